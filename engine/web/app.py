"""The page of ``engine serve``: the plan and its picture before running, a progress bar during,
the video after, and each stage's measured memory against the prediction.

One :class:`Session` holds the loaded model; every request plans for the session's device first
(DynamiCrafter's own run is planned beside it for the picture) and then runs that plan.

Example:
    >>> session = Session.load("tiny")
    >>> build_app(session).launch(server_name="127.0.0.1", server_port=7860)
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..device.spec import format_bytes
from ..errors import EngineError

log = logging.getLogger(__name__)

MEMORY_HEADERS = ["stage", "predicted peak", "predicted tensors", "measured tensors", "measured / predicted",
                  "predicted time (s)", "measured time (s)"]


def require_gradio(argument: str = "engine serve"):
    """The ``gradio`` module, or one sentence naming ``argument`` and the extra to install."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local page
    try:
        import gradio
    except ImportError:
        raise ModuleNotFoundError(f"`{argument}` needs gradio, which is not installed; install it with "
                                  "`pip install engine[serve]`.") from None
    return gradio


@dataclass
class Session:
    """A loaded model, the device it runs on and where the page's videos and pictures go."""

    model: object
    device: str = "cpu"
    out_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="engine-serve-")))
    _device_spec: object = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, config: str = "tiny", ckpt: str | None = None, device: str = "cpu") -> Session:
        """Load ``config`` (random weights without ``ckpt``) and probe ``device`` once."""
        from ..pipeline.loading import load_model

        session = cls(load_model(config, ckpt, device="cpu"), device)  # the plan places the weights
        session.device_spec()
        return session

    @property
    def spec(self):
        return self.model.spec

    def device_spec(self):
        """The probed device (measured once per session)."""
        if self._device_spec is None:
            from ..device import probe_cpu, probe_device

            index = int(self.device.split(":")[1]) if self.device.startswith("cuda:") else 0
            spec = probe_device(index) if self.device.startswith("cuda") else probe_cpu()
            if self.device.startswith("cuda") and spec.kind != "cuda":
                raise ValueError(f"`--device` {self.device!r} is not available here (no CUDA device found); "
                                 "use --device cpu.")
            self._device_spec = spec
        return self._device_spec

    def plans(self, opts):
        """(the plan for ``opts`` on this device, DynamiCrafter's own run planned the same way, or
        why that run cannot be planned here)."""
        from ..device import host_memory
        from ..planner.search import make_plan

        kw = dict(steps=opts.steps, guidance=opts.cfg != 1.0, mode=opts.mode,
                  host_bytes=host_memory()["available_bytes"])
        with self._lock:  # the estimators fit once; two first requests must not fit twice
            plan = make_plan(self.spec, opts.height, opts.width, opts.frames, self.device_spec(), **kw)
            try:
                reference = make_plan(self.spec, opts.height, opts.width, opts.frames, self.device_spec(),
                                      force="reference", **kw)
            except ValueError as err:  # e.g. xformers on a CPU: DynamiCrafter's run needs CUDA
                reference = str(err)
        return plan, reference

    def picture(self, plan, reference) -> str | None:
        """The plan's picture as a PNG path, or None without matplotlib."""
        from ..planner.plot import plot_plan

        reference = reference if not isinstance(reference, str) else None
        try:
            return str(plot_plan(plan, self.out_dir / f"plan-{uuid.uuid4().hex[:8]}.png", reference=reference))
        except ModuleNotFoundError:
            return None

    def run(self, opts, plan, on_step):
        """Generate with ``plan``; ``on_step(step, steps)`` after every denoising step."""
        from ..pipeline.generate import generate

        # on the CPU the plan's budget is enforced through the live-bytes tracker, which is also
        # what measures each stage's peak (CUDA measures through the allocator either way)
        cap = plan.budget_bytes if plan.device.kind == "cpu" else None
        return generate(self.model, opts, plan, device=self.device, max_memory=cap, progress=False,
                        callback_on_step_end=lambda step, t, x: on_step(step + 1, opts.steps))

    def write(self, result) -> str:
        from ..pipeline.video_io import to_uint8_frames, write_video

        path = self.out_dir / f"video-{uuid.uuid4().hex[:8]}.mp4"
        return str(write_video(to_uint8_frames(result.video), path, fps=result.options.fps))


def options(session: Session, image, prompt, height, width, frames, steps, seed, cfg):
    """The page's fields as validated :class:`GenerateOptions` (errors name the field)."""
    from ..pipeline.image_io import EXAMPLE_IMAGE
    from ..pipeline.options import GenerateOptions, resolve_options

    whole = lambda v: None if v in (None, "") else int(v)  # noqa: E731 (empty: the config's default)
    opts = GenerateOptions(image=image or str(EXAMPLE_IMAGE), prompt=prompt or "", height=whole(height),
                           width=whole(width), frames=whole(frames), steps=whole(steps),
                           seed=whole(seed) if whole(seed) is not None else 123,
                           cfg=float(cfg) if cfg not in (None, "") else 7.5)
    return resolve_options(opts, session.spec, name=lambda f: f)


