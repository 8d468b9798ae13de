"""The generation orchestrator: the stage choreography, readable top to bottom.

The stages run in the order of the one stage table (:mod:`engine.plan.stages`): text encode ->
image encode -> VAE-encode the used frame(s) -> DDIM with classifier-free guidance -> VAE-decode.
The plan's settings are attached from ``engine.runtime`` for the run and removed afterwards; the
models never see them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..device.spec import parse_size
from ..errors import InvalidArgument
from ..plan.plan import Plan, Workload
from ..plan.settings import Settings
from ..planner.calibration import CalibrationStore
from ..planner.replan import stage_predictor
from ..runtime.budget import MemoryBudget
from ..runtime.executor import StageRecord, attached
from ..runtime.recovery import Adjustment, OutOfMemory
from ..sampling.ddim import sample_ddim
from ..sampling.schedule import ddim_timesteps
from .calibration_calls import measure_vae_speed, time_minimal_calls, vae_timing_budget_s
from .conditioning import (assemble_conditions, concat_latents, guided, image_conditions, text_conditions,
                           unet_call)
from .image_io import prepare_image
from .latents import decode_remaining, encode_remaining, flat_latents, training_alphas_cumprod
from .options import GenerateOptions, library_name, resolve_options, run_device
from .resume import Interrupted, RunState

log = logging.getLogger(__name__)


@dataclass
class GenerateResult:
    """A finished run: the frames, what was asked, the settings it ran with and each stage as
    executed (``stages`` has the names and order of ``plan.stages``)."""

    video: torch.Tensor | None  # [T, 3, H, W] in [-1, 1], on the CPU; None if stopped
    options: GenerateOptions
    settings: Settings  # as the run ended (after any adjustment)
    stages: tuple[StageRecord, ...] = ()
    plan: Plan | None = None
    adjustments: tuple[Adjustment, ...] = ()  # every re-plan the run made, in order
    unet_calls: int = 0
    denoise_steps: int = 0  # steps run in this call; opts.steps when nothing was repeated or resumed
    state: RunState | None = None  # the sampler's progress: the denoised latents once finished
    stopped: bool = False  # the step callback asked to stop (``video`` is None; resume from ``state``)

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per stage, by stage name."""
        return {s.name: s.time_s for s in self.stages}


def workload_of(opts: GenerateOptions, spec) -> Workload:
    """The workload resolved options ask for (what a plan must have been made for)."""
    return Workload.for_spec(spec, opts.height, opts.width, opts.frames, steps=opts.steps, mode=opts.mode,
                             guidance=opts.cfg != 1.0)


def _run_settings(model, opts, plan, settings, device) -> tuple[GenerateOptions, Settings, torch.device]:
    """Resolve the options against the plan, check the plan was made for this run, pick the settings."""
    if isinstance(settings, Plan):
        plan, settings = settings, None
    if plan is not None and not isinstance(plan, Plan):
        raise InvalidArgument(f"`plan` must be an engine Plan, not {type(plan).__name__}; make one with "
                              "make_plan(...) or Plan.from_json(text).")
    if plan is not None and settings is not None:
        raise InvalidArgument("`plan` and `settings` were both given; pass the plan alone (its settings "
                              "are what it predicted) or settings alone.")
    opts = resolve_options(opts, model.spec, plan.workload if plan else None)
    if device is None:
        device = "cuda" if plan is not None and plan.device.kind == "cuda" else "cpu"
    device = torch.device(run_device(device, "device"))
    if plan is not None:
        plan.check_runs(workload_of(opts, model.spec), device.type)
        chosen = plan.settings
    else:
        chosen = Settings.from_mapping(settings or {}, argument="settings")
    return opts, chosen.with_autoencoding(model.spec.perframe_ae), device


