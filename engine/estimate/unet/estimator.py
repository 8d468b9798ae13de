"""Memory, FLOPs and traffic of the non-VAE stages of a DynamiCrafter run, for the planner.

:class:`StageEstimator` answers ``estimate(stage, height=, width=, frames=, precision=,
attention=, cfg_batch=)`` for ``text_encode``, ``image_encode`` and ``denoise`` (one UNet call) in
well under a millisecond once a fit is loaded. Fits come from fake traces of the real modules
built on the meta device (:mod:`engine.estimate.unet.fits`), two traces per family, and are kept
in the :class:`~engine.estimate.laws.cache.FitCache`; a small index keyed by the spec and the code maps
a spec to its architecture hashes and weight counts, so a warm process builds no model at all.

Example::

    est = StageEstimator(load_spec("1024"), device_type="cuda")
    unet = est.estimate("denoise", height=576, width=1024, frames=16, precision="fp16",
                        attention="sdpa", cfg_batch=2)
    unet.weights_bytes["unet"] + unet.activation_bytes
"""
from __future__ import annotations

import dataclasses
import logging
import time
from types import MappingProxyType
from typing import Iterable, Mapping

import torch

from ..laws.cache import FitCache, architecture_hash
from ..laws.monomials import MonomialLaws
from .fits import const_laws, family_key, fit_stage, spec_digest
from .modules import (attention_family, build_stage_modules, clip_image_size, precision_of,
                           preprocess_call)
from ..tracing.log import trace_log
from .weights import bytes_in, component_weight_bytes, weight_inventory

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "StageEstimate", "StageEstimator", "component_weight_bytes"]

STAGES = ("text_encode", "image_encode", "denoise")
_STAGE_COMPONENTS = {"text_encode": ("text_encoder",), "denoise": ("unet",),
                     "image_encode": ("image_encoder", "image_proj")}


@dataclasses.dataclass(frozen=True)
class StageEstimate:
    """One call of one stage.

    Attributes:
        name: the stage.
        weights_bytes: bytes of each component the stage runs, in the requested precision.
        activation_bytes: peak of the bytes allocated during the call (weights and inputs apart).
        retained_bytes: bytes allocated by the call and still alive when it returns (its output).
        flops: floating-point operations of the call.
        bytes_moved: bytes read and written by its non-view ops (a roofline traffic estimate).
        terms: named extra bytes the planner adds knowingly: ``autocast_weight_cache_bytes``
            (fp16 copies autocast keeps of requires-grad weights for a whole ``fp32-autocast``
            block: DynamiCrafter's own run only) and, for ``image_encode``,
            ``image_encoder_dead_bytes`` (text-tower tensors inside ``weights_bytes`` that a loader
            could drop).
    """

    name: str
    weights_bytes: Mapping[str, int]
    activation_bytes: int
    retained_bytes: int
    flops: int
    bytes_moved: int
    terms: Mapping[str, int] = dataclasses.field(default_factory=dict)


