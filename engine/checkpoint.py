"""Loading DynamiCrafter checkpoints (``.ckpt`` and ``.safetensors``) without a second copy in RAM.

The model is built on the meta device and the checkpoint's tensors are *assigned* into it, so a
10 GB fp32 checkpoint is memory-mapped from disk instead of being read and then copied.

Pickled checkpoints are read by torch's weights-only unpickler, which never imports a module or
calls a function the pickle names unless it is allow-listed. Released DynamiCrafter files are
PyTorch Lightning checkpoints whose non-weight entries (``hyper_parameters`` as OmegaConf objects,
loop and callback state) name classes outside torch's list, so this module adds (a) the plain-data
classes OmegaConf, Lightning and the standard library write, and (b) for any other name, a
placeholder class of ours that accepts any arguments and keeps nothing: the entry holding it is
skipped with a logged note. Names that can only run code (``os.system``, ``builtins.exec``, ...)
are refused outright. Nothing in a checkpoint can therefore execute code.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path

import torch

from .errors import InvalidArgument
from .logs import warn_once

log = logging.getLogger(__name__)

DEEPSPEED_PREFIX_LEN = 16  # DeepSpeed/Lightning wraps keys as "_forward_module.<key>"
RENAMES = (("framestride_embed", "fps_embedding"),)  # the 256 checkpoint's older key name
_MAX_STAND_INS = 64  # one retry per unknown global a legacy pickle names; real files need < 10

# Module roots and builtins whose globals exist to run code; a checkpoint naming one is refused.
_CODE_MODULES = {"os", "sys", "posix", "nt", "subprocess", "shutil", "pty", "runpy", "importlib",
                 "ctypes", "socket", "pickle", "marshal", "code", "codeop", "webbrowser",
                 "multiprocessing", "signal"}
_CODE_BUILTINS = {"eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr",
                  "globals", "locals", "vars", "input", "breakpoint", "exit", "quit"}
# Lightning's hparams dict subclass: read as a plain dict (torch only SETITEMs exact dicts).
_ATTRIBUTE_DICTS = ("lightning_fabric.utilities.data.AttributeDict",
                    "lightning.fabric.utilities.data.AttributeDict",
                    "pytorch_lightning.utilities.parsing.AttributeDict",
                    "lightning.pytorch.utilities.parsing.AttributeDict")


class CheckpointError(InvalidArgument):
    """A checkpoint that cannot be loaded into the chosen config; the message says why and what to do."""


class _Skipped:
    """Stands in for a pickled class or function that is not allow-listed: creating, calling or
    building one stores nothing and runs none of the checkpoint's code."""

    global_name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return f"<skipped {self.global_name}>"


class _AsDict:
    """Stands in for a dict subclass (``defaultdict``, ``AttributeDict``): reads it as a plain dict."""

    def __new__(cls, *args, **kwargs):
        return {}


class _AsList:
    """Stands in for a list subclass: reads it as a plain list."""

    def __new__(cls, *args, **kwargs):
        return []


def _placeholder(name: str) -> type:
    return type("_Skipped", (_Skipped,), {"global_name": name, "__qualname__": f"Skipped[{name}]"})