@torch.no_grad()
def generate(model, opts: GenerateOptions, plan: Plan | None = None, *, settings: Settings | None = None,
             device=None, max_memory: int | str | MemoryBudget | None = None,
             callback_on_step_end=None, resume: RunState | None = None,
             progress: bool = True, calibrate: bool = True) -> GenerateResult:
    """Run one image-to-video generation with ``model`` (a loaded LatentVisualDiffusion).

    A stage that runs out of memory is re-planned one rung down its ladder
    (:mod:`engine.runtime.recovery`) and continues where it stopped: denoising from the last
    finished step with the same random state, decoding after the last finished chunk.

    Args:
        model: the container, e.g. from :func:`engine.pipeline.loading.load_model`.
        opts: what to generate; unset height, width, frames and steps come from the plan.
        plan: a :class:`~engine.plan.plan.Plan` made for this run; one made for another config,
            size, frame count, mode or device kind is refused in one sentence.
        settings: without a plan, the settings to run with (a ``Settings``, or a mapping of setting
            names to values over ``Settings()``); autoencoding defaults to the config's ``perframe_ae``.
        device: where to compute; default the plan's device kind, else the CPU.
        max_memory: a cap on the device memory the run may use (bytes or a size such as ``"6GiB"``),
            enforced (CUDA: the allocator's per-process limit; CPU: live tensor bytes), or a
            :class:`~engine.runtime.budget.MemoryBudget`.
        callback_on_step_end: called after every denoising step as ``fn(step, timestep, latents)``;
            returning True stops the run promptly: the result then has ``stopped=True``,
            ``video=None`` and ``state`` (a :class:`~engine.pipeline.resume.RunState` to resume from).
        resume: a saved :class:`RunState` to finish (its options and settings are used; the
            model must have the config it was made with).
        progress: show the DDIM progress bar.
        calibrate: let a whole run from a plan made on a probed device correct that device's next
            plans (:mod:`engine.planner.calibration`); the first such run on a device also times its
            VAE once (a few seconds, cached). False: the run measures nothing for later.

    Raises:
        Interrupted: Ctrl-C or SIGTERM stopped the run; ``.state`` holds the finished steps (save it
            and pass it as ``resume``).
        OutOfMemory: a stage ran out of memory after every re-plan; it carries ``.state`` too.

    Example:
        >>> plan = make_plan(spec, 320, 512, 16, catalog_device("rtx-4060-laptop"))
        >>> video = generate(model, GenerateOptions(image="cat.png", prompt="a cat"), plan).video
    """
    if resume is not None:  # its options; its last settings unless a plan or settings are given
        opts = _resumed(model, resume)
        settings = resume.settings if plan is None and settings is None else settings
    opts, chosen, device = _run_settings(model, opts, plan, settings, device)
    budget = max_memory if isinstance(max_memory, MemoryBudget) else MemoryBudget(
        None if max_memory is None else parse_size(max_memory, "max_memory"), device)
    counts = {"unet_calls": 0, "steps": 0}
    progress_ = _Progress(opts, model.spec, resume, callback_on_step_end)
    predict = stage_predictor(model.spec, plan) if plan is not None else None  # guides re-plans
    calibrating = calibrate and _calibrating(plan, opts, resumed=resume is not None)
    vae_timing_s = vae_timing_budget_s() if calibrating else 0.0
    with attached(model, chosen, device, frames=opts.frames, budget=budget, plan=plan, predict=predict) as run:
        try:
            video = _run_stages(model, opts, run, progress, counts, progress_, calibrating, vae_timing_s)
        except _StopRequested:
            video = None
        except KeyboardInterrupt as err:
            raise progress_.interrupted(run, err) from err
        except OutOfMemory as err:  # after every re-plan: the error says why; ``.state`` keeps the work
            err.state = progress_.state(run)
            raise
        except torch.OutOfMemoryError as err:  # outside any stage (inputs, noise): nothing to re-plan
            raise OutOfMemory(f"`max_memory` left no room for the run's inputs ({err}); raise it or lower "
                              "the resolution or frame count.") from err
    if calibrating and video is not None and not run.adjustments:  # it followed its plan to the end
        CalibrationStore(plan.device, plan.workload.config_digest).record(plan, run.records)
    return GenerateResult(video=video, options=opts, settings=run.settings, stages=tuple(run.records),
                          plan=plan, adjustments=tuple(run.adjustments), unet_calls=counts["unet_calls"],
                          denoise_steps=counts["steps"], state=progress_.state(run), stopped=video is None)


