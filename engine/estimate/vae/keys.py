"""What the VAE memory model's cache keys depend on (see :mod:`engine.estimate.vae.memory`).

The fits themselves go through :class:`~engine.estimate.laws.cache.FitCache` like every other fit;
changes of the sampled shapes, terms or phase rules (``_FIT_SHAPES`` and ``_TERMS`` in
:mod:`engine.estimate.vae.laws`, the phase rules in :mod:`engine.estimate.vae.trace`) bump its
single :data:`~engine.estimate.laws.cache.SCHEMA_VERSION`.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
from typing import Any

import torch

from ...runtime import autoencode as _autoencode
from ...runtime import tiling as _tiling


def _source_digest(*modules: Any) -> str:
    """Digest of the runtime code whose memory the fits describe: edit it and the fits refit."""
    text = "".join(inspect.getsource(m) for m in modules)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def hash_extra(dtype: torch.dtype, device_type: str) -> dict[str, Any]:
    """The settings besides the architecture that a VAE fit depends on (its key's ``extra``)."""
    extra = {"dtype": str(dtype), "device_type": device_type, "torch": torch.__version__,
             "runtime": _runtime_digest()}
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
