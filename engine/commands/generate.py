"""``engine generate``: one image (or two) -> a video. With no arguments: the built-in demo."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InvalidArgument

DEMO_PROMPT = "clouds drifting over a mountain lake"
DEMO_OUT = "outputs/demo.mp4"


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="animate an image (no arguments: tiny demo on CPU)")
    p.add_argument("--config", default="tiny", help="config YAML or built-in name: tiny, 256, 512, 1024")
    p.add_argument("--ckpt", help="DynamiCrafter model.ckpt or .safetensors (default: random weights)")
    p.add_argument("--image", help="conditioning image (default: the bundled example)")
    p.add_argument("--image2", help="last frame for --mode interp (and loop)")
    p.add_argument("--mode", default="i2v", choices=["i2v", "interp", "loop"])
    p.add_argument("--prompt", help="text prompt")
    p.add_argument("--out", default=DEMO_OUT, help="output video: .mp4, .webm or .gif")
    p.add_argument("--png-dir", help="also write the frames as PNG files into this folder")
    for name in ("height", "width", "frames", "fs", "seed"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (1 disables)")
    p.add_argument("--cfg-img", type=float, help="image guidance scale: multi-condition CFG")
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--perframe-ae", dest="perframe_ae", action=argparse.BooleanOptionalAction, default=None,
                   help="force one frame per VAE call (or, with --no-perframe-ae, all frames at once)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--force", help="pin plan settings: key=value,... or `reference` (see `engine plan`)")
    p.add_argument("--reserve", help="device memory to keep free (default max(1 GiB, 10%%))")
    p.add_argument("--max-memory", help="cap on the device memory the run may use, e.g. 6GiB (enforced; "
                   "on the CPU: host RAM)")
    p.add_argument("--save-latents", help="also save the denoised latents and sampler state to this file")
    p.add_argument("--resume", help="finish a run saved by an interrupted run or --save-latents")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="record nothing for later plans (and skip timing the VAE on a device's first run)")


def _options(args, is_demo: bool):
    from ..pipeline.image_io import EXAMPLE_IMAGE
    from ..pipeline.options import GenerateOptions

    return GenerateOptions(
        image=str(EXAMPLE_IMAGE) if args.image is None else args.image, image2=args.image2, mode=args.mode,
        prompt=args.prompt if args.prompt is not None else (DEMO_PROMPT if is_demo else ""),
        height=args.height, width=args.width, frames=args.frames,
        steps=args.steps if args.steps is not None else (25 if is_demo else 50), cfg=args.cfg,
        cfg_img=args.cfg_img, fs=args.fs, eta=args.eta, seed=123 if args.seed is None else args.seed,
        fps=args.fps)


def _force(args) -> str | None:
    """``--force`` with ``--perframe-ae/--no-perframe-ae`` added as forced autoencoding modes."""
    force = [args.force] if args.force else []
    if args.perframe_ae is not None:
        mode = "per-frame" if args.perframe_ae else "batched"
        force.append(f"ae_encode={mode},ae_decode={mode}")
    return ",".join(force) or None


def _device_for(args, max_memory: int | None):
    """The probed device (``--device``, already checked by :func:`run_device`), capped at
    ``--max-memory`` when given."""
    from ..device import probe_cpu, probe_device
    from ..device.probe import capped

    if args.device == "cpu":
        device = probe_cpu()
    else:
        device = probe_device(int(args.device.partition(":")[2]))
        if device.kind != "cuda":  # torch sees the GPU but the driver's management library does not
            raise InvalidArgument(f"`--device` {args.device!r} could not be probed (no NVIDIA driver "
                                  "answered); check nvidia-smi, or use --device cpu.")
    return capped(device, max_memory)


def plan_for(args, spec, opts, max_memory: int | None = None):
    """Plan the run for the device it will use (within ``--max-memory``: the cap is the budget)."""
    from ..device import host_memory
    from ..device.spec import parse_size
    from ..planner.search import make_plan

    reserve = (parse_size(args.reserve, "--reserve") if args.reserve is not None
               else 0 if max_memory is not None else None)
    return make_plan(spec, opts.height, opts.width, opts.frames, _device_for(args, max_memory),
                     force=_force(args), reserve_bytes=reserve, steps=opts.steps, guidance=opts.cfg != 1.0,
                     mode=opts.mode, host_bytes=host_memory()["available_bytes"],
                     names=plan_names(args.device, max_memory is not None))


def plan_names(device: str, capped: bool) -> dict:
    """How ``engine generate``'s planning errors name its flags (it has no ``--vram`` or ``--gpu``)."""
    memory = "--max-memory" if capped else ("--device" if device != "cpu" else None)
    return {"device": memory, "reserve_bytes": "--reserve", "height": "--height", "width": "--width",
            "frames": "--frames", "steps": "--steps", "force": "--force"}


