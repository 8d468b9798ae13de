"""The plan space: which settings exist, their allowed values, and ``--force`` parsing."""
from __future__ import annotations

from dataclasses import dataclass, replace

PRECISIONS = ("fp16", "bf16", "fp32-autocast")
OFFLOADS = ("none", "model", "block")
CFG_MODES = ("batched", "sequential")
ATTENTIONS = ("sdpa", "xformers", "chunked:4096", "chunked:1024", "naive")
SETTING_KEYS = ("dtype", "attention", "cfg", "offload", "ae_encode", "ae_decode", "empty_cache")


@dataclass(frozen=True)
class Settings:
    """One point of the plan space (autoencoding modes are chosen per candidate by the AE planner)."""

    dtype: str = "fp16"
    attention: str = "sdpa"
    cfg: str = "batched"
    offload: str = "none"
    ae_encode: str | None = None
    ae_decode: str | None = None
    empty_cache: bool = True
    reference: bool = False  # DynamiCrafter's own execution: extra terms apply (see planner)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in SETTING_KEYS}
        d["empty_cache"] = "yes" if self.empty_cache else "no"
        return d


def reference_settings(spec) -> Settings:
    """DynamiCrafter's inference: fp32 weights under fp16 autocast, CFG as two calls, xformers for
    spatial attention (plain path for temporal), all frames VAE-encoded, ``perframe_ae`` from the
    config, every component resident, the allocator cache never emptied."""
    ae = "per-frame" if spec.perframe_ae else "batched"
    return Settings(dtype="fp32-autocast", attention="xformers", cfg="sequential", offload="none",
                    ae_encode=ae, ae_decode=ae, empty_cache=False, reference=True)


def _check_value(key: str, value: str) -> None:
    allowed = {"dtype": PRECISIONS, "offload": OFFLOADS, "cfg": CFG_MODES}.get(key)
    if allowed and value not in allowed:
        raise ValueError(f"`--force {key}={value}` is not a valid value; use one of {', '.join(allowed)}.")
    if key == "attention" and value not in ("sdpa", "xformers", "naive") and not value.startswith("chunked:"):
        raise ValueError(f"`--force attention={value}` is not a valid value; use sdpa, xformers, naive or chunked:N.")
    if key == "empty_cache" and value not in ("yes", "no"):
        raise ValueError(f"`--force empty_cache={value}` is not a valid value; use yes or no.")


def parse_force(text: str | None, spec) -> tuple[dict, bool]:
    """``reference,ae_decode=batched`` -> ({'ae_decode': 'batched', ...}, reference=True)."""
    forced, reference = {}, False
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        if item == "reference":
            reference = True
            continue
        key, sep, value = item.partition("=")
        if not sep or key not in SETTING_KEYS:
            raise ValueError(f"`--force` item {item!r} is not key=value with a key among "
                             f"{', '.join(SETTING_KEYS)} (or the word `reference`); fix the list.")
        _check_value(key, value)
        forced[key] = value
    return forced, reference


def apply_forced(settings: Settings, forced: dict) -> Settings:
    values = dict(forced)
    if "empty_cache" in values:
        values["empty_cache"] = values["empty_cache"] == "yes"
    return replace(settings, **values)
