"""The estimators one plan needs, bundled per (model, device) and cached in-process.

Everything here answers in microseconds once the fits are on disk: the stage laws
(:mod:`engine.estimate.unet`), the VAE memory laws (:mod:`engine.estimate.vae`), an
autoencoding time model (calibrated on this machine when a calibration is cached, otherwise
derived from the device's FLOP rate), and the device overhead terms.

With the fits cached, a plan imports no torch and traces nothing: every number a model build
would give (weight bytes, offload blocks, VAE fits and weights, the image tower's input size) is
kept in the fit cache under keys computed from the spec and file digests of the code. Torch is
imported only on a miss, and the first plan of an architecture shows what it fits on stderr.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from .costs import DeviceTerms
from ..device.spec import GIB, DeviceSpec

log = logging.getLogger(__name__)

# Not measurable without the card: used only when no probe measurement exists, and reported in
# every plan's assumptions. A CUDA context with cuBLAS/cuDNN loaded occupies hundreds of MiB.
ASSUMED_CUDA_CONTEXT = GIB // 2
ASSUMED_PER_CALL_S = 2e-3  # kernel launches of one VAE call on a GPU we cannot time


@dataclass(frozen=True)
class StageWork:
    """What the planner reads from any stage estimate."""

    activation_bytes: int
    flops: float
    bytes_moved: float
    allocator_bytes: int = 0
    mode: object = None
    time_s: float | None = None
    overhead_s: float = 0.0  # of ``time_s``: its calls' fixed cost, as the time model has it
    time_measured: bool = False  # ``time_s`` is from a time model measured on this device


def _dtype_name(precision: str) -> str:
    """The weight dtype a precision is sized at (bf16 bytes equal fp16 bytes)."""
    return "float32" if precision in ("fp32", "fp32-autocast") else "float16"


def timed_dtype(precision: str, device_kind: str):
    """The dtype the VAE of ``precision`` computes in on ``device_kind``, which its measured time
    model is stored under: fp32-autocast runs the convolutions in fp16 on a card and in fp32 on
    the CPU (``engine.runtime.precision.precision_context``), bf16 in bf16."""
    import torch

    if precision == "fp32-autocast":
        return torch.float16 if device_kind == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else sized_dtype(precision)


def sized_dtype(precision: str):
    """The torch dtype the planner sizes ``precision`` in, and looks its measured VAE times up
    under (bf16 as fp16: the same bytes; :func:`engine.runtime.precision.weight_dtype` is what
    the run stores)."""
    import torch  # the cold paths only

    return getattr(torch, _dtype_name(precision))


# The fits a default plan of one architecture asks for on a cold cache: three stage indices, the
# weight inventory, the two encoders (CFG batch), the UNet step at batch 1 and 2+, the image
# preprocessing at the run's size and the tower's own, the VAE and the offload blocks. Only the
# progress bar's length: a forced plan may fit fewer or more.
_DEFAULT_FITS = 12


class _FitProgress:
    """One progress bar on stderr over the fits a cold plan makes (each once per architecture).

    stdout stays clean (``--json``). Opened at the first cold fit; :meth:`close` ends it.
    """

    def __init__(self, spec, device_type: str, cache_dir: Path) -> None:
        self.spec, self.device_type, self.cache_dir = spec, device_type, cache_dir
        self._bar = None

    @contextlib.contextmanager
    def __call__(self, what: str):
        if self._bar is None:
            from ..logs import progress_bar

            home = str(Path.home())
            where = str(self.cache_dir)
            where = "~" + where[len(home):] if where.startswith(home + "/") else where
            print(f"engine: fitting memory laws for {self.spec.name} ({self.device_type}): once per "
                  f"architecture, cached in {where}", file=sys.stderr, flush=True)
            self._bar = progress_bar(total=_DEFAULT_FITS, file=sys.stderr, unit="fit", desc="fitting",
                             bar_format="{desc} {n_fmt}/{total_fmt} |{bar:20}| {elapsed}{postfix}")
        bar = self._bar
        bar.total = max(bar.total, bar.n + 1)
        bar.set_postfix_str(what)
        try:
            yield
        finally:
            bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.total = self._bar.n
            self._bar.set_postfix_str("done")
            self._bar.close()
            self._bar = None


class _Remembering:
    """``model`` whose prediction ``methods`` remember their answers. A plan puts the same
    questions (direction, frames, size, mode) to the AE models for every candidate setting, with
    only the budget changing, so each is answered once per process."""

    def __init__(self, model, methods: tuple[str, ...]) -> None:
        self._model = model
        for name in methods:
            if callable(getattr(model, name, None)):
                setattr(self, name, functools.lru_cache(maxsize=4096)(getattr(model, name)))

    def __getattr__(self, name: str):
        return getattr(self._model, name)


_BUNDLES: dict = {}


def forget_vae_time_models() -> None:
    """Make this process's next plans look the VAE time models up again (a run measured one)."""
    for bundle in list(_BUNDLES.values()):  # a copy: another thread may be adding a bundle
        bundle._vae_time.clear()
        bundle._ae_choices.clear()
    Estimators._ae_models.cache_clear()


