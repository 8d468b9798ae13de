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
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..device.probe import cpu_name

logger = logging.getLogger(__name__)

__all__ = ["AETimeModel", "CallLayout", "DirectionTiming", "call_layout", "device_name"]

DIRECTIONS = ("encode", "decode")
SCHEMA = 1
# Ladder of calibration calls (frames per call, latent side, variant). Main rungs grow one
# frame's side by ~1.5x (p by ~2.25x; a steeper ladder reaches further for the same budget but
# smears the cliff where activations leave the caches), then add frames; variants repeat a p
# with more frames so s(p) sees both ways of filling it, and run only while they are cheap.
_LADDER = ((1, 1, False), (1, 2, False), (1, 4, False), (1, 6, False), (1, 8, False),
           (4, 4, True), (1, 12, False), (1, 16, False), (4, 8, True), (1, 24, False),
           (2, 16, True), (1, 32, False), (4, 16, True), (16, 8, True), (1, 48, False),
           (1, 64, False), (4, 32, True), (1, 96, False), (1, 128, False), (4, 96, False),
           (4, 128, False))
# Of the budget left when each ladder starts; the rest pays for blending, copies and hold-outs.
# Decode gets most: it runs on every frame, encode on one or two.
_BUDGET_SHARE = {"decode": 0.65, "encode": 0.6}


