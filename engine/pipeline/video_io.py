"""Writing videos (H.264 mp4 through PyAV) and frames, atomically: no half-written outputs."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch


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


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int = 8, crf: int = 10) -> Path:
    """Encode uint8 [T, H, W, 3] frames as H.264 (yuv420p). Written to a temporary file in the same
    folder and renamed, so an interrupted run never leaves a broken video behind."""
    import av

    path = Path(path)
    tmp = _atomic_target(path)
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=int(fps))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_png_frames(frames: np.ndarray, folder: str | os.PathLike) -> list[Path]:
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames):
        p = folder / f"frame_{i:04d}.png"
        Image.fromarray(frame).save(p)
        paths.append(p)
    return paths


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode a video file into uint8 [T, H, W, 3] (used by tests and tools)."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
