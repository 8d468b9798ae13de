"""One-command CUDA validation: every stage's predicted memory and time against the card's allocator.

    python benchmarks/cuda_validate.py                          # 256, 512, 1024 at 16 frames, 3 steps
    python benchmarks/cuda_validate.py --configs 512 --steps 2  # one config
    python benchmarks/cuda_validate.py --device cpu --quick     # tiny 64x96x4, 2 steps (the test suite)

For each config at its native size (256x256, 320x512, 576x1024) and 16 frames, with randomly
initialised weights (``load_model(config, None)``: nothing is downloaded), the model is built once
and run through ``generate`` under these plans:

* ``card``: ``make_plan(spec, h, w, 16, probe_device())``, the plan chosen for this card;
* ``16GiB``, ``8GiB``: the plans chosen for this card's throughput with 16 and 8 GiB, ENFORCED while
  they run: the caching allocator is capped at the emulated size minus the measured CUDA context
  (what such a card leaves the allocator), through ``generate(..., max_memory=...)`` where
  ``generate`` takes it, else ``torch.cuda.set_per_process_memory_fraction`` (reset to 1.0 after),
  so going over raises the real ``torch.OutOfMemoryError`` (recorded as the row's error); a size
  no plan fits is recorded as such;
* ``reference``: DynamiCrafter's own execution (``force="reference"``). Where xformers' kernels do
  not run (``xformers_kernels_work("cuda")``), its spatial attention runs as SDPA
  (``reference,spatial_attention=sdpa``, the prediction made with the same forced settings) and
  the output says so;
* ``block``: a forced ``offload=block`` plan on the card, only when no plan above streams blocks,
  so the block prefetch is always exercised.

Per stage it reports ``max_memory_allocated`` against ``plan.stage(name).allocated_bytes`` and
``max_memory_reserved`` + the CUDA context (``probe_device().context_bytes``) against
``peak_bytes`` (which includes the context), and the stage time; then time per denoising step,
per VAE call (``call_layout`` of the plan's mode: predicted calls; decoder/encoder forward calls
counted: measured calls; a decode that fell back to smaller modes is named), the chosen plan's
time over the reference's at their measured peaks, the attention backends actually called, and
whether block offload prefetched on the side stream (calls of ``_StreamTransfer.prefetch``,
counted by a wrapper this script installs and removes). One warm-up run (the card plan, one step)
per config keeps CUDA's lazy initialisation out of the first measured plan; ``--no-warmup``
skips it. No video is written.

Writes ``<out>/cuda_validate_<card-slug>.json`` (machine, torch, date, card, every row, and a
``calibration`` section: per config and stage, measured/predicted for peak, allocated and time,
for the planner's future calibration store) and ``.md`` beside it (the table, also printed).
The JSON is rewritten after every run, so a run cut short keeps what it measured.

On the CPU (``--device cpu``) the same code runs: peaks are ``n/a`` (no allocator statistics),
the emulated budgets only plan (not enforced, the output says so), and the reference is planned
with ``autocast_weight_cache=no`` too (the CPU runs fp32-autocast in plain fp32, so autocast
keeps no fp16 copies; the estimator's autocast-cache term only traces on CUDA).

On the lent H200 (the workplace's ``device`` tool; 15 minutes of device time in all, so one
prepared call). Its image has torch 2.11, accelerate, nvidia-ml-py, PyYAML, einops, timm, but
lacks open_clip_torch, omegaconf, antlr4-python3-runtime, ftfy, wcwidth and platformdirs, which
``engine`` imports (configs, the text tokenizer, the fit cache). ``av`` is not needed: this script
writes no video. Here, in the repo root, once (the versions installed here; ``.whl/`` is ignored)::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 omegaconf==2.4.0 \\
        antlr4-python3-runtime==4.13.2 ftfy==6.3.1 wcwidth==0.7.0 platformdirs==4.14.9

then one ``run`` with ``carry=[".whl"]``, ``timeout_s=600``::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; \\
    PYTHONUNBUFFERED=1 python3 benchmarks/cuda_validate.py --out $OUT 2>&1 | tee $OUT/log.txt

and copy the returned ``cuda_validate_*.{json,md}`` into ``benchmarks/results/``. Budget: within
8 minutes on an H100/H200-class card: the fits are traced cold on a fresh machine (tens of seconds
per config), each model is built once, every run is 3 steps.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import inspect
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from engine.config import load_spec  # noqa: E402
from engine.device.spec import GIB, format_bytes  # noqa: E402
from engine.errors import DoesNotFit  # noqa: E402
from engine.estimate.timing.layout import call_layout  # noqa: E402
from engine.pipeline.generate import generate  # noqa: E402
from engine.pipeline.options import GenerateOptions  # noqa: E402
from engine.plan.settings import Offload  # noqa: E402
from engine.plan.stages import STAGE_NAMES  # noqa: E402
from engine.planner.search import make_plan  # noqa: E402
from engine.runtime.residency import release_model  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
FULL = {"256": (256, 256), "512": (320, 512), "1024": (576, 1024)}
QUICK = {"tiny": (64, 96)}
EMULATED = (("16GiB", 16 * GIB), ("8GiB", 8 * GIB))
PROMPT = "a lighthouse on a cliff at dusk, waves below"


# ---------------------------------------------------------------- instrumentation
class Probes:
    """Wrappers this script installs around engine internals for one run, and removes on exit.

    They count, never change, what runs: per stage attempt the allocator's reserved peak (after
    ``Run.stage`` has measured the allocated peak), attention calls per backend, VAE
    encoder/decoder forward calls, and offload prefetches by transfer type
    (``_StreamTransfer.prefetch`` is the side-stream one).
    """

    def __init__(self, model):
        self.model = model
        self.stages: list[dict] = []
        self.attention: dict[str, int] = {}
        self.vae_calls = {"encode": 0, "decode": 0}
        self.prefetches: dict[str, int] = {}
        self.transfers: list[str] = []
        self.missing: list[str] = []
        self._undo: list = []

    def _patch(self, owner, name: str, make):
        original = getattr(owner, name, None)
        if original is None:  # the engine moved it: the run goes on, the row says what was not counted
            self.missing.append(f"{getattr(owner, '__name__', owner)}.{name}")
            return
        setattr(owner, name, make(original))
        self._undo.append(lambda: setattr(owner, name, original))

    def __enter__(self) -> Probes:
        from engine.models import attention_ops, transformers
        from engine.runtime import executor, offload

        self._patch(executor.Run, "stage", self._stage_wrapper)
        self._patch(transformers, "attend", lambda attend: self._count_attention(attend, attention_ops))
        self._patch(offload, "_make_transfer", self._transfer_wrapper)
        for cls_name in ("_SyncTransfer", "_StreamTransfer"):
            cls = getattr(offload, cls_name, None)
            if cls is not None and "prefetch" in vars(cls):
                self._patch(cls, "prefetch", lambda f, n=cls_name: self._prefetch_wrapper(f, n))
        vae = self.model.first_stage_model
        for direction, module in (("encode", vae.encoder), ("decode", vae.decoder)):
            handle = module.register_forward_pre_hook(lambda *_, d=direction: self._vae_call(d))
            self._undo.append(handle.remove)
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            self._undo.pop()()

    def _vae_call(self, direction: str) -> None:
        self.vae_calls[direction] += 1

    def _stage_wrapper(self, original):
        probes = self

        @contextlib.contextmanager
        def stage(run, name):
            try:
                with original(run, name) as inner:
                    yield inner
            except BaseException as exc:
                probes.stages.append({"name": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
                raise
            record = run.records[-1]
            reserved = torch.cuda.max_memory_reserved(run.device) if run.device.type == "cuda" else None
            probes.stages.append({"name": name, "time_s": record.time_s, "allocated_bytes": record.peak_bytes,
                                  "reserved_bytes": reserved, "resident": list(record.resident)})
        return stage

    def _count_attention(self, attend, attention_ops):
        def counted(q, k, v, heads, backend="sdpa"):
            kind = attention_ops.parse_backend(backend)[0]
            self.attention[kind] = self.attention.get(kind, 0) + 1
            return attend(q, k, v, heads, backend)
        return counted

    def _transfer_wrapper(self, make_transfer):
        def make(device):
            transfer = make_transfer(device)
            self.transfers.append(type(transfer).__name__)
            return transfer
        return make

    def _prefetch_wrapper(self, prefetch, cls_name: str):
        def counted(transfer, group):
            self.prefetches[cls_name] = self.prefetches.get(cls_name, 0) + 1
            return prefetch(transfer, group)
        return counted


# ---------------------------------------------------------------- devices and budgets
def card_device(kind: str):
    """The probed device: the CUDA card (with its measured context), or the CPU."""
    if kind == "cpu":
        from engine.device.probe import probe_cpu

        return probe_cpu()
    from engine.device import probe_device

    if not torch.cuda.is_available():
        raise SystemExit("`--device cuda` needs a CUDA device and this machine has none; "
                         "pass `--device cpu --quick` for the CPU run of the same code.")
    probed = probe_device()
    if probed.kind != "cuda":
        raise SystemExit("probe_device() found no NVIDIA driver (NVML); install nvidia-ml-py or run "
                         "`--device cpu`.")
    return probed


def emulated_device(probed, label: str, total: int):
    """This card's throughput and context with only ``total`` bytes (CPU: a CPU-kind device)."""
    return replace(probed.with_total(total, "vram"), name=f"{probed.name} limited to {label}")


