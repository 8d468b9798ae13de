"""``engine gpus``: the catalogued cards that ``--gpu`` accepts."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("gpus", help="list the GPU catalogue (slugs for --gpu)")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from ..device.spec import format_bytes, load_catalog

    cat = load_catalog()
    if args.json:
        print(json.dumps({slug: d.as_dict() for slug, d in cat.items()}, indent=2))
        return 0
    print(f"{'slug':<18}{'memory':>11}  {'cc':>4}  {'bf16':>4}  {'fp16 TFLOP/s':>12}  name")
    for slug, d in cat.items():
        print(f"{slug:<18}{format_bytes(d.total_bytes):>11}  {d.compute_capability:>4}  "
              f"{'yes' if d.bf16 else 'no':>4}  {d.fp16_flops / 1e12:>12.1f}  {d.name}")
    return 0
