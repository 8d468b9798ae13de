"""``engine convert``: write a (half-precision) safetensors copy of a checkpoint."""
from __future__ import annotations

from pathlib import Path

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint to fp16/bf16 safetensors")
    p.add_argument("--config", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))


def convert(config, ckpt, out, dtype: str = "fp16") -> Path:
    """Validate ``ckpt`` against ``config`` and write its parameters as ``dtype`` safetensors.

    The source is memory-mapped, so RAM holds only the converted copy. Schedule buffers
    (``alphas_cumprod`` and friends) stay fp32: the sampler needs their precision.
    """
    import os

    import torch
    from safetensors.torch import save_file

    from ..checkpoint import check_compatible, read_state_dict
    from ..config import load_spec
    from ..models import build_model

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"`--out` {str(out)!r} must end in .safetensors; rename the output path.")
    spec = load_spec(config)
    sd = read_state_dict(ckpt)
    model = build_model(spec, device="meta")
    check_compatible(model, sd, spec.name, str(ckpt))
    params = {name for name, _ in model.named_parameters()}
    target = getattr(torch, DTYPES[dtype])
    converted = {k: (v.to(target) if k in params else v).contiguous() for k, v in sd.items()}
    tmp = out.with_name(f".partial-{out.name}")
    save_file(converted, str(tmp), metadata={"config": spec.name, "dtype": dtype})
    os.replace(tmp, out)
    return out


def run(args) -> int:
    out = convert(args.config, args.ckpt, args.out, args.dtype)
    print(f"wrote {out}")
    return 0
