"""Runtime policies that execute a plan on pure models (chunked/tiled autoencoding, ...)."""
from .autoencode import (AEMode, AutoencodeConfig, AutoencodePolicy, apply_autoencode_policy,
                         decode_frames, encode_frames, get_autoencode_policy,
                         remove_autoencode_policy)
from .memory_probe import peak_cpu_allocated_bytes

__all__ = ["AEMode", "AutoencodeConfig", "AutoencodePolicy", "apply_autoencode_policy",
           "decode_frames", "encode_frames", "get_autoencode_policy", "peak_cpu_allocated_bytes",
           "remove_autoencode_policy"]
