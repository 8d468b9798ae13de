"""``engine plan``: predict memory and time for every stage and choose the settings."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="plan a run: memory and time per stage, chosen settings")
    p.add_argument("--config", required=True, help="config YAML or built-in name: tiny, 256, 512, 1024")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--vram", help="plan for a card with this much memory, e.g. 8GiB (with --gpu: "
                   "that card with this much memory)")
    p.add_argument("--gpu", help="plan for a catalogued card (see `engine gpus`)")
    p.add_argument("--reserve", help="memory to keep free (default max(1 GiB, 10%%))")
    p.add_argument("--force", help="pin settings: key=value,... or `reference` (DynamiCrafter's own run)")
    p.add_argument("--interp", action="store_true", help="interpolation: two frames are VAE-encoded")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="FILE.png", help="also draw each stage's memory, with DynamiCrafter's "
                   "run beside it, into this picture (.png, .svg or .pdf; needs `pip install engine[plot]`)")


# how planning errors name this command's flags (make_plan's ``names``)
NAMES = {"device": "--vram", "reserve_bytes": "--reserve", "height": "--height", "width": "--width",
         "frames": "--frames", "steps": "--steps", "force": "--force"}


def resolve_device(vram: str | None, gpu: str | None):
    """``--gpu`` from the catalogue, ``--vram`` alone, or the probed device of this machine."""
    from ..device.spec import catalog_device, nearest_catalog_device, parse_size, vram_device

    if gpu is not None:
        card = catalog_device(gpu)
        return vram_device(vram, like=card) if vram is not None else card
    if vram is not None:
        return vram_device(vram, like=nearest_catalog_device(parse_size(vram)))
    from ..device import probe_device

    return probe_device()


def run(args) -> int:
    from ..config import load_spec
    from ..pipeline.options import GenerateOptions, cli_name, resolve_options
    from ..device.spec import parse_size
    from ..planner.search import make_plan

    plot = _check_plot(args.plot) if args.plot else None  # before planning: a typo costs nothing
    spec = load_spec(args.config)
    opts = resolve_options(GenerateOptions(height=args.height, width=args.width, frames=args.frames,
                                           steps=args.steps), spec, name=cli_name)
    device = resolve_device(args.vram, args.gpu)
    reserve = parse_size(args.reserve, "--reserve") if args.reserve is not None else None
    host = None
    if device.source == "probe":  # planning for this machine: its free RAM bounds offloading
        from ..device import host_memory

        host = host_memory()["available_bytes"]
    plan = make_plan(spec, opts.height, opts.width, opts.frames, device, force=args.force,
                     reserve_bytes=reserve, steps=opts.steps, mode="interp" if args.interp else "i2v",
                     host_bytes=host, names=NAMES)
    print(plan.to_json() if args.json else plan.explain())
    if plot is not None:
        _plot(plan, plot, lambda: make_plan(spec, opts.height, opts.width, opts.frames, device, force="reference",
                                            reserve_bytes=reserve, steps=opts.steps, mode=plan.workload.mode,
                                            host_bytes=host))
    return 0


def _check_plot(path: str):
    from ..pipeline.video_io import check_writable_folder
    from ..planner.plot import check_plot_path, require_matplotlib

    require_matplotlib("--plot")
    path = check_plot_path(path, "--plot")
    check_writable_folder(path.parent, "--plot")
    return path


def _plot(plan, path, reference_plan) -> None:
    """Draw ``plan`` beside DynamiCrafter's run (unless it is that run) into ``path``."""
    import sys

    from ..planner.plot import plot_plan

    reference = None
    if "reference" not in plan.forced:
        try:
            reference = reference_plan()
        except ValueError as err:  # e.g. xformers on a CPU: DynamiCrafter's run needs CUDA
            print(f"engine plan: DynamiCrafter's run is left out of the picture: {err}", file=sys.stderr)
    print(f"wrote {plot_plan(plan, path, reference=reference, argument='--plot')}", file=sys.stderr)
