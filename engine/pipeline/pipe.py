"""``engine.Pipeline``: one loaded model, planned for its device, called like a diffusers pipeline.

A pipeline holds the model, the device it computes on (probed once) and the plans it made (one per
workload). Calls are safe from several threads: runs on one model are serialised by the model's
lock (:mod:`engine.runtime.residency`), and each call has its own random generator, plan and
output, so a call gives the video it would give alone.

Example:
    >>> pipe = Pipeline.from_config("tiny")                       # cuda if available, else cpu
    >>> out = pipe("cat.png", "a cat turning its head", steps=25)
    >>> out.save("cat.mp4")                                       # + cat.mp4.json
    >>> out.frames.shape                                          # (T, H, W, 3) uint8
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from ..device.spec import DeviceSpec, parse_size
from ..errors import InvalidArgument
from ..plan.plan import Plan
from ..plan.settings import Settings
from ..runtime.executor import StageRecord
from ..runtime.recovery import Adjustment
from ..runtime.residency import release_model
from .generate import GenerateResult, generate
from .image_io import load_image
from .loading import load_model
from .options import GenerateOptions, resolve_options
from .resume import RunState
from .video_io import (CONTAINERS, check_output_path, check_writable_folder, to_uint8_frames, write_png_frames,
                       write_video)

if TYPE_CHECKING:
    from .options import ImageInput  # a path, PIL image, numpy array or tensor

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int, torch.Tensor], "bool | None"]


def default_device() -> torch.device:
    """``cuda`` when a CUDA device is available, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class VideoOutput:
    """What one :class:`Pipeline` call made, and everything needed to reproduce it.

    A stopped call (the step callback returned True) has ``stopped=True``, ``video`` and ``frames``
    None, and ``state``: pass it as ``pipe(resume=output.state)`` to finish the same video.
    """

    video: torch.Tensor | None = field(repr=False)  # [T, 3, H, W] in [-1, 1], on the CPU
    prompt: str
    seed: int
    config: str
    options: GenerateOptions = field(repr=False)
    settings: Settings  # as the run ended (after any adjustment)
    plan: Plan | None
    stages: tuple[StageRecord, ...] = ()
    adjustments: tuple[Adjustment, ...] = ()
    state: RunState | None = field(default=None, repr=False)
    stopped: bool = False

    @classmethod
    def from_result(cls, result: GenerateResult, config: str) -> VideoOutput:
        o = result.options
        return cls(video=result.video, prompt=o.prompt, seed=o.seed, config=config, options=o,
                   settings=result.settings, plan=result.plan, stages=result.stages,
                   adjustments=result.adjustments, state=result.state, stopped=result.stopped)

    @cached_property
    def frames(self) -> np.ndarray | None:
        """uint8 ``[T, H, W, 3]``, or None when the call was stopped."""
        return None if self.video is None else to_uint8_frames(self.video)

    def images(self) -> list:
        """The frames as RGB ``PIL.Image`` objects (empty when the call was stopped)."""
        from PIL import Image

        return [] if self.frames is None else [Image.fromarray(f) for f in self.frames]

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per stage, by stage name."""
        return {s.name: s.time_s for s in self.stages}

    def metadata(self) -> dict[str, Any]:
        """What the output records: prompt, seed, config, options, settings, plan, adjustments, stages."""
        options = {k: (v if v is None or isinstance(v, (str, int, float)) else f"({type(v).__name__})")
                   for k, v in asdict(self.options).items()}  # an in-memory image is named, not stored
        return {"prompt": self.prompt, "seed": self.seed, "config": self.config, "options": options,
                "settings": self.settings.to_dict(),
                "plan": None if self.plan is None else self.plan.as_dict(),
                "adjustments": [a.to_dict() for a in self.adjustments],
                "stages": [s.to_dict() for s in self.stages]}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the video where ``path``'s extension says, with what made it recorded.

        ``.mp4``, ``.webm`` and ``.gif`` are encoded containers; a folder (an existing one, or a path
        ending in ``/``) gets ``frame_0000.png``...; ``name.png`` gets ``name_0000.png``... beside
        it. The prompt, seed, config, settings and plan go into the file's comment (mp4/webm tag,
        GIF comment, PNG text chunk: :func:`engine.pipeline.video_io.read_metadata` reads it) and
        everything of :meth:`metadata` into ``path + ".json"`` (``frames/`` -> ``frames.json``).
        Returns the path written (the folder for PNG frames).
        """
        if self.frames is None:
            raise InvalidArgument("`save` has no video to write: this call was stopped by its step callback; "
                                  "finish it with pipe(resume=output.state) first.")
        target, png, sidecar = _save_target(path)
        meta = self.metadata()
        comment = json.dumps({k: meta[k] for k in ("prompt", "seed", "config", "settings", "plan")})
        if png is not None:
            write_png_frames(self.frames, target, prefix=png, metadata=comment)
        else:
            write_video(self.frames, target, fps=self.options.fps, metadata=comment)
        sidecar.write_text(json.dumps(meta, indent=2) + "\n")
        log.info("wrote %s and %s", target, sidecar.name)
        return target