def _known_globals() -> list:
    """Plain-data classes Lightning, OmegaConf and the standard library pickle into checkpoints;
    OmegaConf's are added only when it is installed (without it, they become placeholders)."""
    import collections
    import typing

    known: list = [list, dict, tuple, set, frozenset, int, float, complex, str, bytes, bool,
                   typing.Any, collections.defaultdict, collections.deque]
    known += [(_AsDict, name) for name in _ATTRIBUTE_DICTS]
    try:
        from omegaconf import DictConfig, ListConfig, base, nodes
    except ImportError:
        return known
    known += [DictConfig, ListConfig, base.ContainerMetadata, base.Metadata]
    known += [getattr(nodes, n) for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode",
                                          "BooleanNode", "BytesNode", "PathNode", "EnumNode",
                                          "NoneNode") if hasattr(nodes, n)]
    return known


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.ckpt``/``.pt``/``.pth`` (weights-only, memory-mapped) or ``.safetensors`` file,
    unwrapped from Lightning's ``state_dict`` or DeepSpeed's ``module`` layouts and key-renamed."""
    path = _existing_file(Path(path).expanduser())
    if path.suffix == ".safetensors":
        sd = _read_safetensors(path)
    else:
        sd = _torch_load(path)
    return _normalise_keys(_unwrap(sd, path))


def check_checkpoint_path(path: str | os.PathLike, argument: str = "--ckpt") -> Path:
    """The cheap checks of a checkpoint path (there, a file, not empty, readable), made before
    anything is planned or built; :func:`read_state_dict` makes them again when it reads the file.
    Errors name ``argument`` (the CLI flag, or the library's parameter)."""
    return _existing_file(Path(path).expanduser(), argument)


def _existing_file(path: Path, argument: str = "--ckpt") -> Path:
    if path.is_dir():
        raise CheckpointError(f"`{argument}` {str(path)!r} is a directory; pass the checkpoint file "
                              "inside it (DynamiCrafter ships it as model.ckpt).")
    if not path.is_file():
        raise CheckpointError(f"`{argument}` {str(path)!r} does not exist; pass the path of a "
                              "DynamiCrafter model.ckpt or a converted .safetensors file.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"`{argument}` {str(path)!r} is empty (0 bytes); the download or copy "
                              "did not finish, so fetch the checkpoint again.")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"`{argument}` {str(path)!r} cannot be read (permission denied); make it "
                              "readable (chmod +r) or copy it somewhere you can read.")
    return path


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"`--ckpt` {str(path)!r} is not a readable .safetensors file ({exc}); "
                              "it is truncated or corrupt, so write it again (`engine convert` from "
                              "the original .ckpt) or download it again.") from exc


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _torch_load(path: Path):
    """Weights-only ``torch.load``, memory-mapped for zip-format files, with placeholders for the
    globals that are not allow-listed (see the module docstring)."""
    zipped = _is_zip(path)
    stand_ins: dict[str, type] = {}
    if zipped:
        try:
            known = {_global_name(g) for g in _known_globals()}
            for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)):
                if name not in known:
                    stand_ins[name] = _placeholder(name)
        except Exception as exc:  # a truncated or foreign zip; torch.load below says which
            log.debug("could not list the globals of %s: %s", path, exc)
    for _ in range(_MAX_STAND_INS):
        _refuse_code(stand_ins, path)
        present = torch.serialization.get_safe_globals()
        allowed = [g for g in _known_globals() if _global_name(g) not in stand_ins]
        allowed += [(cls, name) for name, cls in stand_ins.items()]
        try:
            with torch.serialization.safe_globals([g for g in allowed if g not in present]):
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
        except pickle.UnpicklingError as exc:
            name, stand_in = _stand_in_for(str(exc), stand_ins)
            if name is None:
                raise _unreadable(path, exc) from exc
            stand_ins[name] = stand_in
            continue
        except Exception as exc:  # zip reader RuntimeError, EOFError, a stand-in's odd state
            raise _unreadable(path, exc) from exc
        _note_skipped(obj, stand_ins, path)
        if not zipped:
            warn_once(log, "`--ckpt` %r uses PyTorch's legacy (non-zip) format, which cannot be "
                      "memory-mapped, so it is held in RAM while it loads; to load it mapped, write a "
                      "copy once with `engine convert --config CONFIG --ckpt %s --out model.safetensors` "
                      "(it reads this format).", str(path), str(path))
        return obj
    raise CheckpointError(f"`--ckpt` {str(path)!r} names more than {_MAX_STAND_INS} classes that "
                          "are not allow-listed; re-save only its weights with "
                          "`torch.save({'state_dict': model.state_dict()}, path)` from a trusted copy.")


