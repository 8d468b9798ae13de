"""DynamiCrafter ``target``/``params`` sections -> typed parameter dataclasses.

The YAML edge below :mod:`engine.config`: the targets we build, the values we reproduce and
:class:`ConfigError`; :func:`model_spec_fields` returns the fields of a
:class:`~engine.config.ModelSpec`, which :func:`engine.config.load_spec` builds (this module does
not import :mod:`engine.config`, so the two form no cycle).
"""
from __future__ import annotations

from typing import Any

from .models.params import ResamplerParams, UNetParams, VAEParams

TOP_TARGET = "lvdm.models.ddpm3d.LatentVisualDiffusion"
UNET_TARGET = "lvdm.modules.networks.openaimodel3d.UNetModel"
VAE_TARGET = "lvdm.models.autoencoder.AutoencoderKL"
TEXT_TARGET = "lvdm.modules.encoders.condition.FrozenOpenCLIPEmbedder"
IMAGE_TARGET = "lvdm.modules.encoders.condition.FrozenOpenCLIPImageEmbedderV2"
RESAMPLER_TARGET = "lvdm.modules.encoders.resampler.Resampler"


class ConfigError(ValueError):
    """A model config that we cannot build; the message names the key and the way out."""


# Values our implementation reproduces; any other value is refused rather than silently ignored.
_UNET_FIXED = {"dims": 2, "transformer_depth": 1, "use_linear": True, "temporal_selfatt_only": True,
               "use_relative_position": False, "use_causal_attention": False,
               "use_scale_shift_norm": False, "resblock_updown": False, "tempspatial_aware": False,
               "conv_resample": True, "use_fp16": False}
_TOP_FIXED = {"conditioning_key": "hybrid", "encoder_type": "2d", "scale_by_std": False}


def _section(parent: dict, key: str, target: str, where: str) -> dict:
    sec = parent.get(key)
    if not isinstance(sec, dict):
        raise ConfigError(f"`{where}.{key}` is missing; copy it from a DynamiCrafter inference config.")
    got = sec.get("target")
    if got != target:
        raise ConfigError(f"`{where}.{key}.target` {got!r} is unknown; the supported target is {target!r}.")
    return dict(sec.get("params") or {})


def _check_fixed(params: dict, fixed: dict, where: str) -> None:
    for key, expected in fixed.items():
        if key in params and params[key] != expected:
            raise ConfigError(f"`{where}.{key}` = {params[key]!r} is not supported; "
                              f"DynamiCrafter models use {expected!r}.")


def _unet(p: dict) -> UNetParams:
    _check_fixed(p, _UNET_FIXED, "unet_config.params")
    if p.get("num_head_channels", -1) in (-1, None):
        raise ConfigError("`unet_config.params.num_head_channels` must be set; DynamiCrafter uses 64.")
    return UNetParams(
        in_channels=p["in_channels"], out_channels=p["out_channels"],
        model_channels=p["model_channels"], attention_resolutions=tuple(p["attention_resolutions"]),
        num_res_blocks=p["num_res_blocks"], channel_mult=tuple(p["channel_mult"]),
        num_head_channels=p["num_head_channels"], context_dim=p["context_dim"],
        temporal_length=p.get("temporal_length", 16),
        addition_attention=p.get("addition_attention", False),
        image_cross_attention=p.get("image_cross_attention", False),
        image_cross_attention_scale_learnable=p.get("image_cross_attention_scale_learnable", False),
        temporal_conv=p.get("temporal_conv", False), temporal_attention=p.get("temporal_attention", True),
        fs_condition=p.get("fs_condition", False), default_fs=p.get("default_fs", 4))


def _vae(p: dict) -> VAEParams:
    dd = dict(p.get("ddconfig") or {})
    if dd.get("attn_resolutions"):
        raise ConfigError("`first_stage_config.params.ddconfig.attn_resolutions` must be []; "
                          "the KL-f8 VAE has attention only in its mid block.")
    return VAEParams(embed_dim=p["embed_dim"], z_channels=dd["z_channels"], in_channels=dd["in_channels"],
                     out_ch=dd["out_ch"], ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]),
                     num_res_blocks=dd["num_res_blocks"], double_z=dd.get("double_z", True))


def _resampler(p: dict) -> ResamplerParams:
    known = ResamplerParams.__dataclass_fields__
    return ResamplerParams(**{k: v for k, v in p.items() if k in known})


def model_spec_fields(model: dict) -> dict[str, Any]:
    """The :class:`~engine.config.ModelSpec` fields (all but ``name`` and ``source``) of the
    ``model`` section of a DynamiCrafter config."""
    if model.get("target") != TOP_TARGET:
        raise ConfigError(f"`model.target` {model.get('target')!r} is unknown; "
                          f"the supported target is {TOP_TARGET!r}.")
    p = dict(model.get("params") or {})
    _check_fixed(p, _TOP_FIXED, "model.params")
    where = "model.params"
    unet = _unet(_section(p, "unet_config", UNET_TARGET, where))
    vae = _vae(_section(p, "first_stage_config", VAE_TARGET, where))
    text = _section(p, "cond_stage_config", TEXT_TARGET, where)
    image = _section(p, "img_cond_stage_config", IMAGE_TARGET, where)
    resampler = _resampler(_section(p, "image_proj_stage_config", RESAMPLER_TARGET, where))
    size = p.get("image_size", [32, 32])
    return dict(
        unet=unet, vae=vae, resampler=resampler,
        text_arch=text.get("arch", "ViT-H-14"), text_layer=text.get("layer", "last"),
        image_arch=image.get("arch", "ViT-H-14"),
        parameterization=p.get("parameterization", "eps"),
        rescale_betas_zero_snr=bool(p.get("rescale_betas_zero_snr", False)),
        linear_start=p.get("linear_start", 1e-4), linear_end=p.get("linear_end", 2e-2),
        timesteps=p.get("timesteps", 1000), scale_factor=p.get("scale_factor", 1.0),
        use_dynamic_rescale=bool(p.get("use_dynamic_rescale", False)),
        base_scale=p.get("base_scale", 0.7), turning_step=p.get("turning_step", 400),
        fps_condition_type=p.get("fps_condition_type", "fs"),
        perframe_ae=bool(p.get("perframe_ae", False)),
        latent_size=tuple(size if isinstance(size, (list, tuple)) else (size, size)),
        channels=p.get("channels", 4))