class Estimators:
    """Stage, VAE-memory and VAE-time models for one spec on one device."""

    def __init__(self, spec, device: DeviceSpec):
        from ..estimate.laws.cache import FitCache
        from ..estimate.unet import StageEstimator

        self.spec, self.device = spec, device
        self.device_type = "cpu" if device.kind == "cpu" else "cuda"
        self._cache = FitCache()
        self._progress = _FitProgress(spec, self.device_type, self._cache.root)
        self.stages = StageEstimator(spec, device_type=self.device_type, cache=self._cache,
                                     progress=self._progress)
        self._vae_memory, self._vae_time, self._notes = {}, {}, []
        self._ae_choices: dict[tuple, StageWork] = {}

    @classmethod
    def for_spec(cls, spec, device: DeviceSpec) -> Estimators:
        """One bundle per (config file, device) in this process: warm plans reuse loaded fits."""
        key = (spec.source, spec.name, device)
        if key not in _BUNDLES:
            _BUNDLES[key] = cls(spec, device)
        return _BUNDLES[key]

    # -- weights and device terms -----------------------------------------------------------
    def weights(self, precision: str) -> dict[str, int]:
        return self.stages.component_weight_bytes("fp32" if precision == "fp32-autocast" else precision)

    @functools.lru_cache(maxsize=4)
    def block_resident_bytes(self, precision: str) -> int:
        """Block offload keeps at most two consecutive UNet units on the device."""
        from ..estimate.laws.cache import code_digest

        dtype = _dtype_name(precision)
        digest = hashlib.sha256(f"{self.spec.unet!r}|{dtype}|".encode()
                                + code_digest("models/*.py", "runtime/offload_units.py").encode())
        key = f"offload-blocks-{dtype}-{digest.hexdigest()[:24]}"
        fit = self._cache.get_fit(key)
        units = fit.sections.get("block_units") if fit is not None else None
        if units is None:
            from ..runtime.offload_units import offload_units

            with self._progress(f"UNet offload blocks ({dtype})"):
                blocks = offload_units(self._meta_model(), "block", sized_dtype(precision))
                units = [b for _, b in blocks]
            self._cache.put_fit(key, block_units=units)
        units = [b for b in units if b > 0]
        return max((a + b for a, b in zip(units, units[1:])), default=sum(units))

    @functools.lru_cache(maxsize=1)
    def _meta_model(self):
        import torch

        from ..models.unet import UNetModel

        with torch.device("meta"):
            return UNetModel(self.spec.unet)

    def device_terms(self) -> DeviceTerms:
        if self.device.kind == "cpu":
            return DeviceTerms(0, True)
        measured = getattr(self.device, "context_bytes", None)
        return DeviceTerms(measured or ASSUMED_CUDA_CONTEXT, measured is not None)

    def carried_bytes(self, w) -> int:
        """Latents, conditioning and noise alive across stages (fp32; small next to weights)."""
        f = self.spec.vae.downsample_factor
        latent = 4 * w.frames * (w.height // f) * (w.width // f) * 4
        context = (77 + 16 * w.frames) * self.spec.unet.context_dim * 4 * (2 if w.guidance else 1)
        return 3 * latent + context  # x, c_concat, noise

    def autocast_cache_bytes(self) -> int:
        e = self.stages.estimate("denoise", height=self.spec.default_height_width[0],
                                 width=self.spec.default_height_width[1], frames=self.spec.frames,
                                 precision="fp32-autocast", attention="xformers/naive", cfg_batch=1)
        return int(e.terms.get("autocast_weight_cache_bytes", 0))

    # -- stages ------------------------------------------------------------------------------
    def stage(self, name: str, *, height, width, frames, precision, attention, cfg_batch, guidance) -> StageWork:
        # the encoders run the prompt and the empty prompt (the image and the zero image) together
        batch = cfg_batch if name == "denoise" else (2 if guidance else 1)
        attention = attention if name == "denoise" else "sdpa"  # CLIP has its own attention
        e = self.stages.estimate(name, height=height, width=width, frames=frames,
                                 precision=precision, attention=attention, cfg_batch=batch)
        return StageWork(e.activation_bytes, e.flops, e.bytes_moved)

    def vae_dtype(self, precision: str) -> str:
        """The dtype the VAE laws of ``precision`` are fitted in (bf16 bytes equal fp16 bytes)."""
        return _dtype_name(precision)

    def vae_fitted(self, precision: str) -> bool:
        """Whether the VAE laws of ``precision`` are loaded or in the cache (read without torch;
        loaded when found)."""
        from ..estimate.vae import VAEMemoryModel
        from ..estimate.vae.keys import index_key

        dtype = _dtype_name(precision)
        if dtype not in self._vae_memory:
            model = VAEMemoryModel.from_index(index_key(self.spec.vae, dtype, self.device_type),
                                              cache=self._cache)
            if model is None:
                return False
            self._vae_memory[dtype] = model
        return True

    def silence(self, progress) -> None:
        """Report cold fits through ``progress`` instead of the progress bar (a helper process)."""
        self._progress = progress
        self.stages._progress = progress

    def vae_memory(self, precision: str):
        """The VAE memory model of ``precision``: loaded from the cache, else fitted."""
        from ..estimate.vae import VAEMemoryModel
        from ..estimate.vae.keys import index_key

        dtype = _dtype_name(precision)
        if not self.vae_fitted(precision):
            index = index_key(self.spec.vae, dtype, self.device_type)
            # each family under its own lock: a helper process may be fitting some of them
            # (see :mod:`engine.planner.fit_ahead`)
            with self._progress(f"VAE encode and decode laws ({dtype})"):
                self._vae_memory[dtype] = VAEMemoryModel.for_vae(
                    self._meta_vae(), device_type=self.device_type, dtype=sized_dtype(precision),
                    cache=self._cache, index_key=index)
        return self._vae_memory[dtype]

    @functools.lru_cache(maxsize=1)
    def _meta_vae(self):
        from ..models.autoencoder import AutoencoderKL
        import torch

        with torch.device("meta"):
            return AutoencoderKL(self.spec.vae)

    def _time_model(self, precision: str):
        from ..estimate.timing import AETimeModel

        known = self._vae_time.get(precision)  # read once: a run in another thread may clear the dict
        if known is not None:
            return known
        if self.device.source == "probe":
            # one measured on this very device (its first calibrating run, `engine probe --calibrate`)
            where = "cpu" if self.device.kind == "cpu" else "cuda"
            try:
                found = AETimeModel.cached(self._meta_vae(), device=where,
                                           dtype=timed_dtype(precision, self.device_type))
            except (RuntimeError, AssertionError):  # the device is not reachable from this process
                found = None
            if found is not None:
                self._notes.append("VAE times calibrated on this device")
                return self._vae_time.setdefault(precision, found)
        # autocast runs the convolutions in fp16: the fp16 rate applies to it too
        half = precision != "fp32" and self.device.kind == "cuda"
        rate = (self.device.fp16_flops if half else self.device.fp32_flops) or \
            self.device.fp16_flops or self.device.fp32_flops
        if not rate:
            raise ValueError(f"`device` {self.device.name!r} has no measured or catalogued throughput; "
                             "probe it with measurements (engine probe) or plan with --gpu NAME.")
        paper = AETimeModel.from_flops(
            rate, ASSUMED_PER_CALL_S if self.device.kind == "cuda" else 0.0,
            flop_terms=self._vae_flop_terms(precision), bandwidth_bytes_per_s=self.device.mem_bandwidth,
            dtype_bytes=4 if precision in ("fp32", "fp32-autocast") else 2, device=self.device.name)
        return self._vae_time.setdefault(precision, paper)

    def _vae_flop_terms(self, precision: str) -> dict:
        """Per-frame FLOPs as ``a*hw + b*hw^2`` over latent pixels, read off the VAE memory
        model's FLOP laws at two sizes (no extra trace)."""
        f, mem, terms = self.spec.vae.downsample_factor, self.vae_memory(precision), {}
        for direction in ("decode", "encode"):
            (h1, y1), (h2, y2) = [(s * s, mem.flops(direction, 1, s * f, s * f, "batched")) for s in (16, 64)]
            b = (y2 / h2 - y1 / h1) / (h2 - h1)
            terms[direction] = (y1 / h1 - b * h1, b)
        return terms

    @functools.lru_cache(maxsize=8)
    def _ae_models(self, precision: str) -> dict:
        """The AE memory and time models of ``precision``, remembering their predictions."""
        return {"memory_model": _Remembering(self.vae_memory(precision), ("predict", "flops")),
                "time_model": _Remembering(self._time_model(precision), ("predict", "breakdown"))}

    def autoencode(self, direction, frames, height, width, precision, *, forced, budget_bytes,
                   resident_bytes) -> StageWork:
        """The AE planner's choice (or the forced mode's prediction) as a :class:`StageWork`."""
        from ..planner.autoencode import InfeasibleBudget, force_mode, plan_autoencoding

        asked = (direction, frames, height, width, precision, forced, budget_bytes, resident_bytes)
        if asked in self._ae_choices:  # a repeated plan asks again
            return self._ae_choices[asked]
        vae_weights = self.vae_memory(precision).weights_bytes
        # the AE memory model counts the VAE's own weights and input; the planner's resident
        # bytes include the VAE weights, so they are taken out here and added back below
        args = dict(budget_bytes=max(1, budget_bytes), resident_bytes=max(0, resident_bytes - vae_weights),
                    **self._ae_models(precision), downsample=self.spec.vae.downsample_factor)
        try:
            choice = (force_mode(direction, frames, height, width, forced, **args) if forced
                      else plan_autoencoding(direction, frames, height, width, **args))
        except InfeasibleBudget as exc:  # report the least-memory mode; the caller rejects the plan
            choice = force_mode(direction, frames, height, width, exc.mode, **args)
        act = choice.allocated_bytes - vae_weights  # input + activations + workspace
        measured = self._time_model(precision).source == "measured"
        work = StageWork(act, choice.flops, 0.0, choice.allocator_bytes, choice.mode, choice.time_s,
                         choice.overhead_s, measured)
        self._ae_choices[asked] = work
        return work

    def fits_done(self) -> None:
        """End the progress bar of a cold plan's fits (a plan that fails ends it too, so that its
        error starts on a line of its own)."""
        self._progress.close()

    def assumptions(self) -> list[str]:
        """What the plan assumed (asked for once every stage is estimated)."""
        notes = list(dict.fromkeys(self._notes))
        vae_measured = any(model.source == "measured" for model in self._vae_time.values())
        if self.device.kind == "cuda":
            t = self.device_terms()
            if not t.context_measured:
                notes.append(f"CUDA context not measured on this card: {ASSUMED_CUDA_CONTEXT / GIB:.2f} GiB "
                             "assumed (run `engine probe` on the card to measure it)")
            notes.append("allocator: per-stage reserved = allocated + segment rounding; cached blocks "
                         "carried between stages when the cache is not emptied (upper bound)")
            if not vae_measured:
                how = ("the first run planned here times the VAE, as does `engine probe --calibrate CONFIG`"
                       if self.device.source == "probe" else "time the VAE with `engine probe --calibrate "
                       "CONFIG` on the card and plan for the probed card")
                notes.append(f"VAE calls: {ASSUMED_PER_CALL_S * 1e3:.0f} ms launch overhead each assumed ({how})")
            if self.device.source != "probe":
                notes.append("times are a roofline over the catalogue's datasheet throughput "
                             "(uncalibrated for this card)")
        elif self.device.source == "probe" and not vae_measured:
            notes.append("VAE times are FLOPs at the probed matmul rate until the first run planned here "
                         "times the VAE at many sizes (once, a few seconds; `engine probe --calibrate "
                         f"{self.spec.name}` spends ~20 s), which one run's correction cannot (its speed "
                         "per FLOP changes with size)")
        return notes