_UNSUPPORTED = re.compile(r"GLOBAL (\S+) was not an allowed global")
_BLOCKED = re.compile(r"unsupported GLOBAL (\S+) whose module")
_WRONG_CONTAINER = re.compile(r"Can only (SETITEMS?|append)\b.*but got <class '([^']+)'>")


def _stand_in_for(message: str, stand_ins: dict) -> tuple[str | None, type | None]:
    """The global a weights-only failure names and the class to stand in for it, or ``(None, None)``
    when the failure is not one a stand-in can fix."""
    if m := _BLOCKED.search(message):
        return m.group(1), _placeholder(m.group(1))  # refused by _refuse_code on the next pass
    if m := _UNSUPPORTED.search(message):
        name = m.group(1) if "." in m.group(1) else f"builtins.{m.group(1)}"
        return (None, None) if name in stand_ins else (name, _placeholder(name))
    if m := _WRONG_CONTAINER.search(message):
        cls = m.group(2)
        name = re.search(r"Skipped\[(.+)\]", cls).group(1) if "Skipped[" in cls else cls
        stand_in = _AsDict if m.group(1).startswith("SETITEM") else _AsList
        return (None, None) if stand_ins.get(name) is stand_in else (name, stand_in)
    return None, None


def _global_name(entry) -> str:
    return entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"


def _refuse_code(stand_ins: dict, path: Path) -> None:
    for name in stand_ins:
        module, _, attr = name.rpartition(".")
        if module.split(".")[0] in _CODE_MODULES or (module == "builtins" and attr in _CODE_BUILTINS):
            raise CheckpointError(f"`--ckpt` {str(path)!r} refers to `{name}`, which can run code "
                                  "and which no checkpoint needs, so it was not loaded; use a "
                                  "checkpoint from a trusted source (DynamiCrafter's model.ckpt loads).")


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    text = str(exc)
    if "WeightsUnpickler error: " in text:
        text = text.split("WeightsUnpickler error: ", 1)[1]
    text = text.strip().splitlines()[0].split(". ")[0].rstrip(".") if text.strip() else type(exc).__name__
    if isinstance(exc, (EOFError, OSError)) or re.search(r"zip archive|central directory|EOF|too short", text):
        return CheckpointError(f"`--ckpt` {str(path)!r} is truncated or corrupt ({text}); "
                               "download or copy the checkpoint again.")
    return CheckpointError(f"`--ckpt` {str(path)!r} is not a PyTorch checkpoint the weights-only "
                           f"loader can read ({text}); pass a DynamiCrafter model.ckpt or a "
                           ".safetensors file.")


def _note_skipped(obj, stand_ins: dict, path: Path) -> None:
    """Log once which entries held placeholders (their data is dropped; the weights are not)."""
    entries = sorted({str(k) for k, v in obj.items() if _holds_placeholder(v)}) \
        if isinstance(obj, dict) else []
    names = sorted(n for n, cls in stand_ins.items() if issubclass(cls, _Skipped))
    if entries or names:
        log.info("`--ckpt` %r: skipped non-tensor entries %s, which hold classes that are not "
                 "allow-listed (%s); the weights are unaffected.", str(path),
                 ", ".join(entries) or "(none at the top level)", ", ".join(names) or "none")


