"""Attaching a plan's execution policies to a model for one run, and taking them off again.

Reads the plan's ``settings`` (dtype, attention, offload, empty_cache; the autoencoding modes and
CFG batching are read by the orchestrator itself). Precision is applied and *kept* (casting back
would not restore the original weights); attention and offload are removed after the run.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from ..runtime.attention import restore_attention_backend, set_attention_backend
from ..runtime.offload import apply_offload, remove_offload
from ..runtime.precision import apply_precision, precision_context

log = logging.getLogger(__name__)

DEFAULT_SETTINGS = {"dtype": "fp32", "attention": "sdpa", "cfg": "sequential", "offload": "none",
                    "empty_cache": "no"}


@dataclass
class Execution:
    """What the stages need while the policies are attached."""

    settings: dict
    device: torch.device
    offload: object

    def stage(self, *components: str):
        """Context for one stage: its components resident, the plan's precision regime."""
        stack = contextlib.ExitStack()
        if self.settings.get("empty_cache") == "yes" and self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the previous stage's cached blocks back (lowers the peak)
        stack.enter_context(self.offload.onload(*components))
        stack.enter_context(precision_context(self.settings["dtype"], self.device))
        return stack


def _attention_kwargs(settings: dict) -> dict:
    if settings.get("reference"):
        return {"spatial": settings["attention"], "temporal": "naive"}  # DynamiCrafter's split
    return {"spatial": settings["attention"], "temporal": settings["attention"]}


@contextlib.contextmanager
def attached(model, settings: dict, device) -> Execution:
    """Apply precision, attention backend and offload for a run; remove the removable ones after."""
    settings = {**DEFAULT_SETTINGS, **settings}
    device = torch.device(device)
    apply_precision(model, settings["dtype"], device=device)
    unet = model.model.diffusion_model
    previous = set_attention_backend(unet, None, device=device, **_attention_kwargs(settings))
    handle = apply_offload(model, settings["offload"], device=device)
    try:
        yield Execution(settings, device, handle)
    finally:
        remove_offload(model)
        restore_attention_backend(unet, previous)
