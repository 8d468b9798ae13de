"""Writing videos (mp4, webm, gif through PyAV) and frames, atomically: no half-written outputs."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidArgument


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[T, 3, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    v = ((video.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return v.permute(0, 2, 3, 1).cpu().numpy()


def _atomic_target(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the video is an ordinary file
    return Path(tmp)


# extension -> (container format, codec, pixel format, codec options)
CONTAINERS = {
    ".mp4": ("mp4", "libx264", "yuv420p", {"crf": "10"}),        # DynamiCrafter's own: H.264, crf 10
    ".webm": ("webm", "libvpx-vp9", "yuv420p", {"crf": "12", "b": "0"}),
    ".gif": ("gif", None, None, {}),  # written by PIL: an adaptive palette per frame (FFmpeg's rgb8 bands)
}


def check_output_path(path: str | os.PathLike, argument: str = "--out") -> Path:
    """Check an output video path before any work: a supported extension, not a directory, and a
    folder that exists (created if missing) and is writable. Returns the path."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InvalidArgument(f"`{argument}` {str(path)!r} is a directory; pass a file name in it such as "
                              f"{str(path / 'video.mp4')!r}.")
    if path.suffix.lower() not in CONTAINERS:
        raise InvalidArgument(f"`{argument}` {str(path)!r} has no supported video extension; end it in "
                              f"{', '.join(CONTAINERS)} (or write frames with --png-dir).")
    check_writable_folder(path.parent, argument)
    return path


def check_writable_folder(folder: str | os.PathLike, argument: str) -> Path:
    """Create ``folder`` if missing and prove it writable with a probe file."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InvalidArgument(f"`{argument}` cannot be written in {str(folder)!r} ({exc.strerror or exc}); "
                              "pass a path in a folder you can write to.") from None
    return folder


def write_video(frames: np.ndarray, path: str | os.PathLike, fps: int = 8, metadata: str | None = None) -> Path:
    """Encode uint8 [T, H, W, 3] frames in the container the extension names (see ``CONTAINERS``).
    Written to a temporary file in the same folder and renamed, so an interrupted run never leaves a
    broken video behind. ``metadata`` (text, e.g. JSON) is stored as the container's comment: the
    ``comment`` tag of mp4/webm (``av.open(path).metadata["comment"]``), the GIF comment extension."""
    import av

    path = Path(path)
    fmt, codec, pix_fmt, options = CONTAINERS[path.suffix.lower()]
    tmp = _atomic_target(path)
    try:
        if codec is None:
            _write_gif(frames, tmp, fps, metadata)
            os.replace(tmp, path)
            return path
        with av.open(str(tmp), mode="w", format=fmt) as container:
            if metadata is not None:
                container.metadata["comment"] = metadata
            stream = container.add_stream(codec, rate=int(fps))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = pix_fmt
            stream.options = dict(options)
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_gif(frames: np.ndarray, path: Path, fps: int, metadata: str | None = None) -> None:
    from PIL import Image

    images = [Image.fromarray(f).quantize(colors=256, method=Image.Quantize.MEDIANCUT) for f in frames]
    extra = {"comment": metadata} if metadata is not None else {}
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=round(1000 / fps), disposal=1, **extra)


write_mp4 = write_video  # the older name; the extension picks the container


def write_png_frames(frames: np.ndarray, folder: str | os.PathLike, prefix: str = "frame_",
                     metadata: str | None = None) -> list[Path]:
    """``folder/<prefix>0000.png``, ...; ``metadata`` goes into each file's ``comment`` text chunk."""
    from PIL import Image, PngImagePlugin

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = None
    if metadata is not None:
        info = PngImagePlugin.PngInfo()
        info.add_itxt("comment", metadata)
    paths = []
    for i, frame in enumerate(frames):
        p = folder / f"{prefix}{i:04d}.png"
        Image.fromarray(frame).save(p, pnginfo=info)
        paths.append(p)
    return paths


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode a video file into uint8 [T, H, W, 3] (used by tests and tools)."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def read_metadata(path: str | os.PathLike) -> str | None:
    """The comment :func:`write_video` or :func:`write_png_frames` stored in ``path``, or None.

    Matroska (webm) upper-cases tag names and GIF stores bytes; this reads all of them alike."""
    path = Path(path)
    if path.suffix.lower() in (".gif", ".png"):
        from PIL import Image

        with Image.open(path) as im:
            comment = im.info.get("comment")
        return comment.decode("utf-8") if isinstance(comment, bytes) else comment
    import av

    with av.open(str(path)) as container:
        return next((v for k, v in container.metadata.items() if k.lower() == "comment"), None)
