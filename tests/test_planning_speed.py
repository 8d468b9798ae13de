"""A warm plan imports no torch and traces nothing (the timings live in benchmarks/planning_speed.py).

Uses the fit cache the planner uses (``$ENGINE_CACHE_DIR`` or the user cache): the first test warms
it for the 512 config if needed (a cold fit, once per code version), then checks a fresh process.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

ARGS = ["plan", "--config", "512", "--gpu", "rtx-4090-laptop", "--json"]

# Plan in-process through the CLI's own code, then report what the process imported.
_PROBE = """
import contextlib, io, json, sys
from engine.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(%r)
plan = json.loads(out.getvalue())
heavy = [m for m in ("torch", "engine.estimate.tracing.log", "engine.estimate.tracing.trace",
                     "engine.models.unet", "engine.runtime.autoencode") if m in sys.modules]
print(json.dumps({"code": code, "settings": plan["settings"], "imported": heavy}))
""" % (ARGS,)


@pytest.fixture(scope="module")
def warm_cache():
    """Plan once in a subprocess so the 512 fits are on disk (a no-op when they already are)."""
    done = subprocess.run([sys.executable, "-m", "engine.cli", *ARGS], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_warm_plan_in_a_fresh_process_imports_no_torch(warm_cache):
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 0
    assert report["imported"] == [], f"a warm plan imported {report['imported']}"
    assert report["settings"] == warm_cache["settings"]
    assert "fitting" not in done.stderr  # no cold fit, so no progress bar


def test_repeated_make_plan_traces_nothing(warm_cache, monkeypatch):
    from engine.config import load_spec
    from engine.device.spec import catalog_device
    from engine.estimate.tracing import log as trace_log_module
    from engine.estimate.unet import fits
    from engine.estimate.vae import laws as vae_laws
    from engine.planner.estimators import Estimators
    from engine.planner.search import make_plan

    spec, device = load_spec("512"), catalog_device("rtx-4090-laptop")
    first = make_plan(spec, 320, 512, 16, device)
    calls = []

    def no_trace(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a warm plan traced")

    monkeypatch.setattr(trace_log_module, "trace_log", no_trace)
    monkeypatch.setattr(fits, "fit_stage", no_trace)
    monkeypatch.setattr(vae_laws, "fit_families", no_trace)
    again = make_plan(spec, 320, 512, 16, device)  # the in-process bundle
    fresh = make_plan(spec, 320, 512, 16, device, estimators=Estimators(spec, device))  # the disk
    assert calls == []
    assert again.settings == first.settings == fresh.settings
    assert [s.peak_bytes for s in fresh.stages] == [s.peak_bytes for s in first.stages]