def _holds_placeholder(value, depth: int = 0) -> bool:
    if isinstance(value, _Skipped):
        return True
    if depth > 32:
        return False
    if isinstance(value, dict):
        return any(_holds_placeholder(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return any(_holds_placeholder(v, depth + 1) for v in value)
    return False


def _unwrap(sd, path: Path) -> dict:
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    elif isinstance(sd, dict) and isinstance(sd.get("module"), dict):
        sd = {k[DEEPSPEED_PREFIX_LEN:]: v for k, v in sd["module"].items()}
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"`--ckpt` {str(path)!r} holds no state_dict, DeepSpeed module or "
                              "tensor mapping; pass a DynamiCrafter checkpoint.")
    dropped = [str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if dropped:
        log.info("`--ckpt` %r: ignored %d non-tensor state_dict entries (first: %s).", str(path),
                 len(dropped), ", ".join(dropped[:3]))
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _normalise_keys(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        for old, new in RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def check_compatible(model: torch.nn.Module, sd: dict, config_name: str, ckpt: str) -> None:
    """Raise :class:`CheckpointError` naming the first missing, unexpected, mis-shaped and
    non-float keys (integer or bool tensors where the model has float weights)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}"
              for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
            if keys:
                parts.append(f"{len(keys)} {label} (first: {', '.join(keys[:3])})")
        raise CheckpointError(f"`--ckpt` {ckpt!r} does not match `--config` {config_name!r}: "
                              f"{'; '.join(parts)}; pass the config this checkpoint was trained with.")
    wrong = [f"{k} ({str(sd[k].dtype).replace('torch.', '')})" for k, t in expected.items()
             if _kind(sd[k].dtype) != _kind(t.dtype)]
    if wrong:
        raise CheckpointError(f"`--ckpt` {ckpt!r} holds {len(wrong)} tensors whose dtype cannot hold "
                              f"the model's weights (first: {', '.join(wrong[:3])}); pass a "
                              "checkpoint with float weights (this file is damaged or not a "
                              "DynamiCrafter checkpoint).")


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "float"
    return "complex" if dtype.is_complex else "bool" if dtype == torch.bool else "int"


def load_into(model: torch.nn.Module, sd: dict, config_name: str, ckpt: str) -> torch.nn.Module:
    """Strictly load ``sd`` into ``model`` (a meta-device model is materialised by assignment).

    float64 tensors are cast to the model's dtype (with a warning: they are then held in RAM);
    fp16/bf16 tensors (``engine convert``'s output) are kept as they are. Non-finite weights load
    with a warning naming the first such keys.
    """
    check_compatible(model, sd, config_name, ckpt)
    sd = _cast_float64(model, sd, ckpt)
    _warn_non_finite(sd, ckpt)
    model.load_state_dict(sd, strict=True, assign=True)
    materialize_nonpersistent(model)
    return model


def _cast_float64(model: torch.nn.Module, sd: dict, ckpt: str) -> dict:
    expected = model.state_dict()
    wide = [k for k, v in sd.items() if v.dtype == torch.float64 and expected[k].dtype != torch.float64]
    if not wide:
        return sd
    target = str(expected[wide[0]].dtype).replace("torch.", "")
    warn_once(log, "`--ckpt` %r holds %d float64 tensors (first: %s); cast them to %s, the dtype "
              "`--config` builds, which holds them in RAM (save the checkpoint as float32 to keep "
              "it memory-mapped).", ckpt, len(wide), ", ".join(wide[:3]), target)
    return {k: v.to(expected[k].dtype) if k in wide else v for k, v in sd.items()}


def _warn_non_finite(sd: dict, ckpt: str) -> None:
    """One pass over the floating tensors: a float64 sum is non-finite iff some element is NaN/Inf
    (it does not overflow for any real weight), and it allocates nothing per element."""
    bad = [k for k, t in sd.items() if t.is_floating_point() and t.numel()
           and not torch.isfinite(t.sum(dtype=torch.float64))]
    bad = [k for k in bad if not torch.isfinite(sd[k]).all()]  # rule out a sum that overflowed
    if bad:
        warn_once(log, "`--ckpt` %r holds NaN or Inf in %d tensors (first: %s); the output will be "
                  "garbage, so download or convert the checkpoint again.", ckpt, len(bad),
                  ", ".join(bad[:3]))


def materialize_nonpersistent(model: torch.nn.Module) -> None:
    """Rebuild buffers that are not in checkpoints (masks, constants) where a meta build left them."""
    for module in model.modules():
        if hasattr(module, "reset_buffers") and any(b.is_meta for b in module.buffers()):
            module.reset_buffers()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"tensors {leftover[:3]} were not filled by the checkpoint; "
                              "pass a complete DynamiCrafter checkpoint.")
