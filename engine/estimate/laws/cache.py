"""The one disk cache of everything the estimator fits, keyed by what determines it.

Every fit (the VAE's memory laws, the UNet and encoder laws and their indices, the AE time
model, the device measurements of ``engine probe``) is one JSON entry written by
:meth:`FitCache.put_fit` and read by :meth:`FitCache.get_fit`, stamped with the single
:data:`SCHEMA_VERSION`; an entry of another version reads as absent, so it is refitted.

Entries live under ``$ENGINE_CACHE_DIR/fits``, else under the platform's user cache directory
(``platformdirs.user_cache_dir("engine")``, which honours ``XDG_CACHE_HOME``). Writes go to a
temporary file in the same directory and are moved into place with ``os.replace``, which is atomic
on POSIX and Windows, so concurrent writers never leave a torn file: the last complete write wins,
and a reader sees either the old or the new file. When the directory cannot be written, one
warning is logged per process and entries are kept in memory for the rest of the process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import platformdirs

from .scaling import ScalingLaw

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["SCHEMA_VERSION", "CachedFit", "FitCache", "FitHeldElsewhere", "architecture_hash", "code_digest",
           "default_cache_dir", "skip_held_fits", "torch_version"]

# The one version of every cached entry. Bump when the meaning of any cached fit changes (trace
# semantics, features, the VAE's fit shapes, terms or phase rules, the time model's fields).
SCHEMA_VERSION = 3

class FitHeldElsewhere(Exception):
    """Another process is fitting this key (raised instead of waiting: see
    :meth:`FitCache.fitting`)."""


_skip_held = False


def skip_held_fits(skip: bool = True) -> None:
    """From now on, :meth:`FitCache.fitting` in this process raises :class:`FitHeldElsewhere`
    instead of waiting for a key another process is fitting (a helper moves on to other work);
    ``skip=False`` waits again."""
    global _skip_held
    _skip_held = skip


# Entries that could not be written, per cache directory, kept for the rest of the process.
_IN_MEMORY: dict[Path, dict[str, dict[str, Any]]] = {}
_warned_unwritable = False


def default_cache_dir() -> Path:
    """``$ENGINE_CACHE_DIR`` when set, else ``platformdirs.user_cache_dir("engine")``."""
    env = os.environ.get("ENGINE_CACHE_DIR")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("engine"))


@functools.lru_cache(maxsize=1)
def torch_version() -> str:
    """The installed torch's version, read from its package metadata (importing torch takes
    seconds; this takes microseconds). Equal to ``torch.__version__`` for pip and conda builds."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # a source build run from its checkout
        import torch

        return torch.__version__


_ENGINE_ROOT = Path(__file__).resolve().parents[2]  # engine/


@functools.lru_cache(maxsize=None)
def code_digest(*patterns: str) -> str:
    """Digest of the engine source files matching ``patterns`` (globs relative to ``engine/``),
    of :data:`SCHEMA_VERSION` and of the torch version: edit any of those files and every key
    built on the digest changes, so the fits they produced are refitted.

    Reads file bytes only (no module is imported), so a warm process computes its keys without
    torch; ``("models/*.py", "runtime/tiling.py")`` hashes ~20 files in about a millisecond.
    """
    h = hashlib.sha256(f"{SCHEMA_VERSION}|{torch_version()}".encode())
    for pattern in patterns:
        for path in sorted(_ENGINE_ROOT.glob(pattern)):
            h.update(path.relative_to(_ENGINE_ROOT).as_posix().encode() + path.read_bytes())
    return h.hexdigest()[:16]


def architecture_hash(module: nn.Module, mode: str = "", *, extra: Mapping[str, Any] | None = None,
                      as_dtype: Any = None) -> str:
    """A stable hex digest of ``module``'s structure, its weights' shapes and dtypes, and ``mode``.

    Module classes and ``extra_repr`` (strides, paddings, group counts, which shapes alone do not
    show) are included; weight values are not, so the hash works on meta-device modules and does
    not change when a checkpoint is fine-tuned.

    Args:
        module: the module whose cost the fit describes.
        mode: the execution mode string, e.g. ``"decode/per_frame/fp16"``.
        extra: any further JSON-serialisable settings the fit depends on.
        as_dtype: hash floating-point weights as if stored in this dtype (a planner's meta-device
            module in fp32 then names the same fit as the fp16 module the run measured).
    """
    parts: list[Any] = [SCHEMA_VERSION, mode, dict(extra or {})]
    for name, sub in module.named_modules():
        cls = type(sub)
        parts.append([name, f"{cls.__module__}.{cls.__qualname__}", sub.extra_repr()])
    for kind, named in (("p", module.named_parameters()), ("b", module.named_buffers())):
        parts += [[kind, name, list(t.shape), str(as_dtype if as_dtype is not None and t.is_floating_point()
                                                 else t.dtype)] for name, t in named]
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class CachedFit:
    """One entry as :meth:`FitCache.get_fit` returns it.

    Attributes:
        laws: the named scaling laws stored with the entry (may be empty).
        meta: free-form details of the fit (fit shapes, timings, errors).
        sections: any further JSON sections the entry's owner stored (e.g. the VAE's phases).
    """

    laws: Mapping[str, ScalingLaw]
    meta: Mapping[str, Any]
    sections: Mapping[str, Any]


