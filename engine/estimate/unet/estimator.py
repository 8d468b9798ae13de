"""Memory, FLOPs and traffic of the non-VAE stages of a DynamiCrafter run, for the planner.

:class:`StageEstimator` answers ``estimate(stage, height=, width=, frames=, precision=,
attention=, cfg_batch=)`` for ``text_encode``, ``image_encode`` and ``denoise`` (one UNet call) in
well under a millisecond once a fit is loaded. Fits come from fake traces of the real modules
built on the meta device (:mod:`engine.estimate.unet.fits`), two traces per family, and are kept
in the :class:`~engine.estimate.laws.cache.FitCache`; a small index keyed by the spec and the code maps
a spec to its architecture hashes and weight counts, so a warm process builds no model at all.
Torch is imported only on a cache miss: a warm estimate reads JSON and multiplies numbers.

Example::

    est = StageEstimator(load_spec("1024"), device_type="cuda")
    unet = est.estimate("denoise", height=576, width=1024, frames=16, precision="fp16",
                        attention="sdpa", cfg_batch=2)
    unet.weights_bytes["unet"] + unet.activation_bytes
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from types import MappingProxyType
from typing import Any, Callable, ContextManager, Iterable, Mapping

from ..laws.cache import FitCache
from ..laws.monomials import MonomialLaws
from .keys import family_key, preprocess_key, spec_digest
from .precision import Precision, attention_family, precision_of
from .weights import bytes_in, component_weight_bytes, weight_inventory

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "StageEstimate", "StageEstimator", "component_weight_bytes"]

STAGES = ("text_encode", "image_encode", "denoise")
_LABELS = {"text_encode": "text encoder", "image_encode": "image encoder", "denoise": "UNet"}
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
        progress: called with a description of each cold fit before it runs; the context
            manager it returns is held while the fit runs (a progress bar, a log line).

    Fits are loaded from ``cache`` (milliseconds) or traced the first time a family is asked for
    (seconds; see :meth:`warm`). :attr:`fit_seconds` records the cold fits this instance made.
    """

    def __init__(self, spec, device_type: str = "cuda", *, cache: FitCache | None = None,
                 progress: Callable[[str], ContextManager[Any]] | None = None):
        if device_type not in ("cuda", "cpu"):
            raise ValueError(f"`device_type` {device_type!r} is not supported; use 'cuda' or "
                             "'cpu'.")
        self.spec = spec
        self.device_type = device_type
        self.cache = cache if cache is not None else FitCache()
        self.fit_seconds: dict[str, float] = {}
        self._progress = progress or (lambda what: contextlib.nullcontext())
        self._laws: dict[str, tuple[MonomialLaws, dict]] = {}
        self._modules: dict[str, tuple] = {}  # stage -> its meta modules, in the last dtype asked
        self._index: dict[str, dict[str, Any]] = {}
        self._inventory: dict | None = None

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
        prec, kinds, regime = self._family_of("denoise", precision, attention, b)
        laws, meta = self._family("denoise", prec, kinds, regime)
        f = self.spec.vae.downsample_factor
        v = laws.evaluate({"b": b, "f": frames, "hw": (height // f) * (width // f)})
        cache = meta["cast_bytes"] if prec.autocast is not None else 0
        return self._result("denoise", precision, v, {"autocast_weight_cache_bytes": cache})

    def _encoder(self, stage, height, width, precision, b) -> StageEstimate:
        prec, kinds, regime = self._family_of(stage, precision, "sdpa", b)
        laws, meta = self._family(stage, prec, kinds, regime)
        v = laws.evaluate({})
        terms = {"autocast_weight_cache_bytes": meta["cast_bytes"] if prec.autocast else 0}
        if stage == "image_encode":
            # The tower was traced at its own input size; swap in the preprocessing at this one.
            own = tuple(self._stage_index("image_encode")["image_size"])
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
    def _stage_modules(self, stage: str, prec: Precision) -> tuple:
        """The stage's modules on the meta device in ``prec``'s weight dtype, built once per
        process: the weight count, the architecture hash and every fit of the stage share them
        (a meta module changes dtype in milliseconds; building the UNet or a CLIP tower again
        costs a fifth of a second or more)."""
        from .modules import build_stage_modules

        mods = self._modules.get(stage)
        if mods is None:
            mods = self._modules[stage] = build_stage_modules(self.spec, stage, prec.weight_dtype)
        dtype = prec.weight_dtype
        if next(mods[0].parameters()).dtype != dtype:
            for module in mods:
                module.to(dtype)
        return mods

    def _components(self) -> dict:
        """Every component by its public name, from the stage modules (which the fits reuse)
        and a meta VAE: the same modules :func:`engine.models.lvdm.build_model` assembles."""
        import torch

        from ...models.autoencoder import AutoencoderKL

        fp32 = precision_of("fp32")
        (wrapper,) = self._stage_modules("denoise", fp32)
        (text,) = self._stage_modules("text_encode", fp32)
        image, resampler = self._stage_modules("image_encode", fp32)
        with torch.device("meta"):
            vae = AutoencoderKL(self.spec.vae)
        return {"unet": wrapper.diffusion_model, "vae": vae, "text_encoder": text,
                "image_encoder": image, "image_proj": resampler}

    def _stage_index(self, stage: str) -> dict[str, Any]:
        """The stage's architecture hash (and the image tower's input size), from the spec-keyed
        index or, on a miss, by building the stage on the meta device."""
        if stage not in self._index:
            key = f"stages-index-{spec_digest(self.spec, stage)}"
            fit = self.cache.get_fit(key)
            entry = dict(fit.sections) if fit is not None else {}
            if "arch" not in entry or (stage == "image_encode" and "image_size" not in entry):
                with self._progress(f"{_LABELS[stage]}: architecture on the meta device"):
                    entry = self._build_index(stage)
                self.cache.put_fit(key, **entry)
            self._index[stage] = entry
        return self._index[stage]

    def _build_index(self, stage: str) -> dict[str, Any]:
        import torch

        from ..laws.cache import architecture_hash
        from .modules import clip_image_size

        mods = self._stage_modules(stage, precision_of("fp32"))
        entry: dict[str, Any] = {"arch": architecture_hash(torch.nn.ModuleList(mods), stage)}
        if stage == "image_encode":
            entry["image_size"] = list(clip_image_size(self.spec))
        return entry

    def is_fitted(self, stage: str, *, precision: str = "fp16", attention: str = "sdpa",
                  cfg_batch: int = 1) -> bool:
        """Whether the laws :meth:`estimate` would read for these settings are in the cache
        (read from disk only: no torch, no build)."""
        arch = self._index.get(stage, {}).get("arch")
        if arch is None:
            index = self.cache.get_fit(f"stages-index-{spec_digest(self.spec, stage)}")
            if index is None or "arch" not in index.sections:
                return False
            arch = index.sections["arch"]
        prec, kinds, regime = self._family_of(stage, precision, attention, cfg_batch)
        key = family_key(stage, arch, prec.family, kinds, regime, self.device_type)
        if key in self._laws:  # loaded in this process
            return True
        fit = self.cache.get_fit(key)
        return fit is not None and bool(fit.laws)

    def _family_of(self, stage: str, precision: str, attention: str, cfg_batch: int):
        """(precision, attention backends, batch regime) of the laws a call is estimated from."""
        if stage == "denoise":
            return (precision_of(precision), attention_family(attention, self.device_type),
                    "b1" if cfg_batch == 1 else "b2+")
        return precision_of(precision), ("sdpa", "sdpa"), f"b{min(cfg_batch, 2)}"

    def _family(self, stage, prec: Precision, kinds, regime) -> tuple[MonomialLaws, dict]:
        key = family_key(stage, self._stage_index(stage)["arch"], prec.family, kinds, regime,
                         self.device_type)

        def fit():
            from .fits import fit_stage

            mods = self._stage_modules(stage, prec)
            return fit_stage(self.spec, stage, prec, kinds, regime, self.device_type, mods)

        what = f"{_LABELS[stage]} laws, batch {regime.lstrip('b')} ({prec.family}, {'/'.join(kinds)})"
        return self._cached_laws(key, what, fit)

    def _preprocess(self, prec: Precision, b: int, height: int, width: int) -> MonomialLaws:
        key = preprocess_key(self.spec, prec.family, b, height, width, self.device_type)

        def fit():
            from ..tracing.log import trace_log
            from .fits import const_laws
            from .modules import preprocess_call

            fn, args = preprocess_call(self.spec, b, height, width, prec.act_dtype)
            log, _ = trace_log(fn, args, (), device=self.device_type,
                               autocast_dtype=prec.autocast_dtype)
            laws = const_laws(log)
            return laws, {"features": [], "exponents": [[]], "unmatched_fraction": 0.0,
                          "feature_ranges": {}, "num_ops": log.num_ops}

        what = f"image preprocessing at {height}x{width}, batch {b} ({prec.family})"
        return self._cached_laws(key, what, fit)[0]

    def _cached_laws(self, key: str, what: str,
                     fit: Callable[[], tuple[MonomialLaws, dict]]) -> tuple[MonomialLaws, dict]:
        """Laws under ``key``: in this process, else in the cache, else fitted (and stored)."""
        if key not in self._laws:
            found = self._load_laws(key)
            if found is None:
                with self._progress(what), self.cache.fitting(key):
                    found = self._load_laws(key)  # fitted meanwhile by another process
                    if found is None:
                        found = fit()
                        laws, meta = found
                        self.cache.put_fit(key, laws=laws.to_laws(meta["feature_ranges"]), meta=meta)
                        if "fit_seconds" in meta:
                            self.fit_seconds[key] = meta["fit_seconds"]
            self._laws[key] = found
        return self._laws[key]

    def _load_laws(self, key: str) -> tuple[MonomialLaws, dict] | None:
        found = self.cache.get_fit(key)
        if found is None or not found.laws:
            return None
        meta = dict(found.meta)
        return MonomialLaws.from_laws(dict(found.laws), meta["features"], meta["exponents"],
                                      meta["unmatched_fraction"]), meta

    def _weights(self) -> dict:
        if self._inventory is None:
            key = f"stages-weights-{spec_digest(self.spec, 'weights')}"
            fit = self.cache.get_fit(key)
            inventory = fit.sections.get("inventory") if fit is not None else None
            if inventory is None:
                with self._progress("weights of every component on the meta device"):
                    inventory = weight_inventory(self._components())
                self.cache.put_fit(key, inventory=inventory)
            self._inventory = inventory
        return self._inventory
