"""The typed plan as the contract between planner and runtime: vocabulary, JSON, the stage table,
runs that refuse a plan made for something else, and runs that leave the model as they found it."""
from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import replace

import pytest
import torch

from engine.config import load_spec
from engine.device.spec import catalog_device
from engine.errors import EngineError, InvalidArgument, PlanMismatch
from engine.pipeline.generate import generate
from engine.pipeline.image_io import EXAMPLE_IMAGE
from engine.pipeline.options import GenerateOptions
from engine.plan.aemode import AEMode
from engine.plan.plan import Plan
from engine.plan.settings import (Attention, CFGMode, Offload, Precision, Settings, parse_force,
                                  reference_settings)
from engine.plan.stages import STAGE_NAMES, STAGES
from engine.planner.search import make_plan

FAST = dict(image=str(EXAMPLE_IMAGE), prompt="a lake", steps=2, height=64, width=96, frames=4)


@pytest.fixture(scope="module")
def tiny_spec():
    return load_spec("tiny")


@pytest.fixture(scope="module")
def cpu_plan(tiny_spec):
    from engine.device import probe_cpu

    return make_plan(tiny_spec, 64, 96, 4, probe_cpu(), steps=2)


# ---------------------------------------------------------------- vocabulary
def test_the_vocabulary_imports_no_torch():
    code = ("import sys, engine.plan.settings, engine.plan.plan, engine.plan.stages, engine.errors;"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_settings_coerce_strings_and_name_bad_keys_and_values():
    s = Settings(precision="fp16", offload="block", ae_decode="chunk:4", empty_cache="no")
    assert s.precision is Precision.FP16 and s.offload is Offload.BLOCK and s.empty_cache is False
    assert s.ae_decode == AEMode(chunk=4) and s.ae_encode is None
    with pytest.raises(InvalidArgument, match=r"^`Settings` key 'ofload' is unknown; did you mean 'offload'"):
        Settings(ofload="block")
    with pytest.raises(InvalidArgument, match=r"^`settings` key 'atention' is unknown; did you mean 'attention'"):
        Settings.from_mapping({"atention": "naive"})
    with pytest.raises(InvalidArgument, match=r"^`offload` 'disk' is not an offload mode; use one of none"):
        Settings(offload="disk")
    with pytest.raises(InvalidArgument, match=r"`settings.cfg` 'twice' is not a CFG mode"):
        Settings.from_mapping({"cfg": "twice"})
    with pytest.raises(EngineError, match=r"`settings` must be a Settings or a mapping"):
        Settings.from_mapping(["fp16"])


def test_force_accepts_every_precision_the_planner_picks():
    for precision in Precision:  # fp32 is what the planner picks on the CPU
        assert parse_force(f"dtype={precision}").values == {"precision": precision}
    forced = parse_force("reference,attention=chunked:512")
    assert forced.reference and forced.values["spatial_attention"] is Attention.CHUNKED
    assert forced.values["attention_chunk"] == 512 and forced.items == ("reference", "attention=chunked:512")


def test_reference_is_a_plain_value():
    ref = reference_settings(perframe_ae=True)
    assert (ref.spatial_attention, ref.temporal_attention) == (Attention.XFORMERS, Attention.NAIVE)
    assert ref.attention == "xformers/naive" and ref.encode_all_frames and ref.autocast_weight_cache
    assert ref.cfg is CFGMode.SEQUENTIAL and ref.ae_decode == AEMode(chunk=1) and not ref.empty_cache
    assert Settings.from_mapping(ref.to_dict()) == ref


# ---------------------------------------------------------------- the Plan and its JSON
@pytest.mark.parametrize("force", [None, "reference", "offload=block,ae_decode=tile:256x256"])
def test_plan_json_round_trips_exactly(force):
    spec = load_spec("512")
    plan = make_plan(spec, 320, 512, 16, catalog_device("rtx-4060-laptop"), force=force)
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.to_json() == plan.to_json()
    assert isinstance(again.settings, Settings) and again.settings.ae_decode is not None
    assert [s.name for s in plan.stages] == list(STAGE_NAMES)


def test_plan_from_json_rejects_another_schema():
    with pytest.raises(InvalidArgument, match=r"`plan` has schema 1, this engine reads 2"):
        Plan.from_json('{"schema": 1}')


def test_stage_table_is_in_execution_order():
    assert STAGE_NAMES == ("text_encode", "image_encode", "vae_encode", "denoise", "vae_decode")
    assert {c for s in STAGES for c in s.components} == {"unet", "vae", "text_encoder", "image_encoder",
                                                          "image_proj"}


# ---------------------------------------------------------------- generate runs a Plan
def test_generate_runs_a_plan_and_reports_its_stages(tiny_model, cpu_plan):
    result = generate(tiny_model, GenerateOptions(image=FAST["image"], prompt="a lake"), cpu_plan,
                      progress=False)
    assert result.video.shape == (4, 3, 64, 96)  # size and frames from the plan
    assert [s.name for s in result.stages] == [s.name for s in cpu_plan.stages]
    assert all(s.time_s > 0 and s.peak_bytes is None for s in result.stages)  # no peak on a CPU
    assert result.settings == cpu_plan.settings and result.plan is cpu_plan
    same = generate(tiny_model, GenerateOptions(**FAST), settings=cpu_plan, progress=False)
    assert torch.equal(same.video, result.video)  # a Plan given as `settings` is run as the plan


@pytest.mark.parametrize("change,pattern", [
    (dict(height=128), r"made for 64x96 \(the run asks for 128x96\)"),
    (dict(frames=5), r"made for 4 frames \(the run asks for 5\)"),
    (dict(mode="loop"), r"made for mode i2v \(the run asks for loop\)"),
])
def test_generate_refuses_a_plan_for_another_run(tiny_model, cpu_plan, change, pattern):
    with pytest.raises(PlanMismatch, match=r"^`plan` was made for .*" + pattern.split("made for ")[1]):
        generate(tiny_model, GenerateOptions(**{**FAST, **change}), cpu_plan, progress=False)


def test_generate_refuses_a_plan_for_another_config_or_device(tiny_model, tiny_spec, cpu_plan):
    gpu_plan = make_plan(tiny_spec, 64, 96, 4, catalog_device("rtx-4060-laptop"), steps=2)
    with pytest.raises(PlanMismatch, match=r"made for a cuda device \(the run is on cpu\)"):
        generate(tiny_model, GenerateOptions(**FAST), gpu_plan, device="cpu", progress=False)
    other = replace(cpu_plan, workload=replace(cpu_plan.workload, config="256", config_digest="x"))
    with pytest.raises(PlanMismatch, match=r"made for config '256' \(the model is 'tiny'\)"):
        generate(tiny_model, GenerateOptions(**FAST), other, progress=False)


def test_generate_rejects_misspelt_settings_before_running(tiny_model):
    with pytest.raises(InvalidArgument, match=r"`settings` key 'ofload' is unknown"):
        generate(tiny_model, GenerateOptions(**FAST), settings={"ofload": "block", "attention": "naive"})
    with pytest.raises(EngineError, match=r"`opts` must be a GenerateOptions, not dict"):
        generate(tiny_model, dict(FAST))


def test_model_offload_onloads_in_stage_table_order(tiny_model, monkeypatch):
    from engine.runtime import offload as off

    loaded = []

    class Recording(off._SyncTransfer):
        def load(self, group):
            loaded.append(group.name)
            super().load(group)

    monkeypatch.setattr(off, "_make_transfer", lambda device: Recording())
    result = generate(tiny_model, GenerateOptions(**FAST), settings={"offload": "model"}, progress=False)
    expected = [c for s in STAGES for c in s.components]
    expected = [c for i, c in enumerate(expected) if i == 0 or c != expected[i - 1]]  # a component stays while consecutive stages use it
    assert loaded == ["text_encoder", "image_encoder", "image_proj", "vae", "unet", "vae"] == expected
    for record, stage in zip(result.stages, STAGES):
        assert record.name == stage.name and set(record.resident) == set(stage.components)


# ---------------------------------------------------------------- the model as it was found
def _snapshot(model):
    return [(t.data_ptr(), t.dtype, t.device) for t in list(model.parameters()) + list(model.buffers())]


def test_half_precision_run_leaves_the_model_as_it_found_it(tiny_model):
    from engine.pipeline.loading import load_model

    fresh = generate(load_model("tiny", None, seed=0), GenerateOptions(**FAST), progress=False).video
    before = _snapshot(tiny_model)
    generate(tiny_model, GenerateOptions(**FAST), settings={"precision": "fp16", "offload": "block"},
             progress=False)
    assert _snapshot(tiny_model) == before  # the very same storages back: no copy was made to restore
    assert not any(p.requires_grad for p in tiny_model.parameters())
    after = generate(tiny_model, GenerateOptions(**FAST), progress=False).video
    assert (after - fresh).abs().max() <= 1e-6


def test_reference_style_settings_restore_grad_flags_and_attention(tiny_model):
    from engine.models.transformers import CrossAttention

    backends = [m.backend for m in tiny_model.modules() if isinstance(m, CrossAttention)]
    s = replace(reference_settings(perframe_ae=False), spatial_attention="sdpa")  # no xformers on a CPU
    out = generate(tiny_model, GenerateOptions(**FAST), settings=s, progress=False)
    assert out.video.shape == (4, 3, 64, 96) and torch.isfinite(out.video).all()
    assert [m.backend for m in tiny_model.modules() if isinstance(m, CrossAttention)] == backends
    assert not any(p.requires_grad for p in tiny_model.parameters())


def test_two_threads_sharing_a_model_each_get_their_own_run(tiny_model):
    jobs = {"half": {"precision": "bf16", "offload": "model", "cfg": "batched"},
            "naive": {"attention": "naive", "ae_decode": "per-frame"}}
    alone = {k: generate(tiny_model, GenerateOptions(**FAST), settings=s, progress=False).video
             for k, s in jobs.items()}
    together, errors = {}, []

    def work(key):
        try:
            together[key] = generate(tiny_model, GenerateOptions(**FAST), settings=jobs[key], progress=False).video
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for key in jobs:
        assert torch.equal(together[key], alone[key]), key
