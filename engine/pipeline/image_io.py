"""Reading the conditioning image: resize the short side to cover HxW, centre-crop, scale to [-1, 1].

Whatever PIL opens comes out as the picture a person sees: EXIF orientation applied, 16-bit and
float modes scaled (not clipped) to 8 bits, transparency composited onto **white**
(:data:`BACKGROUND`, with a warning), the first frame of an animation (with a warning), and
CMYK/YCbCr/LAB/1/L/P converted to RGB. Library callers may also pass a ``PIL.Image``, a numpy array
or a torch tensor (see :func:`load_image` for the layout and value conventions).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InvalidArgument
from ..logs import warn_once

log = logging.getLogger(__name__)

EXAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "assets" / "example.png"
BACKGROUND = (255, 255, 255)  # white: what transparent pixels become (viewers and browsers show white)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")
_CHANNEL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def load_image(source, argument: str = "--image") -> Image.Image:
    """The RGB picture ``source`` shows, with one-sentence errors naming ``argument``.

    ``source`` is a path, a ``PIL.Image``, a numpy array ``HxW`` or ``HxWxC``, or a torch tensor
    ``CxHxW``/``HxWxC`` (``C`` of 1-4: gray, gray+alpha, RGB, RGBA; a leading batch of 1 is
    dropped; a tensor whose first *and* last sizes could be channels is read as ``CxHxW``, an
    array as ``HxWxC``). Values: ``uint8`` 0-255, ``uint16`` 0-65535, floats in [0, 1], or in
    [-1, 1] (the engine's own convention) when any value is negative.
    """
    if source is None:  # GenerateOptions' own default: no image given
        raise InvalidArgument(f"`{argument}` is required to generate a video; pass a file path, a PIL.Image, "
                              "an HxWxC numpy array or a CxHxW torch tensor.")
    if isinstance(source, Image.Image):
        return to_rgb(source, argument, _describe(source))
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return to_rgb(_array_to_image(source, argument), argument, _describe(source))
    if isinstance(source, (str, os.PathLike)):
        return _open_file(Path(source).expanduser(), argument)
    raise TypeError(f"`{argument}` has type {type(source).__name__}; pass a file path, a PIL.Image, an "
                    "HxWxC numpy array or a CxHxW torch tensor.")


def _describe(source) -> str:
    """How messages name ``source``: its quoted path, or what kind of object it is."""
    if isinstance(source, (str, os.PathLike)):
        return repr(str(Path(source).expanduser()))
    kind = {Image.Image: "a PIL image", np.ndarray: "a numpy array", torch.Tensor: "a torch tensor"}
    return next((f"({v})" for k, v in kind.items() if isinstance(source, k)), "(the given image)")


def _open_file(p: Path, argument: str) -> Image.Image:
    if p.is_dir():
        raise FileNotFoundError(f"`{argument}` {str(p)!r} is a directory; pass the path of one image "
                                "file (PNG, JPEG, WebP...).")
    if not p.is_file():
        raise FileNotFoundError(f"`{argument}` {str(p)!r} does not exist; pass the path of a PNG or JPEG image.")
    try:
        with Image.open(p) as im:
            return to_rgb(im, argument, repr(str(p)))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        reason = str(exc).replace(f" {str(p)!r}", "").replace(str(p), "the file").rstrip(".")
        raise ValueError(f"`{argument}` {str(p)!r} is not an image PIL can read "
                         f"({reason or type(exc).__name__}), so it cannot be read as an image; "
                         "pass a PNG, JPEG or WebP file.") from exc


def to_rgb(im: Image.Image, argument: str = "--image", name: str = "(a PIL image)") -> Image.Image:
    """An 8-bit RGB copy of ``im`` as it is displayed (see the module docstring)."""
    if getattr(im, "n_frames", 1) > 1:
        warn_once(log, "`%s` %s is animated (%d frames); using its first frame.", argument, name, im.n_frames)
        im.seek(0)
    im = ImageOps.exif_transpose(im)  # also forces the (lazy) decode, so damage surfaces here
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        im = _high_depth_to_l(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("1", "L") and "transparency" in im.info:
        im = im.convert("LA")
    if im.mode in _ALPHA_MODES:
        return _flatten(im.convert("RGBA"), argument, name)
    return im.convert("RGB")


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit gray scaled into 0-255: ``I;16*`` by 65535, ``I`` by 65535 when its values
    fit 16 bits (a 16-bit file PIL widened) else stretched min..max, ``F`` as [0, 1] when it fits
    else stretched min..max."""
    arr = np.asarray(im).astype(np.float64)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
    if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535):
        arr = arr / 65535.0
    elif not (im.mode == "F" and lo >= 0 and hi <= 1):
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8), "L")


