"""Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598) as a denoiser wrapper for the samplers.

Two-condition form and guidance rescale (Lin et al. 2023, arXiv:2305.08891, sec. 3.4) follow
DynamiCrafter's ``ddim.py``; the three-call image/text form follows its ``ddim_multiplecond.py``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch


def rescale_noise_cfg(noise_cfg: torch.Tensor, noise_pred_text: torch.Tensor,
                      guidance_rescale: float) -> torch.Tensor:
    """Lin et al. 2023, eq. 15-16: phi * cfg * std(text)/std(cfg) + (1 - phi) * cfg, std over non-batch dims."""
    dims = list(range(1, noise_cfg.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    # A constant guided output (std 0) has nothing to rescale; DynamiCrafter would divide by zero.
    ratio = torch.where(std_cfg > 0, std_text / std_cfg.clamp_min(torch.finfo(std_cfg.dtype).tiny), 1.0)
    rescaled = noise_cfg * ratio
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * noise_cfg


def default_concat_conds(conds: list) -> Any:
    """Concatenate conditionings along the batch dim: tensors directly, dicts per key, lists per item.

    Anything else (None, ints, strings) must be equal across ``conds`` and passes through once.
    """
    first = conds[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(conds, dim=0)
    if isinstance(first, dict):
        if any(not isinstance(c, dict) or c.keys() != first.keys() for c in conds):
            raise ValueError("`concat_conds`: the default batching needs every cond to be a dict with the same "
                             "keys; pass your own `concat_conds` or use `batched=False`.")
        return {key: default_concat_conds([c[key] for c in conds]) for key in first}
    if isinstance(first, (list, tuple)):
        if any(not isinstance(c, (list, tuple)) or len(c) != len(first) for c in conds):
            raise ValueError("`concat_conds`: the default batching needs list conds of equal length; pass your "
                             "own `concat_conds` or use `batched=False`.")
        return type(first)(default_concat_conds(list(items)) for items in zip(*conds))
    if all(c is first or (not isinstance(c, torch.Tensor) and c == first) for c in conds):
        return first
    raise ValueError(f"`concat_conds`: the default batching cannot merge differing {type(first).__name__} "
                     f"values; pass your own `concat_conds` or use `batched=False`.")


class CFGDenoiser:
    """Wraps ``unet_call(x, t, cond) -> out`` into a guided ``model(x, t, **kw)`` for the samplers.

    Guidance runs only when ``uncond`` is given and ``scale != 1`` (DynamiCrafter then makes a single
    conditional call, even in the three-condition form). Outputs stay in the network's space (eps or v).

    Args:
        unet_call: the raw network; ``cond`` is opaque to this class except for default batching.
        cond, uncond: conditional and unconditional inputs; ``uncond=None`` disables guidance.
        scale: text guidance scale ``s``.
        guidance_rescale: phi of `rescale_noise_cfg`, applied against the conditional output; 0 disables it.
        uncond_image: the "empty text, real image" cond; enables the three-call form
            ``uncond + cfg_img * (uc_img - uncond) + s * (cond - uc_img)``.
        cfg_img: image guidance scale; None means ``scale``.
        batched: one call over the concatenated batch instead of sequential calls
            (order cond, uncond, uncond_image either way). Per-sample keyword inputs must then live
            in ``cond``, because only conds are concatenated.
        concat_conds: merges a list of conds into one batched cond; None uses `default_concat_conds`.

    Example:
        >>> den = CFGDenoiser(lambda x, t, c: unet(x, t, **c), cond, uncond, scale=7.5, batched=True)
        >>> z = sample_ddim(den, z_T, ts, alphas_cumprod=ac)
    """

    def __init__(self, unet_call: Callable[..., torch.Tensor], cond: Any, uncond: Any = None, scale: float = 1.0,
                 guidance_rescale: float = 0.0, uncond_image: Any = None, cfg_img: float | None = None,
                 batched: bool = False, concat_conds: Callable[[list], Any] | None = None):
        if not callable(unet_call):
            raise ValueError("`unet_call` must be callable as unet_call(x, t, cond); pass the network function.")
        if not math.isfinite(scale):
            raise ValueError(f"`scale` must be a finite number, got {scale!r}; use 1.0 to disable guidance.")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"`guidance_rescale` must lie in [0, 1], got {guidance_rescale!r}; use 0.7 "
                             f"(DynamiCrafter) or 0 to disable it.")
        if uncond_image is not None and uncond is None:
            raise ValueError("`uncond_image` needs `uncond` as well; pass both or neither.")
        if cfg_img is not None and (uncond_image is None or not math.isfinite(cfg_img)):
            raise ValueError(f"`cfg_img` ({cfg_img!r}) needs `uncond_image` and a finite value; pass "
                             f"`uncond_image` or leave `cfg_img` as None.")
        if concat_conds is not None and not callable(concat_conds):
            raise ValueError("`concat_conds` must be callable as concat_conds(list_of_conds) -> cond, or None.")
        self.unet_call = unet_call
        self.cond, self.uncond, self.uncond_image = cond, uncond, uncond_image
        self.scale, self.guidance_rescale = float(scale), float(guidance_rescale)
        self.cfg_img = self.scale if cfg_img is None else float(cfg_img)
        self.batched = bool(batched)
        self.concat_conds = default_concat_conds if concat_conds is None else concat_conds

    @property
    def branches(self) -> int:
        """Conditionings evaluated per step (1, 2 or 3); a batched call carries this many x batch."""
        if self.uncond is None or self.scale == 1.0:
            return 1
        return 2 if self.uncond_image is None else 3

    @property
    def calls_per_step(self) -> int:
        """Network calls per sampler step."""
        return 1 if self.batched else self.branches

    def _outputs(self, x: torch.Tensor, t: torch.Tensor, conds: list, kwargs: dict) -> list[torch.Tensor]:
        if not self.batched:
            return [self.unet_call(x, t, c, **kwargs) for c in conds]
        n = len(conds)
        out = self.unet_call(torch.cat([x] * n), torch.cat([t] * n), self.concat_conds(conds), **kwargs)
        return list(out.split(x.shape[0], dim=0))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        branches = self.branches
        if branches == 1:
            return self.unet_call(x, t, self.cond, **kwargs)
        conds = [self.cond, self.uncond, self.uncond_image][:branches]
        outs = self._outputs(x, t, conds, kwargs)
        if branches == 2:
            e_cond, e_uncond = outs
            out = e_uncond + self.scale * (e_cond - e_uncond)
        else:
            e_cond, e_uncond, e_uncond_img = outs
            out = e_uncond + self.cfg_img * (e_uncond_img - e_uncond) + self.scale * (e_cond - e_uncond_img)
        if self.guidance_rescale > 0.0:
            out = rescale_noise_cfg(out, e_cond, self.guidance_rescale)
        return out
