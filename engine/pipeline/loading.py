"""Building a ready model from a config and an optional checkpoint."""
from __future__ import annotations

import logging

import torch

from ..checkpoint import load_into, read_state_dict
from ..config import load_spec
from ..models import build_model

log = logging.getLogger(__name__)


def load_model(config, ckpt: str | None = None, device="cpu", dtype: torch.dtype | None = None,
               seed: int = 0):
    """A :class:`LatentVisualDiffusion` in eval mode on ``device``.

    With ``ckpt`` the model is built on the meta device and the checkpoint's (memory-mapped) tensors
    are assigned into it, so weights are never held twice in RAM. Without ``ckpt`` the weights are
    randomly initialised from ``seed`` (demos and tests; nothing is downloaded).
    """
    spec = load_spec(config)
    if ckpt is None:
        log.warning("no `--ckpt` given: using randomly initialised weights for config %r", spec.name)
        model = build_model(spec, device="cpu", seed=seed)
    else:
        model = build_model(spec, device="meta")
        load_into(model, read_state_dict(ckpt), spec.name, str(ckpt))
    return model.to(device=device, dtype=dtype)
