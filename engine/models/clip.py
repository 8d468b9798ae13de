"""OpenCLIP text and image encoders as DynamiCrafter uses them, built with open_clip_torch's own
``CLIP`` class and no download (weights come from the DynamiCrafter checkpoint).

State-dict layout: ``cond_stage_model.model.*`` is a CLIP without ``visual``; ``embedder.model.*`` is
a CLIP without the text ``transformer`` (its token embedding, ln_final and projection stay, unused).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..logs import warn_once

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_config(arch: str | dict) -> dict:
    """open_clip's model config for a named architecture, or a custom config dict as is."""
    if isinstance(arch, dict):
        return arch
    cfg = _packaged_config(arch)
    if cfg is None:
        raise ValueError(f"`arch` {arch!r} is not an open_clip architecture; use e.g. 'ViT-H-14'.")
    return cfg


def _packaged_config(arch: str) -> dict | None:
    """Read open_clip's bundled ``model_configs/<arch>.json`` without importing open_clip (an
    import costs seconds, and the planner needs only the shapes)."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.find_spec("open_clip")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "model_configs" / f"{arch}.json"
        if path.is_file():
            cfg = json.loads(path.read_text())
            return {k: v for k, v in cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg",
                                                         "quick_gelu", "cast_dtype")}
    return None


def _clip(arch: str | dict):
    from open_clip.model import CLIP

    return CLIP(**clip_config(arch))


def causal_mask(n: int, device=None) -> torch.Tensor:
    """Additive mask letting token i attend to tokens <= i (open_clip's text mask)."""
    return torch.full((n, n), float("-inf"), device=device).triu_(1)


def _run_blocks(transformer, x, n_blocks, attn_mask=None):
    """Run the first ``n_blocks`` residual blocks on ``[batch, tokens, width]``."""
    batch_first = getattr(transformer, "batch_first", False)
    x = x if batch_first else x.permute(1, 0, 2)
    for block in transformer.resblocks[:n_blocks]:
        x = block(x, attn_mask=attn_mask)
    return x if batch_first else x.permute(1, 0, 2)


class TextEncoder(nn.Module):
    """OpenCLIP text tower, penultimate layer then ``ln_final``: ``[B, 77, width]``."""

    def __init__(self, arch: str | dict = "ViT-H-14", layer: str = "penultimate"):
        super().__init__()
        if layer not in ("last", "penultimate"):
            raise ValueError(f"`layer` {layer!r} is unknown; use 'last' or 'penultimate'.")
        model = _clip(arch)
        del model.visual
        self.model = model
        self.skip_last = 1 if layer == "penultimate" else 0

    def reset_buffers(self, device=None) -> None:
        """Recompute the non-persistent causal mask (left on ``meta`` after a meta-device build)."""
        self.model.attn_mask = causal_mask(self.model.attn_mask.shape[0], device)

    @staticmethod
    def tokenize(prompts: list[str]) -> torch.Tensor:
        """open_clip's tokens ``[B, 77]``; a prompt over 77 tokens (start and end included) is cut
        there, with one warning per distinct prompt."""
        import open_clip

        tokens = open_clip.tokenize(prompts)
        _warn_truncated(prompts, tokens.shape[1])
        return tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.token_embedding(tokens) + m.positional_embedding
        n_blocks = len(m.transformer.resblocks) - self.skip_last
        x = _run_blocks(m.transformer, x, n_blocks, attn_mask=m.attn_mask.to(x.device))
        return m.ln_final(x)


def _warn_truncated(prompts: list[str], context: int) -> None:
    from open_clip.tokenizer import _tokenizer  # the instance open_clip.tokenize encodes with

    for prompt in dict.fromkeys(prompts):
        n = len(_tokenizer.encode(prompt)) + 2  # + start and end tokens
        if n > context:
            shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            warn_once(log, "`--prompt` %r has %d tokens (start and end included), over the text "
                      "encoder's %d; only the first %d are kept, so shorten it to make the rest "
                      "count.", shown, n, context, context, key=prompt)


def _gaussian_kernel(size: int, sigma: float, device, dtype):
    x = torch.arange(size, device=device, dtype=dtype) - size // 2
    k = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return k / k.sum()


def antialiased_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Gaussian pre-blur then bicubic (align_corners) resize: kornia's ``resize(antialias=True)``."""
    h, w = x.shape[-2:]
    factors = (h / size[0], w / size[1])
    if max(factors) > 1:
        for dim, f in ((-2, factors[0]), (-1, factors[1])):
            sigma = max((f - 1.0) / 2.0, 0.001)
            ks = int(max(4.0 * sigma, 3))
            ks += 1 - ks % 2
            k = _gaussian_kernel(ks, sigma, x.device, x.dtype)
            shape = (1, 1, ks, 1) if dim == -2 else (1, 1, 1, ks)
            pad = (0, 0, ks // 2, ks // 2) if dim == -2 else (ks // 2, ks // 2, 0, 0)
            c = x.shape[1]
            x = F.conv2d(F.pad(x, pad, mode="reflect"), k.view(shape).expand(c, 1, *shape[2:]), groups=c)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=True)


class ImageEncoder(nn.Module):
    """OpenCLIP vision tower returning all tokens before ``ln_post``: ``[B, 1 + patches, width]``.

    Input is an image in [-1, 1]; it is resized (aspect ratio not kept, as DynamiCrafter does) to the
    tower's input size and normalised with CLIP's mean and std.
    """

    def __init__(self, arch: str | dict = "ViT-H-14"):
        super().__init__()
        model = _clip(arch)
        del model.transformer
        self.model = model
        self.register_buffer("mean", torch.tensor(CLIP_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD), persistent=False)

    def reset_buffers(self, device=None) -> None:
        """Recompute non-persistent constants (left on ``meta`` after a meta-device build)."""
        self.mean, self.std = torch.tensor(CLIP_MEAN, device=device), torch.tensor(CLIP_STD, device=device)
        self.model.attn_mask = causal_mask(self.model.attn_mask.shape[0], device)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        size = self.model.visual.image_size
        x = antialiased_resize(image, tuple(size))
        x = (x + 1.0) / 2.0
        return (x - self.mean[:, None, None].to(x.dtype)) / self.std[:, None, None].to(x.dtype)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        v = self.model.visual
        x = v.conv1(self.preprocess(image))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.ln_pre(v.patch_dropout(x))
        return _run_blocks(v.transformer, x, len(v.transformer.resblocks))
