"""Runtime policies that execute a plan on pure models: chunked/tiled autoencoding, attention
backends, precision, offload. Submodules import lazily (some pull in accelerate or torch.compiler)."""
import importlib

_EXPORTS = {
    "AEMode": "autoencode", "AutoencodeConfig": "autoencode", "AutoencodePolicy": "autoencode",
    "apply_autoencode_policy": "autoencode", "decode_frames": "autoencode",
    "encode_frames": "autoencode", "get_autoencode_policy": "autoencode",
    "remove_autoencode_policy": "autoencode", "peak_cpu_allocated_bytes": "memory_probe",
    "apply_offload": "offload", "remove_offload": "offload", "set_attention_backend": "attention",
    "apply_precision": "precision",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
