"""``engine probe``: the device this machine offers, measured, and host RAM."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("probe", help="describe and briefly measure this machine's GPU (or CPU)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-measure", action="store_true", help="skip the micro-benchmarks")
    p.add_argument("--calibrate", metavar="CONFIG",
                   help="also time this config's VAE on the device (~20 s, cached) for the planner")
    p.add_argument("--reset-calibration", action="store_true",
                   help="drop the corrections earlier runs on this device recorded for the planner")


def calibrate_vae(config: str, spec_device) -> float:
    """Measure the config's VAE (random weights: only shapes matter) on the device; cached."""
    import torch

    from ..config import load_spec
    from ..estimate.timing import AETimeModel
    from ..models.autoencoder import AutoencoderKL

    device = "cuda" if spec_device.kind == "cuda" else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    vae = AutoencoderKL(load_spec(config).vae).to(device, dtype).eval()
    with torch.no_grad():
        model = AETimeModel.calibrate(vae, device=device, dtype=dtype)
    return float(model.meta.get("calibration_s", 0.0))


def run(args) -> int:
    from ..device import host_memory, probe_device
    from ..device.spec import format_bytes
    from ..planner.calibration import Correction

    if args.calibrate is not None:  # a bad config is answered before the device is measured
        from ..config import ConfigError, load_spec

        try:
            load_spec(args.calibrate)
        except ConfigError as err:  # the config came in by --calibrate here
            raise ConfigError(str(err).replace("`--config`", "`--calibrate`", 1)) from None
    spec = probe_device(measure=not args.no_measure)
    info = {"device": spec.as_dict(), "host": host_memory()}
    if args.calibrate is not None:
        info["vae_calibration_s"] = calibrate_vae(args.calibrate, spec)
    if args.reset_calibration:
        from ..planner.calibration import reset_all

        info["calibration_reset_files"] = reset_all(spec)
    info["calibration"] = _calibration(spec)
    if spec.kind == "cpu":
        info["note"] = "no NVIDIA driver or CUDA device found; plans are made for the CPU"
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if "note" in info:
        print(info["note"])
    print(f"device    {spec.name} ({spec.kind})")
    print(f"memory    {format_bytes(spec.total_bytes)} total"
          + (f", {format_bytes(spec.free_bytes)} free" if spec.free_bytes is not None else ""))
    if spec.compute_capability:
        print(f"compute   capability {spec.compute_capability}, bf16 {'yes' if spec.bf16 else 'no'}")
    for key, label in (("fp16_flops", "fp16 matmul"), ("fp32_flops", "fp32 matmul")):
        if getattr(spec, key):
            print(f"{label:<10}{getattr(spec, key) / 1e12:8.2f} TFLOP/s (measured)")
    if spec.context_bytes is not None:
        print(f"context   {format_bytes(spec.context_bytes)} per process (measured CUDA context)")
    if spec.link_bandwidth:
        print(f"link      {spec.link_bandwidth / 1e9:8.2f} GB/s host->device (measured)")
    if "vae_calibration_s" in info:
        print(f"VAE       {args.calibrate}'s VAE timed on this device ({info['vae_calibration_s']:.1f} s, "
              "cached for the planner)")
    print(f"host RAM  {format_bytes(info['host']['total_bytes'])} total, "
          f"{format_bytes(info['host']['available_bytes'])} available")
    if "calibration_reset_files" in info:
        print(f"calibration reset ({info['calibration_reset_files']} file(s) removed)")
    for model, stages in info["calibration"].items():
        factors = ", ".join(f"{k} time {Correction.from_dict(c).time_text()} memory x{c['memory']:.2f} "
                            f"({c['runs']} runs)" for k, c in stages.items())
        print(f"calibrated model {model}: {factors}")
    return 0


def _calibration(device) -> dict:
    """Stored run corrections for this device, by model spec digest."""
    from ..planner.calibration import CalibrationStore, calibration_dir, device_key

    folder = calibration_dir() / device_key(device)
    return {f.stem: {k: vars(c) for k, c in CalibrationStore(device, f.stem).stages.items()}
            for f in sorted(folder.glob("*.json"))}