# ---------------------------------------------------------------- pure geometry
def _axis_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Same spans as :func:`engine.runtime.tiling.axis_spans` (kept torch-free for planning)."""
    if tile >= size:
        return [(0, size)]
    stride = tile - overlap
    count = math.ceil((size - tile) / stride) + 1
    return [(s, s + tile) for s in (round(i * (size - tile) / (count - 1)) for i in range(count))]


@dataclasses.dataclass(frozen=True)
class CallLayout:
    """How a mode splits one autoencoding run into VAE calls.

    Attributes:
        chunks: ``(frames per call, number of such chunks)`` pairs (the last chunk may be short).
        tiles: tiles per frame (1 when untiled).
        call_hw: latent ``(height, width)`` one call sees.
        tiled: whether tiles are blended (a tile covering the frame is the untiled call).
        copied: whether each chunk is copied into an output buffer (any chunking or tiling).
    """

    chunks: tuple[tuple[int, int], ...]
    tiles: int
    call_hw: tuple[int, int]
    tiled: bool
    copied: bool

    @property
    def calls(self) -> int:
        """Number of VAE calls."""
        return self.tiles * sum(n for _, n in self.chunks)


def call_layout(mode, frames: int, height: int, width: int, downsample: int = 8) -> CallLayout:
    """The VAE calls :func:`engine.runtime.autoencode.decode_frames` makes for ``mode``.

    Args:
        mode: an :class:`~engine.runtime.aemode.AEMode` (anything with ``chunk``, ``tile``,
            ``overlap``).
        frames: frames to encode or decode.
        height, width: frame size in PIXELS (the latent is ``height // downsample``).
        downsample: the VAE's spatial factor.
    """
    h, w = max(1, height // downsample), max(1, width // downsample)
    k = min(mode.chunk or frames, frames)
    chunks = tuple((size, n) for size, n in ((k, frames // k), (frames % k, 1)) if size and n)
    tiled, tiles, call_hw = False, 1, (h, w)
    if mode.tile is not None:
        th, tw = mode.tile
        f = downsample
        if th % f or tw % f or (mode.overlap or 0) % f:
            raise ValueError(f"`mode` tile {th}x{tw} / overlap {mode.overlap} must be multiples of "
                             f"the VAE downsample factor {f}; round them to multiples of {f}.")
        th, tw = th // f, tw // f
        if not (th >= h and tw >= w):
            ov_h = mode.overlap // f if mode.overlap is not None else th // 4
            ov_w = mode.overlap // f if mode.overlap is not None else tw // 4
            spans_h = _axis_spans(h, th, min(ov_h, th - 1))
            spans_w = _axis_spans(w, tw, min(ov_w, tw - 1))
            tiled, tiles = True, len(spans_h) * len(spans_w)
            call_hw = (spans_h[0][1] - spans_h[0][0], spans_w[0][1] - spans_w[0][0])
    return CallLayout(chunks, tiles, call_hw, tiled, tiled or k < frames)


# ---------------------------------------------------------------- the model
@dataclasses.dataclass(frozen=True)
class DirectionTiming:
    """Fitted time terms of one direction (encode or decode).

    Attributes:
        per_call_s: fixed seconds per VAE call.
        knots: ``(p, seconds per FLOP)`` pairs sorted by ``p`` (latent pixels per call), for
            one-frame calls.
        flops_hw: FLOPs per frame per latent pixel (``a``).
        flops_hw2: FLOPs per frame per latent pixel squared (``b``, attention).
        out_channels: channels of one call's output (3 for decode, 8 for encode moments).
        out_scale: output pixels per latent unit along one axis (the downsample factor for decode,
            1 for encode).
        batch_knots: ``(k, factor)`` pairs sorted by ``k``: seconds per FLOP of a ``k``-frame
            call relative to a one-frame call with the same ``p`` (1.0 when ``p`` alone decides).
    """

    per_call_s: float
    knots: tuple[tuple[float, float], ...]
    flops_hw: float
    flops_hw2: float
    out_channels: int
    out_scale: int
    batch_knots: tuple[tuple[float, float], ...] = ((1.0, 1.0),)

    def flops(self, frames: int, hw: int) -> float:
        """FLOPs of one call over ``frames`` frames of ``hw`` latent pixels."""
        return frames * (self.flops_hw * hw + self.flops_hw2 * hw * hw)

    def seconds_per_flop(self, p: float, frames: int = 1) -> float:
        """``s(p)`` times the batch factor of ``frames``: each interpolated linearly in log-log
        between knots and held flat outside them."""
        return _loglog(self.knots, p) * _loglog(self.batch_knots, frames)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["knots"] = [list(k) for k in self.knots]
        out["batch_knots"] = [list(k) for k in self.batch_knots]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DirectionTiming:
        pairs = lambda key, default: tuple((float(a), float(b))  # noqa: E731
                                           for a, b in data.get(key, default))
        return cls(float(data["per_call_s"]), pairs("knots", ()), float(data["flops_hw"]),
                   float(data["flops_hw2"]), int(data["out_channels"]), int(data["out_scale"]),
                   pairs("batch_knots", ((1.0, 1.0),)))


def _loglog(knots: tuple[tuple[float, float], ...], x: float) -> float:
    """Piecewise-linear interpolation of ``log y`` over ``log x``; flat outside the knots."""
    if x <= knots[0][0]:
        return knots[0][1]
    for (x0, y0), (x1, y1) in zip(knots, knots[1:]):
        if x <= x1:
            u = math.log(x / x0) / math.log(x1 / x0)
            return math.exp(math.log(y0) + u * (math.log(y1) - math.log(y0)))
    return knots[-1][1]


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
            mode: an :class:`~engine.runtime.aemode.AEMode` or its string form.
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
                   meta=dict(self.meta), schema=SCHEMA, kind="ae_time")
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AETimeModel:
        """Rebuild a model from :meth:`to_dict` output."""
        if data.get("kind") != "ae_time" or data.get("schema") != SCHEMA:
            raise ValueError("`data` is not an AE time model of schema "
                             f"{SCHEMA}; recalibrate with `AETimeModel.calibrate`.")
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
        info = _vae_info(vae, "cpu") if vae is not None else None
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
            cache: a :class:`~engine.estimate.cache.FitCache`; None uses the default cache
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
        import torch

        from .cache import FitCache, architecture_hash

        device, dtype = _check_place(vae, device, dtype)
        name = device_name(device)
        store = None if cache is False else (cache if cache is not None else FitCache())
        key = architecture_hash(vae, "ae_time", extra={"device": name, "dtype": str(dtype),
                                                       "torch": torch.__version__,
                                                       "schema": SCHEMA})
        if store is not None and not refresh:
            payload = store.get(key)
            if payload is not None:
                try:
                    model = cls.from_dict(payload)
                    logger.info("loaded AE time model for %s (%s) from %s", name, dtype,
                                store.path(key))
                    return model
                except (KeyError, TypeError, ValueError) as err:
                    logger.warning("ignoring cached AE time model %s (%s)", key, err)
        model = _calibrate(vae, device, dtype, name, budget_s, max_latent_pixels)
        if store is not None:
            path = store.put(key, model.to_dict())
            logger.info("stored AE time model for %s in %s", name, path)
        return model


def _as_mode(mode):
    if isinstance(mode, str):
        from ..runtime.aemode import AEMode
        return AEMode.parse(mode)
    return mode


# ---------------------------------------------------------------- measuring
def device_name(device) -> str:
    """A description of ``device`` that identifies its speed: the GPU's name, or the CPU model
    with the thread count torch uses (timings on CPU depend on it as much as on the chip)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "cpu":
        return f"{cpu_name()} ({torch.get_num_threads()} threads)"
    return dev.type


def _check_place(vae, device, dtype):
    import torch

    from ..runtime.vae_adapter import module_place

    own_device, own_dtype = module_place(vae)
    device = torch.device(device) if device is not None else (own_device or torch.device("cpu"))
    dtype = dtype if dtype is not None else (own_dtype or torch.float32)
    if own_device is not None and own_device.type != device.type:
        raise ValueError(f"`device` {device} differs from the VAE's device {own_device}; move the "
                         "VAE first (`vae.to(device)`) or leave `device` unset.")
    if own_dtype is not None and own_dtype != dtype:
        raise ValueError(f"`dtype` {dtype} differs from the VAE's parameters ({own_dtype}); cast "
                         "the VAE first (`vae.to(dtype)`) or leave `dtype` unset.")
    return device, dtype


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _timed(fn: Callable[[], Any], device, runs: int, warmup: bool = True) -> float:
    """Fastest of ``runs`` calls, after one untimed warm-up call when ``warmup`` (new shapes pay
    kernel selection and primitive creation once; the runtime pays it once per shape too). The
    minimum, not the median: on a machine shared with other processes they only ever add time,
    and the planner compares modes, so the undisturbed time is the comparable one."""
    if warmup:
        fn()
    times = []
    for _ in range(max(1, runs)):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        del out
    return min(times)


def _latent_channels(vae) -> int:
    params = getattr(vae, "params", None)
    if getattr(params, "embed_dim", None):
        return int(params.embed_dim)
    return int(getattr(getattr(vae, "config", None), "latent_channels", 4) or 4)


def _in_channels(vae) -> int:
    params = getattr(vae, "params", None)
    if getattr(params, "in_channels", None):
        return int(params.in_channels)
    return int(getattr(getattr(vae, "config", None), "in_channels", 3) or 3)


def _vae_info(vae, device) -> dict[str, Any]:
    """Downsample factor, channels and the exact FLOP terms ``(a, b)`` of each direction, from
    three fake-tensor traces (two to solve, one to check)."""
    import torch

    from ..runtime.autoencode import decode_frames, encode_frames
    from ..runtime.vae_adapter import downsample_factor
    from .scaling import fit_scaling_law
    from .trace import trace_call

    f, zc, xc = downsample_factor(vae), _latent_channels(vae), _in_channels(vae)
    calls = {"decode": (lambda z: decode_frames(vae, z, "batched"), zc, 1),
             "encode": (lambda x: encode_frames(vae, x, "batched", sample=False), xc, f)}
    flops, out_channels, residual = {}, {}, {}
    with torch.no_grad():
        for direction, (fn, channels, scale) in calls.items():
            samples = []
            for k, h, w in ((1, 4, 4), (1, 8, 8), (2, 4, 8)):
                meta = torch.empty(k, channels, h * scale, w * scale, device="meta")
                res = trace_call(fn, meta, device=device)
                samples.append(({"n": k, "hw": h * w}, float(res.flops)))
                out_channels[direction] = int(res.output_shapes[0][1])
            law = fit_scaling_law(samples[:2], ["n*hw", "n*hw^2"], holdout=samples[2:])
            flops[direction] = (max(law.coefficients[0], 0.0), max(law.coefficients[1], 0.0))
            residual[direction] = law.holdout_max_rel_residual
    out_channels["encode"] *= 2  # tiles blend the posterior moments (mean and log-variance)
    return {"downsample": f, "latent_channels": zc, "in_channels": xc, "flops": flops,
            "out_channels": out_channels, "flops_holdout_rel_err": residual}


def _ladder(run: Callable[[int, int], Callable[[], Any]], flops: Callable[[int, int], float],
            device, budget_s: float, max_p: int) -> list[dict[str, float]]:
    """Time single VAE calls up the ladder of (frames, latent side) until the budget is spent,
    then once more down the ladder, keeping each rung's fastest call."""
    import torch

    points: list[dict[str, float]] = []
    calls: dict[int, Callable[[], Any]] = {}
    spent = 0.0
    for k, side, variant in _LADDER:
        p = k * side * side
        if p > max_p:
            break
        work = flops(k, side * side)
        guess = points[-1]["seconds"] * work / points[-1]["flops"] if points else 0.0
        # cheap calls: warm-up + best of 3; dear ones: one cold call (one-off costs are small
        # next to seconds of compute, and the budget goes further up the ladder instead)
        warmup, runs = (True, 3) if guess < 0.02 * budget_s else (
            (True, 1) if guess < 0.1 * budget_s else (False, 1))
        cost = guess * (runs + warmup + 1)  # + 1: the pass back down
        if variant and (cost > 0.1 * budget_s or spent + cost > budget_s):
            continue
        if len(points) >= 2 and spent + cost > budget_s:
            break
        start = time.perf_counter()
        try:
            calls[len(points)] = run(k, side)
            seconds = _timed(calls[len(points)], device, runs, warmup)
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError on torch >= 2.5
            logger.info("AE calibration stopped at %d frame(s) of %dx%d latents: out of memory",
                        k, side, side)
            calls.pop(len(points), None)
            break
        spent += time.perf_counter() - start
        points.append({"frames": k, "side": side, "p": p, "flops": work, "seconds": seconds})
    # Load from other processes comes and goes over seconds: a second pass in the opposite
    # order gives every rung another chance at a quiet moment, so the curve keeps its shape.
    for index in reversed(range(len(points))):
        again = _timed(calls.pop(index), device, 1, warmup=False)
        points[index]["seconds"] = min(points[index]["seconds"], again)
    return points


def _fit_direction(points: list[dict[str, float]], flop_terms: tuple[float, float],
                   out_channels: int, out_scale: int) -> DirectionTiming:
    """``per_call_s`` from the two smallest calls (same rate assumed); ``s(p)`` from the
    one-frame calls as (time - per_call_s) / FLOPs; the batch factor of ``k`` frames as the
    geometric mean, over the ``p`` where both were measured, of ``s`` of the ``k``-frame call
    over ``s(p)`` (clamped to [0.5, 2] against noise)."""
    if len(points) < 2 or points[0]["frames"] != 1:
        raise RuntimeError("AE calibration timed fewer than two one-frame calls (out of memory "
                           "at the smallest size?); free device memory and calibrate again.")
    one, two = points[0], points[1]
    slope = (two["seconds"] - one["seconds"]) / max(two["flops"] - one["flops"], 1.0)
    per_call = one["seconds"] - max(slope, 0.0) * one["flops"]
    # Noise can put the intercept outside the smallest call; keep some time for its FLOPs.
    per_call = min(max(per_call, 0.0), 0.95 * one["seconds"])

    def rate(pt):
        return max(pt["seconds"] - per_call, 0.05 * pt["seconds"]) / max(pt["flops"], 1.0)
    single = tuple((float(pt["p"]), rate(pt)) for pt in points if pt["frames"] == 1)
    ratios: dict[float, list[float]] = {}
    for pt in points:
        if pt["frames"] > 1 and single[0][0] <= pt["p"] <= single[-1][0]:
            ratios.setdefault(float(pt["frames"]), []).append(
                math.log(rate(pt) / _loglog(single, pt["p"])))
    batch = ((1.0, 1.0),) + tuple(
        (k, min(2.0, max(0.5, math.exp(sum(v) / len(v))))) for k, v in sorted(ratios.items()))
    # multi-frame rungs beyond the one-frame range extend s(p), divided by their batch factor
    extra = tuple((float(pt["p"]), rate(pt) / _loglog(batch, pt["frames"])) for pt in points
                  if pt["frames"] > 1 and pt["p"] > single[-1][0])
    knots = tuple(sorted(dict(single + extra).items()))
    return DirectionTiming(per_call, knots, flop_terms[0], flop_terms[1], out_channels,
                           out_scale, batch)


def _measure_blend(device, dtype, f: int) -> dict[str, float]:
    """Seconds per element of tile blending and chunk copies, timed on the device's tensors with
    a stand-in decoder that returns a fixed tile (so only the runtime's own work is timed)."""
    import torch

    from ..runtime.tiling import axis_spans, blend_tiles

    spans = axis_spans(32, 16, 4)  # 3 x 3 tiles of 16 latents, as a 256x256 decode with 128 tiles
    tile_px, channels = (16 * f) ** 2, 3
    timings = {}
    for k in (1, 4):
        src = torch.empty(k, 4, 32, 32, device=device, dtype=dtype)
        tile = torch.randn(k, channels, 16 * f, 16 * f, device=device, dtype=dtype)
        dst = torch.empty(k, channels, 32 * f, 32 * f, device=device, dtype=dtype)
        timings[k] = _timed(lambda: blend_tiles(lambda t: tile, src, dst, spans, spans, 1, f),
                            device, 3)
    tiles = len(spans) ** 2
    per_frame = max(timings[4] - timings[1], 0.0) / 3  # addcmul_ work grows with frames
    fixed = max(timings[1] - per_frame, 0.0)           # weight maps: once per tile
    src = torch.randn(4, channels, 32 * f, 32 * f, device=device, dtype=dtype)
    out = torch.empty_like(src)
    copy = _timed(lambda: out.copy_(src), device, 3)
    return {"blend_s_per_elem": per_frame / (tiles * tile_px * channels),
            "weight_s_per_elem": fixed / (tiles * tile_px),
            "copy_s_per_elem": copy / src.numel()}


def _holdout(model: AETimeModel, run_mode: Callable[[str, int, int], Callable[[], Any]],
             device, side: int, budget_s: float) -> list[dict[str, Any]]:
    """Time a few multi-call runs the ladder never saw and record the prediction error."""
    f = model.downsample
    px = side * f
    checks = [("per-frame+tile:%dx%d" % (px // 2, px // 2), 2), ("batched", 2), ("chunk:2", 4)]
    out, spent = [], 0.0
    for mode, frames in checks:
        predicted = model.predict("decode", frames, px, px, mode)
        if spent + 2 * predicted > budget_s:
            continue
        start = time.perf_counter()
        measured = _timed(run_mode(mode, frames, side), device, 1)
        spent += time.perf_counter() - start
        out.append({"mode": mode, "frames": frames, "height": px, "width": px,
                    "measured_s": measured, "predicted_s": predicted,
                    "rel_err": predicted / measured - 1.0})
    return out


def _calibrate(vae, device, dtype, name: str, budget_s: float,
               max_latent_pixels: int) -> AETimeModel:
    import torch

    from ..runtime.autoencode import decode_frames, encode_frames

    start = time.perf_counter()
    info = _vae_info(vae, device)
    f, zc, xc = info["downsample"], info["latent_channels"], info["in_channels"]

    def run(direction):
        def make(k, side):
            if direction == "decode":
                z = torch.randn(k, zc, side, side, device=device, dtype=dtype)
                return lambda: decode_frames(vae, z, "batched")
            x = torch.rand(k, xc, side * f, side * f, device=device, dtype=dtype) * 2 - 1
            return lambda: encode_frames(vae, x, "batched", sample=False)
        return make

    fitted, ladders = {}, {}
    with torch.no_grad():
        for direction in ("decode", "encode"):
            a, b = info["flops"][direction]
            # shares of what is left, so tracing time and a slow first rung are paid for
            share = _BUDGET_SHARE[direction] * (budget_s - (time.perf_counter() - start))
            ladders[direction] = _ladder(run(direction), lambda k, hw: k * (a * hw + b * hw * hw),
                                         device, share, max_latent_pixels)
            fitted[direction] = _fit_direction(ladders[direction], (a, b),
                                               info["out_channels"][direction],
                                               f if direction == "decode" else 1)
        blend = _measure_blend(device, dtype, f)
        model = AETimeModel(fitted["decode"], fitted["encode"], f, **blend, source="measured",
                            device=name, dtype=str(dtype))
        side = max([p["side"] for p in ladders["decode"] if p["frames"] == 1 and p["side"] <= 32]
                   + [2])

        def run_mode(mode, frames, s):
            z = torch.randn(frames, zc, s, s, device=device, dtype=dtype)
            return lambda: decode_frames(vae, z, mode)
        left = budget_s - (time.perf_counter() - start)
        holdout = _holdout(model, run_mode, device, side, max(left, 0.0))
    meta = {"ladders": ladders, "holdout": holdout, "budget_s": budget_s,
            "calibration_s": time.perf_counter() - start, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "flops_holdout_rel_err": info["flops_holdout_rel_err"]}
    logger.info("calibrated AE time model on %s in %.1f s", name, meta["calibration_s"])
    return dataclasses.replace(model, meta=meta)