@contextlib.contextmanager
def enforced(total: int | None, probed, device: torch.device):
    """Cap the allocator at an emulated card's size minus the CUDA context for one run.

    Yields ``(extra generate kwargs, note)``; on the CPU nothing is enforced.
    """
    if total is None:
        yield {}, ""
        return
    if device.type != "cuda":
        yield {}, f"planned for {format_bytes(total)}; not enforced on the CPU"
        return
    cap = total - (probed.context_bytes or 0)
    if "max_memory" in inspect.signature(generate).parameters:
        yield {"max_memory": cap}, f"enforced: generate(max_memory={format_bytes(cap)})"
        return
    card_total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / card_total), device)
    try:
        yield {}, f"enforced: allocator capped at {format_bytes(cap)} (set_per_process_memory_fraction)"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def reference_force(device: torch.device) -> tuple[str, str]:
    """DynamiCrafter's execution as runnable here, and the note saying what was changed."""
    from engine.runtime.attention import xformers_kernels_work

    if device.type == "cpu":
        return ("reference,spatial_attention=sdpa,autocast_weight_cache=no",
                "reference with SDPA spatial attention (no xformers on the CPU) and no autocast "
                "weight cache (the CPU runs fp32-autocast in plain fp32)")
    if xformers_kernels_work("cuda"):
        return "reference", "reference as DynamiCrafter runs it (xformers spatial, naive temporal)"
    return ("reference,spatial_attention=sdpa",
            "reference ran with SDPA spatial attention because xformers kernels did not run here "
            "(predicted with the same forced settings)")


