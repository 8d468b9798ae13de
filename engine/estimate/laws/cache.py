"""Disk cache of fitted scaling laws, keyed by what determines them: the architecture and mode.

One JSON file per key under ``$ENGINE_CACHE_DIR/fits`` (default ``~/.cache/engine/fits``). Writes
go to a temporary file in the same directory and are moved into place with ``os.replace``, which
is atomic on POSIX and Windows, so concurrent writers never leave a torn file: the last complete
write wins, and a reader sees either the old or the new file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from .scaling import ScalingLaw

logger = logging.getLogger(__name__)

__all__ = ["FitCache", "architecture_hash", "default_cache_dir"]

# Bump when the meaning of cached fits changes (new trace semantics, new features).
SCHEMA_VERSION = 1


def default_cache_dir() -> Path:
    """``$ENGINE_CACHE_DIR`` when set, else ``~/.cache/engine``."""
    env = os.environ.get("ENGINE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "engine"


def architecture_hash(module: nn.Module, mode: str = "", *,
                      extra: Mapping[str, Any] | None = None) -> str:
    """A stable hex digest of ``module``'s structure, its weights' shapes and dtypes, and ``mode``.

    Module classes and ``extra_repr`` (strides, paddings, group counts, which shapes alone do not
    show) are included; weight values are not, so the hash works on meta-device modules and does
    not change when a checkpoint is fine-tuned.

    Args:
        module: the module whose cost the fit describes.
        mode: the execution mode string, e.g. ``"decode/per_frame/fp16"``.
        extra: any further JSON-serialisable settings the fit depends on.
    """
    parts: list[Any] = [SCHEMA_VERSION, mode, dict(extra or {})]
    for name, sub in module.named_modules():
        cls = type(sub)
        parts.append([name, f"{cls.__module__}.{cls.__qualname__}", sub.extra_repr()])
    for kind, named in (("p", module.named_parameters()), ("b", module.named_buffers())):
        parts += [[kind, name, list(t.shape), str(t.dtype)] for name, t in named]
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


class FitCache:
    """JSON files of fits, one per key, safe under concurrent writers.

    Args:
        root: the cache directory; defaults to :func:`default_cache_dir`. Fits live in its
            ``fits`` subdirectory.

    Example::

        cache = FitCache()
        key = architecture_hash(vae, "decode/per_frame")
        laws = cache.get_laws(key) or fit_and_store(...)
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.dir = self.root / "fits"

    def path(self, key: str) -> Path:
        """The file that holds ``key``."""
        if not key or any(c in key for c in "/\\") or key.startswith("."):
            raise ValueError(f"`key` {key!r} must be a plain file name such as the output of "
                             "`architecture_hash`.")
        return self.dir / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored payload for ``key``, or None when absent or unreadable."""
        path = self.path(key)
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            logger.warning("ignoring unreadable fit cache file %s (%s)", path, err)
            return None

    def put(self, key: str, payload: Mapping[str, Any]) -> Path:
        """Store a JSON-serialisable ``payload`` under ``key`` atomically; return its path."""
        path = self.path(key)
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(payload, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path

    def get_laws(self, key: str) -> dict[str, ScalingLaw] | None:
        """The named laws stored with :meth:`put_laws`, or None."""
        payload = self.get(key)
        if payload is None or "laws" not in payload:
            return None
        return {name: ScalingLaw.from_dict(d) for name, d in payload["laws"].items()}

    def put_laws(self, key: str, laws: Mapping[str, ScalingLaw],
                 meta: Mapping[str, Any] | None = None) -> Path:
        """Store named laws (e.g. ``{"peak_bytes": law, "flops": law}``) plus free-form ``meta``."""
        payload = {"schema": SCHEMA_VERSION, "meta": dict(meta or {}),
                   "laws": {name: law.to_dict() for name, law in laws.items()}}
        return self.put(key, payload)

