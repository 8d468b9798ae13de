"""The DynamiCrafter container: every component under the checkpoint's own prefixes.

``model.diffusion_model`` (UNet), ``first_stage_model`` (VAE), ``cond_stage_model`` (text),
``embedder`` (image), ``image_proj_model`` (Resampler) and the diffusion schedule buffers, so a
released ``model.ckpt`` loads with ``strict=True``. No sampling or memory policy lives here.
"""
from __future__ import annotations

import torch
from torch import nn

from ..sampling.schedule import diffusion_buffers, dynamic_rescale_array, make_betas
from .autoencoder import AutoencoderKL
from .clip import ImageEncoder, TextEncoder
from .resampler import Resampler
from .unet import UNetModel

COMPONENTS = {  # public name -> attribute path in the container
    "unet": "model.diffusion_model",
    "vae": "first_stage_model",
    "text_encoder": "cond_stage_model",
    "image_encoder": "embedder",
    "image_proj": "image_proj_model",
}


class DiffusionWrapper(nn.Module):
    """'hybrid' conditioning: channel-concat ``c_concat`` to the noisy latent, cross-attend ``context``."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x, t, c_concat=None, context=None, fs=None):
        if c_concat is not None:
            x = torch.cat([x, c_concat], dim=1)
        return self.diffusion_model(x, t, context=context, fs=fs)


class LatentVisualDiffusion(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.model = DiffusionWrapper(UNetModel(spec.unet))
        self.first_stage_model = AutoencoderKL(spec.vae)
        self.cond_stage_model = TextEncoder(spec.text_arch, spec.text_layer)
        self.embedder = ImageEncoder(spec.image_arch)
        self.image_proj_model = Resampler(spec.resampler)
        betas = make_betas(spec.timesteps, spec.linear_start, spec.linear_end, spec.rescale_betas_zero_snr)
        for name, value in diffusion_buffers(betas, spec.parameterization).items():
            self.register_buffer(name, value)
        if spec.use_dynamic_rescale:
            scale = dynamic_rescale_array(spec.base_scale, spec.timesteps, spec.turning_step)
            self.register_buffer("scale_arr", torch.tensor(scale, dtype=torch.float32))

    def component(self, name: str) -> nn.Module:
        """A component by public name (``unet``, ``vae``, ``text_encoder``, ...)."""
        if name not in COMPONENTS:
            raise KeyError(f"`component` {name!r} is unknown; use one of {', '.join(COMPONENTS)}.")
        return self.get_submodule(COMPONENTS[name])

    def apply_model(self, x, t, c_concat, context, fs=None):
        """The network output (eps or v) for noisy latents ``x`` [b, 4, t, h, w] at timesteps ``t``."""
        return self.model(x, t, c_concat=c_concat, context=context, fs=fs)


def build_model(spec, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                seed: int | None = None) -> LatentVisualDiffusion:
    """Instantiate the container. ``device="meta"`` allocates nothing (for inspection and for
    streaming a checkpoint in with ``load_state_dict(assign=True)``).

    With ``seed`` the weights are random *and non-degenerate*: the layers that DynamiCrafter
    zero-initialises (residual outputs, ``fps_embedding``'s last layer) get small random values,
    because with them at zero the UNet's output is identically 0 and a demo, a test or a parity
    check would compare zeros.
    """
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = LatentVisualDiffusion(spec)
    if seed is not None and device != "meta":
        randomize_zero_parameters(model)
    if dtype is not None:
        model.to(dtype)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def randomize_zero_parameters(model: nn.Module, std: float = 0.02) -> None:
    """Give every all-zero parameter (a zero-initialised layer) small random values."""
    for p in model.parameters():
        if p.is_floating_point() and not p.any():
            p.normal_(0.0, std)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter count per public component (works on the meta device)."""
    return {name: sum(p.numel() for p in model.get_submodule(path).parameters())
            for name, path in COMPONENTS.items()}
