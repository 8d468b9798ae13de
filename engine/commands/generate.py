"""``engine generate``: one image (or two) -> an mp4. With no arguments: the built-in demo."""
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
    p.add_argument("--out", default=DEMO_OUT, help="output mp4 path")
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
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _options(args, GenerateOptions, is_demo: bool):
    forced = None if args.perframe_ae is None else ("per-frame" if args.perframe_ae else "batched")
    from ..pipeline.image_io import EXAMPLE_IMAGE
    return GenerateOptions(
        image=args.image or str(EXAMPLE_IMAGE), image2=args.image2, mode=args.mode,
        prompt=args.prompt if args.prompt is not None else (DEMO_PROMPT if is_demo else ""),
        height=args.height, width=args.width, frames=args.frames,
        steps=args.steps or (25 if is_demo else 50), cfg=args.cfg, cfg_img=args.cfg_img, fs=args.fs,
        eta=args.eta, seed=123 if args.seed is None else args.seed, fps=args.fps,
        ae_encode=forced, ae_decode=forced)


def run(args) -> int:
    from ..pipeline.generate import generate
    from ..pipeline.loading import load_model
    from ..pipeline.options import GenerateOptions
    from ..pipeline.video_io import to_uint8_frames, write_mp4, write_png_frames

    is_demo = args.ckpt is None and args.image is None
    opts = _options(args, GenerateOptions, is_demo)
    model = load_model(args.config, args.ckpt, device=args.device)
    result = generate(model, opts, device=args.device, progress=not args.quiet)
    frames = to_uint8_frames(result.video)
    out = write_mp4(frames, Path(args.out), fps=opts.fps)
    if args.png_dir:
        write_png_frames(frames, args.png_dir)
    total = sum(result.timings.values())
    print(f"wrote {out} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, "
          f"{total:.1f} s{', random weights' if args.ckpt is None else ''})")
    return 0
