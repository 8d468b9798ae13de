"""The stages of a run, in execution order, with the components each needs on the device.

One table, read by the planner's cost model (which weights are resident, what is carried) and by
the runtime (what ``stage()`` onloads, what ``GenerateResult.stages`` reports).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgument

# public component names; ``engine.models.lvdm.COMPONENTS`` maps each to its checkpoint prefix
COMPONENT_NAMES = ("unet", "vae", "text_encoder", "image_encoder", "image_proj")


@dataclass(frozen=True)
class Stage:
    """One stage: its name and the components that must be on the device while it runs."""

    name: str
    components: tuple[str, ...]
    what: str
    ae_setting: str | None = None  # the ``Settings`` field holding this stage's autoencoding mode


STAGES = (
    Stage("text_encode", ("text_encoder",), "the prompt and the empty prompt through the text encoder"),
    Stage("image_encode", ("image_encoder", "image_proj"), "CLIP image tokens and the Resampler"),
    Stage("vae_encode", ("vae",), "the used frame(s) into latents", "ae_encode"),
    Stage("denoise", ("unet",), "DDIM with classifier-free guidance"),
    Stage("vae_decode", ("vae",), "latents into frames", "ae_decode"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    """The :class:`Stage` called ``name``."""
    for s in STAGES:
        if s.name == name:
            return s
    raise InvalidArgument(f"`stage` {name!r} is unknown; use one of {', '.join(STAGE_NAMES)}.")
