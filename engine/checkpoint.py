"""Loading DynamiCrafter checkpoints (``.ckpt`` and ``.safetensors``) without a second copy in RAM.

The model is built on the meta device and the checkpoint's tensors are *assigned* into it, so a
10 GB fp32 checkpoint is memory-mapped from disk instead of being read and then copied.
"""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEEPSPEED_PREFIX_LEN = 16  # DeepSpeed/Lightning wraps keys as "_forward_module.<key>"
RENAMES = (("framestride_embed", "fps_embedding"),)  # the 256 checkpoint's older key name


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the chosen config; the message says why and what to do."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.ckpt``/``.pt``/``.pth`` (weights-only, memory-mapped) or ``.safetensors`` file,
    unwrapped from Lightning's ``state_dict`` or DeepSpeed's ``module`` layouts and key-renamed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"`--ckpt` {str(path)!r} does not exist; pass the path of a "
                              "DynamiCrafter model.ckpt or a converted .safetensors file.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path), device="cpu")
    else:
        sd = _torch_load(path)
    return _normalise_keys(_unwrap(sd, path))


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise CheckpointError(
            f"`--ckpt` {str(path)!r} is not a readable weights-only PyTorch checkpoint ({exc}); "
            "check the file is complete, or convert it with `engine convert`.") from exc


def _unwrap(sd, path: Path) -> dict:
    if isinstance(sd, dict) and "state_dict" in sd:
        return sd["state_dict"]
    if isinstance(sd, dict) and "module" in sd:
        return {k[DEEPSPEED_PREFIX_LEN:]: v for k, v in sd["module"].items()}
    if isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values()):
        return sd
    raise CheckpointError(f"`--ckpt` {str(path)!r} holds no state_dict, DeepSpeed module or tensor "
                          "mapping; pass a DynamiCrafter checkpoint.")


def _normalise_keys(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        for old, new in RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def check_compatible(model: torch.nn.Module, sd: dict, config_name: str, ckpt: str) -> None:
    """Raise :class:`CheckpointError` naming the first missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}"
              for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if keys:
            parts.append(f"{len(keys)} {label} (first: {', '.join(keys[:3])})")
    raise CheckpointError(f"`--ckpt` {ckpt!r} does not match `--config` {config_name!r}: "
                          f"{'; '.join(parts)}; pass the config this checkpoint was trained with.")


def load_into(model: torch.nn.Module, sd: dict, config_name: str, ckpt: str) -> torch.nn.Module:
    """Strictly load ``sd`` into ``model`` (a meta-device model is materialised by assignment)."""
    check_compatible(model, sd, config_name, ckpt)
    model.load_state_dict(sd, strict=True, assign=True)
    materialize_nonpersistent(model)
    return model


def materialize_nonpersistent(model: torch.nn.Module) -> None:
    """Rebuild buffers that are not in checkpoints (masks, constants) where a meta build left them."""
    for module in model.modules():
        if hasattr(module, "reset_buffers") and any(b.is_meta for b in module.buffers()):
            module.reset_buffers()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"tensors {leftover[:3]} were not filled by the checkpoint; "
                              "pass a complete DynamiCrafter checkpoint.")
