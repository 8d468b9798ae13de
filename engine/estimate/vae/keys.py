"""Cache keys and payloads of the VAE memory model's fits (see :mod:`engine.estimate.vae`)."""
from __future__ import annotations

import functools
import hashlib
import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch

from ..runtime import autoencode as _autoencode
from ..runtime import tiling as _tiling
from .cache import SCHEMA_VERSION, FitCache
from .scaling import ScalingLaw
from .vae_laws import _FamilyLaws

logger = logging.getLogger(__name__)

# Bump when the sampled shapes, terms or phase rules change (``_FIT_SHAPES`` and ``_TERMS`` in
# :mod:`engine.estimate.vae_laws`, the phase rules in :mod:`engine.estimate.vae_trace`):
# cached fits then refit.
SCHEME_VERSION = 2


def _source_digest(*modules: Any) -> str:
    """Digest of the runtime code whose memory the fits describe: edit it and the fits refit."""
    text = "".join(inspect.getsource(m) for m in modules)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _hash_extra(dtype: torch.dtype, device_type: str) -> dict[str, Any]:
    extra = {"dtype": str(dtype), "device_type": device_type, "torch": torch.__version__,
             "scheme": SCHEME_VERSION, "runtime": _runtime_digest()}
    if device_type == "cpu":
        # oneDNN's layout blocks and its use for small convolutions depend on these
        extra.update(isa=torch.backends.cpu.get_cpu_capability(),
                     threaded=torch.get_num_threads() > 1,
                     onednn=bool(torch.backends.mkldnn.is_available()
                                 and torch.backends.mkldnn.enabled))
    return extra


@functools.lru_cache(maxsize=1)
def _runtime_digest() -> str:
    return _source_digest(_autoencode, _tiling)


def _load(cache: FitCache, key: str) -> tuple[_FamilyLaws, dict] | None:
    payload = cache.get(key)
    try:
        flops = ScalingLaw.from_dict(payload["laws"]["flops"])
        return _FamilyLaws.from_payload(payload["phases"], flops), dict(payload.get("meta", {}))
    except (TypeError, KeyError, ValueError) as err:
        if payload is not None:
            logger.warning("ignoring malformed VAE fit %s in the cache (%s); refitting", key, err)
        return None


def _store(cache: FitCache, key: str, laws: _FamilyLaws, meta: Mapping[str, Any]) -> None:
    cache.put(key, {"schema": SCHEMA_VERSION, "meta": dict(meta),
                    "laws": {"flops": laws.flops.to_dict()}, "phases": laws.to_payload()})
