"""Online calibration: a planned run records measured / predicted per stage for its device, and
the next plan there applies the correction and says so."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

from engine.config import load_spec
from engine.pipeline.generate import generate
from engine.pipeline.image_io import EXAMPLE_IMAGE
from engine.pipeline.options import GenerateOptions
from engine.plan.plan import Plan
from engine.planner.calibration import CalibrationStore, reset_all
from engine.planner.search import make_plan

# plans here time the VAE from FLOPs unless a test measures it: not from a model in the user's cache
pytestmark = pytest.mark.usefixtures("private_fit_cache")


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
    measured = {r.name: r for r in result.stages}
    # the UNet and the VAE were timed once more at their smallest input: their fixed cost per call
    assert {r.name for r in result.stages if r.call_s} == {"denoise", "vae_encode", "vae_decode"}
    for s in first.stages:  # the ratio of this run, for every stage, beyond its calls' fixed cost
        c, rec = store.correction(s.name), measured[s.name]
        assert c.runs == 1 and c.call_s == (rec.call_s or 0.0)
        fixed = s.calls * c.call_s if c.call_s else s.fixed_s  # the time model's own where unmeasured
        assert c.time == pytest.approx(max(rec.time_s - fixed, 0.05 * rec.time_s) / (s.time_s - s.fixed_s))
        assert c.memory == 1.0  # the CPU measures no peak: memory untouched
    assert first.stage("denoise").calls == 2 * (1 if first.settings.cfg == "batched" else 2)  # 2 steps
    second = make_plan(spec, 64, 96, 4, cpu, steps=2, calibrate=True)
    bare = make_plan(spec, 64, 96, 4, cpu, steps=2, calibrate=False)
    for a, b in zip(second.stages, bare.stages):
        c = store.correction(a.name)
        fixed = b.calls * c.call_s if c.call_s else b.fixed_s
        assert a.time_is == "calibrated" and a.time_s == pytest.approx((b.time_s - b.fixed_s) * c.time + fixed)
        assert a.fixed_s == pytest.approx(fixed) and a.peak_bytes == b.peak_bytes
    assert any("corrected by 1 calibrating run(s)" in a for a in second.assumptions)
    assert Plan.from_json(second.to_json()) == second


@pytest.mark.parametrize("force,unet_batch,encode_frames,decode_frames", [
    ("cfg=batched,ae_decode=chunk:3,encode_all_frames=true,ae_encode=chunk:2", 2, 2, 3),
    ("cfg=sequential,ae_decode=per-frame", 1, 1, 1)])
def test_the_minimal_calls_are_the_runs_calls_at_the_smallest_size(tiny_model, cpu, force, unet_batch,
                                                                   encode_frames, decode_frames):
    """The fixed cost is timed on the calls the run made (its CFG batch, its frames per VAE call),
    shrunk to the smallest latent: a batch-1, one-frame call under-counts a batched step's."""
    plan = make_plan(load_spec("tiny"), 64, 64, 4, cpu, steps=1, force=force)
    side = 2 ** (len(tiny_model.spec.unet.channel_mult) - 1)
    pixels = side * tiny_model.spec.vae.downsample_factor
    seen = {"unet": [], "encoder": [], "decoder": []}
    vae = tiny_model.first_stage_model
    hooks = [part.register_forward_pre_hook(lambda _m, args, key=key: seen[key].append(tuple(args[0].shape)))
             for key, part in (("unet", tiny_model.model.diffusion_model), ("encoder", vae.encoder),
                               ("decoder", vae.decoder))]
    try:
        result = generate(tiny_model, GenerateOptions(image=str(EXAMPLE_IMAGE)), plan, progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert not result.adjustments  # the run followed its plan, so it calibrated

    def batches(key, smallest):  # the batches of the calls at (or not at) the smallest size
        edge = pixels if key == "encoder" else side
        return [s[0] for s in seen[key] if (s[-1] == edge) == smallest]
    assert set(batches("unet", False)) == {unet_batch}  # what the run itself called
    # a warm-up and five timed steps, each the run's calls per step, at the run's batch
    assert batches("unet", True) == [unet_batch] * (6 * (2 // unet_batch))
    assert max(batches("encoder", False)) == encode_frames and batches("encoder", True) == [encode_frames] * 6
    assert max(batches("decoder", False)) == decode_frames and batches("decoder", True) == [decode_frames] * 6
    assert next(r for r in result.stages if r.name == "denoise").call_s > 0


def test_a_timed_step_of_several_calls_keeps_the_cost_of_one(monkeypatch):
    """``call_s`` is per model call: a sequential-CFG step makes two or three, and the timed
    median is divided by them (a clock that advances one second a reading makes it exact)."""
    import itertools

    import torch

    from engine.plan.settings import Settings
    from engine.runtime import executor
    from engine.runtime.budget import MemoryBudget

    clock = itertools.count()
    monkeypatch.setattr(executor.time, "perf_counter", lambda: float(next(clock)))
    run = executor.Run(None, Settings(), torch.device("cpu"), MemoryBudget(None, "cpu"),
                       records=[executor.StageRecord("denoise", (), 1.0)])
    run.time_minimal_call("denoise", lambda: None, calls=3)
    assert run.records[0].call_s == pytest.approx(1 / 3)


def test_a_measured_per_call_cost_replaces_the_time_models_own(tmp_path):
    from types import SimpleNamespace

    from engine.plan.plan import StagePlan
    from engine.planner.calibration import corrected

    # a VAE time model measured by `engine probe --calibrate` puts part of each call down to its
    # fixed cost; a device that runs the rest 1.5x slower and spends 3 ms a call is then predicted
    # exactly at another size and call count after one run, that fixed part counted once
    small = StagePlan("vae_encode", 1, 1, 0.010, calls=1, fixed_s=0.002)
    large = StagePlan("vae_encode", 1, 1, 0.030, calls=2, fixed_s=0.004)

    def truth(stage):
        return 1.5 * (stage.time_s - stage.fixed_s) + stage.calls * 0.003
    store = CalibrationStore(SimpleNamespace(kind="cpu", name="test"), "digest", root=tmp_path)
    run = SimpleNamespace(name="vae_encode", time_s=truth(small), call_s=0.003, peak_bytes=None)
    store.record(SimpleNamespace(stage=lambda name: small), [run])
    assert corrected(large, store.correction("vae_encode")).time_s == pytest.approx(truth(large))
    # a run that timed no minimal call keeps the time model's fixed part and scales the rest
    store.reset()
    store.record(SimpleNamespace(stage=lambda name: small), [SimpleNamespace(**{**vars(run), "call_s": None})])
    again = corrected(large, store.correction("vae_encode"))
    assert again.fixed_s == large.fixed_s
    assert again.time_s == pytest.approx((truth(small) - small.fixed_s) / 0.008 * 0.026 + large.fixed_s)


def test_ratios_are_kept_per_size_and_interpolated_between_them(tmp_path):
    """A device that runs small calls 3x slower than its time model and large ones 1.5x: after
    one run at each size a plan between them interpolates, one beyond them takes the nearest
    size's ratio, and another run at a measured size refines that size alone."""
    from types import SimpleNamespace

    from engine.plan.plan import StagePlan
    from engine.planner.calibration import corrected

    def stage(per_call_s, calls=4):
        return StagePlan("denoise", 1, 1, per_call_s * calls, calls=calls)

    def run(plan_stage, ratio):
        return SimpleNamespace(name="denoise", time_s=plan_stage.time_s * ratio, call_s=None, peak_bytes=None)

    store = CalibrationStore(SimpleNamespace(kind="cpu", name="test"), "digest", root=tmp_path)
    small, large = stage(0.01), stage(0.04, calls=2)
    for plan_stage, ratio in ((small, 3.0), (large, 1.5)):
        store.record(SimpleNamespace(stage=lambda name, s=plan_stage: s), [run(plan_stage, ratio)])
    c = CalibrationStore(SimpleNamespace(kind="cpu", name="test"), "digest", root=tmp_path).correction("denoise")
    assert c.runs == 2 and len(c.points) == 2  # read back from the file
    assert corrected(stage(0.01, calls=9), c).time_s == pytest.approx(0.09 * 3.0)  # the small size's
    assert corrected(stage(0.02), c).time_s == pytest.approx(0.08 * 3.0 ** 0.5 * 1.5 ** 0.5)  # halfway (log)
    assert corrected(stage(0.005), c).calibration == pytest.approx(3.0)  # below: the nearest size's
    assert corrected(stage(0.16), c).calibration == pytest.approx(1.5)  # above: the nearest size's
    assert c.time_text() == "x1.50-3.00"
    store.record(SimpleNamespace(stage=lambda name: small), [run(small, 2.0)])  # the small size again
    c = store.correction("denoise")
    assert len(c.points) == 2 and c.time_at(0.01) == pytest.approx((3.0 * 2.0) ** 0.5)
    assert c.time_at(0.04) == pytest.approx(1.5)


def test_a_store_keeps_sizes_apart_and_survives_old_and_damaged_files(tmp_path):
    """A run merges into the nearest measured size only (its size kept), the oldest of more than
    eight sizes is dropped, a store written before sizes were kept applies and seeds its running
    mean, and a damaged entry leaves that stage uncalibrated instead of failing the plan."""
    from types import SimpleNamespace

    from engine.plan.plan import StagePlan
    from engine.planner.calibration import Correction, corrected

    c = Correction(2.0, runs=2, points=((1.0, 2.0), (1.18, 4.0)))
    merged = c.with_point(1.09, 8.0, 0.5)  # within 10 % of both: only the nearest (1.18) takes it
    assert merged == ((1.0, 2.0), (1.18, pytest.approx((4.0 * 8.0) ** 0.5)))
    many = Correction()
    for k in range(9):
        many = Correction(points=many.with_point(2.0 ** k, 1.0 + k, 0.5), runs=k + 1)
    assert [x for x, _ in many.points] == [2.0 ** k for k in range(1, 9)]  # the first size dropped
    # runs that only recorded memory (a measured VAE time model) seed no time ratio
    assert Correction(memory=1.2, runs=3).with_point(0.1, 5.0, 0.5) == ((0.1, 5.0),)
    device = SimpleNamespace(kind="cpu", name="test")
    store = CalibrationStore(device, "digest", root=tmp_path)
    store.path.parent.mkdir(parents=True)
    store.path.write_text(json.dumps({"stages": {
        "denoise": {"time": 3.0, "memory": 1.0, "runs": 4, "call_s": 0.0},  # before sizes were kept
        "vae_decode": {"time": 1.0, "points": [[0.01]]}}}))  # damaged
    store = CalibrationStore(device, "digest", root=tmp_path)
    assert set(store.stages) == {"denoise"}
    stage = StagePlan("denoise", 1, 1, 0.4, calls=4)
    assert corrected(stage, store.correction("denoise")).time_s == pytest.approx(1.2)
    store.record(SimpleNamespace(stage=lambda name: stage),
                 [SimpleNamespace(name="denoise", time_s=0.4 * 12.0, call_s=None, peak_bytes=None)])
    assert store.correction("denoise").points == ((0.1, pytest.approx((3.0 * 12.0) ** 0.5)),)


def test_a_vae_time_model_measured_on_the_device_is_not_rescaled_by_runs(tiny_model, cpu, monkeypatch):
    """After `engine probe --calibrate`, the VAE stages are timed by this device's own measured
    model: `measured`, no lower bound, and a calibrating run corrects their memory but leaves
    their time (one run's single call is a noisier measurement of the same thing)."""
    import torch

    from engine.estimate.timing import AETimeModel
    from engine.planner.estimators import Estimators

    torch.manual_seed(0)
    measured = AETimeModel.calibrate(tiny_model.first_stage_model, budget_s=1.0, cache=False)
    monkeypatch.setattr(AETimeModel, "cached", classmethod(lambda cls, *args, **kwargs: measured))
    spec = load_spec("tiny")
    est = Estimators(spec, cpu)  # not the process's shared bundle: it may hold an unmeasured model
    first = make_plan(spec, 64, 64, 4, cpu, steps=2, estimators=est)
    vae_stages = {"vae_encode", "vae_decode"}
    assert {s.name for s in first.stages if s.time_is == "measured"} == vae_stages
    assert all(s.time_measured == (s.name in vae_stages) for s in Plan.from_json(first.to_json()).stages)
    generate(tiny_model, GenerateOptions(image=str(EXAMPLE_IMAGE)), first, progress=False)
    store = CalibrationStore(cpu, first.workload.config_digest)
    assert all(store.correction(n).points == () and store.correction(n).runs == 1 for n in vae_stages)
    second = make_plan(spec, 64, 64, 4, cpu, steps=2, estimators=est)
    for a, b in zip(first.stages, second.stages):
        assert (a.time_s == b.time_s) == (a.name in vae_stages)  # the others are calibrated now
    assert not any("vae_" in note for note in second.assumptions if "corrected by" in note)


def _measured_vae_model(tiny_model):
    import torch

    from engine.estimate.timing import AETimeModel

    return AETimeModel.cached(tiny_model.first_stage_model, device="cpu", dtype=torch.float32)


def test_the_first_calibrating_run_on_a_device_times_its_vae_once(tiny_model, cpu, monkeypatch, caplog,
                                                                    capsys):
    """One run's VAE call shows one ratio at one size, and the VAE's speed per FLOP changes with
    size: so the first calibrating run times the VAE at many sizes (as `engine probe --calibrate`
    does), and the plans after it time the VAE stages by that measured model."""
    import logging

    monkeypatch.setenv("ENGINE_VAE_TIMING_S", "1")
    spec, opts = load_spec("tiny"), GenerateOptions(image=str(EXAMPLE_IMAGE))
    first = make_plan(spec, 64, 64, 4, cpu, steps=2)
    assert not any(s.time_is == "measured" for s in first.stages) and _measured_vae_model(tiny_model) is None
    with caplog.at_level(logging.INFO, logger="engine.pipeline.calibration_calls"):
        assert generate(tiny_model, opts, first, progress=True).video is not None
        assert "timing the VAE on cpu once for later plans" in capsys.readouterr().err  # why it pauses
        measured = _measured_vae_model(tiny_model)
        assert measured is not None and measured.source == "measured"
        assert len(measured.meta["ladders"]["decode"]) >= 2  # sizes, not one call
        second = make_plan(spec, 64, 96, 4, cpu, steps=2)  # this process's plans see it at once
        assert {s.name for s in second.stages if s.time_is == "measured"} == {"vae_encode", "vae_decode"}
        assert "VAE times calibrated on this device" in second.assumptions
        generate(tiny_model, opts, second, progress=False)
    assert sum("timing the VAE" in r.getMessage() for r in caplog.records) == 1  # the second run did not
    assert _measured_vae_model(tiny_model) == measured


@pytest.mark.parametrize("how", ["calibrate=False", "ENGINE_VAE_TIMING_S=0", "cfg_img"])
def test_runs_that_do_not_calibrate_time_no_vae(tiny_model, cpu, monkeypatch, how):
    monkeypatch.setenv("ENGINE_VAE_TIMING_S", "0" if how.startswith("ENGINE") else "1")
    plan = make_plan(load_spec("tiny"), 64, 64, 4, cpu, steps=2)
    opts = GenerateOptions(image=str(EXAMPLE_IMAGE), cfg_img=1.5 if how == "cfg_img" else None)
    generate(tiny_model, opts, plan, progress=False, calibrate=how != "calibrate=False")
    assert _measured_vae_model(tiny_model) is None
    recorded = CalibrationStore(cpu, plan.workload.config_digest).correction("denoise")
    assert (recorded is not None) == how.startswith("ENGINE")  # the run's own ratios are kept apart


def test_vae_timing_under_a_memory_budget_never_costs_the_video(tiny_model, cpu, monkeypatch, caplog):
    """It runs within the run's budget (the CPU tracker counts its real tensors, not the fake ones
    of its shape traces); running out of memory there ends the timing, not the run."""
    from engine.runtime.budget import MemoryBudget

    monkeypatch.setenv("ENGINE_VAE_TIMING_S", "1")
    spec, opts = load_spec("tiny"), GenerateOptions(image=str(EXAMPLE_IMAGE))
    unconstrained = generate(tiny_model, opts, make_plan(spec, 64, 64, 4, cpu, steps=2), progress=False,
                             calibrate=False)
    budget = MemoryBudget(None, "cpu")
    budget.inject("vae_timing")
    with warnings.catch_warnings(record=True) as seen:  # torch warns once a process: both runs inside
        warnings.simplefilter("always")
        result = generate(tiny_model, opts, make_plan(spec, 64, 64, 4, cpu, steps=2), progress=False,
                          max_memory=budget)
        assert result.video is not None and (result.video - unconstrained.video).abs().max() == 0
        assert _measured_vae_model(tiny_model) is None and "timing the VAE failed" in caplog.text
        generate(tiny_model, opts, make_plan(spec, 64, 64, 4, cpu, steps=2), progress=False, max_memory="4GiB")
    assert _measured_vae_model(tiny_model) is not None
    assert not [w for w in seen if "FakeTensor" in str(w.message)]  # the tracker leaves fake tensors be


def test_a_bad_vae_timing_budget_is_refused_before_the_run(tiny_model, cpu, monkeypatch):
    from engine.errors import InvalidArgument

    def too_late(*args, **kwargs):
        raise AssertionError("the run started before the bad value was found")

    monkeypatch.setattr("engine.pipeline.generate._run_stages", too_late)
    monkeypatch.setenv("ENGINE_VAE_TIMING_S", "soon")
    with pytest.raises(InvalidArgument, match="ENGINE_VAE_TIMING_S.*not 'soon'"):
        generate(tiny_model, GenerateOptions(image=str(EXAMPLE_IMAGE)),
                 make_plan(load_spec("tiny"), 64, 64, 4, cpu, steps=2), progress=False)


def test_the_vae_timed_in_fp16_is_the_model_the_planner_looks_up():
    """The planner hashes its fp32 meta-device VAE; a card's run (or the probe) times the fp16 one:
    both name the same model. An fp32 VAE's key is what it was before dtypes were hashed so."""
    import torch

    from engine.estimate.laws.cache import architecture_hash
    from engine.estimate.timing.model import _cache_key
    from engine.models.autoencoder import AutoencoderKL
    from engine.planner.estimators import timed_dtype

    spec = load_spec("tiny")
    with torch.device("meta"):
        planned = AutoencoderKL(spec.vae)
    run_vae = AutoencoderKL(spec.vae).half()
    assert _cache_key(run_vae, "NVIDIA H200", torch.float16) == _cache_key(planned, "NVIDIA H200", torch.float16)
    assert _cache_key(planned, "cpu", torch.float32) != _cache_key(planned, "cpu", torch.float16)
    assert architecture_hash(planned, "x", as_dtype=torch.float32) == architecture_hash(planned, "x")
    assert [timed_dtype(p, "cuda") for p in ("fp32", "fp32-autocast", "fp16", "bf16")] == [
        torch.float32, torch.float16, torch.float16, torch.bfloat16]
    assert timed_dtype("fp32-autocast", "cpu") == torch.float32  # the CPU runs autocast in fp32


@pytest.mark.parametrize("budget,peak,top", [(100, 10, 4000), (100, 50, 2000), (100, 100, 1000), (100, 0, 4000)])
def test_the_vae_timing_climbs_past_the_run_within_the_plans_budget(budget, peak, top):
    from types import SimpleNamespace

    from engine.pipeline.calibration_calls import ladder_top

    plan = SimpleNamespace(budget_bytes=budget, stage=lambda name: SimpleNamespace(peak_bytes=peak))
    assert ladder_top(SimpleNamespace(plan=plan), 1000) == top
    assert ladder_top(SimpleNamespace(plan=None), 1000) == 4000


def test_catalogued_cards_are_never_corrected(tiny_model, cpu):
    from dataclasses import replace

    spec = load_spec("tiny")
    probed = make_plan(spec, 64, 64, 4, cpu, steps=2)
    generate(tiny_model, GenerateOptions(image=str(EXAMPLE_IMAGE)), probed, progress=False)
    assert all(s.time_is == "calibrated" for s in make_plan(spec, 64, 64, 4, cpu, steps=2).stages)
    # the same device known from a catalogue (numbers on paper): its plans are never corrected
    plan = make_plan(spec, 64, 64, 4, replace(cpu, source="catalog"), steps=2)
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
