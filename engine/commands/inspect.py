"""``engine inspect``: parameter counts per component, from a meta-device build (no weights)."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="parameter counts per component (allocates no weights)")
    p.add_argument("--config", required=True, help="config YAML or built-in name: tiny, 256, 512, 1024")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def inspect_config(config) -> dict:
    from ..config import load_spec
    from ..models import build_model, count_parameters

    spec = load_spec(config)
    model = build_model(spec, device="meta")
    params = count_parameters(model)
    return {"config": spec.name, "source": spec.source, "params": params,
            "total_params": sum(params.values()),
            "default_size": list(spec.default_height_width), "frames": spec.frames,
            "parameterization": spec.parameterization, "perframe_ae": spec.perframe_ae}


def run(args) -> int:
    info = inspect_config(args.config)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"config {info['config']} ({info['source']})")
    for name, n in info["params"].items():
        print(f"  {name:<14} {n:>15,d}  ({n * 4 / 2**30:6.2f} GiB fp32, {n * 2 / 2**30:6.2f} GiB fp16)")
    print(f"  {'total':<14} {info['total_params']:>15,d}")
    return 0