def _check_run_inputs(args) -> int | None:
    """Everything a run needs that is cheap to check, before the config, planning or the model:
    outputs, ``--device``, ``--max-memory``, ``--reserve``, ``--ckpt`` and ``--resume`` paths, and
    ``$ENGINE_VAE_TIMING_S``."""
    from ..device.spec import parse_size
    from ..pipeline.calibration_calls import vae_timing_budget_s
    from ..pipeline.options import run_device

    _check_outputs(args)
    if args.calibrate:
        vae_timing_budget_s()
    args.device = run_device(args.device, "--device")
    max_memory = parse_size(args.max_memory, "--max-memory") if args.max_memory is not None else None
    if max_memory is not None and max_memory <= 0:
        raise InvalidArgument(f"`--max-memory` {args.max_memory!r} must be positive; write it like 6GiB "
                              "(leave it out for no cap).")
    if args.reserve is not None and parse_size(args.reserve, "--reserve") < 0:
        raise InvalidArgument(f"`--reserve` {args.reserve!r} must be >= 0; pass 0 to keep nothing free.")
    if args.ckpt is not None:
        from ..checkpoint import check_checkpoint_path

        check_checkpoint_path(args.ckpt)
    if args.resume is not None:
        _check_file(args.resume, "--resume", "the .resume.pt file an interrupted run named")
    return max_memory


def _check_file(path: str, flag: str, what: str) -> None:
    p = Path(path).expanduser()
    if p.is_dir():
        raise InvalidArgument(f"`{flag}` {path!r} is a directory; pass {what}.")
    if not p.is_file():
        raise InvalidArgument(f"`{flag}` {path!r} does not exist; pass {what}.")


def _check_outputs(args) -> None:
    """Every output place is checked before planning and loading: a typo costs seconds."""
    from ..pipeline.video_io import check_output_path, check_writable_folder

    for flag, value in (("--out", args.out), ("--png-dir", args.png_dir), ("--save-latents", args.save_latents),
                        ("--ckpt", args.ckpt), ("--resume", args.resume), ("--config", args.config)):
        if value is not None and not value.strip():
            raise InvalidArgument(f"`{flag}` is an empty path; pass a path or leave the flag out.")
    check_output_path(args.out, "--out")
    if args.png_dir is not None:
        check_writable_folder(args.png_dir, "--png-dir")
    if args.save_latents is not None:
        check_writable_folder(Path(args.save_latents).expanduser().parent, "--save-latents")


def _inputs(args, spec):
    """(options, saved run or None), validated, images read once to catch a bad file early."""
    from ..pipeline.image_io import prepare_image
    from ..pipeline.options import GenerateOptions, cli_name, resolve_options
    from ..pipeline.resume import RunState

    state = RunState.load(args.resume, "--resume") if args.resume else None
    is_demo = args.ckpt is None and args.image is None
    raw = GenerateOptions(**state.options) if state else _options(args, is_demo)
    opts = resolve_options(raw, spec, name=cli_name)
    for image, flag in ((opts.image, "--image"), (opts.image2, "--image2")):
        if image is not None:
            prepare_image(image, opts.height, opts.width, flag)
    return opts, state


