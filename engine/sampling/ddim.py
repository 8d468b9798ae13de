"""DDIM sampling (Song et al. 2020, arXiv:2010.02502, eq. 12) as DynamiCrafter's DDIMSampler runs it.

Noise order (for seeded reproduction): the caller draws x_T; then every step draws exactly one
``torch.randn(x.shape)`` from ``generator`` (or the global RNG of ``x.device``) right after the model
call, including steps where sigma == 0 (eta = 0, the final step), as DynamiCrafter's ``noise_like``
does. Resuming at ``start_index`` with the saved x and generator state therefore continues the stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from ..logs import progress_bar

from .schedule import _as_float64, ddim_sigmas

PARAMETERIZATIONS = ("eps", "v")


@dataclass(frozen=True)
class _Coefficients:
    """Per-DDIM-index scalars as [n, 1, ..., 1] tensors on the latent's device and compute dtype."""

    timesteps: np.ndarray
    sqrt_a: torch.Tensor             # sqrt(a_t), a_t = ddim_alphas
    sqrt_one_minus_a: torch.Tensor
    sqrt_a_prev: torch.Tensor
    dir_coef: torch.Tensor           # sqrt(1 - a_prev - sigma^2)
    sigma: torch.Tensor
    v_sqrt_ac: torch.Tensor          # model buffer sqrt_alphas_cumprod[t], used by the v conversion
    v_sqrt_one_minus_ac: torch.Tensor
    rescale: torch.Tensor            # scale_arr[t_prev] / scale_arr[t]; 1 without dynamic rescale


def _validated_steps(alphas_cumprod, timesteps, parameterization: str, eta: float, np_dtype):
    """(steps, ac64, sigma, a, a_prev) with a/a_prev rounded like LVDM's float32 buffer, or ValueError."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"`parameterization` must be one of {', '.join(PARAMETERIZATIONS)}, "
                         f"got {parameterization!r}; DDIM needs an eps or v network.")
    ac64 = _as_float64(alphas_cumprod)
    steps = np.asarray(timesteps, dtype=np.int64)
    if steps.ndim == 1 and steps.size > 1 and np.any(np.diff(steps) < 0):
        raise ValueError("`timesteps` must be ascending (the sampler walks them from the largest down); "
                         "build them with `ddim_timesteps`.")
    sigma, a, a_prev = ddim_sigmas(ac64.astype(np_dtype), steps, eta)
    if parameterization == "eps" and np.any(a == 0):
        raise ValueError("`parameterization` 'eps' cannot denoise where alphas_cumprod[t] == 0 (zero terminal "
                         "SNR); use a v-model or a spacing that avoids the final timestep.")
    if eta > 1.0 and np.any(1.0 - a_prev - sigma ** 2 < -1e-6):
        raise ValueError(f"`eta` = {eta} makes sigma^2 exceed 1 - a_prev; use eta <= 1.")
    return steps, ac64, sigma, a, a_prev


def _coefficients(alphas_cumprod, timesteps, parameterization: str, eta: float, scale_arr,
                  like: torch.Tensor, dtype: torch.dtype) -> _Coefficients:
    """DDIM update scalars, each computed where and in the precision LVDM computes it (bit parity)."""
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    steps, ac64, sigma, a, a_prev = _validated_steps(alphas_cumprod, timesteps, parameterization, eta, np_dtype)

    def dev(values) -> torch.Tensor:
        shape = (-1,) + (1,) * like.ndim
        return torch.as_tensor(np.asarray(values), device=like.device).to(dtype).reshape(shape)

    a_t, a_prev_t, sigma_t = dev(a), dev(a_prev), dev(sigma)
    # Clamp: with zero terminal SNR the radicand is exactly 0 at t = T-1 and float32 rounding can
    # make it -6e-8 (e.g. 25 trailing steps), which turns DynamiCrafter's output into NaN.
    dir_coef = (1.0 - a_prev_t - sigma_t ** 2).clamp_min(0.0).sqrt()
    rescale = torch.ones_like(a_t)
    if scale_arr is not None:
        scale = _as_float64(scale_arr)
        if len(scale) <= steps.max():
            raise ValueError(f"`scale_arr` has {len(scale)} entries but timestep {steps.max()} is sampled; "
                             f"build it with `dynamic_rescale_array`.")
        s = dev(scale[steps])
        # LVDM pairs each step with the next smaller DDIM timestep; the last step pairs with
        # itself (s_prev[0] = s[0]), so its ratio is exactly 1, not scale_arr[0] / scale_arr[t].
        rescale = torch.cat([s[:1], s[:-1]]) / s
    # LVDM takes sqrt(1 - a) on the host (numpy) and sqrt(a_t), sqrt(a_prev) on the device.
    return _Coefficients(
        timesteps=steps, sqrt_a=a_t.sqrt(), sqrt_one_minus_a=dev(np.sqrt(1 - a.astype(np_dtype))),
        sqrt_a_prev=a_prev_t.sqrt(), dir_coef=dir_coef, sigma=sigma_t, rescale=rescale,
        v_sqrt_ac=dev(np.sqrt(ac64[steps])), v_sqrt_one_minus_ac=dev(np.sqrt(1.0 - ac64[steps])),
    )


def _ddim_step(x: torch.Tensor, out: torch.Tensor, noise: torch.Tensor, c: _Coefficients, index: int,
               parameterization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update x_t -> x_prev (eq. 12); returns (x_prev, pred_x0) in the compute dtype."""
    if parameterization == "v":
        # v-prediction, Salimans & Ho 2022 (arXiv:2202.00512) sec. 4, with LVDM's full-schedule buffers.
        e_t = c.v_sqrt_ac[index] * out + c.v_sqrt_one_minus_ac[index] * x
        pred_x0 = c.v_sqrt_ac[index] * x - c.v_sqrt_one_minus_ac[index] * out
    else:
        e_t = out
        pred_x0 = (x - c.sqrt_one_minus_a[index] * e_t) / c.sqrt_a[index]
    pred_x0 = pred_x0 * c.rescale[index]
    x_prev = c.sqrt_a_prev[index] * pred_x0 + c.dir_coef[index] * e_t + c.sigma[index] * noise
    return x_prev, pred_x0


