"""What each stage of an SVD call holds, from traces of the pipeline's own modules on meta twins.

A stage's predicted peak is the sum of three terms:

* ``weights``: the resident components' parameters and buffers at the plan's precision (counted
  on a meta twin after the same cast the runtime applies, so ``_keep_in_fp32_modules`` and
  integer buffers come out as they will be);
* ``held``: the tensors ``StableVideoDiffusionPipeline.__call__`` keeps alive across the stage
  (conditioning image and its noise, image embeddings, image latents, latents, the previous
  step's UNet input and output), from the shapes and dtypes its code gives them (diffusers
  0.3x-0.4x; the terms are listed in :func:`held_terms`);
* ``call``: the peak of new bytes of the stage's exact call, traced with
  :func:`engine.estimate.tracing.trace_call` on a meta-device twin built from the module's own
  config: ``image_encoder(pixels).image_embeds`` at 224x224, ``vae.encode(x).latent_dist.mode()``,
  one ``unet(...)`` call with the CFG batch, and the pipeline's own ``decode_latents`` (chunks
  of ``decode_chunk_size`` frames, ``num_frames=`` per chunk) followed by ``postprocess_video``.

Nothing is fitted to published figures. Twins and traces are cached per process: every candidate
setting asks the same questions again.
"""
from __future__ import annotations

import copy
import json
import logging
import types
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import InvalidArgument
from ...plan.settings import Offload, Precision
from ...runtime.precision import apply_precision, weight_dtype
from .settings import SVD_STAGES, SVDAttention, SVDSettings, SVDStage, resident

logger = logging.getLogger(__name__)

__all__ = ["StageEstimate", "SVDWorkload", "estimate_stages", "held_terms", "weights_bytes"]

CLIP_SIZE = 224  # the pipeline resizes every conditioning image to 224x224 for CLIP
_TWINS: dict = {}
_TRACES: dict = {}


@dataclass(frozen=True)
class SVDWorkload:
    """One SVD call: output size, frame count, CFG (``max_guidance_scale > 1``) and device."""

    height: int
    width: int
    num_frames: int
    cfg: bool
    device: str

    def latent(self, vae_scale: int) -> tuple[int, int]:
        return self.height // vae_scale, self.width // vae_scale


@dataclass(frozen=True)
class StageEstimate:
    """One stage's predicted peak: ``weights + held + call`` bytes, and who is resident."""

    name: str
    resident: tuple[str, ...]
    weights_bytes: int
    held_bytes: int
    call_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.held_bytes + self.call_bytes

    def to_dict(self) -> dict:
        return {"name": self.name, "resident": list(self.resident), "weights_bytes": self.weights_bytes,
                "held_bytes": self.held_bytes, "call_bytes": self.call_bytes,
                "peak_bytes": self.peak_bytes}


# ---------------------------------------------------------------- twins
def _config_digest(module: nn.Module) -> str:
    config = module.config
    if hasattr(config, "to_json_string"):  # transformers
        return config.to_json_string(use_diff=False)
    return json.dumps(dict(config), sort_keys=True, default=str)


def _processors(module: nn.Module) -> dict | None:
    procs = getattr(module, "attn_processors", None)
    return dict(procs) if isinstance(procs, dict) else None


def _build_twin(module: nn.Module) -> nn.Module:
    with torch.device("meta"):
        if hasattr(type(module), "from_config") and not hasattr(module.config, "to_json_string"):
            twin = type(module).from_config(module.config)  # diffusers
        else:
            twin = type(module)(copy.deepcopy(module.config))  # transformers
    procs = _processors(module)
    if procs and hasattr(twin, "set_attn_processor"):
        twin.set_attn_processor(procs)  # the attention the user set, not the class default
    return twin.eval().requires_grad_(False)