def _save_target(path: str | os.PathLike) -> tuple[Path, str | None, Path]:
    """(where to write, the PNG file prefix or None for a video container, the JSON sidecar),
    checked before anything is written."""
    p = Path(path).expanduser()
    sidecar = p.with_name(p.name + ".json")
    if p.is_dir() or str(path).endswith(("/", os.sep)):
        return check_writable_folder(p, "path"), "frame_", sidecar
    if p.suffix.lower() == ".png":
        return check_writable_folder(p.parent, "path"), p.stem + "_", sidecar
    if p.suffix.lower() not in CONTAINERS:
        raise InvalidArgument(f"`path` {str(p)!r} has no supported extension; end it in "
                              f"{', '.join(CONTAINERS)} or .png, or pass a folder for PNG frames.")
    return check_output_path(p, "path"), None, sidecar


def as_image_input(image: ImageInput | None, argument: str):
    """A path stays a path; an in-memory image becomes a uint8 ``CxHxW`` tensor of the RGB picture
    it shows, so the run's saved state holds only tensors (``RunState.save``/``load``)."""
    if image is None or isinstance(image, (str, os.PathLike)):
        return image
    rgb = np.asarray(load_image(image, argument))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


class Pipeline:
    """A DynamiCrafter model on one device, planned per workload and called per video.

    Weights stay where the plan put them between calls: on a CUDA device with ``offload=none``
    they stay on the card in the plan's precision (the next call most likely wants them there);
    :meth:`release` gives them back to the CPU in their loaded precision. Offloaded plans and CPU
    runs return the model exactly as loaded after every call, stopped or not.

    Args:
        model: a loaded :class:`~engine.models.LatentVisualDiffusion` (see :meth:`from_config`).
        device: where to compute (``cpu``, ``cuda``, ``cuda:N``); default cuda when available.
    """

    def __init__(self, model, device: str | torch.device | None = None):
        self._model = model
        self._spec = model.spec if model is not None else None
        self._loader: Callable[[], object] | None = None
        self.device = torch.device(device) if device is not None else default_device()
        self._lock = threading.Lock()  # the probe, the plan cache and the lazy load
        self._planning = threading.Lock()  # one plan at a time: the estimators' caches are shared
        self._device_spec: DeviceSpec | None = None
        self._plans: dict[tuple, Plan] = {}

    @classmethod
    def from_config(cls, config, ckpt: str | os.PathLike | None = None,
                    device: str | torch.device | None = None, *, lazy: bool = False) -> Pipeline:
        """Load ``config`` (a built-in name, a YAML path or a loaded ``ModelSpec``) with ``ckpt``
        (None: random weights).

        The weights load on the CPU (memory-mapped); the first call's plan casts and places them, so
        a half-precision plan never holds an fp32 copy on the card. ``lazy=True`` reads only the
        config now and loads the weights on the first call (or :attr:`model`): :meth:`plan` works
        without them, so a workload that cannot fit is refused before seconds of loading."""
        from ..config import load_spec

        spec = load_spec(config) if not hasattr(config, "unet") else config
        path = None if ckpt is None else str(ckpt)
        if path is not None:
            from ..checkpoint import check_checkpoint_path

            check_checkpoint_path(path, "ckpt")  # a missing file is said now, not at the first call
        pipe = cls(None, device)
        pipe._spec, pipe._loader = spec, lambda: load_model(spec.source, path, device="cpu")
        return pipe if lazy else pipe._loaded()

    def _loaded(self) -> Pipeline:
        self.model  # noqa: B018 - loads the weights
        return self

    @property
    def model(self):
        """The loaded model (a lazy pipeline loads its weights here, once)."""
        with self._lock:
            if self._model is None:
                self._model, self._loader = self._loader(), None
            return self._model

    @property
    def spec(self):
        return self._spec

    def device_spec(self) -> DeviceSpec:
        """This pipeline's device as probed (once; later calls reuse it)."""
        from ..device import probe_for

        with self._lock:
            if self._device_spec is None:
                self._device_spec = probe_for(self.device, "device")
            return self._device_spec

    def plan(self, height: int | None = None, width: int | None = None, frames: int | None = None,
             max_memory: int | str | None = None, steps: int = 50, mode: str = "i2v",
             force: str | None = None, reserve: int | str | None = None, guidance: bool = True) -> Plan:
        """The plan for this workload on this pipeline's device (made once, then cached).

        Args:
            height, width, frames: the video; None takes the config's defaults.
            max_memory: plan for at most this much device memory (bytes or e.g. ``"6GiB"``): the
                budget is min(device, max_memory), with no further reserve unless ``reserve`` says.
            steps, mode, guidance: the sampling run (``guidance``: cfg != 1).
            force: settings to pin, as ``engine plan --force`` (e.g. ``"cfg=sequential"``).
            reserve: memory to keep free (default max(1 GiB, 10 %)).
        """
        from ..device import capped, host_memory
        from ..planner.search import make_plan

        opts = resolve_options(GenerateOptions(height=height, width=width, frames=frames, steps=steps),
                               self.spec, name=str)
        cap = None if max_memory is None else parse_size(max_memory, "max_memory")
        reserve_bytes = parse_size(reserve, "reserve") if reserve is not None else (0 if cap else None)
        key = (opts.height, opts.width, opts.frames, opts.steps, mode, guidance, force, reserve_bytes, cap)
        with self._planning:
            with self._lock:
                if key in self._plans:
                    return self._plans[key]
            device = capped(self.device_spec(), cap)
            plan = make_plan(self.spec, opts.height, opts.width, opts.frames, device, force=force,
                             reserve_bytes=reserve_bytes, steps=opts.steps, guidance=guidance, mode=mode,
                             host_bytes=host_memory()["available_bytes"])
            log.info("planned %sx%sx%s on %s: %s", opts.height, opts.width, opts.frames, device.name,
                     plan.settings.describe())
            with self._lock:
                self._plans[key] = plan
            return plan

    def __call__(self, image: ImageInput | None = None, prompt: str = "", *, image2: ImageInput | None = None,
                 mode: str = "i2v", height: int | None = None, width: int | None = None,
                 frames: int | None = None, steps: int | None = None, seed: int = 123, cfg: float = 7.5,
                 cfg_img: float | None = None, fs: int | None = None, eta: float = 1.0, fps: int = 8,
                 plan: Plan | None = None, max_memory: int | str | None = None, force: str | None = None,
                 callback_on_step_end: StepCallback | None = None, resume: RunState | None = None,
                 progress: bool = True, calibrate: bool = True) -> VideoOutput:
        """Animate ``image`` (a path, PIL image, numpy array or tensor) as ``prompt`` describes.

        Args:
            image, image2: the first frame, and the last one for ``mode="interp"`` (``loop``: optional).
            height, width, frames, steps: None takes the plan's (or the config's; steps 50).
            seed, cfg, cfg_img, fs, eta, fps: as :class:`~engine.pipeline.options.GenerateOptions`.
            plan: a plan made for this workload (:meth:`plan`); None plans for this device and
                caches the plan (``max_memory`` and ``force`` then shape it).
            max_memory: a cap on the device memory the run may use, enforced during the run.
            callback_on_step_end: ``fn(step, timestep, latents)`` after every denoising step;
                returning True stops the call promptly with ``VideoOutput(stopped=True)``.
            resume: a stopped call's ``state`` to finish (its options are used; a given ``plan``
                must match them).
            progress: show the DDIM progress bar.
            calibrate: let the run correct this device's next plans (see :func:`engine.generate`).
        """
        if resume is not None:
            opts = GenerateOptions(**resume.options)
        elif image is None:
            raise InvalidArgument("`image` is required to generate a video; pass a file path, a PIL.Image, "
                                  "a numpy array or a torch tensor (or `resume` to finish a stopped call).")
        else:
            opts = GenerateOptions(image=as_image_input(image, "image"), image2=as_image_input(image2, "image2"),
                                   prompt=prompt, mode=mode, height=height, width=width, frames=frames,
                                   steps=steps, cfg=cfg, cfg_img=cfg_img, fs=fs, eta=eta, seed=seed, fps=fps)
        if plan is not None and not isinstance(plan, Plan):
            raise InvalidArgument(f"`plan` must be an engine Plan, not {type(plan).__name__}; make one with "
                                  "pipe.plan(...).")
        # resolved once here (a negative seed is drawn once), so errors name this call's arguments
        opts = resolve_options(opts, self.spec, plan.workload if plan else None, name=str)
        if plan is None:
            plan = self.plan(opts.height, opts.width, opts.frames, max_memory=max_memory, steps=opts.steps,
                             mode=opts.mode, force=force, guidance=opts.cfg != 1.0)
        elif force is not None:
            raise InvalidArgument("`force` shapes a plan this call makes; with `plan` given, pass "
                                  "pipe.plan(..., force=...) as the plan instead.")
        result = generate(self.model, opts, plan, device=self.device, max_memory=max_memory,
                          callback_on_step_end=callback_on_step_end, resume=resume, progress=progress,
                          calibrate=calibrate)
        if result.stopped:
            log.info("stopped by the step callback after %d steps", result.state.steps_done)
        return VideoOutput.from_result(result, self.spec.name)

    def release(self) -> None:
        """Give back weights a call kept on the device (:func:`engine.release_model`): the model is
        again as loaded, on the CPU. The next call places them again; cached plans stay."""
        if self._model is not None:
            release_model(self._model)

    def __repr__(self) -> str:
        loaded = "" if self._model is not None else ", weights not loaded yet"
        return f"Pipeline(config={self.spec.name!r}, device={str(self.device)!r}, plans={len(self._plans)}{loaded})"
