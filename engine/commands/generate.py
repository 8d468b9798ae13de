"""``engine generate``: one image (or two) -> a video. With no arguments: the built-in demo."""
from __future__ import annotations

import argparse
from pathlib import Path

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


def _options(args, is_demo: bool):
    from ..pipeline.image_io import EXAMPLE_IMAGE
    from ..pipeline.options import GenerateOptions

    return GenerateOptions(
        image=args.image or str(EXAMPLE_IMAGE), image2=args.image2, mode=args.mode,
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
    """The probed device, capped at ``--max-memory`` when given."""
    from dataclasses import replace

    from ..device import probe_cpu, probe_device

    index = int(args.device.split(":")[1]) if args.device.startswith("cuda:") else 0
    device = probe_device(index) if args.device.startswith("cuda") else probe_cpu()
    if args.device.startswith("cuda") and device.kind != "cuda":
        raise ValueError(f"`--device` {args.device!r} is not available here (no CUDA device found); "
                         "use --device cpu.")
    if max_memory is None:
        return device
    free = max_memory if device.free_bytes is None else min(device.free_bytes, max_memory)
    return replace(device, total_bytes=min(device.total_bytes, max_memory), free_bytes=free)


def plan_for(args, spec, opts, max_memory: int | None = None):
    """Plan the run for the device it will use (within ``--max-memory``: the cap is the budget)."""
    from ..device import host_memory
    from ..device.spec import parse_size
    from ..planner.search import make_plan

    reserve = parse_size(args.reserve, "--reserve") if args.reserve else (0 if max_memory else None)
    return make_plan(spec, opts.height, opts.width, opts.frames, _device_for(args, max_memory),
                     force=_force(args), reserve_bytes=reserve, steps=opts.steps, guidance=opts.cfg != 1.0,
                     mode=opts.mode, host_bytes=host_memory()["available_bytes"])


def _check_outputs(args) -> None:
    """Every output place is checked before planning and loading: a typo costs seconds."""
    from ..pipeline.video_io import check_output_path, check_writable_folder

    check_output_path(args.out, "--out")
    if args.png_dir:
        check_writable_folder(args.png_dir, "--png-dir")
    if args.save_latents:
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
    from ..device.spec import format_bytes, parse_size
    from ..errors import DoesNotFit
    from ..pipeline.loading import load_model

    _check_outputs(args)
    max_memory = parse_size(args.max_memory, "--max-memory") if args.max_memory else None
    spec = load_spec(args.config)
    opts, state = _inputs(args, spec)
    plan = plan_for(args, spec, opts, max_memory)  # before loading: a run that cannot fit fails in seconds
    if not plan.fits:
        raise DoesNotFit(f"`--force` {args.force or ''} is predicted to need {format_bytes(plan.peak_bytes)} "
                         f"of the {format_bytes(plan.budget_bytes)} budget; drop the forced settings "
                         "or lower `--reserve`.")
    print(f"plan: {plan.settings.describe()}; predicted peak {format_bytes(plan.peak_bytes)} "
          f"of {format_bytes(plan.budget_bytes)}")
    # weights stay on the CPU (memory-mapped) until the plan's precision and offload place them:
    # casting on the device first would hold the fp32 copy there
    model = load_model(spec.source, args.ckpt, device="cpu")
    previous = signal.signal(signal.SIGTERM, _terminate)  # SIGTERM saves the run like Ctrl-C
    try:
        return _generate_and_write(args, model, opts, plan, state, max_memory)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame):
    raise KeyboardInterrupt


def _generate_and_write(args, model, opts, plan, state, max_memory) -> int:
    import sys

    from ..pipeline.generate import generate
    from ..pipeline.resume import Interrupted
    from ..pipeline.video_io import to_uint8_frames, write_png_frames, write_video

    try:
        result = generate(model, opts, plan, device=args.device, progress=not args.quiet,
                          max_memory=max_memory, resume=state)
    except Interrupted as stop:
        saved = stop.state.save(Path(args.out).expanduser().with_suffix(".resume.pt"))
        print(f"engine generate: {stop}; continue with: engine generate --config {args.config} "
              f"{'--ckpt ' + args.ckpt + ' ' if args.ckpt else ''}--resume {saved} --out {args.out}",
              file=sys.stderr)
        return 130 if isinstance(stop.cause, KeyboardInterrupt) else 2
    if args.save_latents:
        print(f"saved latents to {result.state.save(Path(args.save_latents).expanduser())}")
    frames = to_uint8_frames(result.video)
    out = write_video(frames, Path(args.out).expanduser(), fps=opts.fps)
    if args.png_dir:
        write_png_frames(frames, args.png_dir)
    total = sum(result.timings.values())
    print(f"wrote {out} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, "
          f"{total:.1f} s{', random weights' if args.ckpt is None else ''})")
    return 0
