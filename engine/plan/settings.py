"""The plan's vocabulary: every setting with one name, one type and one table of legal values.

Torch-free on purpose: the planner, the JSON reader and the CLI use it without importing torch.
Strings exist only at the edges: :meth:`Settings.from_mapping` (a dict, JSON or ``--force``) turns
them into these types, and :meth:`Settings.to_dict` turns them back.

Example:
    >>> s = Settings(precision="fp16", offload="block", ae_decode="chunk:4")
    >>> s.precision is Precision.FP16, str(s.ae_decode)
    (True, 'chunk:4')
    >>> Settings.from_mapping({"ofload": "block"})
    Traceback (most recent call last):
    engine.errors.InvalidArgument: `settings` key 'ofload' is unknown; did you mean 'offload'? ...
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields, replace
from enum import Enum
from typing import Any, Mapping

from ..errors import InvalidArgument, WrongType
from .aemode import AEMode


class Choice(str, Enum):
    """A setting whose values are named strings; equal to its string (``Offload.NONE == "none"``)."""

    @classmethod
    def parse(cls, value: Any, argument: str) -> Choice:
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise InvalidArgument(f"`{argument}` {value!r} is not {cls.label()}; use one of "
                                  f"{', '.join(m.value for m in cls)}.") from None

    @classmethod
    def label(cls) -> str:
        return "a valid value"

    def __str__(self) -> str:
        return self.value

    __hash__ = str.__hash__  # equal to its string, so it must hash like it (dict keys, sets)


class Precision(Choice):
    """Weight storage and compute precision."""

    FP16 = "fp16"
    BF16 = "bf16"
    FP32_AUTOCAST = "fp32-autocast"  # fp32 weights, fp16 autocast: DynamiCrafter's own run
    FP32 = "fp32"

    @classmethod
    def label(cls) -> str:
        return "a precision"

    @property
    def weight_dtype_name(self) -> str:
        """The ``torch`` dtype name weights are stored in (``getattr(torch, name)``)."""
        return {"fp16": "float16", "bf16": "bfloat16"}.get(self.value, "float32")

    @property
    def weight_bytes(self) -> int:
        return 4 if self.weight_dtype_name == "float32" else 2


class Offload(Choice):
    NONE = "none"    # every weight on the device for the whole run
    MODEL = "model"  # each component on the device only for its stages
    BLOCK = "block"  # UNet blocks streamed with prefetch, other components model-level

    @classmethod
    def label(cls) -> str:
        return "an offload mode"


class CFGMode(Choice):
    BATCHED = "batched"        # cond and uncond in one UNet call of batch 2
    SEQUENTIAL = "sequential"  # two calls of batch 1 (DynamiCrafter)

    @classmethod
    def label(cls) -> str:
        return "a CFG mode"


class Attention(Choice):
    SDPA = "sdpa"          # PyTorch's fused kernels
    XFORMERS = "xformers"  # only where its kernels really run
    NAIVE = "naive"        # the full score matrix (DynamiCrafter's plain path)
    CHUNKED = "chunked"    # SDPA over query chunks of ``attention_chunk`` tokens

    @classmethod
    def label(cls) -> str:
        return "an attention backend"


# DDIM timestep spacings (engine.sampling.schedule implements them); here so that option checks
# made before anything imports torch read the same table
TIMESTEP_SPACINGS = ("uniform", "uniform_trailing", "quad")


class GenerationMode(Choice):
    I2V = "i2v"
    INTERP = "interp"
    LOOP = "loop"

    @classmethod
    def label(cls) -> str:
        return "a generation mode"


_YES, _NO = ("yes", "true", "1", "on"), ("no", "false", "0", "off")


def parse_flag(value: Any, argument: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _YES or text in _NO:
        return text in _YES
    raise InvalidArgument(f"`{argument}` {value!r} is not yes or no; write yes or no.")


def parse_attention(text: Any, argument: str) -> tuple[Attention, int | None]:
    """``"chunked:1024"`` -> (CHUNKED, 1024); ``"sdpa"`` -> (SDPA, None)."""
    kind, _, size = str(text).partition(":")
    attention = Attention.parse(kind if size or kind == "chunked" else text, argument)
    if not size:
        return attention, None
    if attention is not Attention.CHUNKED or not size.isdigit() or int(size) < 1:
        raise InvalidArgument(f"`{argument}` {text!r} is not an attention backend; use sdpa, xformers, "
                              "naive or chunked:N with N a positive token count.")
    return attention, int(size)


@dataclass(frozen=True)
class Settings:
    """One point of the plan space: everything the runtime needs to execute a run.

    Attributes:
        precision: weight and compute precision.
        spatial_attention, temporal_attention: the backend of the attention layers inside the
            spatial and the temporal transformers (DynamiCrafter: ``xformers`` and ``naive``).
        attention_chunk: query tokens per chunk for the ``chunked`` backend.
        cfg: classifier-free guidance batched in one UNet call or as sequential calls.
        offload: where weights live between and during stages.
        ae_encode, ae_decode: autoencoding modes; ``None`` takes the config's ``perframe_ae``
            (a plan always names both).
        empty_cache: give cached allocator blocks back before each stage (CUDA only).
        encode_all_frames: VAE-encode every frame as DynamiCrafter does, not only the used ones.
        autocast_weight_cache: keep the UNet and Resampler weights requiring grad, as
            DynamiCrafter does, so autocast caches fp16 copies of them for the whole run.
    """

    precision: Precision = Precision.FP32
    spatial_attention: Attention = Attention.SDPA
    temporal_attention: Attention = Attention.SDPA
    attention_chunk: int = 4096
    cfg: CFGMode = CFGMode.SEQUENTIAL
    offload: Offload = Offload.NONE
    ae_encode: AEMode | None = None
    ae_decode: AEMode | None = None
    empty_cache: bool = True
    encode_all_frames: bool = False
    autocast_weight_cache: bool = False

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name)))

    # -- the runtime's view ------------------------------------------------------------------
    def backend(self, layer: str) -> str:
        """The backend string of the ``spatial`` or ``temporal`` attention layers for the models."""
        kind = self.spatial_attention if layer == "spatial" else self.temporal_attention
        return f"chunked:{self.attention_chunk}" if kind is Attention.CHUNKED else kind.value

    @property
    def attention(self) -> str:
        """``sdpa`` when both layer kinds agree, else ``SPATIAL/TEMPORAL`` (e.g. ``xformers/naive``)."""
        spatial, temporal = self.backend("spatial"), self.backend("temporal")
        return spatial if spatial == temporal else f"{spatial}/{temporal}"

    def with_autoencoding(self, perframe_ae: bool) -> Settings:
        """Unset autoencoding modes take the config's ``perframe_ae`` (per-frame or batched)."""
        default = AEMode(chunk=1) if perframe_ae else AEMode()
        return replace(self, ae_encode=self.ae_encode or default, ae_decode=self.ae_decode or default)

    # -- the edges ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON scalars: enums and modes as their strings, unset modes as ``None``."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value if isinstance(value, (bool, int)) or value is None else str(value)
        return out

    def describe(self) -> str:
        """One line for people: ``precision=fp16, attention=sdpa, cfg=batched, ...``."""
        parts = [f"precision={self.precision}", f"attention={self.attention}", f"cfg={self.cfg}",
                 f"offload={self.offload}", f"ae_encode={self.ae_encode}", f"ae_decode={self.ae_decode}",
                 f"empty_cache={'yes' if self.empty_cache else 'no'}"]
        parts += [f"{k}=yes" for k in ("encode_all_frames", "autocast_weight_cache") if getattr(self, k)]
        return ", ".join(parts)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], *, argument: str = "settings",
                     base: Settings | None = None) -> Settings:
        """Settings from a dict of (string) values over ``base`` (default: :class:`Settings`).

        Besides the field names, the edge accepts ``attention`` (both layer kinds; ``chunked:N``
        also sets the chunk) and ``dtype`` (an older name of ``precision``).
        """
        if isinstance(mapping, Settings):
            return mapping
        if not isinstance(mapping, Mapping):
            raise WrongType(f"`{argument}` must be a Settings or a mapping of setting names to values, "
                            f"not {type(mapping).__name__}; build one with engine.Settings(...).")
        values: dict[str, Any] = {}
        for key, value in mapping.items():
            values.update(_edge_item(str(key), value, argument))
        return replace(base or cls(), **values)


