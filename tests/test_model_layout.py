"""Our model's state-dict layout equals DynamiCrafter's, so released checkpoints load strictly.

Reference data: ``tests/data/dynamicrafter_keys_{256,512,1024}.json``, dumped from DynamiCrafter's
own ``LatentVisualDiffusion`` by ``benchmarks/parity/dump_dynamicrafter_keys.py``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from engine.config import BUILTIN_CONFIGS, load_spec
from engine.models import build_model, count_parameters

DATA = Path(__file__).parent / "data"
RESOLUTIONS = ("256", "512", "1024")

# Exact counts, verified against DynamiCrafter's constructors (dynamicrafter-facts.md, section 5).
PARAMS_512 = {"unet": 1_438_854_980, "vae": 83_653_863, "image_proj": 48_787_456,
              "text_encoder": 354_032_641}
ALPHA_SCALARS_256 = 16  # the 256 model's learnable image cross-attention scales


def _reference(name: str) -> dict[str, list[int]]:
    return json.loads((DATA / f"dynamicrafter_keys_{name}.json").read_text())["state_dict"]


def _layout_diff(expected: dict, got: dict, show: int = 10) -> str:
    """A readable report of the first missing, unexpected and mis-shaped keys ('' when equal)."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k}: expected {expected[k]}, got {got[k]}"
              for k in expected if k in got and expected[k] != got[k]]
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            lines.append(f"{len(items)} {title}: " + "; ".join(items[:show]))
    return "\n".join(lines)


@pytest.fixture(scope="module")
def meta_models():
    """The three released architectures, built on the meta device once for the whole module."""
    return {name: build_model(load_spec(name), device="meta") for name in RESOLUTIONS}


@pytest.mark.parametrize("name", RESOLUTIONS)
def test_state_dict_matches_dynamicrafter(meta_models, name):
    expected = _reference(name)
    got = {k: list(v.shape) for k, v in meta_models[name].state_dict().items()}
    diff = _layout_diff(expected, got)
    assert not diff, f"layout of config {name} differs from DynamiCrafter:\n{diff}"


def test_parameter_counts_512(meta_models):
    counts = count_parameters(meta_models["512"])
    assert {k: counts[k] for k in PARAMS_512} == PARAMS_512


def test_parameter_counts_256(meta_models):
    counts = count_parameters(meta_models["256"])
    assert counts["unet"] == PARAMS_512["unet"] + ALPHA_SCALARS_256
    assert {k: counts[k] for k in ("vae", "image_proj", "text_encoder")} == \
        {k: PARAMS_512[k] for k in ("vae", "image_proj", "text_encoder")}


def test_build_1024_on_meta_is_fast():
    start = time.perf_counter()
    build_model(load_spec("1024"), device="meta")
    assert time.perf_counter() - start < 30.0


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(load_spec("tiny"), device="cpu", seed=0)


def test_tiny_unet_forward_shape(tiny_model):
    spec = tiny_model.spec
    b, frames, h, w = 1, 4, 8, 8
    x = torch.randn(b, spec.channels, frames, h, w)
    c_concat = torch.randn(b, spec.channels, frames, h, w)
    # Text tokens then 16 image tokens per frame: the layout the UNet splits per frame.
    context = torch.randn(b, 77 + 16 * frames, spec.unet.context_dim)
    t = torch.tensor([500])
    with torch.no_grad():
        out = tiny_model.apply_model(x, t, c_concat, context, fs=torch.tensor([spec.default_fs]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_tiny_vae_round_trip_shapes(tiny_model):
    vae = tiny_model.first_stage_model
    f = tiny_model.spec.vae.downsample_factor
    image = torch.rand(2, 3, 8 * f, 8 * f) * 2 - 1
    with torch.no_grad():
        z = vae.encode(image).mode()
        recon = vae.decode(z)
    assert z.shape == (2, tiny_model.spec.vae.embed_dim, 8, 8)
    assert recon.shape == image.shape


@pytest.mark.skipif(not os.environ.get("DYNAMICRAFTER_SRC"),
                    reason="set DYNAMICRAFTER_SRC to a DynamiCrafter checkout to compare its configs")
@pytest.mark.parametrize("name", RESOLUTIONS)
def test_original_yaml_gives_our_spec(name):
    original = Path(os.environ["DYNAMICRAFTER_SRC"]) / "configs" / BUILTIN_CONFIGS[name]
    assert original.is_file(), f"{original} not found; is DYNAMICRAFTER_SRC a DynamiCrafter checkout?"
    assert load_spec(original) == load_spec(name)
