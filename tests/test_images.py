"""Every image PIL opens comes out as the picture a person sees; in-memory images are accepted;
bad inputs get one sentence naming the argument."""
from __future__ import annotations

import logging
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from engine.logs import reset_warn_once
from engine.pipeline.image_io import BACKGROUND, load_image, prepare_image

RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture(autouse=True)
def _fresh_warnings(caplog):
    reset_warn_once()
    caplog.set_level(logging.WARNING, logger="engine.pipeline.image_io")


def _px(im, x=0, y=0):
    return tuple(int(v) for v in np.asarray(im)[y, x])


def _close(a, b, tol=3):
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


def _one_sentence(msg: str) -> bool:
    return msg.count(". ") == 0 and "`" in msg


def test_exif_orientation_is_honoured(tmp_path):
    im = Image.new("RGB", (40, 20), RED)
    im.paste(BLUE, (20, 0, 40, 20))  # left red, right blue
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = tmp_path / "rotated.png"
    im.save(path, exif=exif)
    out = load_image(path)
    assert out.size == (20, 40)
    assert _close(_px(out, 10, 5), RED) and _close(_px(out, 10, 35), BLUE)


def test_16_bit_gray_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    out = np.asarray(load_image(path))
    assert out.shape == (64, 64, 3) and abs(out.mean() - 127.5) < 2 and out.min() == 0 and out.max() == 255