def _calibrating(plan, opts, resumed: bool) -> bool:
    """Whether this run can calibrate the next plans: a whole run (not resumed) from a plan made
    for it on a probed device, with the guidance the planner models (not a third, image-guided
    branch: plans count two)."""
    return (plan is not None and plan.device.source == "probe" and opts.steps == plan.workload.steps
            and not resumed and (opts.cfg_img is None or opts.cfg == 1.0))


class _StopRequested(Exception):
    """The step callback asked to stop (internal: becomes ``GenerateResult.stopped``)."""


class _Progress:
    """The sampler's progress: steps done, the latents after them, the generator state."""

    def __init__(self, opts, spec, resume: RunState | None, callback):
        self.opts, self.spec, self.callback = opts, spec, callback
        self.done = resume.steps_done if resume else 0
        self.x = resume.latents if resume else None
        self.rng = resume.rng_state if resume else None

    def state(self, run) -> RunState:
        from dataclasses import asdict

        from ..plan.plan import spec_digest

        return RunState(self.spec.name, spec_digest(self.spec), asdict(self.opts), run.settings.to_dict(),
                        self.done, self.x if self.x is not None else torch.zeros(0),
                        self.rng if self.rng is not None else torch.zeros(0, dtype=torch.uint8))

    def interrupted(self, run, err: BaseException) -> Interrupted:
        why = "interrupted" if isinstance(err, KeyboardInterrupt) else str(err).rstrip(".")
        return Interrupted(f"the run stopped after {self.done} of {self.opts.steps} denoising steps ({why}); "
                           "save `.state` and pass it as `resume` to finish it.", self.state(run), err)


def _resumed(model, state: RunState) -> GenerateOptions:
    from ..plan.plan import spec_digest

    if (state.config, state.config_digest) != (model.spec.name, spec_digest(model.spec)):
        raise InvalidArgument(f"`resume` was saved from config {state.config!r}, not this model's "
                              f"{model.spec.name!r}; load the model with the config the run started with.")
    if state.latents.numel() == 0:
        raise InvalidArgument("`resume` holds no latents (the run stopped before denoising began); start "
                              "the run again instead.")
    return GenerateOptions(**state.options)


def _recovering(run, name: str, attempt):
    """Run ``attempt()`` as stage ``name``; after an out-of-memory error re-plan and call it again
    (each attempt resumes from what the previous ones finished)."""
    run.check_headroom(name)
    while True:
        try:
            with run.stage(name):
                return attempt()
        except torch.OutOfMemoryError as err:
            run.recover(name, run.budget.position[1], err)


