"""Runs that run out of memory re-plan and continue: every stage, under an enforced budget.

Out-of-memory errors come from the budget users get (``generate(max_memory=...)``): a cap on live
CPU tensor bytes, or a fault injected at a stage and step through the same mechanism. No test
patches a model.
"""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from engine.pipeline.generate import generate
from engine.pipeline.image_io import EXAMPLE_IMAGE
from engine.pipeline.options import GenerateOptions
from engine.runtime.budget import MemoryBudget
from engine.runtime.recovery import MAX_REPLANS, OutOfMemory, smaller_mode
from engine.plan.aemode import AEMode

FAST = dict(image=str(EXAMPLE_IMAGE), prompt="a lake", steps=3, height=64, width=96, frames=4)
BATCHED = {"cfg": "batched", "ae_encode": "batched", "ae_decode": "batched"}


def run(model, settings=BATCHED, budget=None, **opts):
    return generate(model, GenerateOptions(**{**FAST, **opts}), settings=settings, max_memory=budget,
                    progress=False)


@pytest.fixture(scope="module")
def reference(tiny_model):
    return run(tiny_model)


@pytest.mark.parametrize("stage,step", [("text_encode", None), ("image_encode", None), ("vae_encode", None),
                                        ("denoise", 0), ("denoise", 2), ("vae_decode", 0)])
def test_an_out_of_memory_in_any_stage_continues_to_the_same_video(tiny_model, reference, stage, step):
    budget = MemoryBudget(None, "cpu")
    budget.inject(stage, step)
    out = run(tiny_model, budget=budget)
    assert torch.allclose(out.video, reference.video, atol=1e-4), (out.video - reference.video).abs().max()
    assert [a.stage for a in out.adjustments] == [stage] and out.adjustments[0].step == step
    assert out.denoise_steps == FAST["steps"]  # no denoising step ran twice
    assert [s.name for s in out.stages] == [s.name for s in reference.stages]
    if stage == "denoise":  # batched CFG (1 call a step) gave way to sequential (2 calls)
        assert out.settings.cfg == "sequential"
        assert out.unet_calls == step + 2 * (FAST["steps"] - step)


def _stage_peaks(model, settings):
    measured = run(model, settings, budget=MemoryBudget(1 << 40, "cpu"))
    return {s.name: s.peak_bytes for s in measured.stages}


@pytest.mark.parametrize("stage,base,smaller", [
    ("denoise", {**BATCHED, "ae_decode": "per-frame"}, {"cfg": "sequential"}),
    ("vae_decode", BATCHED, {"ae_decode": "per-frame"})])
def test_a_cap_below_the_stage_peak_is_met_by_a_smaller_setting(tiny_model, reference, stage, base, smaller):
    big, small = _stage_peaks(tiny_model, base), _stage_peaks(tiny_model, {**base, **smaller})
    assert small[stage] < big[stage] and max(small.values()) < big[stage]  # only this stage is over
    cap = (max(small.values()) + big[stage]) // 2
    out = run(tiny_model, base, budget=MemoryBudget(cap, "cpu"))
    assert torch.allclose(out.video, reference.video, atol=1e-4)
    assert out.adjustments and all(a.stage == stage for a in out.adjustments)
    assert all(s.peak_bytes <= cap for s in out.stages) and out.denoise_steps == FAST["steps"]


def test_a_cap_nothing_meets_ends_in_one_sentence(tiny_model):
    with pytest.raises(OutOfMemory, match=r"^`max_memory` 1 MiB is below the .* weights already take"):
        run(tiny_model, budget=MemoryBudget(1 << 20, "cpu"))  # refused before any work
    weights = sum(t.untyped_storage().nbytes() for t in tiny_model.state_dict().values())
    with pytest.raises(OutOfMemory) as info:
        run(tiny_model, budget=MemoryBudget(weights + (1 << 20), "cpu"))
    msg = str(info.value)
    assert re.match(r"^`\w+` ran out of memory .* after 1 re-plan", msg) and "raise `max_memory`" in msg
    assert msg.count(". ") == 0


def test_the_budget_is_a_user_argument(tiny_model, reference):
    out = generate(tiny_model, GenerateOptions(**FAST), settings=BATCHED, max_memory="1TiB", progress=False)
    assert torch.equal(out.video, reference.video) and not out.adjustments
    with pytest.raises(ValueError, match="`max_memory` 'lots' is not a size"):
        generate(tiny_model, GenerateOptions(**FAST), max_memory="lots")