def plans_for(spec, hw, frames, steps, probed, device) -> list[dict]:
    """The plans of one config, each ``{kind, plan (None: nothing fits), note, total}`` where
    ``total`` is the emulated card's size (None: the card itself)."""
    h, w = hw
    entries = [("card", probed, None, None, "")]
    entries += [(label, emulated_device(probed, label, total), None, total, "") for label, total in EMULATED]
    force, note = reference_force(device)
    entries.append(("reference", probed, force, None, note))
    out = []
    for kind, dev, forced, total, why in entries:
        try:
            plan = make_plan(spec, h, w, frames, dev, force=forced, steps=steps)
        except DoesNotFit as exc:
            plan, why = None, f"no plan fits: {exc}"
        out.append({"kind": kind, "plan": plan, "note": why, "total": total})
    if not any(e["plan"] is not None and e["plan"].settings.offload is Offload.BLOCK for e in out):
        plan = make_plan(spec, h, w, frames, probed, force="offload=block", steps=steps)
        out.append({"kind": "block", "plan": plan, "note": "forced offload=block to exercise the prefetch",
                    "total": None})
    return out


# ---------------------------------------------------------------- one run
def _ratio(measured, predicted):
    return None if measured is None or not predicted else measured / predicted


def stage_rows(plan, probes: Probes, context: int | None) -> list[dict]:
    """Predicted against measured, stage by stage, in the plan's order. A stage the runtime
    re-planned after running out of memory has several attempts: the figures are the last
    (finished) attempt's, ``attempts`` counts them and ``errors`` names the failed ones."""
    rows = []
    for name in STAGE_NAMES:
        p = plan.stage(name)
        tries = [s for s in probes.stages if s["name"] == name]
        done = [s for s in tries if "error" not in s]
        m = done[-1] if done else {}
        reserved = m.get("reserved_bytes")
        peak = None if reserved is None or context is None else reserved + context
        rows.append({"name": name, "predicted_allocated_bytes": p.allocated_bytes,
                     "predicted_peak_bytes": p.peak_bytes, "predicted_time_s": p.time_s,
                     "measured_allocated_bytes": m.get("allocated_bytes"), "measured_reserved_bytes": reserved,
                     "measured_peak_bytes": peak, "measured_time_s": m.get("time_s"),
                     "allocated_ratio": _ratio(m.get("allocated_bytes"), p.allocated_bytes),
                     "peak_ratio": _ratio(peak, p.peak_bytes), "time_ratio": _ratio(m.get("time_s"), p.time_s),
                     "attempts": len(tries), "errors": [s["error"] for s in tries if "error" in s],
                     "resident": m.get("resident"), "note": p.note})
    return rows