def _run_stages(model, opts: GenerateOptions, run, progress: bool, counts: dict, saved,
                calibrating: bool = False, vae_timing_s: float = 0.0) -> torch.Tensor:
    spec, device = model.spec, run.device
    generator = torch.Generator("cpu").manual_seed(opts.seed)
    images = _images(opts, device, run.input_dtype)
    use_cfg, multi = opts.cfg != 1.0, opts.cfg != 1.0 and opts.cfg_img is not None

    text, empty = _recovering(run, "text_encode", lambda: text_conditions(
        model, opts.prompt, images[0].shape[0], use_cfg, device))
    img, zero_img = _recovering(run, "image_encode", lambda: image_conditions(model, images[0], use_cfg))
    before_encode, encoded = generator.get_state(), []  # ``encoded``: moments of finished groups

    def encode():
        generator.set_state(before_encode)  # a retried encode draws the same posterior noise
        frames = torch.cat(_frames_to_encode(images, opts, run.settings), dim=0)
        return encode_remaining(model, frames, run, encoded, generator)

    z = _recovering(run, "vae_encode", encode)
    c_concat = concat_latents(z[0:1], z[-1:] if opts.mode != "i2v" else None, opts.frames, opts.mode)
    conds = assemble_conditions(text, empty, img, zero_img, c_concat, opts.fs, use_cfg, multi)
    f = spec.vae.downsample_factor
    noise = torch.randn((1, spec.channels, opts.frames, opts.height // f, opts.width // f),
                        generator=generator).to(device, run.input_dtype)
    if saved.x is None:  # a fresh run (a resumed one brings its latents and random state)
        saved.x, saved.rng = noise, generator.get_state()
    saved.x = saved.x.to(device, run.input_dtype)
    latents = _recovering(run, "denoise", _denoiser_attempt(model, opts, run, conds, saved, generator,
                                                             progress, counts))
    flat, done = flat_latents(model, latents), []
    video = _recovering(run, "vae_decode", lambda: decode_remaining(model, flat, run, done))
    if calibrating and not run.adjustments:  # a run that re-planned calibrates nothing
        encoded_frames = torch.cat(_frames_to_encode(images, opts, run.settings), dim=0)
        time_minimal_calls(model, run, opts, conds, saved.x, encoded_frames, flat)
        measure_vae_speed(model, run, vae_timing_s, encoded_frames, flat, announce=progress)
    if opts.mode == "loop":
        video = video[:-1]  # the last frame repeats the first
    return video.float()


def _denoiser_attempt(model, opts, run, conds, saved: _Progress, generator, progress: bool, counts: dict):
    """A resumable DDIM run: each attempt starts after the last finished step, with its latents and
    random state, and the current settings' CFG batching."""
    spec, network = model.spec, unet_call(model)

    def counted(x, t, c):
        counts["unet_calls"] += 1
        return network(x, t, c)

    def finished(info):
        counts["steps"] += 1
        saved.done, saved.x, saved.rng = info["i"] + 1, info["x"], generator.get_state()
        run.budget.at("denoise", saved.done)
        if saved.callback is not None and saved.callback(info["i"], info["t"], info["x"]):
            raise _StopRequested

    def attempt():
        generator.set_state(saved.rng)
        run.budget.at("denoise", saved.done)
        denoiser = guided(counted, conds, opts, run.settings)
        return sample_ddim(denoiser, saved.x, ddim_timesteps(opts.steps, spec.timesteps, opts.timestep_spacing),
                           callback=finished, disable=not progress, alphas_cumprod=training_alphas_cumprod(spec),
                           parameterization=spec.parameterization, eta=opts.eta,
                           scale_arr=getattr(model, "scale_arr", None), generator=generator,
                           start_index=saved.done)

    return attempt


def _images(opts: GenerateOptions, device, dtype) -> list[torch.Tensor]:
    first = prepare_image(opts.image, opts.height, opts.width, library_name("image")).to(device, dtype)
    if opts.mode == "i2v":
        return [first]
    second = opts.image if opts.image2 is None else opts.image2  # arrays have no truth value
    return [first, prepare_image(second, opts.height, opts.width, library_name("image2")).to(device, dtype)]


def _frames_to_encode(images: list[torch.Tensor], opts: GenerateOptions, s: Settings) -> list[torch.Tensor]:
    """The used frame(s); with ``encode_all_frames`` every frame, as DynamiCrafter builds the clip
    (the image repeated; interpolation: the first image for the first half, the last for the rest)."""
    if not s.encode_all_frames:
        return images
    if len(images) == 1:
        return images * opts.frames
    half = opts.frames // 2
    return [images[0]] * half + [images[1]] * (opts.frames - half)