_FIELDS = tuple(f.name for f in fields(Settings))
_BOOLS = ("empty_cache", "encode_all_frames", "autocast_weight_cache")
_CHOICES = {"precision": Precision, "spatial_attention": Attention, "temporal_attention": Attention,
            "cfg": CFGMode, "offload": Offload}


def _unknown_key(key: str, argument: str) -> InvalidArgument:
    near = difflib.get_close_matches(key, _FIELDS + ("attention",), n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return InvalidArgument(f"`{argument}` key {key!r} is unknown; {hint}the keys are "
                           f"{', '.join(_FIELDS)} (and attention for both layer kinds).")


_generated_init = Settings.__init__


def _keyword_init(self, **values):
    """Settings take keywords only, and an unknown keyword is named (not a bare TypeError)."""
    for key in values:
        if key not in _FIELDS:
            raise _unknown_key(key, "Settings")
    _generated_init(self, **values)


Settings.__init__ = _keyword_init


def _coerce(name: str, value: Any) -> Any:
    if name in _CHOICES:
        if name.endswith("_attention") and isinstance(value, str) and ":" in value:
            raise InvalidArgument(f"`{name}` {value!r} carries a chunk size; pass "
                                  f"{name}='chunked' and attention_chunk={value.partition(':')[2]}.")
        return _CHOICES[name].parse(value, name)
    if name in ("ae_encode", "ae_decode"):
        return None if value is None else AEMode.parse(value, argument=name)
    if name in _BOOLS:
        return parse_flag(value, name)
    if name == "attention_chunk":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgument(f"`attention_chunk` {value!r} must be a positive token count, e.g. 4096.")
    return value


def _edge_item(key: str, value: Any, argument: str) -> dict[str, Any]:
    """One ``key=value`` from a mapping, aliases expanded, as field values."""
    if key == "dtype":
        key = "precision"
    if key == "attention":
        kind, chunk = parse_attention(value, f"{argument}.attention")
        out: dict[str, Any] = {"spatial_attention": kind, "temporal_attention": kind}
        return {**out, "attention_chunk": chunk} if chunk else out
    if key not in _FIELDS:
        raise _unknown_key(key, argument)
    if key.endswith("_attention"):
        kind, chunk = parse_attention(value, f"{argument}.{key}")
        return {key: kind, "attention_chunk": chunk} if chunk else {key: kind}
    try:
        return {key: _coerce(key, value)}
    except InvalidArgument as err:
        raise InvalidArgument(str(err).replace(f"`{key}`", f"`{argument}.{key}`", 1)) from None


def reference_settings(perframe_ae: bool) -> Settings:
    """DynamiCrafter's own inference as plain settings: fp32 weights under fp16 autocast with the
    weights requiring grad, xformers spatial and naive temporal attention, CFG as two calls, every
    frame VAE-encoded, ``perframe_ae`` from the config, all resident, the cache never emptied."""
    ae = AEMode(chunk=1) if perframe_ae else AEMode()
    return Settings(precision=Precision.FP32_AUTOCAST, spatial_attention=Attention.XFORMERS,
                    temporal_attention=Attention.NAIVE, cfg=CFGMode.SEQUENTIAL, offload=Offload.NONE,
                    ae_encode=ae, ae_decode=ae, empty_cache=False, encode_all_frames=True,
                    autocast_weight_cache=True)


@dataclass(frozen=True)
class Forced:
    """Parsed ``--force``: the word ``reference`` and/or pinned setting values."""

    reference: bool = False
    values: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    items: tuple[str, ...] = ()

    def apply(self, settings: Settings) -> Settings:
        return replace(settings, **self.values)


def parse_force(text: str | None, argument: str = "--force") -> Forced:
    """``reference,ae_decode=batched`` -> Forced(reference=True, values={'ae_decode': AEMode()})."""
    reference, values, items = False, {}, []
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        if item == "reference":
            reference = True
            items.insert(0, item)
            continue
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in _FIELDS + ("attention", "dtype"):
            raise InvalidArgument(f"`{argument}` item {item!r} is not key=value with a key among "
                                  f"{', '.join(_FIELDS)} (or the word `reference`); fix the list.")
        try:
            values.update(_edge_item(key, value, argument))
        except InvalidArgument as err:
            way_out = str(err).partition("; ")[2] or "see `engine plan --help`."
            raise InvalidArgument(f"`{argument} {item}` is not a valid value; {way_out}") from None
        items.append(item)
    return Forced(reference, values, tuple(items))
