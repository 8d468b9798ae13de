"""Pure ``nn.Module``s whose state-dict layout equals DynamiCrafter's. No memory policy inside."""
from .autoencoder import AutoencoderKL, VAEParams
from .lvdm import COMPONENTS, LatentVisualDiffusion, build_model, count_parameters
from .resampler import Resampler, ResamplerParams
from .unet import UNetModel, UNetParams

__all__ = ["AutoencoderKL", "VAEParams", "COMPONENTS", "LatentVisualDiffusion", "build_model",
           "count_parameters", "Resampler", "ResamplerParams", "UNetModel", "UNetParams"]
