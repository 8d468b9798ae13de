"""The estimator on modules we did not write: predicted vs measured CPU allocator peaks.

    python benchmarks/foreign_modules.py --quick     # ~5 min on 2 busy CPU cores
    python benchmarks/foreign_modules.py             # adds larger full-width rows

Modules (random weights, fp32, built from their libraries' own classes):

* diffusers ``AutoencoderKL`` in the SD layout (4 down/up blocks, ``layers_per_block=2``, latent
  4): ``sd-vae`` at full width ``block_out_channels=(128, 256, 512, 512)`` and ``sd-vae-s`` at a
  quarter of it (32, 64, 128, 128) so that every frame count and size runs in minutes here;
  decoded through :func:`engine.runtime.autoencode.decode_frames` (``batched`` / ``per-frame``);
* diffusers ``AutoencoderKLTemporalDecoder`` (SVD's VAE, full width), 8 frames: its decoder mixes
  frames with 3-D convolutions (``num_frames`` frames per call);
* a small diffusers ``UNetSpatioTemporalConditionModel`` (SVD's UNet layout, widths 32/64);
* torchvision ``resnet50`` at batch 8, 224x224.

Predictions: :func:`engine.estimate.tracing.trace_call` of the very call that is measured (for
the VAEs, ``decode_frames`` in the row's mode) on a meta-device twin in this process (nothing real
is allocated). ``--laws`` also fits :class:`engine.estimate.vae.VAEMemoryModel` per VAE and
reports its laws' prediction beside the trace (see docs/estimation.md for where they differ).
Every row is then MEASURED in a fresh process (``--child``): the module is built, warmed up on a
small input, and :func:`engine.estimate.tracing.measure_cpu_peak_bytes` (the allocator's own
memory records) gives the peak of new bytes during the call, the quantity the estimator
predicts. The run ends with one line ``median_error=X max_error=Y`` (|predicted - measured| /
measured over measured rows); results go to ``benchmarks/results/foreign_modules_cpu.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from ae_memory import run_child  # noqa: E402  (same folder: fresh-process measurement)
from report_rows import mib, print_memory_row  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
SD_FULL, SD_SMALL = (128, 256, 512, 512), (32, 64, 128, 128)

# (module, frames or batch, height, width, mode); VAE sizes are in pixels
QUICK = [
    *[("sd-vae-s", n, h, w, mode) for (h, w) in ((256, 256), (320, 512)) for n in (1, 4, 8)
      for mode in ("batched", "per-frame")],
    ("sd-vae", 1, 256, 256, "batched"), ("sd-vae", 4, 256, 256, "batched"),
    ("sd-vae", 4, 256, 256, "per-frame"), ("sd-vae", 1, 320, 512, "batched"),
    ("svd-vae", 8, 128, 128, "batched"), ("svd-vae", 8, 128, 128, "chunk:4"),
    ("svd-unet-s", 8, 256, 256, "batched"),
    ("resnet50", 8, 224, 224, "batched"),
]
FULL_EXTRA = [
    ("sd-vae", 8, 256, 256, "batched"), ("sd-vae", 8, 256, 256, "per-frame"),
    ("sd-vae", 4, 320, 512, "batched"), ("sd-vae", 4, 320, 512, "per-frame"),
    ("svd-vae", 8, 256, 256, "batched"),
]
VAES = ("sd-vae", "sd-vae-s", "svd-vae")


def build(name: str):
    """The module of row ``name`` (on the current default device; seed it first)."""
    if name in ("sd-vae", "sd-vae-s"):
        from diffusers import AutoencoderKL
        return AutoencoderKL(block_out_channels=SD_FULL if name == "sd-vae" else SD_SMALL,
                             down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                             latent_channels=4, norm_num_groups=32).eval()
    if name == "svd-vae":
        from diffusers import AutoencoderKLTemporalDecoder
        return AutoencoderKLTemporalDecoder(block_out_channels=SD_FULL,
                                            down_block_types=("DownEncoderBlock2D",) * 4,
                                            layers_per_block=2, latent_channels=4).eval()
    if name == "svd-unet-s":
        from diffusers import UNetSpatioTemporalConditionModel
        return UNetSpatioTemporalConditionModel(
            in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
            cross_attention_dim=32, transformer_layers_per_block=1, num_attention_heads=(2, 4),
            num_frames=8).eval()
    if name == "resnet50":
        import torchvision
        return torchvision.models.resnet50().eval()
    raise ValueError(f"unknown module {name!r}; use one of sd-vae, sd-vae-s, svd-vae, "
                     "svd-unet-s, resnet50.")


def call_of(name: str, module, n: int, h: int, w: int, mode: str, device: str):
    """``(fn, args, warm_args)``: the measured call ``fn(*args)`` and a small warm-up input."""
    from engine.runtime.autoencode import decode_frames
    if name in VAES:
        return ((lambda z: decode_frames(module, z, mode)),
                (torch.randn(n, 4, h // 8, w // 8, device=device),),
                (torch.randn(2, 4, 8, 8, device=device),))
    if name == "svd-unet-s":
        def unet(sample, t, ctx, ids):
            return module(sample, t, ctx, ids).sample

        def inputs(frames, lat):
            return (torch.randn(1, frames, 8, lat, lat, device=device),
                    torch.tensor([10.0], device=device), torch.randn(1, 1, 32, device=device),
                    torch.randn(1, 3, device=device))
        return unet, inputs(n, h // 8), inputs(2, 8)
    return module, (torch.randn(n, 3, h, w, device=device),), (torch.randn(1, 3, 64, 64,
                                                                            device=device),)


# ---------------------------------------------------------------- child: one real call
def child(spec: dict) -> dict:
    from engine.estimate.tracing import measure_cpu_peak_bytes

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    module = build(spec["module"])
    fn, args, warm = call_of(spec["module"], module, spec["n"], spec["height"], spec["width"],
                             spec["mode"], "cpu")
    with torch.no_grad():
        # one-time lazies (oneDNN primitives, the profiler's start-up) are not the call's cost
        fn(*warm)
        measure_cpu_peak_bytes(lambda: fn(*warm))
        start = time.perf_counter()
        measured = measure_cpu_peak_bytes(lambda: fn(*args))
    return {"measured_bytes": measured, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------- parent: predictions
class Predictor:
    """Predictions from meta-device twins; VAE memory models are fitted once per module."""

    def __init__(self, laws: bool) -> None:
        self.modules: dict = {}
        self.vae_models: dict = {}
        self.laws = laws

    def module(self, name: str):
        if name not in self.modules:
            with torch.device("meta"):
                self.modules[name] = build(name)
        return self.modules[name]

    def predict(self, name: str, n: int, h: int, w: int, mode: str) -> dict:
        from engine.estimate.tracing import trace_call
        module = self.module(name)
        fn, args, _ = call_of(name, module, n, h, w, mode, "meta")
        with torch.no_grad():
            res = trace_call(fn, *args)
        out = {"predicted_bytes": res.peak_new_bytes, "predictor": "trace_call"}
        if self.laws and name in VAES:
            from engine.estimate.vae import VAEMemoryModel
            if name not in self.vae_models:
                start = time.perf_counter()
                self.vae_models[name] = VAEMemoryModel.for_vae(module, device_type="cpu")
                print(f"# {name}: memory model ready in {time.perf_counter() - start:.1f} s",
                      flush=True)
            pred = self.vae_models[name].predict("decode", n, h, w, mode)
            out.update(laws_bytes=pred.peak_new_bytes, laws_peak_phase=pred.peak_phase)
        return out


def machine_info() -> dict:
    import datetime
    import os
    import platform

    import diffusers
    import torchvision

    from engine.device.host import cpu_name
    return {"platform": platform.platform(), "cpu_model": cpu_name(), "cpu_count": os.cpu_count(),
            "isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def print_row(r: dict) -> None:
    laws = (f"  (laws {mib(r['laws_bytes'])} MiB, err {r['laws_rel_error']:+.4f})"
            if r["status"] == "measured" and "laws_bytes" in r else "")
    print_memory_row(f"{r['module']:>10} {r['size']:>11} {r['mode']:10}", r, laws)


def summarize(rows: list[dict]) -> dict:
    done = [r for r in rows if r["status"] == "measured"]
    errors = [abs(r["rel_error"]) for r in done] or [float("nan")]
    return {"measured": len(done), "errors": len(rows) - len(done),
            "median_error": statistics.median(errors), "max_error": max(errors),
            "by_module": {m: max(abs(r["rel_error"]) for r in done if r["module"] == m)
                          for m in dict.fromkeys(r["module"] for r in done)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the ~5 min subset")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, here and per child (oneDNN's choices depend on it)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per child")
    parser.add_argument("--laws", action="store_true",
                        help="also fit VAEMemoryModel per VAE and report its laws' predictions")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    torch.set_num_threads(args.threads)  # the tracer mirrors the children's kernel choices
    predictor, rows = Predictor(args.laws), []
    for name, n, h, w, mode in QUICK + ([] if args.quick else FULL_EXTRA):
        row = {"module": name, "size": f"{h}x{w}x{n}", "mode": mode,
               **predictor.predict(name, n, h, w, mode)}
        spec = {"module": name, "n": n, "height": h, "width": w, "mode": mode,
                "threads": args.threads}
        row.update(run_child(spec, args.timeout, script=__file__))
        if row["status"] == "measured":
            real = row["measured_bytes"]
            row["rel_error"] = (row["predicted_bytes"] - real) / real
            if "laws_bytes" in row:
                row["laws_rel_error"] = (row["laws_bytes"] - real) / real
        rows.append(row)
        print_row(row)
    summary = summarize(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = {**machine_info(), "torch_threads": args.threads, "quick": args.quick}
    with open(RESULTS / "foreign_modules_cpu.json", "w", encoding="utf-8") as fh:
        json.dump({"machine": info, "summary": summary, "rows": rows}, fh, indent=1)
    print(f"# {summary['measured']} measured, {summary['errors']} errors; worst per module: "
          + ", ".join(f"{m} {e:.4f}" for m, e in summary["by_module"].items()), flush=True)
    print(f"median_error={summary['median_error']:.4f} max_error={summary['max_error']:.4f}")


if __name__ == "__main__":
    main()
