"""``engine serve``: a web page on this machine that plans, shows the plan's picture, runs with a
progress bar and compares measured memory with the prediction (gradio: ``pip install engine[serve]``)."""
from __future__ import annotations

import ipaddress
import shutil

LOOPBACK_NAMES = ("localhost",)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="a web page on this machine: plan, picture, progress, video, memory")
    p.add_argument("--config", default="tiny", help="config YAML or built-in name: tiny, 256, 512, 1024")
    p.add_argument("--ckpt", help="DynamiCrafter model.ckpt or .safetensors (default: random weights)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--host", default="127.0.0.1", help="loopback address to listen on (127.0.0.1, ::1, localhost)")
    p.add_argument("--port", type=int, default=7860)


def check_loopback(host: str) -> str:
    """``host`` if it is a loopback address: the page runs generations on this machine for anyone
    who reaches it, with no login."""
    try:
        loopback = host in LOOPBACK_NAMES or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"`--host` {host!r} is not a loopback address; engine serve listens only on this "
                         "machine (127.0.0.1, ::1 or localhost): reach it from elsewhere through an SSH tunnel, "
                         "e.g. ssh -L 7860:127.0.0.1:7860 HOST.")
    return host


def run(args) -> int:
    host = check_loopback(args.host)
    if not 0 < args.port < 65536:
        raise ValueError(f"`--port` {args.port} must be between 1 and 65535; 7860 is gradio's default.")
    from ..web.app import Session, build_app, require_gradio

    require_gradio("engine serve")  # before loading the model: a missing extra costs nothing
    session = Session.load(args.config, args.ckpt, args.device)
    app = build_app(session)
    print(f"engine serve: {session.spec.name} on {session.device_spec().name} at http://{host}:{args.port}",
          flush=True)
    try:
        app.queue().launch(server_name=host, server_port=args.port, share=False, inbrowser=False,
                           show_error=True, ssr_mode=False, allowed_paths=[str(session.out_dir)], quiet=True)
    finally:
        shutil.rmtree(session.out_dir, ignore_errors=True)  # the page's videos and pictures
    return 0