@torch.no_grad()
def sample_ddim(model, x: torch.Tensor, timesteps, extra_args: dict | None = None, callback=None,
                disable: bool | None = None, *, alphas_cumprod, parameterization: str = "eps",
                eta: float = 1.0, scale_arr=None, generator: torch.Generator | None = None,
                start_index: int = 0) -> torch.Tensor:
    """DDIM from x at the largest of `timesteps` down to the smallest (DynamiCrafter's DDIMSampler).

    Args:
        model: called as ``model(x, t, **extra_args)`` with ``t`` a LongTensor [batch]; returns the
            raw network output (eps or v, per ``parameterization``). CFG lives inside it.
        x: the latent at step ``start_index`` (x_T for a fresh run).
        timesteps: ascending DDIM timesteps, from `ddim_timesteps`.
        callback: called after every step with ``dict(i, t, x, pred_x0, total)``; ``x`` there is
            what to pass back as ``x`` with ``start_index=i + 1`` to resume.
        alphas_cumprod: the full training schedule. The float64 ``np.cumprod(1 - make_betas(...))``
            reproduces DynamiCrafter bit for bit; the model's float32 buffer differs by <= 1 ulp
            in the v conversion.
        scale_arr: DynamiCrafter's dynamic-rescale array (`dynamic_rescale_array`), or None.
        generator: RNG for the per-step noise; see the module docstring for the draw order.
        start_index: number of steps already done.

    Example:
        >>> ts = ddim_timesteps(50, spacing="uniform_trailing")
        >>> z = sample_ddim(cfg_denoiser, torch.randn(1, 4, 16, 40, 64), ts, alphas_cumprod=ac,
        ...                 parameterization="v", scale_arr=dynamic_rescale_array(0.7))
    """
    extra_args = {} if extra_args is None else extra_args
    # Half-precision latents still get float32 DDIM maths and float32 noise, like LVDM.
    compute = torch.promote_types(x.dtype, torch.float32)
    c = _coefficients(alphas_cumprod, timesteps, parameterization, eta, scale_arr, x, compute)
    total = len(c.timesteps)
    if not isinstance(start_index, (int, np.integer)) or not 0 <= start_index <= total:
        raise ValueError(f"`start_index` must be an integer in [0, {total}], got {start_index!r}; pass the "
                         f"number of finished steps (the last callback's i + 1).")
    noise_device = generator.device if generator is not None else x.device
    for i in progress_bar(range(start_index, total), total=total, initial=start_index, disable=disable, desc="DDIM"):
        index = total - 1 - i
        t = int(c.timesteps[index])
        ts = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        out = model(x, ts, **extra_args)
        if out.shape != x.shape:
            raise ValueError(f"`model` returned shape {tuple(out.shape)} for input {tuple(x.shape)}; it must "
                             f"return the raw eps/v prediction with the latent's shape.")
        noise = torch.randn(x.shape, generator=generator, device=noise_device, dtype=compute).to(x.device)
        x_prev, pred_x0 = _ddim_step(x.to(compute), out.to(compute), noise, c, index, parameterization)
        x = x_prev.to(x.dtype)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "pred_x0": pred_x0.to(x.dtype), "total": total})
    return x