def test_smaller_modes_shrink_down_to_small_tiles():
    mode, seen = AEMode(), []
    while mode is not None:
        seen.append(str(mode))
        mode = smaller_mode(mode, frames=8)
    assert seen == ["batched", "chunk:4", "chunk:2", "per-frame", "per-frame+tile:256x256",
                    "per-frame+tile:128x128"]


@hsettings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.sampled_from([(64, 64), (64, 96)]), frames=st.integers(1, 4),
       cap_mib=st.one_of(st.none(), st.integers(1, 400)),
       stage=st.sampled_from(["text_encode", "image_encode", "vae_encode", "denoise", "vae_decode"]),
       step=st.integers(0, 1))
def test_faults_and_caps_never_end_outside_documented_errors(tiny_model, size, frames, cap_mib, stage, step):
    budget = MemoryBudget(None if cap_mib is None else cap_mib << 20, "cpu")
    budget.inject(stage, step if stage in ("denoise", "vae_decode") else None)
    try:
        out = run(tiny_model, height=size[0], width=size[1], frames=frames, steps=2, budget=budget)
    except OutOfMemory as exc:
        assert str(exc).startswith("`") and str(exc).count(". ") == 0
        return
    assert out.video.shape[0] == frames and len(out.adjustments) <= MAX_REPLANS
    assert out.denoise_steps == 2


def test_memory_taken_since_planning_is_met_before_the_stage_fails(tiny_model):
    from engine.device import probe_cpu
    from engine.config import load_spec
    from engine.planner.search import make_plan

    plan = make_plan(load_spec("tiny"), 64, 96, 4, probe_cpu(), steps=3, force="cfg=batched", calibrate=False)
    calls = []

    def free_now():  # another program takes the memory once the encoders are done
        calls.append(1)
        return 1 << 40 if len(calls) <= 3 else 0

    ref = generate(tiny_model, GenerateOptions(**FAST), plan, progress=False)
    out = generate(tiny_model, GenerateOptions(**FAST), plan, progress=False,
                   max_memory=MemoryBudget(None, "cpu", free_reader=free_now))
    assert [(a.stage, a.step) for a in out.adjustments] == [("denoise", None)]
    assert "free memory fell to" in out.adjustments[0].reason and out.settings.cfg == "sequential"
    assert torch.allclose(out.video, ref.video, atol=1e-4) and out.denoise_steps == FAST["steps"]


def test_a_replan_asks_the_planner_and_skips_rungs_predicted_not_to_fit(tiny_model):
    """With a plan, one re-plan takes the decode straight to the mode predicted to fit (the fixed
    ladder would try 2-frame chunks first and re-plan twice)."""
    from engine.config import load_spec
    from engine.device import probe_cpu
    from engine.planner.search import make_plan

    plan = make_plan(load_spec("tiny"), 64, 96, 4, probe_cpu(), steps=3, calibrate=False,
                     force="cfg=sequential,ae_encode=per-frame,ae_decode=batched")
    peaks = {mode: _stage_peaks(tiny_model, {**plan.settings.to_dict(), "ae_decode": mode})
             for mode in ("chunk:2", "per-frame")}
    others = max(v for k, v in peaks["per-frame"].items() if k != "vae_decode")
    cap = (max(others, peaks["per-frame"]["vae_decode"]) + peaks["chunk:2"]["vae_decode"]) // 2
    assert peaks["per-frame"]["vae_decode"] < cap < peaks["chunk:2"]["vae_decode"]
    ref = generate(tiny_model, GenerateOptions(**FAST), plan, progress=False)
    guided = generate(tiny_model, GenerateOptions(**FAST), plan, progress=False, max_memory=MemoryBudget(cap, "cpu"))
    ladder = run(tiny_model, plan.settings.to_dict(), budget=MemoryBudget(cap, "cpu"))  # no plan: one rung a time
    assert [(a.stage, str(a.new.ae_decode)) for a in guided.adjustments] == [("vae_decode", "per-frame")]
    assert "predicted at" in guided.adjustments[0].reason
    assert [str(a.new.ae_decode) for a in ladder.adjustments] == ["chunk:2", "per-frame"]
    assert torch.allclose(guided.video, ref.video, atol=1e-4) and guided.denoise_steps == FAST["steps"]
