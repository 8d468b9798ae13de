"""The first plan ever of the 1024 config, alternating two revisions in one sitting (A/B).

This VM's speed drifts by a fifth between sittings, so a before/after comparison of planning
speed is only fair when both run alternately: each revision is checked out into a temporary
worktree, and ``python -m engine plan ...`` runs from each with an empty fit cache, ``--rounds``
times in turn. Writes ``benchmarks/results/planning_ab.json``.

    python benchmarks/planning_ab.py BEFORE_REV [AFTER_REV] [--rounds 4]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUEST = ["plan", "--config", "1024", "--height", "576", "--width", "1024", "--frames", "16",
           "--gpu", "rtx-4090-laptop", "--json"]


def cold_plan_s(source: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(source), "ENGINE_CACHE_DIR": tempfile.mkdtemp(prefix="engine-ab-")}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "engine", *REQUEST], cwd=tempfile.gettempdir(), env=env,
                   check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="the revision before the change")
    parser.add_argument("after", nargs="?", default="HEAD", help="the revision after it (default HEAD)")
    parser.add_argument("--rounds", type=int, default=4, help="runs of each revision, alternating")
    args = parser.parse_args()
    trees = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, rev in (("before", args.before), ("after", args.after)):
            trees[name] = Path(tmp) / name
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(trees[name]), rev],
                           check=True, capture_output=True)
        try:
            runs = {"before": [], "after": []}
            for _ in range(args.rounds):
                for name in runs:
                    runs[name].append(cold_plan_s(trees[name]))
                    print(f"{name:<6} {runs[name][-1]:6.1f} s", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    revs = {name: subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], capture_output=True, text=True,
                                 check=True).stdout.strip() for name, rev in (("before", args.before), ("after", args.after))}
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "load_average": os.getloadavg()},
           "request": REQUEST, "revisions": revs,
           "runs_s": {k: [round(v, 2) for v in vs] for k, vs in runs.items()},
           "median_s": {k: round(statistics.median(vs), 2) for k, vs in runs.items()}}
    print(f"median before {out['median_s']['before']} s, after {out['median_s']['after']} s")
    (ROOT / "benchmarks" / "results" / "planning_ab.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