def plan_summary(plan, reference) -> str:
    """The plan as the page shows it: the explained table, then DynamiCrafter's run in one line."""
    if isinstance(reference, str):
        return f"{plan.explain()}\n\nDynamiCrafter's own run cannot be planned here: {reference}"
    verdict = "fits" if reference.fits else "does not fit"
    return (f"{plan.explain()}\n\nDynamiCrafter's own run (--force reference): peak "
            f"{format_bytes(reference.peak_bytes)} of {format_bytes(reference.budget_bytes)}, {verdict}")


def memory_rows(plan, result) -> list[list]:
    """One row per stage: predicted against measured memory and time (a stage run twice after an
    adjustment counts its highest peak and its total time)."""
    rows = []
    for s in plan.stages:
        records = [r for r in result.stages if r.name == s.name]
        peaks = [r.peak_bytes for r in records if r.peak_bytes is not None]
        measured = max(peaks) if peaks else None
        ratio = f"{measured / s.allocated_bytes:.2f}" if measured and s.allocated_bytes else "-"
        rows.append([s.name, format_bytes(s.peak_bytes), format_bytes(s.allocated_bytes),
                     format_bytes(measured) if measured is not None else "not measured", ratio,
                     round(s.time_s, 3), round(sum(r.time_s for r in records), 3)])
    return rows


def build_app(session: Session):
    """The gradio ``Blocks`` page for ``session`` (not launched)."""
    gr = require_gradio()
    h0, w0 = session.spec.default_height_width
    with gr.Blocks(title="engine: memory-aware image-to-video") as app:
        gr.Markdown(f"## engine: {session.spec.name} on {session.device_spec().name}\n"
                    "The plan (and its picture) is shown before running; the table after the run compares "
                    "each stage's measured memory with the prediction.")
        with gr.Row():
            with gr.Column():
                fields = _fields(gr, h0, w0, session.spec.frames)
                with gr.Row():
                    plan_button = gr.Button("Plan", elem_id="plan")
                    run_button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                video = gr.Video(label="video", elem_id="video", format="mp4", autoplay=True, loop=True)
                gr.Markdown("memory per stage: engine's plan (solid) beside DynamiCrafter's run (hatched)")
                picture = gr.Image(show_label=False, elem_id="picture", type="filepath", interactive=False)
        plan_text = gr.Code(label="plan", elem_id="plan-text", language=None, interactive=False)
        table = gr.Dataframe(headers=MEMORY_HEADERS, label="memory: measured against predicted",
                             elem_id="memory", interactive=False)
        show_plan = lambda *values: _plan_view(session, *values)  # noqa: E731
        app.load(show_plan, fields, [plan_text, picture])
        plan_button.click(show_plan, fields, [plan_text, picture])
        run_button.click(show_plan, fields, [plan_text, picture]).then(
            lambda *values, progress=gr.Progress(): _generate_view(session, gr, progress, *values),
            fields, [video, table])
    return app


def _fields(gr, height: int, width: int, frames: int) -> list:
    from ..pipeline.image_io import EXAMPLE_IMAGE

    image = gr.Image(label="image", value=str(EXAMPLE_IMAGE), type="filepath", elem_id="image")
    prompt = gr.Textbox(label="prompt", value="clouds drifting over a mountain lake", elem_id="prompt")
    with gr.Row():
        sizes = [gr.Number(label=name, value=value, precision=0, elem_id=name)
                 for name, value in (("height", height), ("width", width), ("frames", frames))]
    with gr.Row():
        steps = gr.Number(label="steps", value=25, precision=0, elem_id="steps")
        seed = gr.Number(label="seed", value=123, precision=0, elem_id="seed")
        cfg = gr.Number(label="cfg", value=7.5, elem_id="cfg")
    return [image, prompt, *sizes, steps, seed, cfg]


def _plan_view(session: Session, *values):
    gr = require_gradio()
    try:
        plan, reference = session.plans(options(session, *values))
    except EngineError as err:
        raise gr.Error(str(err)) from None
    return plan_summary(plan, reference), session.picture(plan, reference)


def _generate_view(session: Session, gr, progress, *values):
    try:
        opts = options(session, *values)
        plan, _ = session.plans(opts)
        if not plan.fits:
            raise gr.Error(f"no settings fit: the plan needs {format_bytes(plan.peak_bytes)} of the "
                           f"{format_bytes(plan.budget_bytes)} budget; lower the size or frame count.")
        progress((0, opts.steps), desc="denoising", unit="steps")
        result = session.run(opts, plan, lambda done, total: progress((done, total), desc="denoising",
                                                                      unit="steps"))
    except EngineError as err:
        raise gr.Error(str(err)) from None
    log.info("served %dx%dx%d in %.1f s", opts.height, opts.width, opts.frames, sum(result.timings.values()))
    return session.write(result), memory_rows(plan, result)


__all__ = ["MEMORY_HEADERS", "Session", "build_app", "memory_rows", "options", "plan_summary", "require_gradio"]