class StageEstimator:
    """Estimates of the non-VAE stages of one model on one device type.

    Args:
        spec: a :class:`~engine.config.ModelSpec` (from :func:`engine.config.load_spec`).
        device_type: the device type to plan for, ``"cuda"`` (planning) or ``"cpu"``.
        cache: where fits live; defaults to ``FitCache()`` (``$ENGINE_CACHE_DIR``).

    Fits are loaded from ``cache`` (milliseconds) or traced the first time a family is asked for
    (seconds; see :meth:`warm`). :attr:`fit_seconds` records the cold fits this instance made.
    """

    def __init__(self, spec, device_type: str = "cuda", *, cache: FitCache | None = None):
        if device_type not in ("cuda", "cpu"):
            raise ValueError(f"`device_type` {device_type!r} is not supported; use 'cuda' or "
                             "'cpu'.")
        self.spec = spec
        self.device_type = device_type
        self.cache = cache if cache is not None else FitCache()
        self.fit_seconds: dict[str, float] = {}
        self._laws: dict[str, tuple[MonomialLaws, dict]] = {}
        self._modules: dict[tuple[str, torch.dtype], tuple] = {}
        self._arch: dict[str, str] = {}
        self._inventory: dict | None = None
        self._pre: dict[tuple, MonomialLaws] = {}

    # -- public -------------------------------------------------------------------------------
    def estimate(self, stage: str, *, height: int, width: int, frames: int | None = None,
                 precision: str = "fp16", attention: str = "sdpa",
                 cfg_batch: int = 1) -> StageEstimate:
        """One call of ``stage`` at the given resolution and settings.

        Args:
            stage: ``text_encode``, ``image_encode`` or ``denoise``.
            height: output video height in pixels (a multiple of the UNet's total downsampling).
            width: output video width in pixels.
            frames: video frames (default: the model's ``temporal_length``); denoise only.
            precision: ``fp32-autocast``, ``fp16``, ``bf16`` or ``fp32``.
            attention: ``naive``, ``sdpa``, ``xformers``, ``chunked:N`` or ``SPATIAL/TEMPORAL``
                (``xformers/naive`` is DynamiCrafter's own run); denoise only.
            cfg_batch: CFG branches run in one call: 1 (sequential or no CFG), 2 (batched CFG),
                3 (batched multi-condition CFG). The encoders take ``min(cfg_batch, 2)`` inputs
                (prompt + empty prompt; image + zero image).
        """
        frames = self.spec.frames if frames is None else frames
        self._validate(stage, height, width, frames, cfg_batch)
        if stage == "denoise":
            return self._denoise(height, width, frames, precision, attention, cfg_batch)
        return self._encoder(stage, height, width, precision, min(cfg_batch, 2))

    def warm(self, families: Iterable[tuple[str, str]] = (("fp16", "sdpa"),), *,
             cfg_batches: Iterable[int] = (1, 2), stages: Iterable[str] = STAGES
             ) -> dict[str, float]:
        """Load or fit every family now; return the seconds each took, by cache key.

        Args:
            families: ``(precision, attention)`` pairs.
            cfg_batches: CFG batch sizes to prepare (1 and 2 cover batch 1 and batch >= 2).
            stages: the stages to prepare.
        """
        h, w = self.spec.default_height_width
        took = {}
        for precision, attention in families:
            for stage in stages:
                for b in cfg_batches:
                    start = time.perf_counter()
                    self.estimate(stage, height=h, width=w, precision=precision,
                                  attention=attention, cfg_batch=b)
                    took[f"{stage}/{precision}/{attention}/b{b}"] = time.perf_counter() - start
        return took

    def component_weight_bytes(self, precision: str) -> dict[str, int]:
        """:func:`component_weight_bytes` from the cached inventory (no model build when warm)."""
        inv = self._weights()
        return {name: bytes_in(counts, precision) for name, counts in inv.items()
                if name != "image_encoder_dead"}

    # -- stages -------------------------------------------------------------------------------
    def _validate(self, stage: str, height: int, width: int, frames: int, cfg_batch: int) -> None:
        if stage not in STAGES:
            raise ValueError(f"`stage` {stage!r} is not a non-VAE stage; use one of "
                             f"{', '.join(STAGES)} (VAE stages live in engine.estimate.vae).")
        p = self.spec.unet
        step = self.spec.vae.downsample_factor * 2 ** (len(p.channel_mult) - 1)
        if height <= 0 or width <= 0 or height % step or width % step:
            raise ValueError(f"`height`/`width` {height}x{width} must be positive multiples of "
                             f"{step} (the UNet's total downsampling); round the resolution.")
        if frames < 1 or cfg_batch not in (1, 2, 3):
            raise ValueError(f"`frames` ({frames}) must be >= 1 and `cfg_batch` ({cfg_batch}) one "
                             "of 1, 2, 3; pass 1 for sequential CFG.")
        if frames == 1 and stage == "denoise":
            from ...logs import warn_once  # once per process: every plan re-estimates denoise
            warn_once(logger, "frames=1 lies outside the traced regime (frames >= 2); size-1 frame "
                      "dimensions may take other copy paths")

    def _denoise(self, height, width, frames, precision, attention, b) -> StageEstimate:
        kinds = attention_family(attention, self.device_type)
        prec = precision_of(precision)
        laws, meta = self._family("denoise", precision, kinds, "b1" if b == 1 else "b2+")
        f = self.spec.vae.downsample_factor
        v = laws.evaluate({"b": b, "f": frames, "hw": (height // f) * (width // f)})
        cache = meta["cast_bytes"] if prec.autocast_dtype is not None else 0
        return self._result("denoise", precision, v, {"autocast_weight_cache_bytes": cache})

    def _encoder(self, stage, height, width, precision, b) -> StageEstimate:
        prec = precision_of(precision)
        laws, meta = self._family(stage, precision, ("sdpa", "sdpa"), f"b{b}")
        v = laws.evaluate({})
        terms = {"autocast_weight_cache_bytes": meta["cast_bytes"] if prec.autocast_dtype else 0}
        if stage == "image_encode":
            # The tower was traced at its own input size; swap in the preprocessing at this one.
            own = clip_image_size(self.spec)
            pre, pre_own = (self._preprocess(prec, b, hh, ww).evaluate({})
                            for hh, ww in ((height, width), own))
            v["peak"] = max(v["peak"], pre["peak"])
            v["flops"] += pre["flops"] - pre_own["flops"]
            v["moved"] += pre["moved"] - pre_own["moved"]
            terms["image_encoder_dead_bytes"] = bytes_in(self._weights()["image_encoder_dead"],
                                                          precision)
        return self._result(stage, precision, v, terms)

    def _result(self, stage, precision, v, terms) -> StageEstimate:
        weights = self.component_weight_bytes(precision)
        return StageEstimate(
            name=stage,
            weights_bytes=MappingProxyType({c: weights[c] for c in _STAGE_COMPONENTS[stage]}),
            activation_bytes=int(round(v["peak"])), retained_bytes=int(round(v["retained"])),
            flops=int(round(v["flops"])), bytes_moved=int(round(v["moved"])),
            terms=MappingProxyType({k: int(x) for k, x in terms.items()}))

    # -- fits and cache -----------------------------------------------------------------------
    def _stage_modules(self, stage: str, dtype: torch.dtype) -> tuple:
        if (stage, dtype) not in self._modules:
            self._modules[(stage, dtype)] = build_stage_modules(self.spec, stage, dtype)
        return self._modules[(stage, dtype)]

    def _arch_hash(self, stage: str) -> str:
        """The stage's architecture hash, from the spec-keyed index or by building it on meta."""
        if stage not in self._arch:
            key = f"stages-index-{spec_digest(self.spec, stage)}"
            fit = self.cache.get_fit(key)
            arch = fit.sections.get("arch") if fit is not None else None
            if arch is None:
                mods = self._stage_modules(stage, torch.float32)
                arch = architecture_hash(torch.nn.ModuleList(mods), stage)
                self.cache.put_fit(key, arch=arch)
            self._arch[stage] = arch
        return self._arch[stage]

    def _family(self, stage, precision, kinds, regime) -> tuple[MonomialLaws, dict]:
        prec = precision_of(precision)
        key = family_key(stage, self._arch_hash(stage), prec.family, kinds, regime,
                         self.device_type)
        if key not in self._laws:
            fit = self.cache.get_fit(key)
            if fit is not None and fit.laws:
                meta = dict(fit.meta)
                fitted = MonomialLaws.from_laws(dict(fit.laws), meta["features"],
                                                meta["exponents"], meta["unmatched_fraction"])
            else:
                mods = self._stage_modules(stage, prec.weight_dtype)
                fitted, meta = fit_stage(self.spec, stage, prec, kinds, regime, self.device_type,
                                         mods)
                self.cache.put_fit(key, laws=fitted.to_laws(meta["feature_ranges"]), meta=meta)
                self.fit_seconds[key] = meta["fit_seconds"]
            self._laws[key] = (fitted, meta)
        return self._laws[key]

    def _preprocess(self, prec, b: int, height: int, width: int) -> MonomialLaws:
        key = (prec.family, b, height, width)
        if key not in self._pre:
            fn, args = preprocess_call(self.spec, b, height, width, prec.act_dtype)
            log, _ = trace_log(fn, args, (), device=self.device_type,
                               autocast_dtype=prec.autocast_dtype)
            self._pre[key] = const_laws(log)
        return self._pre[key]

    def _weights(self) -> dict:
        if self._inventory is None:
            key = f"stages-weights-{spec_digest(self.spec, 'weights')}"
            fit = self.cache.get_fit(key)
            inventory = fit.sections.get("inventory") if fit is not None else None
            if inventory is None:
                from ...models.lvdm import COMPONENTS, build_model

                model = build_model(self.spec, device="meta")
                inventory = weight_inventory({n: model.component(n) for n in COMPONENTS})
                self.cache.put_fit(key, inventory=inventory)
            self._inventory = inventory
        return self._inventory
