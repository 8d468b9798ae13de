"""``engine batch JOBS --out DIR``: every job of a JSONL file, resumable; under ``accelerate launch``
split between the processes (see ``docs/scale-out.md``)."""
from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("batch", help="run the jobs of a JSONL file (resumable; splits across "
                       "processes under accelerate launch)")
    p.add_argument("jobs", metavar="JOBS", help="JSONL file: one job (a JSON object like "
                   '{"image": "cat.png", "prompt": "a cat", "id": "cat"}) per line')
    p.add_argument("--out", required=True, help="folder for <id>.mp4, <id>.json and manifest.jsonl")
    p.add_argument("--config", default="tiny", help="config YAML or built-in name: tiny, 256, 512, 1024")
    p.add_argument("--ckpt", help="DynamiCrafter model.ckpt or .safetensors (default: random weights)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda (each process takes the GPU of its local rank) or cuda:N (one process)")
    p.add_argument("--force", help="pin plan settings for every job: key=value,... or `reference`")
    p.add_argument("--reserve", help="device memory to keep free (default max(1 GiB, 10%%))")
    p.add_argument("--skip-invalid", action="store_true",
                   help="run the valid jobs and record the invalid lines as failed (default: stop)")
    p.add_argument("--quiet", action="store_true", help="no per-job progress lines")


def run(args) -> int:
    import sys

    from ..batch.jobs import InvalidJobs
    from ..batch.runner import BatchConfig, run_batch
    from ..pipeline.calibration_calls import vae_timing_budget_s

    vae_timing_budget_s()  # refused before any job, not by each

    cfg = BatchConfig(jobs=Path(args.jobs), out=Path(args.out), config=args.config, ckpt=args.ckpt,
                      device=args.device, force=args.force, reserve=args.reserve, quiet=args.quiet,
                      skip_invalid=args.skip_invalid)
    try:
        summary = run_batch(cfg)
    except InvalidJobs as err:
        if _is_main():
            for message in err.messages:
                print(f"engine batch: error: {message}", file=sys.stderr)
            print("engine batch: nothing was run; fix the lines above or pass --skip-invalid.",
                  file=sys.stderr)
        return 2
    if _is_main():
        print(f"batch: {summary.total} jobs: {summary.done} done, {summary.skipped} skipped, "
              f"{summary.failed} failed in {summary.time_s:.1f} s on {summary.processes} process(es); "
              f"manifest {summary.manifest}")
    return summary.exit_code


def _is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process
