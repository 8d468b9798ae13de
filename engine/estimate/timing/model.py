"""How long VAE encode/decode takes in each autoencoding mode, MEASURED on the device.

Nothing about speed is assumed: on a 2-core CPU, decoding frame by frame measured faster than
one batched call at 256x256x4 (caches), while a GPU is usually faster batched until it runs out of
memory. So the model is fitted from short real calls (FlexGen's lesson: constants taken from
specifications "will not be accurate", fit them per machine), with the form::

    time(mode) = sum over VAE calls [ per_call_s + flops(call) * s(p) * r(k) ]
                 + blend_s * blended elements + weight_s * tile-weight elements
                 + copy_s * copied elements

* ``per_call_s``: fixed cost of one VAE call (Python and kernel dispatch, reading every weight
  once, kernel launches); it is what makes many small calls slow.
* ``s(p)``: seconds per FLOP as a function of ``p``, the latent pixels in flight in one call
  (frames per call x latent tile height x width), times a batch factor ``r(k)`` of the frames
  per call. Batch efficiency is mostly a property of the work size, not of the frame count:
  on the 2-core CPU here 4 frames of 4x4 latents and 1 frame of 8x8 (and 4 of 8x8 vs 1 of
  16x16) ran within 3 % of each other, while the tiny VAE's decode fell from ~55 to ~37 GFLOP/s
  between p = 2304 and 4096 as activations left the caches, which is why per-frame decoding
  beat batched there. ``s`` is measured on a ladder of one-frame calls (p = 1, 4, 16, 36, ...,
  ~2.25x apart) and ``r(k)`` on a few calls with k = 2, 4, 16 frames at a ``p`` the ladder also
  measured; both are interpolated linearly in log-log and held flat outside the measured
  range (see :meth:`AETimeModel.extrapolates`).
* ``flops(call)``: traced once on fake tensors and fitted exactly as
  ``k * (a * hw + b * hw^2)`` (convolutions are linear in latent pixels ``hw``, the mid-block
  attention quadratic).
* blending (tiles) and the copy of each chunk into the output buffer are timed directly on
  tensors of the device.

:meth:`AETimeModel.calibrate` measures and caches the model per device, dtype, thread count and VAE
architecture; :meth:`AETimeModel.from_flops` builds one on paper for a card known only from a
catalogue. :meth:`AETimeModel.predict` is pure Python and takes microseconds.

Known limitations: ``s`` and ``r`` are one curve each per direction, so effects of the tile's
aspect ratio, or of batching that depend on ``p``, are averaged; beyond the largest measured
``p`` (the budget decides how far the ladder climbs) ``s`` is held flat, which under-predicts
calls past a cache cliff that was never reached; the first call at each new shape (oneDNN
primitive creation, cuDNN autotuning) is excluded from cheap rungs, as it is paid once per
shape, and included in dear ones (one cold call each); timings on a machine shared with other
processes are as noisy as the machine (cheap rungs take the best of three calls).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from ..laws.cache import SCHEMA_VERSION, FitCache, architecture_hash
from .calibrate import check_place, device_name, measure_and_fit, vae_info
from .layout import CallLayout, call_layout
from .terms import DirectionTiming

logger = logging.getLogger(__name__)

__all__ = ["AETimeModel", "CallLayout", "DirectionTiming", "call_layout", "device_name"]

DIRECTIONS = ("encode", "decode")


@dataclasses.dataclass(frozen=True)
class AETimeModel:
    """Predicted seconds of VAE encode/decode per autoencoding mode (see the module docstring).

    Build it with :meth:`calibrate` (measured on the device, cached) or :meth:`from_flops` (on
    paper). All fields are plain numbers, so the model round-trips through JSON.

    Attributes:
        decode, encode: the fitted terms of each direction.
        downsample: the VAE's spatial factor.
        blend_s_per_elem: seconds per output element accumulated into a tiled output
            (``addcmul_``), per frame.
        weight_s_per_elem: seconds per output pixel of a tile's blend-weight map (once per tile
            and chunk).
        copy_s_per_elem: seconds per output element copied from a chunk into the output buffer.
        source: ``"measured"`` or ``"flops"``.
        device: the device description the model was measured on (or planned for).
        dtype: the dtype string (``"torch.float32"``).
        meta: calibration details (measurements, hold-out errors, timing); not used to predict.

    Example:
        >>> model = AETimeModel.calibrate(vae, budget_s=20)   # ~20 s the first time, then cached
        >>> model.predict("decode", 16, 320, 512, AEMode.parse("per-frame"))
    """

    decode: DirectionTiming
    encode: DirectionTiming
    downsample: int = 8
    blend_s_per_elem: float = 0.0
    weight_s_per_elem: float = 0.0
    copy_s_per_elem: float = 0.0
    source: str = "measured"
    device: str = ""
    dtype: str = ""
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    # -- prediction ------------------------------------------------------------------------
    def breakdown(self, direction: str, frames: int, height: int, width: int,
                  mode) -> dict[str, float]:
        """Predicted seconds split into ``calls`` (count), ``overhead``, ``compute``, ``blend``,
        ``copy`` and ``total``; arguments as :meth:`predict`."""
        terms = self._terms(direction)
        lay = call_layout(_as_mode(mode), frames, height, width, self.downsample)
        hw = lay.call_hw[0] * lay.call_hw[1]
        out_px = hw * terms.out_scale ** 2  # output pixels of one call, per frame
        compute = sum(n * lay.tiles * terms.flops(k, hw) * terms.seconds_per_flop(k * hw, k)
                      for k, n in lay.chunks)
        blend = copy = 0.0
        if lay.tiled:
            chunks = sum(n for _, n in lay.chunks)
            blend = (frames * lay.tiles * out_px * terms.out_channels * self.blend_s_per_elem
                     + chunks * lay.tiles * out_px * self.weight_s_per_elem)
        elif lay.copied:
            copy = frames * out_px * terms.out_channels * self.copy_s_per_elem
        overhead = lay.calls * terms.per_call_s
        return {"calls": float(lay.calls), "overhead": overhead, "compute": compute,
                "blend": blend, "copy": copy, "total": overhead + compute + blend + copy}

    def predict(self, direction: str, frames: int, height: int, width: int, mode) -> float:
        """Predicted seconds of one encode or decode run in ``mode``.

        Args:
            direction: ``"encode"`` or ``"decode"``.
            frames: frames in the run.
            height, width: frame size in pixels.
            mode: an :class:`~engine.plan.aemode.AEMode` or its string form.
        """
        return self.breakdown(direction, frames, height, width, mode)["total"]

    def extrapolates(self, direction: str, frames: int, height: int, width: int, mode) -> bool:
        """Whether any call of the run lies outside the measured range of ``p`` (then ``s(p)``
        is the nearest measured value, which on CPU tends to under-predict very large calls)."""
        terms = self._terms(direction)
        lay = call_layout(_as_mode(mode), frames, height, width, self.downsample)
        hw = lay.call_hw[0] * lay.call_hw[1]
        lo, hi = terms.knots[0][0], terms.knots[-1][0]
        return any(not lo <= k * hw <= hi for k, _ in lay.chunks)

    def _terms(self, direction: str) -> DirectionTiming:
        if direction not in DIRECTIONS:
            raise ValueError(f"`direction` must be 'encode' or 'decode', got {direction!r}.")
        return self.decode if direction == "decode" else self.encode

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` inverts it."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(decode=self.decode.to_dict(), encode=self.encode.to_dict(),
                   meta=dict(self.meta), schema=SCHEMA_VERSION, kind="ae_time")
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AETimeModel:
        """Rebuild a model from :meth:`to_dict` output."""
        if data.get("kind") != "ae_time" or data.get("schema") != SCHEMA_VERSION:
            raise ValueError("`data` is not an AE time model of schema "
                             f"{SCHEMA_VERSION}; recalibrate with `AETimeModel.calibrate`.")
        return cls(decode=DirectionTiming.from_dict(data["decode"]),
                   encode=DirectionTiming.from_dict(data["encode"]),
                   downsample=int(data["downsample"]),
                   blend_s_per_elem=float(data["blend_s_per_elem"]),
                   weight_s_per_elem=float(data["weight_s_per_elem"]),
                   copy_s_per_elem=float(data["copy_s_per_elem"]), source=str(data["source"]),
                   device=str(data["device"]), dtype=str(data["dtype"]),
                   meta=dict(data.get("meta", {})))

    # -- constructors ----------------------------------------------------------------------
    @classmethod
    def from_flops(cls, device_flops_per_s: float, per_call_s: float, *, vae=None,
                   flop_terms: Mapping[str, tuple[float, float]] | None = None,
                   bandwidth_bytes_per_s: float | None = None, dtype_bytes: int = 2,
                   device: str = "paper") -> AETimeModel:
        """A model on paper: every FLOP at ``device_flops_per_s``, ``per_call_s`` per VAE call.

        For a card known only from a catalogue (``--gpu NAME``); prefer :meth:`calibrate` on a
        card you have, whose batch efficiency is measured instead of assumed constant.

        Args:
            device_flops_per_s: sustained FLOP/s to assume (e.g. the catalogue's dense fp16
                figure times an efficiency you trust).
            per_call_s: fixed seconds per VAE call (launches, weight reads).
            vae: the VAE (real or on the meta device) whose FLOPs are traced once; or give
                ``flop_terms``.
            flop_terms: ``{"decode": (a, b), "encode": (a, b)}`` FLOPs per frame as
                ``a * hw + b * hw^2`` over latent pixels ``hw``.
            bandwidth_bytes_per_s: memory bandwidth for blend and copy traffic; None ignores
                them (they are small next to the VAE on a GPU).
            dtype_bytes: bytes per element of the output (2 for fp16/bf16, 4 for fp32).
            device: a name for the card, kept in the model.
        """
        if device_flops_per_s <= 0 or per_call_s < 0:
            raise ValueError(f"`device_flops_per_s` ({device_flops_per_s}) must be > 0 and "
                             f"`per_call_s` ({per_call_s}) >= 0; pass the card's FLOP/s.")
        info = vae_info(vae, "cpu") if vae is not None else None
        if flop_terms is None and info is None:
            raise ValueError("`from_flops` needs `vae` or `flop_terms` to know the VAE's FLOPs; "
                             "pass the VAE (it may live on the meta device).")
        terms = dict(flop_terms or {d: info["flops"][d] for d in DIRECTIONS})
        f = info["downsample"] if info else 8
        out_ch = info["out_channels"] if info else {"decode": 3, "encode": 8}
        s = 1.0 / device_flops_per_s
        per_dir = {d: DirectionTiming(per_call_s, ((1.0, s),), *terms[d], out_ch[d],
                                      f if d == "decode" else 1) for d in DIRECTIONS}
        traffic = dtype_bytes / bandwidth_bytes_per_s if bandwidth_bytes_per_s else 0.0
        # addcmul_ reads tile, weight and destination and writes the destination; copy_ is 2x
        return cls(per_dir["decode"], per_dir["encode"], f, 4 * traffic, 2 * traffic,
                   2 * traffic, source="flops", device=device,
                   dtype={2: "torch.float16", 4: "torch.float32"}.get(dtype_bytes, ""),
                   meta={"device_flops_per_s": device_flops_per_s})

    @classmethod
    def cached(cls, vae, *, device, dtype, cache=None) -> AETimeModel | None:
        """The calibration stored for this VAE architecture on ``device`` in ``dtype``, or None.

        Measures nothing, so the planner can use a calibration made earlier (``engine probe
        --calibrate CONFIG``) and fall back to :meth:`from_flops` without one. ``vae`` may live on
        the meta device: only its architecture is hashed.
        """
        store = cache if cache is not None else FitCache()
        name = device_name(device)
        fit = store.get_fit(_cache_key(vae, name, dtype))
        if fit is None:
            return None
        try:
            model = cls.from_dict(fit.sections["model"])
        except (KeyError, TypeError, ValueError) as err:
            logger.warning("ignoring cached AE time model for %s (%s)", name, err)
            return None
        logger.info("loaded AE time model for %s (%s)", name, dtype)
        return model

    @classmethod
    def calibrate(cls, vae, *, device=None, dtype=None, budget_s: float = 20.0, cache=None,
                  refresh: bool = False, max_latent_pixels: int = 16384) -> AETimeModel:
        """Measure ``vae``'s encode/decode speed on its device with short real calls and fit.

        A cached model for the same device, thread count, dtype, torch version and VAE
        architecture is loaded instead of measuring again (weights do not matter, only shapes).

        Args:
            vae: the VAE, already on ``device`` in ``dtype`` (ours or diffusers).
            device: the device to measure; defaults to the VAE's own.
            dtype: the dtype to measure; defaults to the VAE's parameter dtype.
            budget_s: rough wall-clock budget for the measurements; larger calls are skipped
                when the next one would not fit (the two smallest always run).
            cache: a :class:`~engine.estimate.laws.cache.FitCache`; None uses the default cache
                directory, False disables caching.
            refresh: measure even when a cached model exists (and overwrite it).
            max_latent_pixels: largest ``frames x latent pixels`` of one calibration call (keeps
                calibration within memory on small cards).

        Returns:
            The fitted model; ``meta["calibration_s"]`` is the time spent measuring.

        Example:
            >>> tm = AETimeModel.calibrate(vae, budget_s=20)
            >>> tm.predict("decode", 16, 320, 512, "chunk:4")
        """
        device, dtype = check_place(vae, device, dtype)
        name = device_name(device)
        store = None if cache is False else (cache if cache is not None else FitCache())
        if store is not None and not refresh:
            model = cls.cached(vae, device=device, dtype=dtype, cache=store)
            if model is not None:
                return model
        model = measure_and_fit(cls, vae, device, dtype, name, budget_s, max_latent_pixels)
        if store is not None:
            path = store.put_fit(_cache_key(vae, name, dtype), model=model.to_dict())
            logger.info("stored AE time model for %s in %s", name, path)
        return model


def _cache_key(vae, device_name: str, dtype) -> str:
    import torch

    # the weights hashed as stored in ``dtype``: the planner's fp32 meta VAE and the fp16 VAE a
    # run or `engine probe --calibrate` timed name the same model
    return architecture_hash(vae, "ae_time", as_dtype=dtype,
                             extra={"device": device_name, "dtype": str(dtype), "torch": torch.__version__})


def _as_mode(mode):
    if isinstance(mode, str):
        from ...plan.aemode import AEMode
        return AEMode.parse(mode)
    return mode