def _flatten(rgba: Image.Image, argument: str, name: str) -> Image.Image:
    if rgba.getchannel("A").getextrema()[0] < 255:
        warn_once(log, "`%s` %s has transparent pixels; composited them onto white (flatten the "
                  "image yourself for another background).", argument, name)
        rgba = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba)
    return rgba.convert("RGB")


def _array_to_image(x, argument: str) -> Image.Image:
    """A numpy array or torch tensor -> an 8-bit PIL image (L, LA, RGB or RGBA)."""
    is_tensor = isinstance(x, torch.Tensor)
    if is_tensor:
        t = x.detach().cpu()
        arr = (t.float() if t.is_floating_point() else t).numpy()  # numpy has no bfloat16
    else:
        arr = np.asarray(x)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] in _CHANNEL_MODES and (is_tensor or arr.shape[-1] not in _CHANNEL_MODES):
        arr = np.moveaxis(arr, 0, -1)  # CxHxW -> HxWxC
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in _CHANNEL_MODES or min(arr.shape[:2]) < 1:
        raise ValueError(f"`{argument}` has shape {tuple(x.shape)}; pass HxW, HxWxC or CxHxW with "
                         "C of 1 (gray), 3 (RGB) or 4 (RGBA).")
    pixels = _to_uint8(arr, argument)
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, _CHANNEL_MODES[arr.shape[-1]])


def _to_uint8(arr: np.ndarray, argument: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.uint16:
        return np.round(arr / 257.0).astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"`{argument}` has dtype {arr.dtype}; pass uint8 (0-255), uint16 or floats "
                         "in [0, 1] or [-1, 1].")
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if not (np.isfinite(arr).all() and -1.0 - 1e-3 <= lo and hi <= 1.0 + 1e-3):
        raise ValueError(f"`{argument}` float values span [{lo:.3g}, {hi:.3g}]; pass values in [0, 1] "
                         "or [-1, 1] (divide 0-255 data by 255).")
    arr = (arr + 1.0) / 2.0 if lo < 0 else arr
    return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


def fit_and_crop(image: Image.Image, height: int, width: int, argument: str = "--image",
                 name: str = "(the image)") -> Image.Image:
    """Scale so the image covers HxW (no padded stripes, unlike a plain short-side resize), then
    centre-crop; an image that must be enlarged gets one warning (it will look soft)."""
    scale = max(height / image.height, width / image.width)
    if scale > 1:
        warn_once(log, "`%s` %s is %dx%d, smaller than the %dx%d it must cover, so it is upscaled "
                  "%.2fx and will look soft; pass an image at least %dx%d.", argument, name,
                  image.width, image.height, width, height, scale, width, height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [1, 3, H, W] in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return arr.permute(2, 0, 1)[None].contiguous()


def prepare_image(source, height: int, width: int, argument: str = "--image") -> torch.Tensor:
    """``source`` (anything :func:`load_image` takes) as the model's [1, 3, H, W] input in [-1, 1]."""
    image = load_image(source, argument)
    return image_to_tensor(fit_and_crop(image, height, width, argument, _describe(source)))