def vae_rows(plan, probes: Probes, stages: list[dict], downsample: int) -> dict:
    """Seconds per VAE call, predicted (the mode's call count) and measured (forward calls counted)."""
    w, s = plan.workload, plan.settings
    out = {}
    for direction, stage, mode, frames in (("encode", "vae_encode", s.ae_encode, w.encoded_frames(s)),
                                           ("decode", "vae_decode", s.ae_decode, w.frames)):
        calls = call_layout(mode, frames, w.height, w.width, downsample).calls
        row = next(r for r in stages if r["name"] == stage)
        seen = probes.vae_calls[direction]
        out[direction] = {"mode": str(mode), "predicted_calls": calls, "measured_calls": seen,
                          "predicted_s_per_call": row["predicted_time_s"] / calls,
                          "measured_s_per_call": (row["measured_time_s"] / seen
                                                  if seen and row["measured_time_s"] is not None else None)}
    return out


def offload_summary(plan, probes: Probes) -> dict:
    stream = probes.prefetches.get("_StreamTransfer", 0)
    return {"mode": str(plan.settings.offload), "transfers": probes.transfers,
            "prefetches": dict(probes.prefetches), "side_stream_prefetch": stream > 0}


def run_plan(model, entry: dict, probed, device: torch.device, opts: GenerateOptions) -> dict:
    """Run one plan under its budget with the probes on; the row of predicted vs measured."""
    plan, context = entry["plan"], (probed.context_bytes if device.type == "cuda" else None)
    row = {"plan": entry["kind"], "note": entry["note"], "settings": plan.settings.to_dict(),
           "describe": plan.settings.describe(), "forced": list(plan.forced), "device": plan.device.name,
           "budget_bytes": plan.budget_bytes, "predicted_peak_bytes": plan.peak_bytes,
           "predicted_time_s": plan.time_s, "fits": plan.fits, "planning_ms": plan.planning_ms,
           "error": None, "adjustments": [], "ran_settings": None}
    with enforced(entry["total"], probed, device) as (extra, enforcement), Probes(model) as probes:
        row["enforcement"] = enforcement
        try:
            result = generate(model, opts, plan, device=device, progress=False, **extra)
            row["adjustments"] = [a.to_dict() for a in getattr(result, "adjustments", ())]
            row["ran_settings"] = result.settings.to_dict()
        except Exception as exc:  # one failed plan must not cost the other rows of a one-shot run
            first = (str(exc).strip().splitlines() or [""])[0]
            row["error"] = f"{type(exc).__name__}: {first[:300]}"
    _settle(model, device)
    stages = stage_rows(plan, probes, context)
    steps = plan.workload.steps
    denoise = next(r for r in stages if r["name"] == "denoise")
    row.update(stages=stages, vae=vae_rows(plan, probes, stages, model.spec.vae.downsample_factor),
               attention_calls=dict(probes.attention), offload=offload_summary(plan, probes),
               not_instrumented=probes.missing,
               step={"predicted_s": denoise["predicted_time_s"] / steps,
                     "measured_s": None if denoise["measured_time_s"] is None
                     else denoise["measured_time_s"] / steps},
               measured_time_s=sum(s["measured_time_s"] or 0 for s in stages) if not row["error"] else None,
               measured_peak_bytes=max((s["measured_peak_bytes"] for s in stages
                                        if s["measured_peak_bytes"] is not None), default=None))
    return row


