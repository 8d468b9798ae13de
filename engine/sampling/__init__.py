"""Samplers as plain functions over a denoiser ``model(x, t, **extra_args)``, plus schedules and CFG."""
from __future__ import annotations

from .ddim import sample_ddim
from .guidance import CFGDenoiser, default_concat_conds, rescale_noise_cfg
from .schedule import (
    BUFFER_NAMES,
    TIMESTEP_SPACINGS,
    ddim_sigmas,
    ddim_timesteps,
    diffusion_buffers,
    dynamic_rescale_array,
    make_betas,
    rescale_zero_terminal_snr,
)

__all__ = [
    "BUFFER_NAMES", "CFGDenoiser", "TIMESTEP_SPACINGS", "ddim_sigmas", "ddim_timesteps", "default_concat_conds",
    "diffusion_buffers", "dynamic_rescale_array", "make_betas", "rescale_noise_cfg", "rescale_zero_terminal_snr",
    "sample_ddim",
]
