"""Tests for ``engine.estimate.unet``: weight bytes, fitted stage laws against direct fake traces,
attention and CFG orderings, and the fit cache.

Fits use the tiny config (two traces per family); direct traces at shapes outside the fit set are
the held-out check, with the brief's tolerance of 2%.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.config import load_spec
from engine.estimate import FitCache, trace_call
from engine.estimate.unet.fits import DENOISE_FIT_SHAPES
from engine.estimate.unet.modules import (attention_family, build_stage_modules, precision_of,
                                          stage_call, use_attention)
from engine.estimate.tracing.log import emulated_autocast
from engine.estimate.unet.weights import weight_inventory
from engine.estimate.unet.estimator import StageEstimator, component_weight_bytes
from engine.estimate.tracing.trace import Tracer

TOL = 0.02
AMP = "fp32-autocast"


@pytest.fixture(scope="module")
def tiny_spec():
    return load_spec("tiny")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fits")


@pytest.fixture(scope="module")
def estimator(tiny_spec, cache_dir):
    return StageEstimator(tiny_spec, "cuda", cache=FitCache(cache_dir))


def _direct(spec, stage, shape, precision, attention="sdpa"):
    """A plain ``trace_call`` of the stage at ``shape`` (independent of the fitting tracer)."""
    prec = precision_of(precision)
    kinds = attention_family(attention, "cuda")
    mods = build_stage_modules(spec, stage, prec.weight_dtype)
    fn, args = stage_call(stage, mods, shape, prec.act_dtype)

    def call(*a):
        if prec.autocast_dtype is None:
            return fn(*a)
        with emulated_autocast("cuda", prec.autocast_dtype):
            return fn(*a)

    with torch.no_grad(), use_attention(mods[0], kinds):
        return trace_call(call, *args, device="cuda")


# -- weights ---------------------------------------------------------------------------------
def test_weight_bytes_512_are_two_bytes_per_parameter_in_fp16():
    from engine.models.lvdm import COMPONENTS, build_model, count_parameters

    spec = load_spec("512")
    params = count_parameters(build_model(spec, device="meta"))
    fp16, fp32 = component_weight_bytes(spec, "fp16"), component_weight_bytes(spec, "fp32-autocast")
    assert set(fp16) == set(COMPONENTS)
    for name in COMPONENTS:
        assert fp16[name] == 2 * params[name], name
        assert fp32[name] == 4 * params[name], name
    assert component_weight_bytes(spec, "bf16") == fp16


@pytest.mark.parametrize("name", ["tiny", "512"])
def test_the_estimators_weight_count_equals_the_whole_containers(name, tmp_path):
    # the estimator counts the stage modules its fits reuse, not a separately built container
    spec = load_spec(name)
    est = StageEstimator(spec, "cuda", cache=FitCache(tmp_path))
    for precision in ("fp16", "fp32"):
        assert est.component_weight_bytes(precision) == component_weight_bytes(spec, precision)


def test_image_encoder_dead_text_parameters_are_counted_apart():
    from engine.models.clip import ImageEncoder

    with torch.device("meta"):
        encoder = ImageEncoder("ViT-H-14")
    inv = weight_inventory({"image_encoder": encoder})
    visual = sum(p.numel() for p in encoder.model.visual.parameters())
    assert inv["image_encoder_dead"]["float"] == 51_723_265
    assert inv["image_encoder"]["float"] == visual + 51_723_265


# -- held-out accuracy -----------------------------------------------------------------------
@pytest.mark.parametrize("b,f,h,w", [(1, 16, 256, 384), (2, 8, 192, 320), (3, 5, 128, 256)])
def test_denoise_estimate_matches_direct_trace_at_unseen_shapes(estimator, tiny_spec, b, f, h, w):
    fit_shapes = [(s["b"], s["f"], s["h"] * 8, s["w"] * 8)
                  for pair in DENOISE_FIT_SHAPES.values() for s in pair]
    assert (b, f, h, w) not in fit_shapes
    est = estimator.estimate("denoise", height=h, width=w, frames=f, precision=AMP,
                             attention="sdpa", cfg_batch=b)
    if b == 3:  # one direct trace for the batch >= 2 regime is enough for the time budget
        return
    ref = _direct(tiny_spec, "denoise", {"b": b, "f": f, "h": h // 8, "w": w // 8}, AMP)
    assert est.activation_bytes == pytest.approx(ref.peak_new_bytes, rel=TOL)
    assert est.retained_bytes == pytest.approx(ref.retained_bytes, rel=TOL)
    assert est.flops == pytest.approx(ref.flops, rel=TOL)
    assert est.bytes_moved == pytest.approx(ref.bytes_moved, rel=TOL)


@pytest.mark.parametrize("stage", ["text_encode", "image_encode"])
def test_encoder_estimates_match_direct_trace(estimator, tiny_spec, stage):
    est = estimator.estimate(stage, height=320, width=512, precision=AMP, cfg_batch=2)
    ref = _direct(tiny_spec, stage, {"b": 2, "h": 320, "w": 512}, AMP)
    assert est.activation_bytes == pytest.approx(ref.peak_new_bytes, rel=TOL)
    assert est.flops == pytest.approx(ref.flops, rel=TOL)
    modules = build_stage_modules(tiny_spec, stage, torch.float32)
    names = {"text_encode": ("text_encoder",), "image_encode": ("image_encoder", "image_proj")}
    assert dict(est.weights_bytes) == {n: 4 * _params(m) for n, m in zip(names[stage], modules)}


def _params(module: nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values())


# -- orderings -------------------------------------------------------------------------------
def test_naive_attention_needs_more_than_sdpa_at_large_resolution(estimator):
    kw = dict(height=512, width=512, frames=16, precision=AMP, cfg_batch=1)
    naive = estimator.estimate("denoise", attention="naive", **kw).activation_bytes
    sdpa = estimator.estimate("denoise", attention="sdpa", **kw).activation_bytes
    chunked = estimator.estimate("denoise", attention="chunked:64", **kw).activation_bytes
    assert naive > 2 * sdpa
    assert sdpa <= chunked < naive


def test_batched_cfg_needs_about_twice_sequential(estimator):
    kw = dict(height=256, width=256, frames=16, precision=AMP, attention="sdpa")
    one = estimator.estimate("denoise", cfg_batch=1, **kw)
    two = estimator.estimate("denoise", cfg_batch=2, **kw)
    assert two.activation_bytes / one.activation_bytes == pytest.approx(2.0, rel=0.05)
    assert two.flops / one.flops == pytest.approx(2.0, rel=0.01)


def test_autocast_weight_cache_term_is_the_fp16_linear_and_conv_parameters(estimator, tiny_spec):
    est = estimator.estimate("denoise", height=256, width=256, precision=AMP, cfg_batch=1)
    unet = build_stage_modules(tiny_spec, "denoise", torch.float32)[0]
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    expected = sum(2 * p.numel() for m in unet.modules() if isinstance(m, kinds)
                   for p in m.parameters(recurse=False))
    assert est.terms["autocast_weight_cache_bytes"] == expected
    half = estimator.estimate("text_encode", height=256, width=256, precision="fp16")
    assert half.terms["autocast_weight_cache_bytes"] == 0  # no autocast, no cache
    assert estimator.component_weight_bytes("fp16")["unet"] * 2 == est.weights_bytes["unet"]


# -- cache -----------------------------------------------------------------------------------
def test_second_estimator_loads_fits_without_tracing(estimator, tiny_spec, cache_dir, monkeypatch):
    kw = dict(height=256, width=384, frames=16, precision=AMP, attention="sdpa", cfg_batch=1)
    first = estimator.estimate("denoise", **kw)

    def refuse(*_a, **_k):
        raise AssertionError("traced although the fit was cached")

    monkeypatch.setattr(Tracer, "__enter__", refuse)
    monkeypatch.setattr("engine.estimate.tracing.trace.trace_call", refuse)
    again = StageEstimator(tiny_spec, "cuda", cache=FitCache(cache_dir))
    assert again.estimate("denoise", **kw) == first
    assert again.fit_seconds == {}


# -- arguments -------------------------------------------------------------------------------
def test_emulated_autocast_casts_fake_cuda_matmuls_to_fp16():
    layer = nn.Linear(8, 8)

    def call(x):
        with emulated_autocast("cuda"):
            return layer(x)

    with torch.no_grad():
        res = trace_call(call, torch.empty(4, 8, device="meta"), device="cuda")
    assert res.peak_new_bytes >= 4 * 8 * 2  # the fp16 output at least
    assert not torch.is_autocast_enabled("cuda")


@pytest.mark.parametrize("kwargs,match", [
    (dict(stage="vae_decode"), "stage"),
    (dict(precision="int8"), "precision"),
    (dict(attention="flash"), "attention"),
    (dict(height=100), "height"),
    (dict(cfg_batch=4), "cfg_batch"),
])
def test_bad_arguments_name_the_argument(estimator, kwargs, match):
    args = dict(stage="denoise", height=256, width=256, precision=AMP, attention="sdpa")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        estimator.estimate(args.pop("stage"), **args)


def test_xformers_on_cpu_is_refused():
    with pytest.raises(ValueError, match="xformers"):
        attention_family("xformers", "cpu")
    assert attention_family("xformers/naive", "cuda") == ("xformers", "naive")
