"""Pure ``nn.Module``s whose state-dict layout equals DynamiCrafter's. No memory policy inside.

Imported lazily, so reading a spec (:mod:`engine.models.params`, torch-free) imports no torch."""
import importlib

_EXPORTS = {"AutoencoderKL": "autoencoder", "VAEParams": "params", "COMPONENTS": "lvdm",
            "LatentVisualDiffusion": "lvdm", "build_model": "lvdm", "count_parameters": "lvdm",
            "Resampler": "resampler", "ResamplerParams": "params", "UNetModel": "unet",
            "UNetParams": "params"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
