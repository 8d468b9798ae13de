"""Typed model specifications, parsed once from DynamiCrafter's OmegaConf YAML (``target``/``params``).

YAML stays at the edge: :func:`load_spec` turns a config file (ours, or DynamiCrafter's original,
unchanged) into a frozen :class:`ModelSpec`; everything downstream reads the dataclasses.
"""
from __future__ import annotations

import atexit
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib.resources import as_file, files
from pathlib import Path

from omegaconf import OmegaConf

from .config_parse import ConfigError, model_spec_fields
from .models.params import ResamplerParams, UNetParams, VAEParams

__all__ = ["BUILTIN_CONFIGS", "ConfigError", "ModelSpec", "load_spec", "resolve_config_path"]

BUILTIN_CONFIGS = {"tiny": "tiny.yaml", "256": "inference_256_v1.0.yaml",
                   "512": "inference_512_v1.0.yaml", "1024": "inference_1024_v1.0.yaml"}
# The built-ins are package data (``engine/configs/``). Wheel, editable and checkout installs hold
# them on disk and ``as_file`` hands back that path; only a zipped install gets a temporary copy,
# which must outlive the call that resolved it, so the copies are released at exit.
_BUILTIN_FILES = ExitStack()
atexit.register(_BUILTIN_FILES.close)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a DynamiCrafter model and run it as its authors do."""

    name: str
    unet: UNetParams
    vae: VAEParams
    resampler: ResamplerParams
    text_arch: str | dict = "ViT-H-14"
    text_layer: str = "penultimate"
    image_arch: str | dict = "ViT-H-14"
    parameterization: str = "eps"
    rescale_betas_zero_snr: bool = False
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    scale_factor: float = 0.18215
    use_dynamic_rescale: bool = False
    base_scale: float = 0.7
    turning_step: int = 400
    fps_condition_type: str = "fs"
    perframe_ae: bool = False
    latent_size: tuple = (32, 32)
    channels: int = 4
    source: str = field(default="", compare=False)

    @property
    def default_height_width(self) -> tuple[int, int]:
        f = self.vae.downsample_factor
        return self.latent_size[0] * f, self.latent_size[1] * f

    @property
    def frames(self) -> int:
        return self.unet.temporal_length

    @property
    def timestep_spacing(self) -> str:
        # zero-terminal-SNR models need t=999 in the schedule (DynamiCrafter's run.sh does the same)
        return "uniform_trailing" if self.rescale_betas_zero_snr else "uniform"

    @property
    def guidance_rescale(self) -> float:
        return 0.7 if self.rescale_betas_zero_snr else 0.0

    @property
    def default_fs(self) -> int:
        return self.unet.default_fs


def resolve_config_path(config: str | os.PathLike) -> Path:
    """A path, or a built-in name (``tiny``, ``256``, ``512``, ``1024``)."""
    name = str(config)
    if name in BUILTIN_CONFIGS:
        resource = files("engine") / "configs" / BUILTIN_CONFIGS[name]
        return _BUILTIN_FILES.enter_context(as_file(resource))
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(f"`--config` {name!r} is not a file; pass a YAML path or one of "
                          f"{', '.join(BUILTIN_CONFIGS)}.")
    return path


def load_spec(config: str | os.PathLike) -> ModelSpec:
    """Parse a DynamiCrafter-format YAML (path or built-in name) into a :class:`ModelSpec`."""
    path = resolve_config_path(config)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:
        raise ConfigError(f"`--config` {str(path)!r} is not valid YAML ({exc}); fix the file.") from exc
    if not isinstance(raw, dict) or "model" not in raw:
        raise ConfigError(f"`--config` {str(path)!r} has no top-level `model` section; "
                          "use a DynamiCrafter inference config.")
    return ModelSpec(name=path.stem, source=str(path), **model_spec_fields(raw["model"]))
