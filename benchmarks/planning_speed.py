"""How fast does `engine plan` answer? Measured wall time vs target, warm and cold.

    python benchmarks/planning_speed.py               # ~2-3 min with a warm cache (plus three cold plans)
    python benchmarks/planning_speed.py --skip-cold   # warm figures only

Three figures for ``engine plan --config 1024 --height 576 --width 1024 --frames 16
--gpu rtx-4090-laptop --json``:

* a fresh process with the fits cached (the default cache, warmed first): the median wall time of
  ``--runs`` runs of the CLI, target <= 1.0 s; the probe also reports whether the process
  imported torch (it must not);
* in-process repeats of ``make_plan`` for the same request (after one plan): median and worst of
  ``--repeats``, target <= 20 ms;
* the first plan ever for the architecture: the median of ``--cold-runs`` runs of the CLI, each
  with an empty ``ENGINE_CACHE_DIR`` (a temporary directory; the shared cache is untouched),
  target <= 20 s, with the progress bar it
  prints on stderr.

Results go to ``benchmarks/results/planning_speed.json`` with the machine, its load and the date.
Other processes on a shared machine slow every figure; the load averages are recorded beside them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.device.host import cpu_name  # noqa: E402

REQUEST = ["--config", "1024", "--height", "576", "--width", "1024", "--frames", "16",
           "--gpu", "rtx-4090-laptop", "--json"]
TARGETS = {"fresh_process_s": 1.0, "in_process_ms": 20.0, "first_plan_ever_s": 20.0}

# The CLI's own code in a fresh process; reports its wall time and whether torch was imported.
_FRESH = """
import time; t0 = time.perf_counter()
import contextlib, io, json, sys
from engine.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(["plan", *%r])
print(json.dumps({"code": code, "wall_s": time.perf_counter() - t0, "torch": "torch" in sys.modules,
                  "planning_ms": json.loads(out.getvalue())["planning_ms"]}))
""" % (REQUEST,)

_REPEATS = """
import json, sys, time
from engine.config import load_spec
from engine.device.spec import catalog_device
from engine.planner.search import make_plan
spec, device = load_spec("1024"), catalog_device("rtx-4090-laptop")
first = make_plan(spec, 576, 1024, 16, device)
times = []
for _ in range(%d):
    t = time.perf_counter()
    plan = make_plan(spec, 576, 1024, 16, device)
    times.append((time.perf_counter() - t) * 1e3)
assert plan.settings == first.settings
print(json.dumps({"ms": times, "torch": "torch" in sys.modules}))
"""


def _python(code: str, env=None) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=900)
    if done.returncode:
        raise SystemExit(f"probe failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(cmd: list[str], **kwargs) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, CPU seconds, result) of one child process."""
    cpu, t = _cpu_s(), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, **kwargs)
    return time.perf_counter() - t, _cpu_s() - cpu, done


def fresh_process(runs: int) -> dict:
    """Median wall (and CPU) time of the ``engine`` console script in a fresh process with the
    fits cached, of ``python -m engine.cli``, and of the CLI's code timed from inside."""
    script = shutil.which("engine") or sys.executable
    cli = [script, "plan", *REQUEST] if script != sys.executable else [
        sys.executable, "-m", "engine.cli", "plan", *REQUEST]
    module = [sys.executable, "-m", "engine.cli", "plan", *REQUEST]
    subprocess.run(module, capture_output=True, check=True, cwd=ROOT, timeout=900)  # warm the cache
    walls, cpus, module_walls, inside = [], [], [], []
    for _ in range(runs):
        wall, cpu, done = _timed(cli, timeout=300)
        assert done.returncode == 0, done.stderr
        walls.append(wall)
        cpus.append(cpu)
        module_walls.append(_timed(module, timeout=300)[0])
        inside.append(_python(_FRESH))
    return {"command": " ".join([Path(cli[0]).name, *cli[1:]]), "median_s": statistics.median(walls),
            "min_s": min(walls), "runs_s": walls, "cpu_median_s": statistics.median(cpus),
            "python_m_median_s": statistics.median(module_walls),
            "cli_code_median_s": statistics.median(r["wall_s"] for r in inside),
            "planning_ms": statistics.median(r["planning_ms"] for r in inside),
            "torch_imported": any(r["torch"] for r in inside)}


