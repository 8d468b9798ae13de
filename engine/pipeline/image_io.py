"""Reading the conditioning image: resize the short side to cover HxW, centre-crop, scale to [-1, 1]."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

EXAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "assets" / "example.png"


def load_image(path: str | os.PathLike, argument: str = "--image") -> Image.Image:
    """Open an image file as RGB, with a one-sentence error for a missing or unreadable file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"`{argument}` {str(p)!r} does not exist; pass the path of a PNG or JPEG image.")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"`{argument}` {str(p)!r} cannot be read as an image ({exc}); "
                         "pass a PNG or JPEG file.") from exc


def fit_and_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale so the image covers HxW (no padded stripes, unlike a plain short-side resize), then
    centre-crop."""
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [1, 3, H, W] in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return arr.permute(2, 0, 1)[None].contiguous()


def prepare_image(path, height: int, width: int, argument: str = "--image") -> torch.Tensor:
    return image_to_tensor(fit_and_crop(load_image(path, argument), height, width))