def meta_twin(module: nn.Module, precision: Precision, attention: SVDAttention = SVDAttention.DEFAULT
              ) -> nn.Module:
    """A weightless copy of ``module`` from its own config, cast and set up like the plan's run."""
    procs = _processors(module) or {}
    key = (type(module), _config_digest(module), precision, attention,
           tuple(sorted((k, type(v).__name__) for k, v in procs.items())))
    if key not in _TWINS:
        try:
            twin = _build_twin(module)
        except Exception as err:  # a config the class cannot rebuild itself from
            raise InvalidArgument(f"`pipe`'s {type(module).__name__} could not be rebuilt on the meta "
                                  f"device from its config ({err}); plan only pipelines of "
                                  "diffusers/transformers modules.") from err
        apply_precision(twin, precision, device="cpu")
        if attention is SVDAttention.FF_CHUNK:
            twin.enable_forward_chunking(chunk_size=1, dim=0)
        _TWINS[key] = twin
    return _TWINS[key]


def weights_bytes(module: nn.Module, precision: Precision) -> int:
    """Bytes of ``module``'s parameters and buffers once cast for ``precision`` (shared storages once)."""
    twin = meta_twin(module, precision)
    seen, total = set(), 0
    for t in list(twin.parameters()) + list(twin.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------- held tensors
def _dtypes(pipe, precision: Precision) -> dict[str, torch.dtype]:
    """Compute dtypes per stage: fp16 VAEs with ``force_upcast`` encode in fp32 (the pipeline
    upcasts the VAE around its encode and casts it back before decoding)."""
    dtype = weight_dtype(precision)
    upcast = dtype == torch.float16 and bool(getattr(pipe.vae.config, "force_upcast", False))
    return {"latents": dtype, "vae_encode": torch.float32 if upcast else dtype, "vae": dtype}


def held_terms(pipe, stage: SVDStage, work: SVDWorkload, precision: Precision) -> dict[str, int]:
    """The tensors ``StableVideoDiffusionPipeline.__call__`` holds while ``stage`` runs, in bytes.

    Assumes one image, ``num_videos_per_prompt=1`` and at least two denoising steps (from the
    second step on, the previous step's UNet output and guided noise are still referenced)."""
    dt = _dtypes(pipe, precision)
    size = torch.finfo(dt["latents"]).bits // 8
    batch = 2 if work.cfg else 1
    h, w = work.latent(_vae_scale(pipe))
    lat = work.num_frames * 4 * h * w * size  # latents [1, F, 4, h, w]
    image = 3 * work.height * work.width * 4  # preprocessed image [1, 3, H, W], float32
    emb = batch * _embed_dim(pipe) * size
    if stage.name == "image_encode":
        return {"pixel_values": 3 * CLIP_SIZE * CLIP_SIZE * size}
    terms = {"image_embeddings": emb, "image + noise": 2 * image}
    if stage.name == "vae_encode":
        if dt["vae_encode"] != torch.float32:
            terms["image in the VAE's dtype"] = image // 4 * (torch.finfo(dt["vae_encode"]).bits // 8)
        return terms
    terms.update({"image_latents": batch * lat, "latents": lat,
                  "unet input": 2 * batch * lat, "previous unet output + guided noise": (batch + 1) * lat})
    return terms


def _vae_scale(pipe) -> int:
    return int(getattr(pipe, "vae_scale_factor", 2 ** (len(pipe.vae.config.block_out_channels) - 1)))


def _embed_dim(pipe) -> int:
    config = pipe.image_encoder.config
    return int(getattr(config, "projection_dim", None) or pipe.unet.config.cross_attention_dim)


# ---------------------------------------------------------------- traces
def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _stage_call(pipe, stage: SVDStage, work: SVDWorkload, settings: SVDSettings):
    """``(fn, args, twin)``: the stage's exact call on the twin, with meta inputs."""
    precision, dt = settings.precision, _dtypes(pipe, settings.precision)
    h, w = work.latent(_vae_scale(pipe))
    batch, frames = (2 if work.cfg else 1), work.num_frames
    if stage.name == "image_encode":
        twin = meta_twin(pipe.image_encoder, precision)
        return (lambda px: twin(px).image_embeds), (_meta(1, 3, CLIP_SIZE, CLIP_SIZE, dtype=dt["latents"]),), twin
    if stage.name == "vae_encode":
        vae_precision = Precision.FP32 if dt["vae_encode"] == torch.float32 else precision
        twin = meta_twin(pipe.vae, vae_precision)
        return ((lambda x: twin.encode(x).latent_dist.mode()),
                (_meta(1, 3, work.height, work.width, dtype=dt["vae_encode"]),), twin)
    if stage.name == "denoise":
        twin = meta_twin(pipe.unet, precision, settings.attention)
        in_channels = int(pipe.unet.config.in_channels)

        def unet(x, t, emb, ids):
            return twin(x, t, encoder_hidden_states=emb, added_time_ids=ids, return_dict=False)[0]
        return unet, (_meta(batch, frames, in_channels, h, w, dtype=dt["latents"]),
                      _meta(dtype=torch.float32), _meta(batch, 1, _embed_dim(pipe), dtype=dt["latents"]),
                      _meta(batch, 3, dtype=dt["latents"])), twin
    twin = meta_twin(pipe.vae, precision)
    shim = types.SimpleNamespace(vae=twin)  # what `decode_latents` reads of the pipeline
    decode_latents, processor = type(pipe).decode_latents, getattr(pipe, "video_processor", None)
    chunk = settings.decode_chunk_size

    def decode(z):
        video = decode_latents(shim, z, frames, chunk)
        return processor.postprocess_video(video=video, output_type="pt") if processor else video
    return decode, (_meta(1, frames, 4, h, w, dtype=dt["latents"]),), twin


def _trace_key(pipe, stage: SVDStage, work: SVDWorkload, settings: SVDSettings) -> tuple:
    module = getattr(pipe, stage.component)
    relevant = {"image_encode": (settings.precision,), "vae_encode": (settings.precision,),
                "denoise": (settings.precision, settings.attention),
                "vae_decode": (settings.precision, min(settings.decode_chunk_size, work.num_frames))}
    return (stage.name, type(module), _config_digest(module), work, torch.get_num_threads(),
            *relevant[stage.name])


def call_bytes(pipe, stage: SVDStage, work: SVDWorkload, settings: SVDSettings) -> int:
    """Peak new bytes of ``stage``'s call under ``settings`` (traced once per process)."""
    from ...estimate.tracing import trace_call

    key = _trace_key(pipe, stage, work, settings)
    if key not in _TRACES:
        fn, args, _ = _stage_call(pipe, stage, work, settings)
        with torch.no_grad():
            _TRACES[key] = trace_call(fn, *args, device=work.device).peak_new_bytes
        logger.debug("traced SVD %s (%s): %d bytes", stage.name, settings.label(), _TRACES[key])
    return _TRACES[key]


def _stage_weights(pipe, stage: SVDStage, offload: Offload, precision: Precision) -> int:
    dt = _dtypes(pipe, precision)
    total = 0
    for name in resident(stage, offload):
        cast = Precision.FP32 if (name == "vae" and stage.name == "vae_encode"
                                  and dt["vae_encode"] == torch.float32) else precision
        total += weights_bytes(getattr(pipe, name), cast)
    return total


def estimate_stage(pipe, stage: SVDStage, work: SVDWorkload, settings: SVDSettings) -> StageEstimate:
    """The predicted peak of one stage under ``settings``."""
    return StageEstimate(stage.name, resident(stage, settings.offload),
                         _stage_weights(pipe, stage, settings.offload, settings.precision),
                         sum(held_terms(pipe, stage, work, settings.precision).values()),
                         call_bytes(pipe, stage, work, settings))


def estimate_stages(pipe, work: SVDWorkload, settings: SVDSettings) -> tuple[StageEstimate, ...]:
    """Every stage of the call, in execution order."""
    return tuple(estimate_stage(pipe, s, work, settings) for s in SVD_STAGES)