def _settle(model, device: torch.device) -> None:
    """Weights back on the host and the allocator emptied: each run starts from the same state."""
    release_model(model)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def input_image(height: int, width: int):
    """A deterministic gradient image (no file needed)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1),
                    (x + y) * 255 // max(1, height + width - 2)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


# ---------------------------------------------------------------- summaries and output
def config_summary(rows: list[dict]) -> dict:
    """The chosen plan's time over the reference's, at their measured peaks."""
    by = {r["plan"]: r for r in rows}
    card, ref = by.get("card"), by.get("reference")
    if not card or not ref or card.get("measured_time_s") is None or ref.get("measured_time_s") is None:
        return {}
    return {"chosen_over_reference_time": card["measured_time_s"] / ref["measured_time_s"],
            "predicted_chosen_over_reference_time": card["predicted_time_s"] / ref["predicted_time_s"],
            "chosen_measured_peak_bytes": card["measured_peak_bytes"],
            "reference_measured_peak_bytes": ref["measured_peak_bytes"]}


def calibration(results: dict) -> dict:
    """Measured/predicted per config and stage (medians over the runs, and every sample)."""
    samples, by_config = [], {}
    for cfg in results["configs"]:
        per_stage: dict[str, dict[str, list]] = {}
        for row in cfg["rows"]:
            for s in row.get("stages", []):
                sample = {"config": cfg["config"], "height": cfg["height"], "width": cfg["width"],
                          "frames": cfg["frames"], "plan": row["plan"], "settings": row["settings"],
                          "stage": s["name"], "peak": s["peak_ratio"], "allocated": s["allocated_ratio"],
                          "time": s["time_ratio"]}
                samples.append(sample)
                for key in ("peak", "allocated", "time"):
                    if sample[key] is not None:
                        per_stage.setdefault(s["name"], {}).setdefault(key, []).append(sample[key])
        by_config[cfg["config"]] = {name: {k: statistics.median(v) for k, v in vals.items()} | {
            "runs": max(len(v) for v in vals.values())} for name, vals in per_stage.items()}
    return {"schema": 1, "card": results["card"]["name"], "torch": results["torch"],
            "context_bytes": results["card"]["context_bytes"],
            "ratios": "measured / predicted; peak = (max_memory_reserved + CUDA context) / peak_bytes, "
                      "allocated = max_memory_allocated / allocated_bytes, time = stage seconds",
            "by_config": by_config, "samples": samples}


def _b(n) -> str:
    return "n/a" if n is None else format_bytes(n)


def _r(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _t(x) -> str:
    return "n/a" if x is None else f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def table(results: dict) -> str:
    """The readable report (markdown)."""
    card = results["card"]
    lines = [f"# CUDA validation on {card['name']}", "",
             f"{results['date']}, torch {results['torch']}, {results['machine']['platform']}; "
             f"CUDA context measured: {_b(card['context_bytes'])}; xformers kernels: "
             f"{'run' if card['xformers'] else 'do not run'}; steps {results['steps']}; random weights.", "",
             "Memory: `alloc` = max_memory_allocated vs the plan's allocated_bytes; `peak` = "
             "max_memory_reserved + CUDA context vs the plan's peak_bytes (which includes the context). "
             "Ratios are measured / predicted.", ""]
    for cfg in results["configs"]:
        lines += [f"## {cfg['config']} at {cfg['height']}x{cfg['width']}x{cfg['frames']}", ""]
        for row in cfg["rows"]:
            lines += _row_lines(row)
        s = cfg["summary"]
        if s:
            lines += [f"chosen / reference time: {_r(s['chosen_over_reference_time'])} measured "
                      f"({_r(s['predicted_chosen_over_reference_time'])} predicted), at measured peaks "
                      f"{_b(s['chosen_measured_peak_bytes'])} vs {_b(s['reference_measured_peak_bytes'])}", ""]
    lines += [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def _row_lines(row: dict) -> list[str]:
    head = f"### {row['plan']}: {row['describe']}"
    if "stages" not in row:
        return [head, "", row["note"], ""]
    out = [head, "", f"{row['device']}; budget {_b(row['budget_bytes'])}; "
           + "; ".join(x for x in (row["enforcement"], row["note"], row["error"]) if x), "",
           "| stage | alloc pred | alloc meas | ratio | peak pred | peak meas | ratio | time pred | time meas | ratio |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for s in row["stages"]:
        out.append(f"| {s['name']} | {_b(s['predicted_allocated_bytes'])} | {_b(s['measured_allocated_bytes'])} "
                   f"| {_r(s['allocated_ratio'])} | {_b(s['predicted_peak_bytes'])} | {_b(s['measured_peak_bytes'])} "
                   f"| {_r(s['peak_ratio'])} | {_t(s['predicted_time_s'])} | {_t(s['measured_time_s'])} "
                   f"| {_r(s['time_ratio'])} |")
    step, dec, off = row["step"], row["vae"]["decode"], row["offload"]
    out += ["", f"per denoising step {_t(step['measured_s'])} (predicted {_t(step['predicted_s'])}); "
            f"per VAE decode call {_t(dec['measured_s_per_call'])} over {dec['measured_calls']} calls "
            f"(predicted {_t(dec['predicted_s_per_call'])} over {dec['predicted_calls']}, {dec['mode']})"
            + "".join(f"; re-planned {a['stage']}: {a['changes'] or 'same settings'}" for a in row["adjustments"]),
            f"attention calls {row['attention_calls']}; offload {off['mode']}: prefetches {off['prefetches']}, "
            f"side stream {'used' if off['side_stream_prefetch'] else 'not used'}", ""]
    return out


def header(probed, device: torch.device, steps: int) -> dict:
    card = {"name": probed.name, "kind": probed.kind, "total_bytes": probed.total_bytes,
            "free_bytes": probed.free_bytes, "context_bytes": probed.context_bytes,
            "xformers": probed.xformers, "compute_capability": probed.compute_capability,
            "fp16_flops": probed.fp16_flops, "fp32_flops": probed.fp32_flops,
            "link_bandwidth": probed.link_bandwidth}
    return {"schema": 1, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device), "steps": steps,
            "machine": {"node": platform.node(), "platform": platform.platform(),
                        "python": platform.python_version(), "cpu": platform.processor()},
            "card": card, "generate_takes_max_memory": "max_memory" in inspect.signature(generate).parameters,
            "configs": [], "notes": []}


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def write(results: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"cuda_validate_{slug(results['card']['name'])}.json"
    results["calibration"] = calibration(results)
    path.write_text(json.dumps(results, indent=2))
    path.with_suffix(".md").write_text(table(results))
    return path


# ---------------------------------------------------------------- the driver
def validate_config(name: str, hw, frames: int, steps: int, probed, device, results, out_dir, warmup: bool):
    from engine.pipeline.loading import load_model

    t0 = time.perf_counter()
    spec = load_spec(name)
    entries = plans_for(spec, hw, frames, steps, probed, device)
    print(f"[{name}] planned {len(entries)} plans in {time.perf_counter() - t0:.1f} s", flush=True)
    model = load_model(name, None, device="cpu")
    print(f"[{name}] built random weights in {time.perf_counter() - t0:.1f} s", flush=True)
    opts = GenerateOptions(image=input_image(*hw), prompt=PROMPT, seed=0)
    cfg = {"config": name, "height": hw[0], "width": hw[1], "frames": frames, "rows": [], "summary": {}}
    results["configs"].append(cfg)
    if warmup and entries[0]["plan"] is not None:
        generate(model, replace(opts, steps=1), entries[0]["plan"], device=device, progress=False)
        _settle(model, device)
    for entry in entries:
        if entry["plan"] is None:
            cfg["rows"].append({"plan": entry["kind"], "note": entry["note"], "describe": "no plan"})
            continue
        t1 = time.perf_counter()
        cfg["rows"].append(run_plan(model, entry, probed, device, opts))
        print(f"[{name}] {entry['kind']} ran in {time.perf_counter() - t1:.1f} s"
              + (f" ({cfg['rows'][-1]['error']})" if cfg["rows"][-1]["error"] else ""), flush=True)
        cfg["summary"] = config_summary(cfg["rows"])
        write(results, out_dir)
    for note in dict.fromkeys(e["note"] for e in entries if e["kind"] == "reference"):
        results["notes"].append(f"{name}: {note}")
    del model
    gc.collect()


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="the tiny config at 64x96x4, 2 steps")
    ap.add_argument("--configs", default=None, help="comma-separated, default 256,512,1024 (tiny with --quick)")
    ap.add_argument("--frames", type=int, default=None, help="default 16 (4 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="default 3 (2 with --quick)")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    names = args.configs.split(",") if args.configs else list(sizes)
    frames = args.frames or (4 if args.quick else 16)
    steps = args.steps or (2 if args.quick else 3)
    device = torch.device(args.device)
    probed = card_device(args.device)
    results = header(probed, device, steps)
    if device.type == "cpu":
        results["notes"].append("CPU run: no allocator statistics (peaks n/a); the 16 and 8 GiB budgets "
                                "only plan (not enforced)")
    t0 = time.perf_counter()
    for name in names:
        hw = sizes.get(name) or load_spec(name).default_height_width
        validate_config(name, hw, frames, steps, probed, device, results, args.out, not args.no_warmup)
    results["elapsed_s"] = time.perf_counter() - t0
    path = write(results, args.out)
    print(table(results))
    print(f"wrote {path} and {path.with_suffix('.md').name} in {results['elapsed_s']:.0f} s")
    return path


if __name__ == "__main__":
    main()
