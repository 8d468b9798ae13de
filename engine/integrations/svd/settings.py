"""The SVD plan's vocabulary and its stage table, torch-free.

One table (:data:`SVD_STAGES`, execution order of ``StableVideoDiffusionPipeline.__call__``) says
which component each stage runs and which components are resident under each offload mode; the
estimator, the planner and :func:`~engine.integrations.svd.apply.apply_svd_plan` read it.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import InvalidArgument
from ...plan.settings import Choice, Offload, Precision

__all__ = ["COMPONENTS", "SVDAttention", "SVDSettings", "SVDStage", "SVD_STAGES", "resident"]

COMPONENTS = ("image_encoder", "vae", "unet")
OFFLOADS = (Offload.NONE, Offload.MODEL)  # block-level streaming is not offered for SVD


class SVDAttention(Choice):
    """What runs the UNet's transformer blocks."""

    DEFAULT = "default"    # the UNet's own attention processors (SDPA on torch >= 2)
    FF_CHUNK = "ff-chunk"  # + diffusers' ``unet.enable_forward_chunking()``: feed-forwards per item

    @classmethod
    def label(cls) -> str:
        return "an SVD attention setting"


@dataclass(frozen=True)
class SVDStage:
    """One stage: what it runs, and what model-level offload leaves resident while it runs.

    diffusers' ``enable_model_cpu_offload`` (sequence ``image_encoder->unet->vae``) offloads a
    component only when the NEXT one in that sequence is called, so the VAE loaded for the encode
    stays on the device through denoising, and the image encoder through the VAE encode.
    """

    name: str
    component: str
    offload_resident: tuple[str, ...]
    what: str


SVD_STAGES = (
    SVDStage("image_encode", "image_encoder", ("image_encoder",),
             "CLIP on the 224x224 conditioning image"),
    SVDStage("vae_encode", "vae", ("image_encoder", "vae"), "the conditioning image into latents"),
    SVDStage("denoise", "unet", ("unet", "vae"), "one UNet step over every frame (CFG batch)"),
    SVDStage("vae_decode", "vae", ("vae",),
             "`decode_latents` in chunks of `decode_chunk_size` frames, then postprocessing"),
)
STAGE_NAMES = tuple(s.name for s in SVD_STAGES)


def resident(stage: SVDStage, offload: Offload) -> tuple[str, ...]:
    """The components whose weights are on the device while ``stage`` runs."""
    return COMPONENTS if offload is Offload.NONE else stage.offload_resident


@dataclass(frozen=True)
class SVDSettings:
    """The settings a plan picks: offload, weight precision, UNet attention and the decode chunk."""

    offload: Offload = Offload.NONE
    precision: Precision = Precision.FP32
    attention: SVDAttention = SVDAttention.DEFAULT
    decode_chunk_size: int = 1

    def __post_init__(self):
        object.__setattr__(self, "offload", Offload.parse(self.offload, "offload"))
        object.__setattr__(self, "precision", Precision.parse(self.precision, "precision"))
        object.__setattr__(self, "attention", SVDAttention.parse(self.attention, "attention"))
        if self.offload not in OFFLOADS:
            raise InvalidArgument(f"`offload` {self.offload.value!r} is not offered for SVD; use "
                                  "'none' or 'model'.")
        if self.precision is Precision.FP32_AUTOCAST:
            raise InvalidArgument("`precision` 'fp32-autocast' is not offered for SVD; use 'fp32', "
                                  "'fp16' or 'bf16'.")
        if isinstance(self.decode_chunk_size, bool) or not isinstance(self.decode_chunk_size, int) \
                or self.decode_chunk_size < 1:
            raise InvalidArgument(f"`decode_chunk_size` {self.decode_chunk_size!r} must be a "
                                  "positive integer; use 1 to decode one frame at a time.")

    def to_dict(self) -> dict:
        return {"offload": self.offload.value, "precision": self.precision.value,
                "attention": self.attention.value, "decode_chunk_size": self.decode_chunk_size}

    def label(self) -> str:
        return (f"offload {self.offload.value}, {self.precision.value}, attention "
                f"{self.attention.value}, decode_chunk_size {self.decode_chunk_size}")