def in_process(repeats: int) -> dict:
    r = _python(_REPEATS % repeats)
    return {"median_ms": statistics.median(r["ms"]), "max_ms": max(r["ms"]),
            "repeats": repeats, "torch_imported": r["torch"]}


def first_plan_ever(runs: int) -> dict:
    """The CLI on an empty cache directory, ``runs`` times (this shared machine's speed varies by
    a quarter from minute to minute): every fit the plan needs, with the progress bar. CPU time
    counts the helper process that fits alongside (``engine.planner.fit_ahead``)."""
    walls, cpus = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="engine-cold-") as empty:
            env = {**os.environ, "ENGINE_CACHE_DIR": empty}
            wall, cpu, done = _timed([sys.executable, "-m", "engine.cli", "plan", *REQUEST], env=env,
                                     timeout=1800)
        if done.returncode:
            raise SystemExit(f"cold plan failed:\n{done.stderr}")
        json.loads(done.stdout)  # stdout stays one JSON document under the progress bar
        walls.append(wall)
        cpus.append(cpu)
    lines = [ln.strip() for ln in done.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    return {"wall_s": statistics.median(walls), "runs_s": walls, "cpu_s": statistics.median(cpus),
            "stderr_first_line": lines[0] if lines else "", "stderr_last_line": lines[-1] if lines else ""}


def machine_info() -> dict:
    return {"platform": platform.platform(), "cpu": cpu_name(), "cores": os.cpu_count(),
            "python": platform.python_version(), "load_average": list(os.getloadavg()),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh-process runs")
    parser.add_argument("--repeats", type=int, default=20, help="in-process make_plan repeats")
    parser.add_argument("--skip-cold", action="store_true", help="skip the first-plan-ever runs")
    parser.add_argument("--cold-runs", type=int, default=3, help="first-plan-ever runs (median reported)")
    args = parser.parse_args()
    machine = machine_info()
    results = {"fresh_process": fresh_process(args.runs), "in_process": in_process(args.repeats)}
    if not args.skip_cold:
        results["first_plan_ever"] = first_plan_ever(args.cold_runs)
    rows = [("fresh process, fits cached", results["fresh_process"]["median_s"], "s",
             TARGETS["fresh_process_s"]),
            ("in-process make_plan repeat", results["in_process"]["median_ms"], "ms",
             TARGETS["in_process_ms"])]
    if "first_plan_ever" in results:
        rows.append(("first plan ever (median, empty cache)", results["first_plan_ever"]["wall_s"], "s",
                     TARGETS["first_plan_ever_s"]))
    print(f"engine plan {' '.join(REQUEST)}")
    print(f"{'':38} {'measured':>10} {'target':>10}")
    for name, value, unit, target in rows:
        verdict = "ok" if value <= target else "MISSED"
        print(f"{name:38} {value:>8.3g} {unit:<2} {'<= ' + format(target, 'g'):>7} {unit:<2} {verdict}")
    fresh = results["fresh_process"]
    print(f"fresh process: {fresh['command']}: CPU {fresh['cpu_median_s']:.3g} s, python -m "
          f"engine.cli {fresh['python_m_median_s']:.3g} s, the CLI's code alone "
          f"{fresh['cli_code_median_s']:.3g} s (planning_ms {fresh['planning_ms']:.3g}); "
          f"torch imported: {fresh['torch_imported']}")
    print(f"worst in-process repeat {results['in_process']['max_ms']:.3g} ms")
    if "first_plan_ever" in results:
        cold = results["first_plan_ever"]
        print(f"first plan ever: runs {', '.join(f'{x:.1f}' for x in cold['runs_s'])} s wall; CPU (both "
              f"processes) {cold['cpu_s']:.3g} s; stderr: {cold['stderr_first_line']}")
    machine["load_average_after"] = list(os.getloadavg())
    out = ROOT / "benchmarks" / "results" / "planning_speed.json"
    out.write_text(json.dumps({"machine": machine, "request": REQUEST, "targets": TARGETS,
                               **results}, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)} (load average {machine['load_average'][0]:.2f} before, "
          f"{machine['load_average_after'][0]:.2f} after)")


if __name__ == "__main__":
    main()
