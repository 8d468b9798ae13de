"""Running a batch: split the jobs between ranks, plan per device, one model per rank, a manifest.

Under ``accelerate launch`` each process is one rank of accelerate's :class:`PartialState`; run
plainly, the batch is one process. Every rank validates the whole file (cheap, identical), reads
the manifest, and waits for the others before any rank writes, so all ranks agree on the jobs left
to do; ``split_between_processes`` (no padding) then gives each job to exactly one rank, whatever
the number of ranks. A rank probes its own device, plans once per distinct workload for it, loads
the model once and runs its jobs; a job that fails is recorded and the rank goes on.

Example:
    >>> summary = run_batch(BatchConfig(jobs=Path("jobs.jsonl"), out=Path("out")))
    >>> summary.done, summary.skipped, summary.failed
    (5, 0, 0)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..device.spec import format_bytes, parse_size
from ..errors import DoesNotFit, EngineError, InvalidArgument
from ..plan.settings import parse_force
from .jobs import InvalidJobs, Job, read_jobs
from .manifest import Manifest, latest_by_id

log = logging.getLogger(__name__)

MAX_REPLANS = 2  # after an out-of-memory error: re-probe the free memory and re-plan, at most twice
_FAILURES = (EngineError, ValueError, OSError, torch.OutOfMemoryError)


@dataclass(frozen=True)
class BatchConfig:
    """One ``engine batch`` invocation; the options shared with ``engine generate`` apply to every job."""

    jobs: Path
    out: Path
    config: str = "tiny"
    ckpt: str | None = None
    device: str = "cpu"
    force: str | None = None
    reserve: str | None = None
    quiet: bool = False
    skip_invalid: bool = False


@dataclass(frozen=True)
class BatchSummary:
    """The whole batch (the same on every rank): jobs in the file, done now, skipped, failed."""

    total: int
    done: int
    skipped: int
    failed: int
    time_s: float
    processes: int
    manifest: Path

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


class Progress:
    """Per-rank progress lines on stderr: ``[rank 0/2] job 1/3 (cat): generating...``."""

    def __init__(self, rank: int, world: int, quiet: bool, stream=None):
        self.prefix = f"[rank {rank}/{world}]"
        self.quiet = quiet
        self.stream = stream

    def say(self, text: str, always: bool = False) -> None:
        if always or not self.quiet:
            print(f"{self.prefix} {text}", file=self.stream or sys.stderr, flush=True)


def run_batch(cfg: BatchConfig, stream=None) -> BatchSummary:
    """Run every job of ``cfg.jobs`` not already done into ``cfg.out``; see the module docstring.

    Raises :class:`~engine.batch.jobs.InvalidJobs` (before any model is loaded) when lines are
    invalid and ``cfg.skip_invalid`` is off.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from ..config import load_spec

    t0 = time.perf_counter()
    state = PartialState(cpu=cfg.device == "cpu")
    progress = Progress(state.process_index, state.num_processes, cfg.quiet, stream)
    _warn_single_cpu_launch(state)
    spec = load_spec(cfg.config)
    parse_force(cfg.force)  # a bad --force, --reserve or --ckpt fails here, not once per job
    reserve = parse_size(cfg.reserve, "--reserve") if cfg.reserve is not None else None
    if cfg.ckpt is not None:  # before any plan: the weights load only after every rank planned
        from ..checkpoint import check_checkpoint_path

        check_checkpoint_path(cfg.ckpt)
    device = rank_device(cfg.device, state.local_process_index, state.num_processes)
    jobs = read_jobs(cfg.jobs, spec)
    if jobs.invalid and not cfg.skip_invalid:
        raise InvalidJobs([bad.message for bad in jobs.invalid])
    manifest = Manifest(cfg.out, state.process_index)
    done = already_done(manifest, jobs.valid, cfg)
    state.wait_for_everyone()  # every rank has read the manifest before any rank appends to it
    todo = [job for job in jobs.valid if job.id not in done]
    if state.is_main_process:
        if done:
            progress.say(f"{len(done)} of {len(jobs.valid)} jobs already done in {cfg.out}; skipping them")
        for bad in jobs.invalid:
            manifest.append(_record(_base(bad.id or str(bad.line), bad.line, state, None),
                                    status="failed", error=bad.message, stage="validation"))
    with state.split_between_processes(todo) as mine:
        mine = list(mine)
    counts = _run_rank(mine, spec, cfg, device, reserve, state, manifest, progress)
    state.wait_for_everyone()
    per_rank = gather_object([counts])
    summary = BatchSummary(total=len(jobs.valid) + len(jobs.invalid),
                           done=sum(c["done"] for c in per_rank), skipped=len(done),
                           failed=sum(c["failed"] for c in per_rank) + len(jobs.invalid),
                           time_s=time.perf_counter() - t0, processes=state.num_processes,
                           manifest=manifest.path)
    if state.is_main_process:
        manifest.merge()
    state.wait_for_everyone()  # the merge is done before any rank leaves
    # Leaving with the process group alive lets gloo's threads die in the interpreter's exit
    # (std::terminate, exit code -6, seen when a rank has nothing to do): close it ourselves.
    state.destroy_process_group()
    return summary


