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

    out = check_convert_paths(ckpt, out, dtype)
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


def check_convert_paths(ckpt, out, dtype: str) -> Path:
    """``--out``, ``--ckpt`` and ``--dtype`` checked before the checkpoint is read: the output is a
    ``.safetensors`` file name (not a folder, not the input) in a folder that can be written."""
    from ..checkpoint import check_checkpoint_path
    from ..errors import InvalidArgument
    from ..pipeline.video_io import check_writable_folder

    if dtype not in DTYPES:
        raise InvalidArgument(f"`--dtype` {dtype!r} is not one engine convert writes; use one of "
                              f"{', '.join(sorted(DTYPES))}.")
    source = check_checkpoint_path(ckpt)
    out = Path(out).expanduser()
    if out.is_dir():
        raise InvalidArgument(f"`--out` {str(out)!r} is a directory; pass a file name in it such as "
                              f"{str(out / 'model-fp16.safetensors')!r}.")
    if out.suffix != ".safetensors":
        raise InvalidArgument(f"`--out` {str(out)!r} must end in .safetensors; rename the output path.")
    if out.exists() and out.resolve() == source.resolve():
        raise InvalidArgument(f"`--out` {str(out)!r} is the `--ckpt` file itself, which is read while "
                              "the copy is written; pass another file name.")
    check_writable_folder(out.parent, "--out")
    return out


def run(args) -> int:
    out = convert(args.config, args.ckpt, args.out, args.dtype)
    print(f"wrote {out}")
    return 0
