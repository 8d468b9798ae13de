"""Fitting the non-VAE stages from a few traces (their cache keys live in :mod:`.keys`).

``denoise`` is fitted per (precision family, attention backends, CFG regime, device type) from two
traces whose batch, frame and latent-pixel ratios are 2, 3 and 5 (see
:mod:`engine.estimate.laws.monomials`). Batch 1 is its own regime: with a size-1 batch, einops'
``(b t) -> b t`` rearranges are views, with two or more they are copies, so the op sequence
differs. ``text_encode`` and the vision tower of ``image_encode`` run at fixed shapes and are
traced directly at each batch they are used with (1 or 2); only the image preprocessing depends
on the resolution, and it is a few ops, traced once per input size and cached like the fits.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from ..laws.monomials import MonomialLaws, derive_laws
from .modules import (Precision, build_stage_modules, clip_image_size, sdpa_kernel, stage_call,
                           use_attention)
from ..tracing.log import TraceLog, trace_log

logger = logging.getLogger(__name__)

# Two traces per regime; ratios 2 (batch), 3 (frames), 5 (latent pixels) identify exponents.
DENOISE_FIT_SHAPES = {
    "b1": ({"b": 1, "f": 2, "h": 16, "w": 16}, {"b": 1, "f": 6, "h": 32, "w": 40}),
    "b2+": ({"b": 2, "f": 2, "h": 16, "w": 16}, {"b": 4, "f": 6, "h": 32, "w": 40}),
}
_MAX_EXPONENTS = {"b": 2, "f": 3, "hw": 2}
# Modules whose weights DynamiCrafter leaves requires_grad=True, so autocast caches their casts.
_GRAD_MODULES = {"denoise": (0,), "image_encode": (1,), "text_encode": ()}


def const_laws(log: TraceLog) -> MonomialLaws:
    """Laws with only a constant term: what one direct trace measured."""
    retained = sum(log.rounded[i] for i in log.alive_at_end)
    return MonomialLaws((), ((),), np.array([[float(log.peak_new_bytes())]]),
                        np.array([float(retained)]), np.array([float(sum(log.op_flops))]),
                        np.array([float(sum(log.moved))]))


def cast_param_bytes(modules: list[nn.Module]) -> int:
    """fp16 bytes of the parameters of ``modules`` (weight and bias), each module counted once."""
    seen: dict[int, int] = {}
    for module in modules:
        for p in module.parameters(recurse=False):
            seen[id(p)] = p.numel() * 2
    return sum(seen.values())


def _trace(stage: str, modules: tuple[nn.Module, ...], shape: dict[str, int], prec: Precision,
           kinds: tuple[str, str], device_type: str) -> tuple[TraceLog, list[nn.Module]]:
    fn, args = stage_call(stage, modules, shape, prec.act_dtype)
    with use_attention(modules[0], kinds):
        return trace_log(fn, args, modules, device=device_type, sdpa_backend=sdpa_kernel(kinds),
                         autocast_dtype=prec.autocast_dtype)


def _features(shape: dict[str, int], regime: str) -> dict[str, float]:
    feats = {"f": shape["f"], "hw": shape["h"] * shape["w"]}
    return {"b": shape["b"], **feats} if regime != "b1" else feats


def fit_stage(spec, stage: str, prec: Precision, kinds: tuple[str, str], regime: str,
              device_type: str, modules: tuple[nn.Module, ...] | None = None
              ) -> tuple[MonomialLaws, dict[str, Any]]:
    """Trace ``stage`` and derive its laws; returns the laws and the metadata stored with them.

    Args:
        spec: the model spec.
        stage: ``denoise``, ``text_encode`` or ``image_encode``.
        prec: the precision regime.
        kinds: ``(spatial, temporal)`` attention backends (denoise only).
        regime: ``b1`` or ``b2+`` for denoise; ``b1``/``b2`` (the batch) for the encoders.
        device_type: the device type to plan for.
        modules: prebuilt modules for ``stage`` in ``prec.weight_dtype`` (built when None).
    """
    start = time.perf_counter()
    modules = modules or build_stage_modules(spec, stage, prec.weight_dtype)
    if stage == "denoise":
        shapes = DENOISE_FIT_SHAPES[regime]
        (la, cast), (lb, _) = (_trace(stage, modules, s, prec, kinds, device_type) for s in shapes)
        fa, fb = _features(shapes[0], regime), _features(shapes[1], regime)
        laws = derive_laws(la, lb, fa, fb, _MAX_EXPONENTS)
        fit_shapes, num_ops = list(shapes), la.num_ops
        ranges = {k: (min(fa[k], fb[k]), max(fa[k], fb[k])) for k in fa}
    else:
        size = clip_image_size(spec)
        shape = {"b": int(regime[1:]), "h": size[0], "w": size[1]}
        log, cast = _trace(stage, modules, shape, prec, kinds, device_type)
        laws, fit_shapes, num_ops, ranges = const_laws(log), [shape], log.num_ops, {}
    if laws.unmatched_fraction > 1e-3:
        logger.warning("%.2f%% of the bytes %s allocates scale like no monomial; its laws were "
                       "fitted to the larger trace", 100 * laws.unmatched_fraction, stage)
    grad = {id(m) for i in _GRAD_MODULES[stage] for m in modules[i].modules()}
    meta = {"features": list(laws.features), "exponents": [list(e) for e in laws.exponents],
            "cast_bytes": cast_param_bytes([m for m in cast if id(m) in grad]),
            "fit_shapes": fit_shapes, "feature_ranges": ranges, "num_ops": num_ops,
            "unmatched_fraction": laws.unmatched_fraction,
            "fit_seconds": time.perf_counter() - start, "torch": torch.__version__}
    logger.info("fitted %s/%s/%s/%s on %s in %.1f s", stage, regime, prec.family, "/".join(kinds),
                device_type, meta["fit_seconds"])
    return laws, meta
