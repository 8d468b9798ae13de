"""Tests for ``engine.estimate.vae``: laws fitted from fake traces of the VAE's own graph.

Fits run on meta-device VAEs (no real memory); each law is checked against a direct fake trace
of the same call at shapes outside the fit set (``TRACE_TOLERANCE``), and one small real CPU
run per direction checks the whole chain against the profiler's allocator records
(``REAL_TOLERANCE``, as in ``tests/test_estimate.py``).
"""
from __future__ import annotations

import pytest
import torch

from engine.config import load_spec
from engine.estimate import FitCache, measure_cpu_peak_bytes
from engine.estimate.vae import VAEMemoryModel, VAEStageMemory
from engine.models.autoencoder import AutoencoderKL
from engine.runtime.autoencode import decode_frames, encode_frames

TRACE_TOLERANCE = 0.02
REAL_TOLERANCE = 0.10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Fits depend on the thread count (oneDNN's choice for small 1x1 convolutions), so fit
    # and run under one; one thread also avoids oversubscribing shared CI cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fits")


@pytest.fixture(scope="module")
def tiny_vae():
    with torch.device("meta"):
        return AutoencoderKL(load_spec("tiny").vae)


@pytest.fixture(scope="module")
def tiny_model(tiny_vae, cache_dir):
    return VAEMemoryModel.for_vae(tiny_vae, cache=FitCache(cache_dir))


# Shapes outside the fit set (which uses 2k-6k latent pixels per call and n <= 4), few calls each.
HELD_OUT = [
    ("decode", 2, 576, 1024, "batched"),
    ("decode", 3, 128, 192, "per-frame"),
    ("decode", 4, 256, 256, "chunk:2"),
    ("decode", 3, 320, 512, "chunk:2"),  # unequal chunks: the last one is smaller
    ("decode", 1, 256, 512, "tile:256x256"),
    ("encode", 2, 576, 1024, "batched"),
    ("encode", 3, 128, 192, "per-frame"),
    ("encode", 4, 256, 256, "chunk:2"),
    ("encode", 2, 256, 512, "chunk:1+tile:256x256"),
]


@pytest.mark.parametrize("direction,frames,height,width,mode", HELD_OUT)
def test_prediction_matches_direct_fake_trace(tiny_model, direction, frames, height, width, mode):
    pred = tiny_model.predict(direction, frames, height, width, mode)
    traced = tiny_model.trace(direction, frames, height, width, mode)
    err = abs(pred.peak_new_bytes - traced.peak_new_bytes) / traced.peak_new_bytes
    assert err <= TRACE_TOLERANCE, (pred, traced.peak_new_bytes)
    flops = tiny_model.flops(direction, frames, height, width, mode)
    assert abs(flops - traced.flops) / traced.flops <= 1e-6


def test_prediction_terms_and_units(tiny_model, tiny_vae):
    pred = tiny_model.predict("decode", 16, 320, 512, "per-frame")
    assert isinstance(pred, VAEStageMemory)
    weights = sum(p.numel() * 4 for p in tiny_vae.parameters())
    assert pred.weights_bytes == weights
    assert pred.input_bytes == 16 * 4 * 40 * 64 * 4  # fp32 latents
    assert pred.allocator_bytes == 0 and pred.workspace_modelled  # CPU
    assert pred.allocated_bytes == (pred.weights_bytes + pred.input_bytes
                                    + pred.activation_bytes + pred.workspace_bytes)
    assert pred.as_dict()["allocated_bytes"] == pred.allocated_bytes
    assert pred.peak_phase  # names where the peak is, for the planner's explanation


def test_ordering_per_frame_chunk_batched(tiny_model):
    for direction in ("decode", "encode"):
        mem = {m: tiny_model.predict(direction, 16, 320, 512, m).activation_bytes
               for m in ("per-frame", "chunk:4", "batched")}
        assert mem["per-frame"] < mem["chunk:4"] < mem["batched"], mem


def test_tiled_below_untiled_at_large_size(tiny_model):
    for direction in ("decode", "encode"):
        tiled = tiny_model.predict(direction, 1, 1024, 1024, "tile:256x256")
        untiled = tiny_model.predict(direction, 1, 1024, 1024, "batched")
        assert tiled.activation_bytes < untiled.activation_bytes


def test_cache_round_trip_loads_without_tracing(tiny_vae, tiny_model, cache_dir, monkeypatch):
    def no_trace(*args, **kwargs):
        raise AssertionError("a cached fit must not trace")
    monkeypatch.setattr("engine.estimate.vae.trace._run_traces", no_trace)
    warm = VAEMemoryModel.for_vae(tiny_vae, cache=FitCache(cache_dir))
    assert {v["source"] for v in warm.report.values()} == {"cache"}
    for direction, frames, height, width, mode in HELD_OUT:
        assert (warm.predict(direction, frames, height, width, mode)
                == tiny_model.predict(direction, frames, height, width, mode))
        assert (warm.flops(direction, frames, height, width, mode)
                == pytest.approx(tiny_model.flops(direction, frames, height, width, mode)))


@pytest.mark.parametrize("direction,mode", [("decode", "per-frame"), ("encode", "chunk:2")])
def test_prediction_matches_real_cpu_peak(tiny_model, direction, mode):
    torch.manual_seed(0)
    vae = AutoencoderKL(load_spec("tiny").vae).eval()
    if direction == "decode":
        x, run = torch.randn(3, 4, 24, 32), decode_frames
    else:
        x, run = torch.randn(3, 3, 192, 256), encode_frames
    with torch.no_grad():
        run(vae, x[:1], "batched")  # one-time lazies are not part of the call's cost
        real = measure_cpu_peak_bytes(lambda: run(vae, x, mode))
    pred = tiny_model.predict(direction, 3, 192, 256, mode)
    assert abs(pred.peak_new_bytes - real) / real <= REAL_TOLERANCE, (pred, real)


def test_cuda_planning_without_a_gpu(tiny_vae, cache_dir):
    model = VAEMemoryModel.for_vae(tiny_vae, device_type="cuda", dtype=torch.float16,
                                   cache=FitCache(cache_dir))
    pred = model.predict("decode", 16, 320, 512, "per-frame")
    assert pred.workspace_bytes == 0 and not pred.workspace_modelled
    assert pred.allocator_bytes >= 0
    assert pred.input_bytes == 16 * 4 * 40 * 64 * 2  # fp16 latents
    traced = model.trace("decode", 2, 320, 512, "per-frame")
    pred2 = model.predict("decode", 2, 320, 512, "per-frame")
    assert abs(pred2.activation_bytes - traced.peak_new_bytes) / traced.peak_new_bytes <= 0.02


def test_full_size_vae_batched_vs_per_frame(cache_dir):
    from engine.models import build_model

    vae = build_model(load_spec("512"), device="meta").first_stage_model
    model = VAEMemoryModel.for_vae(vae, cache=FitCache(cache_dir))
    batched = model.predict("decode", 16, 576, 1024, "batched")
    per_frame = model.predict("decode", 16, 576, 1024, "per-frame")
    # 16 frames' full-resolution activations at once vs one frame plus the output buffer
    assert batched.activation_bytes / per_frame.activation_bytes > 10
    # at least the mid-block score matrix alone: 16 x 9216^2 fp32 = 5.06 GiB
    assert batched.activation_bytes > 16 * 9216 ** 2 * 4
    assert per_frame.activation_bytes < 4 * 2 ** 30


@pytest.mark.parametrize("call,match", [
    (lambda m: m.predict("decoder", 1, 256, 256), "`direction`"),
    (lambda m: m.predict("decode", 1, 250, 256), "`height`"),
    (lambda m: m.predict("decode", 0, 256, 256), "`frames`"),
    (lambda m: m.predict("decode", 1, 256, 256, "tile:100x100"), "`mode`"),
])
def test_bad_arguments_name_the_argument(tiny_model, call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_model)


def test_for_vae_rejects_bad_arguments(tiny_vae):
    with pytest.raises(ValueError, match="`device_type`"):
        VAEMemoryModel.for_vae(tiny_vae, device_type="mps", cache=None)
    with pytest.raises(ValueError, match="`dtype`"):
        VAEMemoryModel.for_vae(tiny_vae, dtype=torch.int8, cache=None)
    with pytest.raises(ValueError, match="`vae`"):
        VAEMemoryModel.for_vae(torch.nn.Linear(2, 2), cache=None)
