"""Issue 8, item 3: autoencoding measures its first chunk and sizes the remaining chunks from it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.config import load_spec
from engine.device import probe_cpu
from engine.pipeline.generate import generate
from engine.pipeline.image_io import EXAMPLE_IMAGE
from engine.pipeline.options import GenerateOptions
from engine.plan.aemode import AEMode
from engine.planner.search import make_plan
from engine.runtime.budget import MemoryBudget

OPTS = GenerateOptions(image=str(EXAMPLE_IMAGE), prompt="a lake", steps=2, height=64, width=64, frames=8)


@pytest.fixture(scope="module")
def plans():
    """The plan as if the planner had chosen ``decode`` itself, and the same plan with it forced."""
    def plan(decode):
        forced = make_plan(load_spec("tiny"), 64, 64, 8, probe_cpu(), steps=2, calibrate=False,
                           force=f"cfg=batched,ae_decode={decode}")
        return dataclasses.replace(forced, forced=("cfg=batched",)), forced
    return plan


def test_a_small_planned_chunk_grows_when_the_first_one_shows_room(tiny_model, plans):
    chosen, forced = plans("per-frame")
    ref = generate(tiny_model, OPTS, forced, max_memory="8GiB", progress=False)
    out = generate(tiny_model, OPTS, chosen, max_memory="8GiB", progress=False)
    assert not ref.adjustments  # forced settings are the user's: kept
    [adjustment] = out.adjustments
    assert adjustment.measured and adjustment.stage == "vae_decode" and adjustment.step == 1
    assert out.settings.ae_decode == AEMode(chunk=7)  # the seven frames left, in one call
    assert "the first 1-frame chunk needed" in adjustment.reason
    assert torch.allclose(out.video, ref.video, atol=1e-5)


def test_a_chunk_shrinks_when_memory_was_taken_after_the_first(tiny_model, plans):
    chosen, _ = plans("chunk:4")
    probe = generate(tiny_model, OPTS, chosen, max_memory="8GiB", progress=False)
    assert probe.settings.ae_decode == AEMode(chunk=4)  # room for the other four: unchanged
    calls = []

    def free_now():  # another program takes memory once the first chunk is done
        calls.append(1)
        return 1 << 40 if len(calls) <= 5 else 0

    out = generate(tiny_model, OPTS, chosen, progress=False,
                   max_memory=MemoryBudget(8 << 30, "cpu", free_reader=free_now))
    measured = [a for a in out.adjustments if a.measured]
    assert measured and measured[0].new.ae_decode.chunk < 4, out.adjustments
    assert torch.allclose(out.video, probe.video, atol=1e-5)


def test_without_a_measurement_the_plan_is_kept(tiny_model, plans):
    chosen, _ = plans("per-frame")
    out = generate(tiny_model, OPTS, chosen, progress=False)  # CPU, no cap: nothing is measured
    assert not out.adjustments and out.settings.ae_decode == AEMode(chunk=1)


def test_an_encode_is_measured_and_resumes_after_its_last_group(tiny_model):
    """The encode of every frame (DynamiCrafter's own execution) in groups: the first group is
    measured and the rest sized from it; an out-of-memory error mid-encode resumes after the last
    finished group with the same posterior draw."""
    def plan(encode):
        forced = make_plan(load_spec("tiny"), 64, 64, 8, probe_cpu(), steps=2, calibrate=False,
                           force=f"cfg=batched,encode_all_frames=yes,ae_encode={encode}")
        return forced, dataclasses.replace(forced, forced=("cfg=batched", "encode_all_frames=yes"))
    forced, chosen = plan("per-frame")
    ref = generate(tiny_model, OPTS, forced, max_memory="8GiB", progress=False)
    out = generate(tiny_model, OPTS, chosen, max_memory="8GiB", progress=False)
    [adjustment] = out.adjustments
    assert adjustment.measured and adjustment.stage == "vae_encode" and out.settings.ae_encode == AEMode(chunk=7)
    assert torch.allclose(out.video, ref.video, atol=1e-5)
    budget, groups = MemoryBudget(None, "cpu"), []
    budget.inject("vae_encode", 3)  # in the fourth one-frame group
    hook = tiny_model.first_stage_model.encoder.register_forward_hook(
        lambda module, args, out: groups.append(budget.position))  # each finished encoder call, and where
    try:
        resumed = generate(tiny_model, OPTS, forced, max_memory=budget, progress=False)
    finally:
        hook.remove()
    assert [(a.stage, a.step) for a in resumed.adjustments] == [("vae_encode", 3)]
    assert [g for g in groups if g[0] == "vae_encode"] == [("vae_encode", i) for i in range(8)]  # none twice
    assert torch.allclose(resumed.video, ref.video, atol=1e-5)