def _warn_single_cpu_launch(state) -> None:
    """``accelerate launch --cpu --num_processes N`` without mpirun starts one process: say so."""
    env = os.environ
    if (state.num_processes == 1 and env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1")
            and "MASTER_PORT" in env and "WORLD_SIZE" not in env):
        log.warning("`accelerate launch --cpu --num_processes N` started one process (accelerate needs "
                    "mpirun, --mpirun_hostfile, for several CPU processes); this batch runs in one. For N "
                    "processes use `accelerate launch --multi_gpu --num_processes N -m engine batch ... "
                    "--device cpu` (see docs/scale-out.md).")


def rank_device(device: str, local_index: int, processes: int) -> str:
    """The torch device this rank computes on: ``cuda`` means the GPU of the local rank."""
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise InvalidArgument("`--device` 'cuda' is not available here (no CUDA device found); "
                                  "use --device cpu.")
        if local_index >= count:
            raise InvalidArgument(f"`--device` cuda: local rank {local_index} has no GPU of its own "
                                  f"({count} visible); start at most {count} processes per machine.")
        return f"cuda:{local_index}"
    if device.startswith("cuda:") and device[5:].isdigit():
        if processes > 1:
            raise InvalidArgument(f"`--device` {device!r} names one GPU for {processes} processes; pass "
                                  "--device cuda (each process takes its local rank's GPU) and choose "
                                  "cards with accelerate's --gpu_ids.")
        return device
    raise InvalidArgument(f"`--device` {device!r} is not a device; use cpu, cuda or cuda:N.")


def already_done(manifest: Manifest, jobs, cfg: BatchConfig) -> set[str]:
    """Ids whose last record is ``done`` for the same job and whose video is there and not empty."""
    last = latest_by_id(manifest.records())
    done = set()
    for job in jobs:
        rec = last.get(job.id)
        if rec is None or rec.get("status") != "done" or rec.get("job_digest") != job.digest(cfg.config, cfg.ckpt):
            continue
        out = cfg.out / f"{job.id}.mp4"
        if out.is_file() and out.stat().st_size > 0:
            done.add(job.id)
    return done


def _run_rank(mine: list[Job], spec, cfg: BatchConfig, device: str, reserve, state, manifest: Manifest,
              progress: Progress) -> dict[str, Any]:
    """This rank's jobs on one model: plan per workload, run, record; failures do not stop it."""
    from ..pipeline.loading import load_model

    t0 = time.perf_counter()
    counts = {"rank": state.process_index, "done": 0, "failed": 0}
    # the first rank of each machine probes and fits the estimators (cached on disk) while the
    # others wait, then they read the cache: no rank measures the CPU while another computes
    with state.local_main_process_first():
        planner = RankPlanner(spec, device, cfg.force, reserve, _local_processes(state)) if mine else None
        if planner is not None:
            planner.plan_all(mine)
    if planner is None:
        progress.say("no jobs for this rank")
        return counts
    progress.say(f"{len(mine)} job(s) on {planner.device.name} ({device}); {len(planner.plans)} "
                 f"plan(s) made in {time.perf_counter() - t0:.1f} s")
    # weights stay on the CPU (memory-mapped) until each plan's precision and offload place them
    model = load_model(spec.source, cfg.ckpt, device="cpu")
    for k, job in enumerate(mine, start=1):
        tag = f"job {k}/{len(mine)} ({job.id})"
        record = _run_job(model, job, planner, cfg, state, progress, tag)
        manifest.append(record)
        counts[record["status"]] += 1
    progress.say(f"finished: {counts['done']} done, {counts['failed']} failed in "
                 f"{time.perf_counter() - t0:.1f} s", always=True)
    return counts


