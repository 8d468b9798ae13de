"""Weight bytes of each DynamiCrafter component, counted on the meta device.

Counts are kept per component as floating elements plus other bytes, so one inventory gives the
bytes in every precision; :class:`~engine.estimate.unet.estimator.StageEstimator` caches the inventory on
disk so a warm process does not build the 2.6B-parameter model at all.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from .precision import precision_of

if TYPE_CHECKING:
    from torch import nn

__all__ = ["bytes_in", "component_weight_bytes", "weight_inventory"]


def bytes_in(counts: Mapping[str, int], precision: str) -> int:
    """Bytes of an inventory entry with its floating tensors stored in ``precision``."""
    return counts["float"] * precision_of(precision).weight_bytes + counts["other_bytes"]


def component_weight_bytes(spec, precision: str) -> dict[str, int]:
    """Bytes of every component's parameters and persistent buffers with floats in ``precision``.

    Built on the meta device (nothing is allocated). Non-persistent constants (CLIP's 77x77 mask,
    normalisation means) are a few KiB and not counted; nor are the sampler's schedule buffers.

    Args:
        spec: a :class:`~engine.config.ModelSpec`.
        precision: ``fp32-autocast`` or ``fp32`` (4 bytes per float), ``fp16`` or ``bf16`` (2).

    Example::

        component_weight_bytes(load_spec("512"), "fp16")["unet"]  # 2 * 1,438,854,980
    """
    from ...models.lvdm import COMPONENTS, build_model

    precision_of(precision)  # validate before the (slow) build
    model = build_model(spec, device="meta")
    inv = weight_inventory({name: model.component(name) for name in COMPONENTS})
    return {name: bytes_in(inv[name], precision) for name in COMPONENTS}


def weight_inventory(components: dict[str, nn.Module]) -> dict[str, dict[str, int]]:
    """Per component: floating elements and other bytes of its parameters and persistent buffers.

    ``image_encoder_dead`` counts the image encoder's leftover text-tower tensors (token and
    positional embeddings, ``ln_final``, ``text_projection``, ``logit_scale``): stored in the
    checkpoint, never used by the vision path.
    """
    out: dict[str, dict[str, int]] = {}
    for name, module in components.items():
        for key, tensor in module.state_dict(keep_vars=True).items():
            group = ("image_encoder_dead" if name == "image_encoder"
                     and not key.startswith("model.visual.") else None)
            for target in (name, group):
                if target is None:
                    continue
                entry = out.setdefault(target, {"float": 0, "other_bytes": 0})
                if tensor.is_floating_point():
                    entry["float"] += tensor.numel()
                else:
                    entry["other_bytes"] += tensor.numel() * tensor.element_size()
    out.setdefault("image_encoder_dead", {"float": 0, "other_bytes": 0})
    return out