def run(args) -> int:
    import signal

    from ..config import load_spec
    from ..device.spec import format_bytes
    from ..pipeline.pipe import Pipeline

    max_memory = _check_run_inputs(args)  # seconds, before the config, the plan and the weights
    spec = load_spec(args.config)
    opts, state = _inputs(args, spec)
    plan = plan_for(args, spec, opts, max_memory)  # before loading: a run that cannot fit fails in seconds
    if not plan.fits:
        raise _forced_too_big(args, plan, max_memory)
    memory = "host RAM" if plan.device.kind == "cpu" else "device memory"
    print(f"plan: {plan.settings.describe()}; predicted peak {format_bytes(plan.peak_bytes)} "
          f"of {format_bytes(plan.budget_bytes)} {memory}")
    # the library's pipeline, loaded now that the plan fits: weights stay on the CPU (memory-mapped)
    # until the plan's precision and offload place them
    pipe = Pipeline.from_config(spec, args.ckpt, device=args.device, lazy=True)._loaded()
    previous = signal.signal(signal.SIGTERM, _terminate)  # SIGTERM saves the run like Ctrl-C
    try:
        return _generate_and_write(args, pipe, opts, plan, state, max_memory)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _forced_too_big(args, plan, max_memory):
    """A forced plan predicted not to fit: the way out names only flags this run can change."""
    from ..device.spec import format_bytes
    from ..errors import DoesNotFit

    memory = "host RAM" if plan.device.kind == "cpu" else "device memory"
    ways = ["drop or change `--force`" if args.force else "drop `--perframe-ae`/`--no-perframe-ae`"]
    if plan.reserve_bytes:
        ways.append("lower `--reserve`")
    if max_memory is not None:
        ways.append("raise `--max-memory`")
    forced = ",".join(plan.forced)
    return DoesNotFit(f"the forced settings {forced} are predicted to need {format_bytes(plan.peak_bytes)} of "
                      f"the {format_bytes(plan.budget_bytes)} budget ({memory}); {', '.join(ways[:-1])}"
                      f"{' or ' if len(ways) > 1 else ''}{ways[-1]}.")


def _terminate(signum, frame):
    raise KeyboardInterrupt


def _generate_and_write(args, pipe, opts, plan, state, max_memory) -> int:
    import sys

    from ..pipeline.resume import Interrupted
    from ..pipeline.video_io import write_png_frames
    from ..runtime.recovery import OutOfMemory

    try:
        out = pipe(opts.image, opts.prompt, image2=opts.image2, mode=opts.mode, height=opts.height,
                   width=opts.width, frames=opts.frames, steps=opts.steps, seed=opts.seed, cfg=opts.cfg,
                   cfg_img=opts.cfg_img, fs=opts.fs, eta=opts.eta, fps=opts.fps, plan=plan,
                   max_memory=max_memory, resume=state, progress=not args.quiet, calibrate=args.calibrate)
    except (Interrupted, OutOfMemory) as stop:
        why = str(stop).replace("`max_memory`", "`--max-memory`").rstrip(".")  # the CLI's flag
        if getattr(stop, "state", None) is None or stop.state.latents.numel() == 0:
            print(f"engine generate: error: {why}.", file=sys.stderr)  # refused before any work to save
            return 2
        saved = stop.state.save(Path(args.out).expanduser().with_suffix(".resume.pt"))
        print(f"engine generate: {why}; the run is saved, continue with: engine generate --config {args.config} "
              f"{'--ckpt ' + args.ckpt + ' ' if args.ckpt else ''}--resume {saved} --out {args.out}",
              file=sys.stderr)
        return 130 if isinstance(stop.cause, KeyboardInterrupt) else 2
    if args.save_latents is not None:
        print(f"saved latents to {out.state.save(Path(args.save_latents).expanduser())}")
    written = out.save(args.out)  # the video, and what made it in its comment and a .json beside it
    frames, total = out.frames, sum(out.timings.values())
    if args.png_dir is not None:
        write_png_frames(frames, args.png_dir)
    print(f"wrote {written} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, "
          f"{total:.1f} s{', random weights' if args.ckpt is None else ''})")
    return 0