def _local_processes(state) -> int:
    """Processes on this machine: they share its RAM (and, on CPU, its cores)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes)))  # mpirun: one machine


class RankPlanner:
    """Plans for this rank's device, one per distinct workload, reused across jobs.

    On a CPU the processes of one machine share its RAM, so each plans for its share of it; the
    host RAM for offloaded weights is shared the same way on GPUs.
    """

    def __init__(self, spec, device: str, force: str | None, reserve: int | None, local_processes: int):
        self.spec, self.torch_device, self.force, self.reserve = spec, device, force, reserve
        self.share = local_processes
        self.device = self._probe()
        self.plans: dict[tuple, Any] = {}

    def _probe(self):
        from ..device import probe_cpu, probe_device

        if self.torch_device == "cpu":
            spec = probe_cpu()
            return dataclasses.replace(spec, total_bytes=spec.total_bytes // self.share,
                                       free_bytes=None if spec.free_bytes is None
                                       else spec.free_bytes // self.share)
        return probe_device(int(self.torch_device.partition(":")[2] or 0))

    @staticmethod
    def key(job: Job) -> tuple:
        o = job.options
        return (o.height, o.width, o.frames, o.mode, o.steps, o.cfg != 1.0, job.perframe_ae)

    def plan_all(self, jobs) -> None:
        """Plan every distinct workload now (before the model loads); a failure stays with its jobs."""
        for job in jobs:
            if self.key(job) not in self.plans:
                try:
                    self.plans[self.key(job)] = self._make(job)
                except (EngineError, ValueError) as exc:
                    self.plans[self.key(job)] = exc

    def plan(self, job: Job):
        key = self.key(job)
        if key not in self.plans:
            self.plans[key] = self._make(job)
        if isinstance(self.plans[key], Exception):
            raise self.plans[key]
        return self.plans[key]

    def replan(self, job: Job):
        """A new plan from the memory free now (after an out-of-memory error); later jobs use it."""
        if self.torch_device.startswith("cuda"):
            torch.cuda.empty_cache()
        self.device = self._probe()
        self.plans[self.key(job)] = self._make(job)
        return self.plans[self.key(job)]

    def _make(self, job: Job):
        from ..device import host_memory
        from ..planner.search import make_plan

        o = job.options
        force = ",".join(filter(None, [self.force, _perframe_force(job.perframe_ae)])) or None
        return make_plan(self.spec, o.height, o.width, o.frames, self.device, force=force,
                         reserve_bytes=self.reserve, steps=o.steps, guidance=o.cfg != 1.0, mode=o.mode,
                         host_bytes=host_memory()["available_bytes"] // self.share)


def _perframe_force(perframe_ae: bool | None) -> str | None:
    if perframe_ae is None:
        return None
    mode = "per-frame" if perframe_ae else "batched"
    return f"ae_encode={mode},ae_decode={mode}"


def _run_job(model, job: Job, planner: RankPlanner, cfg: BatchConfig, state, progress: Progress,
             tag: str) -> dict[str, Any]:
    """One job -> its record; a failure becomes the record's one-sentence error."""
    base = _base(job.id, job.line, state, planner)
    base["job_digest"] = job.digest(cfg.config, cfg.ckpt)
    t0 = time.perf_counter()
    plan = None
    try:
        plan, result = _generate(model, job, planner, progress, tag)
        out = _write_outputs(job, plan, result, cfg, base)
    except _FAILURES as exc:
        error = _sentence(exc, planner.torch_device)
        progress.say(f"{tag}: failed: {error}", always=True)
        return _record(base, status="failed", error=error, plan=plan, wall_s=time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    progress.say(f"{tag}: done in {wall:.1f} s (predicted {plan.time_s:.1f} s) -> {out}")
    return _record(base, status="done", plan=plan, result=result, output=str(out), wall_s=wall)


def _generate(model, job: Job, planner: RankPlanner, progress: Progress, tag: str):
    """Plan (cached), run; after an out-of-memory error re-plan from the free memory and go on."""
    from ..pipeline.generate import generate

    o = job.options
    plan, tried = planner.plan(job), []
    while True:
        if not plan.fits:
            raise DoesNotFit(f"`--force` {planner.force or ''} is predicted to need "
                             f"{format_bytes(plan.peak_bytes)} of the {format_bytes(plan.budget_bytes)} "
                             "budget; drop the forced settings or lower `--reserve`.")
        progress.say(f"{tag}: generating {o.height}x{o.width}x{o.frames} ({o.mode}, {o.steps} steps) "
                     f"with {plan.settings.describe()}...")
        try:
            return plan, generate(model, o, plan, device=planner.torch_device, progress=False)
        except torch.OutOfMemoryError:
            tried.append(plan.settings)
            if len(tried) > MAX_REPLANS:
                raise
            plan = planner.replan(job)
            if plan.settings in tried:
                raise
            progress.say(f"{tag}: ran out of memory; re-planned for the memory free now: "
                         f"{plan.settings.describe()}", always=True)


def _write_outputs(job: Job, plan, result, cfg: BatchConfig, base: dict[str, Any]) -> Path:
    """The video, then its sidecar (both written to a temporary file and renamed)."""
    from ..pipeline.video_io import to_uint8_frames, write_mp4

    out = write_mp4(to_uint8_frames(result.video), cfg.out / f"{job.id}.mp4", fps=job.options.fps)
    sidecar = {**base, "job": job.raw, "options": dataclasses.asdict(job.options), "config": cfg.config,
               "ckpt": cfg.ckpt, "output": str(out), **_numbers(plan, result), "plan": plan.as_dict(),
               "measured_stages": [s.to_dict() for s in result.stages]}
    _write_json_atomic(cfg.out / f"{job.id}.json", sidecar)
    return out


def _numbers(plan, result) -> dict[str, Any]:
    """Settings, predicted and measured peak (None where the device reports none) and time."""
    peaks = [s.peak_bytes for s in result.stages if s.peak_bytes is not None] if result else []
    return {"settings": plan.settings.to_dict() if plan else None,
            "predicted_peak_bytes": int(plan.peak_bytes) if plan else None,
            "predicted_time_s": float(plan.time_s) if plan else None,
            "measured_peak_bytes": max(peaks) if peaks else None,
            "measured_time_s": sum(s.time_s for s in result.stages) if result else None}


def _base(job_id: str, line: int, state, planner: RankPlanner | None) -> dict[str, Any]:
    return {"id": job_id, "line": line, "rank": state.process_index, "world": state.num_processes,
            "host": os.uname().nodename,
            "device": planner.torch_device if planner else None,
            "device_name": planner.device.name if planner else None}


def _record(base: dict[str, Any], *, status: str, plan=None, result=None, output: str | None = None,
            error: str | None = None, stage: str | None = None, wall_s: float | None = None) -> dict[str, Any]:
    rec = {**base, "status": status, **_numbers(plan, result), "output": output, "error": error,
           "wall_s": wall_s, "finished_at": datetime.now(timezone.utc).isoformat(timespec="microseconds")}
    if stage:
        rec["failed_at"] = stage
    return rec


def _sentence(exc: BaseException, device: str) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return (f"{device} ran out of memory with every plan tried; free memory on it (other programs), "
                "raise `--reserve` to keep more of it free, or lower the job's size.")
    text = exc.args[0] if exc.args else type(exc).__name__
    return str(text).splitlines()[0] if str(text).strip() else type(exc).__name__


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, default=str)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
