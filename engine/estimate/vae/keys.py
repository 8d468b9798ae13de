"""What the VAE memory model's cache keys depend on (see :mod:`engine.estimate.vae.memory`).

:func:`index_key` names the torch-free index from a spec's VAE parameters to those keys.
The fits themselves go through :class:`~engine.estimate.laws.cache.FitCache` like every other fit;
changes of the sampled shapes, terms or phase rules (``_FIT_SHAPES`` and ``_TERMS`` in
:mod:`engine.estimate.vae.laws`, the phase rules in :mod:`engine.estimate.vae.trace`) bump its
single :data:`~engine.estimate.laws.cache.SCHEMA_VERSION`.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
from typing import TYPE_CHECKING, Any

from ..laws.cache import code_digest

if TYPE_CHECKING:
    import torch

# What the index from a spec's VAE parameters to its fits depends on: the model classes (the
# architecture hashes), the runtime's autoencode code (the fits' keys) and this sub-package.
_INDEX_SOURCES = ("models/*.py", "runtime/autoencode.py", "runtime/tiling.py", "runtime/grid.py",
                  "runtime/vae_adapter.py", "estimate/vae/*.py", "estimate/tracing/*.py",
                  "estimate/laws/*.py")


def _source_digest(*modules: Any) -> str:
    """Digest of the runtime code whose memory the fits describe: edit it and the fits refit."""
    text = "".join(inspect.getsource(m) for m in modules)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def hash_extra(dtype: torch.dtype, device_type: str) -> dict[str, Any]:
    """The settings besides the architecture that a VAE fit depends on (its key's ``extra``)."""
    import torch

    # the tracer's kernel and layout corrections shape every fitted law: edit them and refit
    extra = {"dtype": str(dtype), "device_type": device_type, "torch": torch.__version__,
             "runtime": _runtime_digest(), "tracer": code_digest("estimate/tracing/*.py")}
    if device_type == "cpu":
        # oneDNN's layout blocks and its use for small convolutions depend on these
        extra.update(isa=torch.backends.cpu.get_cpu_capability(),
                     threaded=torch.get_num_threads() > 1,
                     onednn=bool(torch.backends.mkldnn.is_available()
                                 and torch.backends.mkldnn.enabled))
    return extra


@functools.lru_cache(maxsize=1)
def _runtime_digest() -> str:
    from ...runtime import autoencode, grid, tiling

    return _source_digest(autoencode, tiling, grid)


def index_key(params: Any, dtype_name: str, device_type: str) -> str:
    """FitCache key of the index from a VAE's parameters (a dataclass such as
    :class:`~engine.models.params.VAEParams`) to its fits' keys and weight bytes, for one dtype
    (``"float16"``) and device type.

    Torch-free for CUDA: the key is built from file digests, so a warm plan finds its VAE fits
    without building the VAE. A CPU fit also depends on this machine's oneDNN (see
    :func:`hash_extra`), which only torch can tell, so a CPU key imports torch.
    """
    extra: dict[str, Any] = {"dtype": dtype_name, "device_type": device_type}
    if device_type == "cpu":
        import torch

        extra = hash_extra(getattr(torch, dtype_name), device_type)
    blob = json.dumps([repr(params), extra, code_digest(*_INDEX_SOURCES)], sort_keys=True,
                      default=str)
    return f"vae-index-{dtype_name}-{device_type}-" + hashlib.sha256(blob.encode()).hexdigest()[:24]