def _png_rgb16(path, rgb16: np.ndarray):
    """A 48-bit RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_rgb_png_is_scaled(tmp_path):
    path = tmp_path / "rgb16.png"
    _png_rgb16(path, np.full((8, 8, 3), (32768, 65535, 0), np.uint16))
    assert _close(_px(load_image(path)), (128, 255, 0), tol=1)


@pytest.mark.parametrize("mode,values,expected", [
    ("I", np.full((8, 8), 32768, np.int32), 128),          # a widened 16-bit file
    ("I", np.array([[-5, 5]] * 2, np.int32), None),       # not 16-bit: stretched min..max
    ("F", np.full((8, 8), 0.5, np.float32), 128),           # already [0, 1]
    ("F", np.array([[0.0, 1000.0]] * 2, np.float32), None),  # stretched min..max
])
def test_32_bit_modes_are_scaled(tmp_path, mode, values, expected):
    path = tmp_path / f"{mode}.tif"
    Image.fromarray(values, mode).save(path)
    out = np.asarray(load_image(path))
    if expected is None:
        assert out.min() == 0 and out.max() == 255
    else:
        assert abs(int(out[0, 0, 0]) - expected) <= 1


@pytest.mark.parametrize("make", [
    lambda: Image.new("RGBA", (16, 16), (255, 0, 0, 0)),
    lambda: Image.new("LA", (16, 16), (0, 0)),
    lambda: _p_with_transparency(),
], ids=["RGBA", "LA", "P-transparency"])
def test_transparency_is_composited_onto_white_with_a_warning(tmp_path, caplog, make):
    path = tmp_path / "alpha.png"
    make().save(path)
    assert _px(load_image(path)) == BACKGROUND == (255, 255, 255)
    assert caplog.text.count("composited them onto white") == 1


def _p_with_transparency():
    im = Image.new("P", (16, 16), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.info["transparency"] = 1
    return im


def test_opaque_alpha_is_not_reported(tmp_path, caplog):
    path = tmp_path / "opaque.png"
    Image.new("RGBA", (16, 16), (0, 0, 255, 255)).save(path)
    assert _px(load_image(path)) == BLUE and "composited" not in caplog.text


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animations_use_the_first_frame_with_a_note(tmp_path, caplog, fmt):
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE, (0, 255, 0))]
    path = tmp_path / f"anim.{fmt.lower()}"
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100, **kwargs)
    assert Image.open(path).n_frames == 3
    assert _close(_px(load_image(path)), RED, tol=8)
    assert "is animated (3 frames); using its first frame" in caplog.text


@pytest.mark.parametrize("mode,color,fmt,expected", [
    ("CMYK", (0, 255, 255, 0), "JPEG", RED),
    ("YCbCr", (29, 255, 107), "JPEG", BLUE),
    ("1", 1, "PNG", (255, 255, 255)),
    ("L", 128, "PNG", (128, 128, 128)),
    ("P", 1, "GIF", BLUE),
])
def test_other_modes_convert_to_rgb(tmp_path, mode, color, fmt, expected):
    im = Image.new(mode, (16, 16), color)
    if mode == "P":
        im.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    path = tmp_path / f"m.{fmt.lower()}"
    im.save(path, format=fmt)
    assert _close(_px(load_image(path)), expected, tol=12)


def test_small_images_are_upscaled_with_one_warning(tmp_path, caplog):
    path = tmp_path / "tiny.png"
    Image.new("RGB", (24, 16), RED).save(path)
    for _ in range(2):
        assert prepare_image(path, 64, 96).shape == (1, 3, 64, 96)
    assert caplog.text.count("upscaled 4.00x") == 1 and "24x16" in caplog.text


def test_large_images_are_not_reported(tmp_path, caplog):
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 100), RED).save(path)
    prepare_image(path, 64, 96)
    assert "upscaled" not in caplog.text


def test_directory_and_non_images_get_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`--image` '.*' is a directory; pass the path of one image"):
        load_image(tmp_path)
    (tmp_path / "notes.png").write_text("hello, not pixels")
    full = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(full)
    (tmp_path / "cut.png").write_bytes(full.read_bytes()[:400])
    for name in ("notes.png", "cut.png"):
        with pytest.raises(ValueError, match="is not an image PIL can read") as info:
            load_image(tmp_path / name, "--image")
        assert _one_sentence(str(info.value)), str(info.value)


def _reference():
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)


@pytest.mark.parametrize("convert", [
    lambda a: Image.fromarray(a),
    lambda a: a,
    lambda a: a.astype(np.float32) / 255,
    lambda a: a.astype(np.float64) / 127.5 - 1,
    lambda a: a.astype(np.uint16) * 257,
    lambda a: torch.from_numpy(a).permute(2, 0, 1),
    lambda a: torch.from_numpy(a),
    lambda a: torch.from_numpy(a).permute(2, 0, 1).float() / 255,
    lambda a: (torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1)[None].bfloat16().float(),
    lambda a: torch.from_numpy(a).float() / 255,
], ids=["pil", "np-uint8", "np-float01", "np-float-11", "np-uint16", "t-chw-uint8", "t-hwc-uint8",
        "t-chw-float01", "t-bchw-float-11", "t-hwc-float01"])
def test_in_memory_images_match_the_file(tmp_path, convert):
    ref = _reference()
    path = tmp_path / "ref.png"
    Image.fromarray(ref).save(path)
    expected = prepare_image(path, 32, 48)
    got = prepare_image(convert(ref), 32, 48, "image")
    assert (got - expected).abs().max() <= 2 / 127.5 + 1e-6


def test_gray_and_rgba_arrays(caplog):
    assert _px(load_image(np.full((4, 4), 7, np.uint8))) == (7, 7, 7)
    rgba = np.zeros((4, 4, 4), np.uint8)
    assert _px(load_image(rgba)) == (255, 255, 255) and "composited" in caplog.text


@pytest.mark.parametrize("value,error,pattern", [
    (42, TypeError, r"`image` has type int; pass a file path, a PIL.Image"),
    ([[0, 1]], TypeError, r"`image` has type list"),
    (np.zeros((2, 3, 4, 5), np.uint8), ValueError, r"`image` has shape \(2, 3, 4, 5\)"),
    (np.zeros((4, 4, 3), np.int64), ValueError, r"`image` has dtype int64"),
    (np.full((4, 4, 3), 255.0), ValueError, r"`image` float values span \[255, 255\]"),
    (torch.zeros(4, 4, 3, dtype=torch.bool), ValueError, r"`image` has dtype bool"),
])
def test_bad_in_memory_images_get_one_sentence(value, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        load_image(value, "image")
    assert _one_sentence(str(info.value)), str(info.value)
