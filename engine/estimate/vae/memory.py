"""VAE memory and FLOPs model, fitted from fake traces of THIS VAE run through the runtime.

:meth:`VAEMemoryModel.for_vae` traces :func:`engine.runtime.autoencode.decode_frames` and
:func:`~engine.runtime.autoencode.encode_frames` of a meta-device twin of the VAE on fake
tensors (no real memory, no published constants) at a few shapes per direction and family,
fits scaling laws and caches them on disk. :meth:`VAEMemoryModel.predict` then answers the
planner in microseconds for any frame count, resolution, chunk and tile.

Features (latent units; ``f`` is the downsample factor): ``n`` frames in the call, ``k`` frames
per VAE call (``n`` when batched), ``hw`` latent pixels of the whole frame, ``thw`` latent
pixels of one tile (``hw`` untiled), ``tp`` the tile's latent perimeter ``th + tw`` and ``T``
tiles per frame. Terms, read off the graph:

* ``k*thw``: every activation of one VAE call is ``k`` frames x channels x a resolution that is
  a fixed multiple of the tile (convolutions, GroupNorm, up/downsampling);
* ``k*thw^2``: the mid-block attention's score matrix (and its softmax) is quadratic in the
  tokens of one frame;
* ``k*tp``: the encoder's ``Downsample`` pads by one row and column, ``(H+1)(W+1) = HW + H + W
  + 1``, so padded activations carry a perimeter term;
* ``n*hw``: buffers the runtime holds for the whole clip while calls run (the assembled output
  of a chunked or tiled call, the posterior moments and sampling temporaries of an encode);
* ``thw`` (tiled): the per-tile blend weights; ``1``: weight-sized scratch (oneDNN reorders of
  convolution weights).

Families, each with its own laws so that no term is ambiguous: ``batched`` (one call, ``k = n``:
``1, k*thw, k*thw^2, k*tp``), ``chunked`` (``k < n``, untiled: adds ``n*hw``) and ``tiled`` (adds
``n*hw`` and ``thw``).

Why a maximum of laws: the peak moves between layers as the shape changes (the full-resolution
blocks at ordinary sizes, the attention's softmax at very large ones, the runtime's buffers when
``k << n``), and one polynomial fitted across such a switch is off by several percent at large
shapes. So every dispatched op of a trace is a *phase*, keyed by the innermost running submodule,
the op's position inside that module's invocation and its name (``decoder.mid.attn_1#3:_softmax``),
or by the runtime's own code between and after the VAE calls. The live bytes at one op are a sum
of live tensors whose sizes are monomials of the features, so each phase's law is exact up to
rounding, and the prediction is the maximum over phases (which also names where the peak is, for
the planner's explanation). Each phase has two laws: live tensor bytes (``activation_bytes``) and
live bytes plus the op's kernel scratch from :mod:`engine.estimate.tracing.kernels` (oneDNN's blocked
copies, im2col columns); their difference at the maxima is ``workspace_bytes``.

Chunks of unequal size (``n % k != 0``): with two or more full chunks the peak is a full chunk
with the output buffer present, which the laws describe; with one full chunk the prediction is
the larger of that chunk without the buffer (the batched laws) and the smaller last chunk with it.

Known limitations: below ~5k latent pixels per tile and with one frame per call, oneDNN hands
small convolutions to the native kernels, so non-peak phases there are approximate; CUDA kernel
workspaces (cuDNN, cuBLAS) are not modelled (``workspace_bytes`` = 0, flagged by
``workspace_modelled``) and ``allocator_bytes`` on CUDA is the tracer's no-reuse segment-rounding
approximation, not measured fragmentation. The laws assume the VAE's op sequence does not branch
on size (true of LDM/diffusers KL VAEs with their own tiling switched off). Phases that never
reach 5% of a fit trace's peak are dropped, so a layer that grows >20x faster than the rest
beyond the fitted sizes would be missed. Only the second VAE call of each chunked or tiled fit
job is traced (the others repeat its input shape and hold no more memory; see ``vae.trace._Where``).

Example:
    >>> model = VAEMemoryModel.for_vae(vae, device_type="cuda", dtype=torch.float16)
    >>> model.predict("decode", 16, 576, 1024, "per-frame").allocated_bytes
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ...plan.aemode import AEMode
from ..laws.cache import FitCache, FitHeldElsewhere
from .laws import FamilyLaws
from .shapes import DIRECTIONS, FAMILIES, CallPoint, classify_call, input_shape

if TYPE_CHECKING:  # predicting from cached laws needs no torch; fitting and tracing import it
    import torch
    from torch import nn

    from ..tracing.trace import TraceResult

__all__ = ["DIRECTIONS", "FAMILIES", "VAEMemoryModel", "VAEStageMemory"]

logger = logging.getLogger(__name__)

_DEFAULT_CACHE: Any = object()
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def _dtype_name(dtype: Any) -> str:
    """``torch.float16`` or ``"float16"`` -> ``"float16"`` (no torch import)."""
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass(frozen=True)
class VAEStageMemory:
    """Predicted memory of one VAE encode or decode call, split into named terms (bytes).

    Attributes:
        direction: ``"decode"`` or ``"encode"``.
        mode: the :class:`AEMode` string.
        activation_bytes: peak of NEW tensor bytes during the call (activations, temporaries,
            the output buffer).
        weights_bytes: the VAE's parameters and buffers in the planned dtype.
        input_bytes: the latents (decode) or images (encode) handed to the call.
        workspace_bytes: kernel scratch on top of ``activation_bytes`` at the peak (CPU: the
            modelled oneDNN/im2col buffers; CUDA: 0, see ``workspace_modelled``).
            ``activation_bytes + workspace_bytes`` is what ``measure_cpu_peak_bytes`` measures.
        allocator_bytes: CUDA caching-allocator segment rounding (approximate); 0 on CPU.
        peak_phase: where the peak happens: submodule, op position and op
            (``decoder.up.0.block.0#5:add``), or the runtime's own code.
        workspace_modelled: False where kernel scratch exists but is not modelled (CUDA).
        extrapolated: a feature lies outside the range the laws were fitted on.
    """

    direction: str
    mode: str
    activation_bytes: int
    weights_bytes: int
    input_bytes: int
    workspace_bytes: int = 0
    allocator_bytes: int = 0
    peak_phase: str = ""
    workspace_modelled: bool = True
    extrapolated: bool = False

    @property
    def allocated_bytes(self) -> int:
        """Tensor bytes alive at the peak: weights + input + activations + workspace."""
        return self.weights_bytes + self.input_bytes + self.activation_bytes + self.workspace_bytes

    @property
    def peak_new_bytes(self) -> int:
        """Bytes allocated on top of weights and input at the peak (activations + workspace)."""
        return self.activation_bytes + self.workspace_bytes

    @property
    def reserved_bytes(self) -> int:
        """``allocated_bytes`` plus the allocator's segment slack (CUDA)."""
        return self.allocated_bytes + self.allocator_bytes

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict including the derived totals."""
        out = dataclasses.asdict(self)
        out.update(allocated_bytes=self.allocated_bytes, peak_new_bytes=self.peak_new_bytes,
                   reserved_bytes=self.reserved_bytes)
        return out


# ---------------------------------------------------------------- the model
class VAEMemoryModel:
    """Fitted memory and FLOPs model of one VAE's encode and decode under every :class:`AEMode`.

    Build it with :meth:`for_vae`; the constructor takes already fitted laws.

    Args:
        laws: ``{(direction, family): FamilyLaws}`` as fitted or loaded by :meth:`for_vae`.
        weights_bytes: the VAE's parameters and buffers in ``dtype``.
        channels: ``(latent channels, image channels)``.
        factor: the spatial downsample factor.
        dtype: the planned dtype, a torch dtype or its name (``"float16"``).
        device_type: ``"cpu"`` or ``"cuda"``.
        vae: the source module (kept by weak reference, for :meth:`trace`).
        report: per ``"direction/family"``: where the laws came from and their fit errors.
    """

    def __init__(self, laws: Mapping[tuple[str, str], FamilyLaws], *, weights_bytes: int,
                 channels: tuple[int, int], factor: int, dtype: torch.dtype | str,
                 device_type: str, vae: nn.Module | None = None,
                 report: Mapping[str, Any] | None = None) -> None:
        self.laws = dict(laws)
        self.weights_bytes = int(weights_bytes)
        self.channels, self.factor = (int(channels[0]), int(channels[1])), int(factor)
        self.dtype_name, self.device_type = _dtype_name(dtype), device_type
        self.dtype_bytes = _ITEMSIZE[self.dtype_name]
        self.report = dict(report or {})
        self._vae_ref = weakref.ref(vae) if vae is not None else None
        self._trace_twin: nn.Module | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The planned torch dtype (imports torch; predictions use :attr:`dtype_bytes`)."""
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def directions(self) -> tuple[str, ...]:
        """The directions the VAE supports (``decode`` and/or ``encode``)."""
        return tuple(d for d in DIRECTIONS if any(key[0] == d for key in self.laws))

    @classmethod
    def for_vae(cls, vae: nn.Module, *, device_type: str = "cpu", dtype: torch.dtype | None = None,
                cache: FitCache | None = _DEFAULT_CACHE,
                index_key: str | None = None) -> VAEMemoryModel:
        """Fit (or load from ``cache``) the model of ``vae`` for ``device_type`` and ``dtype``.

        A meta-device twin of ``vae`` in ``dtype`` is traced on fake tensors, so ``vae`` may be
        real or on the meta device and is never run or modified. A cold fit traces 5-6 VAE
        calls per (direction, family), one family at a time under its own cache lock, so
        processes fitting the same VAE at once share the work (~3-4 s in all for the
        full-size KL-f8 on one CPU core); a warm load reads six small JSON files (~15 ms).

        Args:
            vae: any module with ``encode`` and/or ``decode`` (ours or diffusers-style).
            device_type: the device to plan for, ``"cpu"`` or ``"cuda"`` (no GPU needed).
            dtype: the dtype the VAE will run in (default ``torch.float32``).
            cache: where fits are kept; default :class:`FitCache` (``$ENGINE_CACHE_DIR``);
                ``None`` always refits and stores nothing.
            index_key: also store, under this key, what :meth:`from_index` needs to rebuild the
                model without the VAE (and without torch); see
                :func:`engine.estimate.vae.keys.index_key`.

        Example:
            >>> model = VAEMemoryModel.for_vae(vae, device_type="cuda", dtype=torch.float16)
            >>> model.predict("decode", 16, 576, 1024, "per-frame").allocated_bytes
        """
        import torch

        from ...runtime.vae_adapter import downsample_factor
        from ..laws.cache import architecture_hash
        from .keys import hash_extra
        from .laws import fit_families
        from .shapes import vae_channels
        from .trace import meta_twin

        dtype = torch.float32 if dtype is None else dtype
        directions = _check_for_vae(vae, device_type, dtype)
        cache = FitCache() if cache is _DEFAULT_CACHE else cache
        extra = hash_extra(dtype, device_type)
        keys = {(d, fam): architecture_hash(vae, f"{d}/{fam}", extra=extra)
                for d in directions for fam in FAMILIES}
        f, channels = downsample_factor(vae), vae_channels(vae)
        twin = functools.lru_cache(maxsize=1)(lambda: meta_twin(vae, dtype))

        def fit(wanted):
            return fit_families(twin(), wanted, device_type, dtype, channels, f)

        if cache is None:
            found = {key: (*fitted, "fit") for key, fitted in fit(list(keys)).items()}
        else:
            found = _load_or_fit_each(cache, keys, fit)
        laws = {key: fam_laws for key, (fam_laws, _, _) in found.items()}
        report = {"/".join(key): {"source": source, **meta} for key, (_, meta, source) in found.items()}
        weights = sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
                      for t in itertools.chain(vae.parameters(), vae.buffers()))
        if index_key is not None and cache is not None:
            cache.put_fit(index_key, vae_index={
                "keys": {"/".join(k): v for k, v in keys.items()}, "weights_bytes": weights,
                "channels": list(channels), "factor": f, "dtype": _dtype_name(dtype),
                "device_type": device_type})
        return cls(laws, weights_bytes=weights, channels=channels, factor=f, dtype=dtype,
                   device_type=device_type, vae=vae, report=report)

    @classmethod
    def from_index(cls, index_key: str, *,
                   cache: FitCache | None = _DEFAULT_CACHE) -> VAEMemoryModel | None:
        """The model :meth:`for_vae` stored with ``index_key``, rebuilt from the cache alone
        (no VAE, no torch, a few milliseconds), or None when the index or any fit is missing.

        The model cannot :meth:`trace` (it holds no VAE); everything else is as from
        :meth:`for_vae`.
        """
        cache = FitCache() if cache is _DEFAULT_CACHE else cache
        fit = cache.get_fit(index_key) if cache is not None else None
        index = fit.sections.get("vae_index") if fit is not None else None
        if not isinstance(index, dict):
            return None
        laws, report = {}, {}
        try:
            for name, digest in index["keys"].items():
                loaded = FamilyLaws.load(cache, digest)
                if loaded is None:
                    return None
                key = tuple(name.split("/"))
                laws[key], meta = loaded
                report[name] = {"source": "cache", **meta}
            return cls(laws, weights_bytes=index["weights_bytes"],
                       channels=tuple(index["channels"]), factor=index["factor"],
                       dtype=index["dtype"], device_type=index["device_type"], report=report)
        except (KeyError, TypeError, ValueError) as err:
            logger.warning("ignoring malformed VAE index %s in the cache (%s); refitting",
                           index_key, err)
            return None

    # -- evaluation --------------------------------------------------------------------------
    def _point(self, direction: str, frames: int, height: int, width: int,
               mode: AEMode | str) -> tuple[CallPoint, AEMode]:
        if direction not in self.directions:
            raise ValueError(f"`direction` must be one of {', '.join(self.directions)} (got "
                             f"{direction!r}); the VAE has no other method.")
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"`frames` must be a positive int (got {frames!r}); pass the "
                             "number of frames folded into the batch.")
        f = self.factor
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < f or value % f:
                raise ValueError(f"`{name}` must be a positive multiple of the VAE's downsample "
                                 f"factor {f} (got {value!r}); round it to a multiple of {f}.")
        mode = AEMode.parse(mode, "mode")
        return classify_call(frames, height // f, width // f, mode, f), mode

    def predict(self, direction: str, frames: int, height: int, width: int,
                mode: AEMode | str = "batched") -> VAEStageMemory:
        """Predicted memory of one ``encode_frames``/``decode_frames`` call.

        Args:
            direction: ``"decode"`` or ``"encode"``.
            frames: frames in the call (batch and time folded together).
            height: image height in PIXELS (for decode too), a multiple of the factor.
            width: image width in pixels.
            mode: an :class:`AEMode` or its string (``"per-frame"``, ``"chunk:4+tile:256x256"``).

        Example:
            >>> model.predict("decode", 16, 320, 512, "chunk:4").peak_new_bytes
        """
        point, mode = self._point(direction, frames, height, width, mode)
        laws = self.laws[(direction, point.family)]
        live, total, phase = self._memory(direction, point)
        pixels = point.lat[0] * point.lat[1]
        if direction == "decode":
            inputs = frames * self.channels[0] * pixels
        else:
            inputs = frames * self.channels[1] * pixels * self.factor ** 2
        cuda = self.device_type == "cuda"
        return VAEStageMemory(
            direction=direction, mode=str(mode), activation_bytes=int(math.ceil(live)),
            weights_bytes=self.weights_bytes, input_bytes=inputs * self.dtype_bytes,
            workspace_bytes=int(math.ceil(total - live)),
            allocator_bytes=int(laws.allocator) if cuda else 0, peak_phase=phase,
            workspace_modelled=not cuda, extrapolated=laws.extrapolates(point.features))

    def _memory(self, direction: str, point: CallPoint) -> tuple[float, float, str]:
        """Live bytes, live+scratch bytes and the peak's phase of one call."""
        feats = point.features
        live, total, phase = self.laws[(direction, point.family)].evaluate(feats)
        n, k = feats["n"], feats["k"]
        if point.family == "chunked" and n < 2 * k:
            # One full chunk runs before the output buffer exists, then a smaller one with it;
            # the laws (fitted on equal chunks) describe each of the two calls.
            live, total, phase = self.laws[(direction, "chunked")].evaluate({**feats, "k": n - k})
            first = self.laws[(direction, "batched")].evaluate(feats)
            if first[0] > live:
                live, phase = first[0], first[2]
            total = max(total, first[1])
        return live, total, phase

    def flops(self, direction: str, frames: int, height: int, width: int,
              mode: AEMode | str = "batched") -> float:
        """Predicted FLOPs (convolutions and matmuls, 2 per multiply-add) of one call.

        Args:
            direction, frames, height, width, mode: as in :meth:`predict`.
        """
        point, _ = self._point(direction, frames, height, width, mode)
        law = self.laws[(direction, point.family)].flops
        return max(0.0, law.predict(point.features))

    def trace(self, direction: str, frames: int, height: int, width: int,
              mode: AEMode | str = "batched") -> TraceResult:
        """Trace the call directly on fake tensors (no laws): the ground truth the laws
        approximate, for validation. Costs about 1 ms per dispatched op.

        Args:
            direction, frames, height, width, mode: as in :meth:`predict`.
        """
        import torch

        from ...runtime.autoencode import decode_frames, encode_frames
        from ..tracing.trace import trace_call
        from .trace import meta_twin

        point, mode = self._point(direction, frames, height, width, mode)
        if self._trace_twin is None:
            vae = self._vae_ref() if self._vae_ref is not None else None
            if vae is None:
                raise RuntimeError("`trace` needs the VAE this model was built from, which is "
                                   "gone; rebuild the model with `VAEMemoryModel.for_vae`.")
            self._trace_twin = meta_twin(vae, self.dtype)
        shape = input_shape(direction, frames, point.lat, self.channels, self.factor)
        run = decode_frames if direction == "decode" else encode_frames
        x = torch.empty(shape, device="meta", dtype=self.dtype)
        with torch.no_grad():
            # a partial, so the tracer finds the twin and counts its weights from the start
            return trace_call(functools.partial(run, self._trace_twin, mode=mode), x,
                              device=self.device_type)


def _load_or_fit_each(cache: FitCache, keys: Mapping[tuple[str, str], str], fit: Callable):
    """Each (direction, family)'s laws from ``cache``, else fitted under that family's own lock;
    returns ``{key: (laws, meta, "cache" | "fit")}``.

    A family another process is fitting (the planner's helper, see
    :mod:`engine.planner.fit_ahead`) is left for last and then waited for, so two processes
    asking for one VAE at once split its six families instead of one waiting for all of them.
    A process that must not wait (:func:`~engine.estimate.laws.cache.skip_held_fits`) gets
    :class:`~engine.estimate.laws.cache.FitHeldElsewhere` from the second pass and moves on.
    """
    found, held = {}, []
    for key in keys:
        try:
            found[key] = _load_or_fit(cache, keys[key], key, fit, wait=False)
        except FitHeldElsewhere:
            held.append(key)
    for key in held:  # wait for the other process, then read what it stored
        found[key] = _load_or_fit(cache, keys[key], key, fit, wait=True)
    return {key: found[key] for key in keys}


def _load_or_fit(cache: FitCache, digest: str, key: tuple[str, str], fit: Callable, *, wait: bool):
    """One family's ``(laws, meta, source)``: from the cache, else fitted and stored under its lock."""
    loaded = FamilyLaws.load(cache, digest)
    if loaded is None:
        with cache.fitting(digest, wait=wait):
            loaded = FamilyLaws.load(cache, digest)  # fitted meanwhile by another process?
            if loaded is None:
                logger.debug("VAE %s/%s: fitting", *key)
                fam_laws, meta = fit([key])[key]
                fam_laws.store(cache, digest, meta)
                return fam_laws, meta, "fit"
    return (*loaded, "cache")


def _check_for_vae(vae: Any, device_type: str, dtype: Any) -> list[str]:
    """Validate :meth:`VAEMemoryModel.for_vae` arguments; return the VAE's directions."""
    import torch
    from torch import nn

    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"`device_type` must be 'cpu' or 'cuda' (got {device_type!r}); plan "
                         "other accelerators as 'cuda'.")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"`dtype` must be a floating torch dtype (got {dtype!r}); pass e.g. "
                         "torch.float16.")
    directions = [d for d in DIRECTIONS if callable(getattr(vae, d, None))]
    if not isinstance(vae, nn.Module) or not directions:
        raise ValueError(f"`vae` ({type(vae).__name__}) must be an nn.Module with `encode` "
                         "and/or `decode`; pass the autoencoder module itself.")
    return directions