class FitCache:
    """JSON entries of fits, one file per key, safe under concurrent writers.

    Args:
        root: the cache directory; defaults to :func:`default_cache_dir`. Entries live in its
            ``fits`` subdirectory.

    Example::

        cache = FitCache()
        key = architecture_hash(vae, "decode/per_frame")
        fit = cache.get_fit(key)
        if fit is None:
            cache.put_fit(key, laws={"peak_bytes": law}, meta={"fit_seconds": 2.0})
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

    # -- raw JSON ------------------------------------------------------------------------------
    def get(self, key: str) -> dict[str, Any] | None:
        """The stored payload for ``key``, or None when absent or unreadable."""
        path = self.path(key)
        held = _IN_MEMORY.get(self.dir, {}).get(key)
        if held is not None:
            return json.loads(json.dumps(held))
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError) as err:
            logger.warning("ignoring unreadable fit cache file %s (%s)", path, err)
            return None

    def put(self, key: str, payload: Mapping[str, Any]) -> Path:
        """Store a JSON-serialisable ``payload`` under ``key`` atomically; return its path.

        When the directory cannot be written the payload is kept in memory for this process
        (one warning per process) and planning goes on.
        """
        path = self.path(key)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.dir)
        except OSError as err:
            self._keep_in_memory(key, payload, err)
            return path
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

    def _keep_in_memory(self, key: str, payload: Mapping[str, Any], err: OSError) -> None:
        global _warned_unwritable
        if not _warned_unwritable:
            _warned_unwritable = True
            logger.warning("the fit cache directory %s cannot be written (%s); fits are kept in "
                           "memory for this process and refitted next time; set "
                           "`ENGINE_CACHE_DIR` to a writable directory to keep them.",
                           self.dir, err)
        _IN_MEMORY.setdefault(self.dir, {})[key] = json.loads(json.dumps(payload))

    @contextlib.contextmanager
    def fitting(self, key: str, *, wait: bool = True) -> Iterator[None]:
        """Held while ``key`` is being fitted. Another process fitting the same key (the planner's
        helper, a second planner, a batch worker) waits here and then finds the entry, so no fit
        is traced twice at once; with ``wait=False``, or after :func:`skip_held_fits`, this
        process raises :class:`FitHeldElsewhere` instead of waiting. A no-op where the directory
        cannot be written or the platform has no ``fcntl`` file locks; the lock goes with the
        process, however it ends.
        """
        try:
            import fcntl
        except ImportError:  # Windows: concurrent fits stay correct, only duplicated
            yield
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            handle = open(self.path(key).with_suffix(".lock"), "a")  # noqa: SIM115 - held below
        except OSError:
            yield
            return
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (fcntl.LOCK_NB if _skip_held or not wait else 0))
            except BlockingIOError:
                raise FitHeldElsewhere(key) from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- fits ----------------------------------------------------------------------------------
    def put_fit(self, key: str, *, laws: Mapping[str, ScalingLaw] | None = None,
                meta: Mapping[str, Any] | None = None, **sections: Any) -> Path:
        """Store one fit under ``key``, stamped with :data:`SCHEMA_VERSION`.

        Args:
            key: the entry's name, e.g. from :func:`architecture_hash`.
            laws: named scaling laws (``{"peak_bytes": law, "flops": law}``).
            meta: free-form JSON details of the fit.
            **sections: further JSON sections the owner reads back from
                :attr:`CachedFit.sections`.
        """
        reserved = {"schema", "laws", "meta"} & set(sections)
        if reserved:
            raise ValueError(f"`sections` may not be named {sorted(reserved)}; pass them as "
                             "`laws`/`meta`.")
        payload = {"schema": SCHEMA_VERSION, "meta": dict(meta or {}),
                   "laws": {name: law.to_dict() for name, law in (laws or {}).items()},
                   **sections}
        return self.put(key, payload)

    def get_fit(self, key: str) -> CachedFit | None:
        """The fit stored under ``key`` by :meth:`put_fit`, or None when absent, written under
        another :data:`SCHEMA_VERSION`, or malformed (then with a warning)."""
        payload = self.get(key)
        if payload is None:
            return None
        if not isinstance(payload, dict) or payload.get("schema") != SCHEMA_VERSION:
            logger.info("cached fit %s has another schema version; refitting", key)
            return None
        try:
            laws = {name: ScalingLaw.from_dict(d) for name, d in payload["laws"].items()}
            meta = dict(payload["meta"])
        except (TypeError, KeyError, ValueError, AttributeError) as err:
            logger.warning("ignoring malformed fit %s in the cache (%s); refitting", key, err)
            return None
        sections = {k: v for k, v in payload.items() if k not in ("schema", "laws", "meta")}
        return CachedFit(laws, meta, sections)

    def get_laws(self, key: str) -> dict[str, ScalingLaw] | None:
        """The named laws stored with :meth:`put_laws`, or None."""
        fit = self.get_fit(key)
        return dict(fit.laws) if fit is not None and fit.laws else None

    def put_laws(self, key: str, laws: Mapping[str, ScalingLaw],
                 meta: Mapping[str, Any] | None = None) -> Path:
        """Store named laws (e.g. ``{"peak_bytes": law, "flops": law}``) plus free-form ``meta``."""
        return self.put_fit(key, laws=laws, meta=meta)
