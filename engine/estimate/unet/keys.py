"""The disk-cache keys of the non-VAE stages' fits, computed without torch.

Every key ends in :func:`source_digest`, a digest of the files of the code the fits depend on
(model classes, tracer, law derivation, this sub-package), of the torch and open_clip versions and
of :data:`~engine.estimate.laws.cache.SCHEMA_VERSION`: edit any of them and the fits refit. Only
file bytes and package metadata are read, so a warm plan finds its fits without importing torch.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import re
from functools import lru_cache

from ..laws.cache import code_digest, torch_version

__all__ = ["family_key", "preprocess_key", "source_digest", "spec_digest"]

_SOURCES = ("models/*.py", "estimate/tracing/*.py", "estimate/laws/monomials.py",
            "estimate/unet/*.py")


@lru_cache(maxsize=1)
def source_digest() -> str:
    """Digest of the code a fit depends on (model classes, tracer), of torch and open_clip, and of
    the cache's :data:`~engine.estimate.laws.cache.SCHEMA_VERSION`."""
    h = hashlib.sha256(code_digest(*_SOURCES).encode())
    try:
        h.update(importlib.metadata.version("open_clip_torch").encode())
    except importlib.metadata.PackageNotFoundError:
        pass
    return h.hexdigest()[:16]


def spec_digest(spec, stage: str) -> str:
    """Digest of what builds ``stage``'s modules: spec parameters plus :func:`source_digest`."""
    parts = (stage, repr(spec.unet), repr(spec.resampler), repr(spec.text_arch),
             repr(spec.image_arch), spec.text_layer, source_digest())
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def family_key(stage: str, arch_hash: str, precision_family: str, kinds: tuple[str, str],
               regime: str, device_type: str) -> str:
    """FitCache key of one fit: architecture hash, precision, backends, regime, device, torch."""
    tail = hashlib.sha256(f"{arch_hash}|{torch_version()}|{source_digest()}".encode())
    name = f"stage-{stage}-{regime}-{precision_family}-{kinds[0]}-{kinds[1]}-{device_type}"
    return _safe(name) + "-" + tail.hexdigest()[:20]


def preprocess_key(spec, precision_family: str, batch: int, height: int, width: int,
                   device_type: str) -> str:
    """FitCache key of the image encoder's resize + normalisation traced at one input size."""
    name = f"stage-preprocess-b{batch}-{height}x{width}-{precision_family}-{device_type}"
    return _safe(name) + "-" + spec_digest(spec, "image_encode")[:20]
