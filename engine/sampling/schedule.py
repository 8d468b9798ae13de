"""Discrete diffusion schedules as DynamiCrafter (LVDM) builds them.

Betas: LDM "linear" schedule; zero terminal SNR: Lin et al. 2023, arXiv:2305.08891, Algorithm 1.
DDIM timesteps and sigmas: Song et al. 2020, arXiv:2010.02502, eq. 16.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from ..logs import warn_once
from ..plan.settings import TIMESTEP_SPACINGS

logger = logging.getLogger(__name__)

PARAMETERIZATIONS = ("eps", "x0", "v")

# Registration order of LVDM's DDPM.register_schedule, so state_dict key order matches too.
BUFFER_NAMES = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)


def make_betas(timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012,
               zero_terminal_snr: bool = False) -> np.ndarray:
    """LDM linear betas, linspace(sqrt(start), sqrt(end))**2, optionally rescaled to zero terminal SNR."""
    if not isinstance(timesteps, (int, np.integer)) or timesteps < 2:
        raise ValueError(f"`timesteps` must be an integer >= 2, got {timesteps!r}; use 1000 for DynamiCrafter.")
    if not 0.0 < linear_start <= linear_end < 1.0:
        raise ValueError(f"`linear_start`/`linear_end` must satisfy 0 < start <= end < 1, got "
                         f"{linear_start!r}/{linear_end!r}; use 0.00085/0.012 for DynamiCrafter.")
    betas = np.linspace(math.sqrt(linear_start), math.sqrt(linear_end), int(timesteps), dtype=np.float64) ** 2
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift/scale sqrt(alpha_bar) so it ends at 0 and keeps its start."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_bar = sqrt_ab ** 2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def diffusion_buffers(betas, parameterization: str) -> dict[str, torch.Tensor]:
    """The float32 schedule buffers of LVDM's DDPM (v_posterior = 0), keyed by their checkpoint names."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"`parameterization` must be one of {', '.join(PARAMETERIZATIONS)}, "
                         f"got {parameterization!r}.")
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    # Zero terminal SNR makes ac[-1] == 0: inf/0 entries are expected and match the checkpoints.
    with np.errstate(divide="ignore", invalid="ignore"):
        arrays = {
            "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        }
        if parameterization == "v":
            # LVDM stores zeros here for v-models; the checkpoints carry these zeros.
            arrays["sqrt_recip_alphas_cumprod"] = np.zeros_like(ac)
            arrays["sqrt_recipm1_alphas_cumprod"] = np.zeros_like(ac)
        else:
            arrays["sqrt_recip_alphas_cumprod"] = np.sqrt(1.0 / ac)
            arrays["sqrt_recipm1_alphas_cumprod"] = np.sqrt(1.0 / ac - 1.0)
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        arrays["posterior_variance"] = post_var
        arrays["posterior_log_variance_clipped"] = np.log(np.maximum(post_var, 1e-20))
        arrays["posterior_mean_coef1"] = betas * np.sqrt(ac_prev) / (1.0 - ac)
        arrays["posterior_mean_coef2"] = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
    # torch.tensor (not from_numpy) so a surrounding `with torch.device("meta")` allocates nothing.
    return {name: torch.tensor(arrays[name], dtype=torch.float32) for name in BUFFER_NAMES}


def dynamic_rescale_array(base_scale: float, timesteps: int = 1000, turning_step: int = 400) -> np.ndarray:
    """DynamiCrafter's `scale_arr`: a 1 -> base_scale ramp over `turning_step`, then `timesteps` x base_scale."""
    if turning_step < 1 or timesteps < 1:
        raise ValueError(f"`turning_step` and `timesteps` must be >= 1, got {turning_step!r} and "
                         f"{timesteps!r}; use 400 and 1000 for DynamiCrafter.")
    ramp = np.linspace(1.0, base_scale, int(turning_step), dtype=np.float64)
    return np.concatenate([ramp, np.full(int(timesteps), base_scale, dtype=np.float64)])


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "uniform") -> np.ndarray:
    """Ascending DDIM timesteps for `spacing` (LVDM's make_ddim_timesteps, including its +1/-1 offsets)."""
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"`timestep_spacing` must be one of {', '.join(TIMESTEP_SPACINGS)}, got {spacing!r}.")
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"`steps` must be an integer in [1, {num_train_timesteps}], got {num_steps!r}; "
                         f"pick a value in that range (DynamiCrafter uses 50).")
    total = int(num_train_timesteps)
    if spacing == "uniform":
        steps = np.arange(0, total, total // num_steps, dtype=np.int64) + 1
    elif spacing == "uniform_trailing":
        # Trailing spacing ends at t = T-1, the step zero terminal SNR needs (arXiv:2305.08891, Table 2).
        steps = np.flip(np.round(np.arange(total, 0, -total / num_steps))).astype(np.int64) - 1
    else:
        steps = (np.linspace(0, math.sqrt(total * 0.8), num_steps) ** 2).astype(np.int64) + 1
    if len(steps) != num_steps:
        # LVDM does not assert the count; 'uniform' yields extra steps when T % n != 0. Kept for parity.
        warn_once(logger, "`timestep_spacing` %r gives %d timesteps for `steps`=%d (as DynamiCrafter does).",
                  spacing, len(steps), num_steps)
    return steps


def _as_float64(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def _is_float32(values) -> bool:
    return getattr(values, "dtype", None) in (torch.float32, np.float32)


def ddim_sigmas(alphas_cumprod, timesteps, eta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DDIM eq. 16: sigma = eta*sqrt((1-a_prev)/(1-a)*(1-a/a_prev)), with a_prev[0] = alphas_cumprod[0]."""
    if not eta >= 0.0:
        raise ValueError(f"`eta` must be >= 0, got {eta!r}; use 0 for deterministic DDIM or 1 for DynamiCrafter.")
    ac = _as_float64(alphas_cumprod)
    low = _is_float32(alphas_cumprod)
    steps = np.asarray(timesteps, dtype=np.int64)
    if steps.ndim != 1 or steps.size == 0 or steps.min() < 0 or steps.max() >= len(ac):
        raise ValueError(f"`timesteps` must be a non-empty 1-D array within [0, {len(ac) - 1}]; "
                         f"build it with `ddim_timesteps`.")
    alphas = ac[steps]
    alphas_prev = np.concatenate([ac[:1], ac[steps[:-1]]])
    if low:
        # LVDM divides a float64 array by its float32 tensor, which torch evaluates as
        # (1 - a_prev) * f32(1 / f32(1 - a)); keep that rounding so sigmas match bit for bit.
        inv = (np.float32(1) / (np.float32(1) - alphas.astype(np.float32))).astype(np.float64)
        ratio = (1.0 - alphas_prev) * inv
    else:
        ratio = (1.0 - alphas_prev) / (1.0 - alphas)
    sigmas = eta * np.sqrt(ratio * (1.0 - alphas / alphas_prev))
    return sigmas, alphas, alphas_prev
