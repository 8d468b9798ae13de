"""Dump the state-dict layout (keys and shapes) of DynamiCrafter's own models, as reference data.

Run against a user-supplied DynamiCrafter checkout (never vendored into this repository)::

    python benchmarks/parity/dump_dynamicrafter_keys.py /path/to/DynamiCrafter
    DYNAMICRAFTER_SRC=/path/to/DynamiCrafter python benchmarks/parity/dump_dynamicrafter_keys.py

For each inference config it instantiates DynamiCrafter's ``LatentVisualDiffusion`` on the meta
device (nothing is allocated, no OpenCLIP weights are downloaded) and writes
``tests/data/dynamicrafter_keys_{256,512,1024}.json``::

    {"config": ..., "source_commit": ..., "state_dict": {key: [shape, ...]}}

The state dict holds parameters and persistent buffers only, exactly what a released
``model.ckpt`` must contain for ``strict=True`` loading. DynamiCrafter's model code imports
cv2, pytorch_lightning and kornia (``pip install opencv-python-headless pytorch_lightning
kornia``); they are not dependencies of this package.

The shims below (:func:`dynamicrafter_env`) are reused by ``benchmarks/parity_dynamicrafter.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_COMMIT = "c453369"  # the DynamiCrafter HEAD our facts and configs were checked against
CONFIGS = {"256": "configs/inference_256_v1.0.yaml", "512": "configs/inference_512_v1.0.yaml",
           "1024": "configs/inference_1024_v1.0.yaml"}


def resolve_source(path: str | None) -> Path:
    """The DynamiCrafter checkout from the argument or ``DYNAMICRAFTER_SRC``."""
    path = path or os.environ.get("DYNAMICRAFTER_SRC")
    if not path:
        raise SystemExit("pass the DynamiCrafter checkout as an argument or set `DYNAMICRAFTER_SRC`.")
    src = Path(path).expanduser().resolve()
    if not (src / "lvdm" / "models" / "ddpm3d.py").is_file():
        raise SystemExit(f"{str(src)!r} is not a DynamiCrafter checkout (no lvdm/models/ddpm3d.py).")
    return src


def source_commit(src: Path, default: str = DEFAULT_COMMIT) -> str:
    """Short commit of the checkout when it is a git work tree, else ``default`` (an exported tree)."""
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "--short=7", "HEAD"],
                             capture_output=True, text=True, check=True, timeout=10)
        return out.stdout.strip() or default
    except (OSError, subprocess.SubprocessError):
        return default


def _transformers_stub() -> types.ModuleType:
    """condition.py imports four HF classes at module level that the OpenCLIP path never uses."""
    stub = types.ModuleType("transformers")
    for name in ("T5Tokenizer", "T5EncoderModel", "CLIPTokenizer", "CLIPTextModel"):
        setattr(stub, name, type(name, (), {}))
    return stub


def _offline_create_model_and_transforms(original):
    """open_clip's factory with the download disabled, building on the current default device.

    DynamiCrafter passes ``device=cpu`` and ``pretrained=<LAION tag>``; the checkpoint overwrites the
    weights anyway, so we build without weights, on the ambient device (``meta`` while dumping).
    A dict ``arch`` (our tiny configs) builds an open_clip ``CLIP`` from that config directly.
    """
    def create(arch, *args, **kwargs):
        kwargs["pretrained"] = None
        kwargs["device"] = torch.get_default_device()
        if isinstance(arch, str):
            return original(arch, *args, **kwargs)
        from omegaconf import OmegaConf
        from open_clip.model import CLIP
        cfg = OmegaConf.to_container(arch) if not isinstance(arch, dict) else dict(arch)
        return CLIP(**cfg), None, None
    return create


@contextlib.contextmanager
def dynamicrafter_env(src: Path):
    """Import DynamiCrafter from ``src`` with offline OpenCLIP and, if absent, a transformers stub.

    Everything patched here is restored on exit; DynamiCrafter's modules stay imported.
    """
    import open_clip
    added_path = str(src) not in sys.path
    if added_path:
        sys.path.insert(0, str(src))
    stubbed = False
    try:
        import transformers  # noqa: F401  (real package present: use it)
    except ImportError:
        sys.modules["transformers"], stubbed = _transformers_stub(), True
    original = open_clip.create_model_and_transforms
    open_clip.create_model_and_transforms = _offline_create_model_and_transforms(original)
    try:
        yield
    finally:
        open_clip.create_model_and_transforms = original
        if stubbed:
            sys.modules.pop("transformers", None)
        if added_path:
            sys.path.remove(str(src))


@contextlib.contextmanager
def schedule_on_cpu():
    """Run DDPM.register_schedule on CPU: it asserts on a tensor value, impossible on meta."""
    from lvdm.models.ddpm3d import DDPM
    original = DDPM.register_schedule

    def register_schedule(self, *args, **kwargs):
        with torch.device("cpu"):
            return original(self, *args, **kwargs)

    DDPM.register_schedule = register_schedule
    try:
        yield
    finally:
        DDPM.register_schedule = original


def instantiate_dynamicrafter(config_path: Path, device: str = "meta"):
    """DynamiCrafter's LatentVisualDiffusion from ``config_path`` (call inside :func:`dynamicrafter_env`)."""
    from omegaconf import OmegaConf
    from utils.utils import instantiate_from_config
    config = OmegaConf.load(config_path)
    config.model.params.unet_config.params.use_checkpoint = False  # as inference.py does
    with schedule_on_cpu(), torch.device(device):
        return instantiate_from_config(config.model)


def state_dict_layout(model: torch.nn.Module) -> dict[str, list[int]]:
    """``{key: shape}`` over parameters and persistent buffers."""
    return {key: list(value.shape) for key, value in model.state_dict().items()}


def main(argv: list[str] | None = None) -> None:
    """Write one layout JSON per inference config."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", nargs="?", help="DynamiCrafter checkout (default: $DYNAMICRAFTER_SRC)")
    parser.add_argument("--out", default=str(REPO_ROOT / "tests" / "data"), help="output folder")
    parser.add_argument("--commit", default=None, help="commit to record (default: git HEAD of src, "
                        f"or {DEFAULT_COMMIT} for an exported tree)")
    args = parser.parse_args(argv)
    src = resolve_source(args.src)
    commit = args.commit or source_commit(src)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with dynamicrafter_env(src):
        for name, rel in CONFIGS.items():
            layout = state_dict_layout(instantiate_dynamicrafter(src / rel))
            path = out / f"dynamicrafter_keys_{name}.json"
            payload = {"config": rel, "source_commit": commit, "state_dict": layout}
            path.write_text(json.dumps(payload, indent=1) + "\n")
            n_params = sum(torch.Size(s).numel() for s in layout.values())
            print(f"{rel}: {len(layout)} keys, {n_params:,} elements -> {path}")


if __name__ == "__main__":
    main()
