"""Online calibration: a planned run records measured / predicted per stage for its device, and
the next plan there applies the correction and says so."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine.config import load_spec
from engine.pipeline.generate import generate
from engine.pipeline.image_io import EXAMPLE_IMAGE
from engine.pipeline.options import GenerateOptions
from engine.plan.plan import Plan
from engine.planner.calibration import CalibrationStore, reset_all
from engine.planner.search import make_plan


@pytest.fixture()
def cpu(tmp_path, monkeypatch):
    from engine.device import probe_cpu

    monkeypatch.setenv("ENGINE_CALIBRATION_DIR", str(tmp_path))
    return probe_cpu()


def test_a_run_calibrates_the_next_plan_on_its_device(tiny_model, cpu):
    spec = load_spec("tiny")
    first = make_plan(spec, 64, 64, 4, cpu, steps=2)
    assert all(s.time_is == "lower_bound" for s in first.stages) and ">=" in first.explain()
    assert any("lower bounds" in a for a in first.assumptions)
    result = generate(tiny_model, GenerateOptions(image=str(EXAMPLE_IMAGE)), first, progress=False)
    store = CalibrationStore(cpu, first.workload.config_digest)
    measured = {r.name: r.time_s for r in result.stages}
    for s in first.stages:  # the ratio of this run, for every stage
        assert store.correction(s.name).runs == 1
        assert store.correction(s.name).time == pytest.approx(measured[s.name] / s.time_s)
        assert store.correction(s.name).memory == 1.0  # the CPU measures no peak: memory untouched
    second = make_plan(spec, 64, 96, 4, cpu, steps=2, calibrate=True)
    bare = make_plan(spec, 64, 96, 4, cpu, steps=2, calibrate=False)
    for a, b in zip(second.stages, bare.stages):
        assert a.time_is == "calibrated" and a.time_s == pytest.approx(b.time_s * store.correction(a.name).time)
        assert a.peak_bytes == b.peak_bytes
    assert any("corrected by 1 calibrating run(s)" in a for a in second.assumptions)
    assert Plan.from_json(second.to_json()) == second


def test_catalogued_cards_are_never_corrected(tiny_model, cpu):
    from engine.device.spec import catalog_device

    plan = make_plan(load_spec("tiny"), 64, 64, 4, catalog_device("rtx-4090"), steps=2)
    assert all(s.time_is == "lower_bound" for s in plan.stages)


def test_probe_shows_and_resets_the_corrections(tiny_model, cpu, tmp_path):
    plan = make_plan(load_spec("tiny"), 64, 64, 4, cpu, steps=2)
    generate(tiny_model, GenerateOptions(image=str(EXAMPLE_IMAGE)), plan, progress=False)
    env = {**os.environ, "ENGINE_CALIBRATION_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "engine.cli", "probe", "--json", "--no-measure"]
    shown = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)
    assert set(shown["calibration"][plan.workload.config_digest]) == {s.name for s in plan.stages}
    reset = json.loads(subprocess.run(cmd + ["--reset-calibration"], env=env, capture_output=True, text=True,
                                      check=True).stdout)
    assert reset["calibration_reset_files"] == 1 and reset["calibration"] == {}
    assert reset_all(cpu) == 0
