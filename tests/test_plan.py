"""The whole-run planner: JSON contract, feasibility on real cards, the reference, forced settings."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.config import load_spec
from engine.device.spec import GIB, catalog_device, load_catalog, nearest_catalog_device, vram_device
from engine.plan.settings import CFGMode, Offload, Precision
from engine.planner.search import make_plan

STAGES = ["text_encode", "image_encode", "vae_encode", "denoise", "vae_decode"]


def vram(size: str):
    from engine.device.spec import parse_size

    return vram_device(size, like=nearest_catalog_device(parse_size(size)))


@pytest.fixture(scope="module")
def spec1024():
    return load_spec("1024")


def test_json_contract(spec1024):
    d = make_plan(spec1024, 576, 1024, 16, catalog_device("rtx-4090-laptop")).as_dict()
    assert {"name", "total_bytes", "budget_bytes"} <= set(d["device"])
    assert {"precision", "spatial_attention", "temporal_attention", "cfg", "offload", "ae_encode",
            "ae_decode"} <= set(d["settings"])
    assert [s["name"] for s in d["stages"]] == STAGES
    for s in d["stages"]:
        assert {"name", "peak_bytes", "allocated_bytes", "time_s"} <= set(s)
        assert s["peak_bytes"] >= s["allocated_bytes"] > 0
    assert {"peak_bytes", "time_s", "fits", "planning_ms", "rejected"} <= set(d)
    assert d["peak_bytes"] == max(s["peak_bytes"] for s in d["stages"])
    json.dumps(d)


def test_1024_fits_the_laptop_card_and_8gib(spec1024):
    for device in (catalog_device("rtx-4090-laptop"), vram("8GiB")):
        plan = make_plan(spec1024, 576, 1024, 16, device)
        assert plan.fits and plan.peak_bytes <= plan.budget_bytes <= device.total_bytes - GIB
    small = make_plan(spec1024, 576, 1024, 16, vram("8GiB"))
    assert small.settings.offload is not Offload.NONE  # 2.7 GiB of fp16 UNet plus the rest do not all fit


def test_reference_does_not_fit_the_laptop_and_says_why(spec1024):
    plan = make_plan(spec1024, 576, 1024, 16, catalog_device("rtx-4090-laptop"), force="reference")
    assert not plan.fits
    assert plan.settings.precision is Precision.FP32_AUTOCAST and plan.settings.cfg is CFGMode.SEQUENTIAL
    text = plan.explain()
    assert "DOES NOT FIT" in text and "why: denoise needs" in text and "autocast_cache" in text
    # the allocator cache is never emptied in the reference: blocks carry into the decode
    assert plan.stage("vae_decode").terms["cached_blocks"] > 0
    ours = make_plan(spec1024, 576, 1024, 16, catalog_device("rtx-4090-laptop"))
    assert all(s.terms["cached_blocks"] == 0 for s in ours.stages)


@pytest.mark.parametrize("config", ["256", "512", "1024"])
def test_reference_is_predicted_on_every_card(config):
    spec = load_spec(config)
    h, w = spec.default_height_width
    for slug, device in load_catalog().items():
        plan = make_plan(spec, h, w, 16, device, force="reference")
        assert plan.peak_bytes > 0 and plan.forced[0] == "reference", slug
        assert str(plan.settings.ae_decode) == ("per-frame" if spec.perframe_ae else "batched")


def test_forced_keys_combine_with_reference(spec1024):
    plan = make_plan(spec1024, 576, 1024, 16, catalog_device("a100-80gb"), force="reference,ae_decode=batched")
    assert str(plan.settings.ae_decode) == "batched" and plan.forced == ("reference", "ae_decode=batched")
    per_frame = make_plan(spec1024, 576, 1024, 16, catalog_device("a100-80gb"), force="reference")
    assert plan.stage("vae_decode").allocated_bytes > per_frame.stage("vae_decode").allocated_bytes


def test_impossible_budget_names_the_minimum(spec1024):
    with pytest.raises(ValueError) as info:
        make_plan(spec1024, 576, 1024, 16, vram("1GiB"), reserve_bytes=0)
    msg = str(info.value)
    assert "the smallest plan needs" in msg and "GiB" in msg and msg.count(". ") == 0


def test_bad_force_is_one_sentence(spec1024):
    with pytest.raises(ValueError, match=r"`--force` item 'colour=red' is not key=value"):
        make_plan(spec1024, 576, 1024, 16, catalog_device("rtx-4090"), force="colour=red")
    with pytest.raises(ValueError, match=r"`--force dtype=fp8` is not a valid value"):
        make_plan(spec1024, 576, 1024, 16, catalog_device("rtx-4090"), force="dtype=fp8")


def test_more_memory_never_predicts_a_slower_plan():
    spec = load_spec("512")
    card = catalog_device("rtx-4090")  # the same throughput, more and more memory
    times = [make_plan(spec, 320, 512, 16, vram_device(f"{g}GiB", like=card)).time_s
             for g in (4, 6, 8, 12, 16, 24, 48)]
    assert all(b <= a * 1.01 for a, b in zip(times, times[1:])), times


def test_cli_plan_json_and_human(tmp_path):
    out = subprocess.run([sys.executable, "-m", "engine.cli", "plan", "--config", "1024", "--gpu",
                          "rtx-4090-laptop", "--json"], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert data["fits"] and data["device"]["name"] == "NVIDIA GeForce RTX 4090 Laptop GPU"
    human = subprocess.run([sys.executable, "-m", "engine.cli", "plan", "--config", "tiny", "--vram", "4GiB"],
                           capture_output=True, text=True, check=True).stdout
    assert "vae_decode" in human and "fits" in human


def test_cli_gpus_and_probe():
    gpus = subprocess.run([sys.executable, "-m", "engine.cli", "gpus"], capture_output=True, text=True,
                          check=True).stdout
    for slug in ("rtx-3060", "rtx-4060-laptop", "rtx-4090-laptop", "t4", "a10g", "l4", "a100-40gb",
                 "a100-80gb", "h100-80gb", "rtx-3090", "rtx-4070", "rtx-4090"):
        assert slug in gpus
    probe = json.loads(subprocess.run([sys.executable, "-m", "engine.cli", "probe", "--json", "--no-measure"],
                                      capture_output=True, text=True, check=True).stdout)
    assert probe["host"]["total_bytes"] > 0
    if probe["device"]["kind"] == "cpu":
        assert "no NVIDIA driver" in probe["note"]


@pytest.mark.cuda
def test_probe_measures_the_card(tmp_path, monkeypatch):
    from engine.device import probe_device

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    card = probe_device()
    assert card.kind == "cuda" and card.context_bytes > 0 and card.fp16_flops > 0
    plan = make_plan(load_spec("tiny"), 128, 128, 16, card)
    assert not any("CUDA context not measured" in a for a in plan.assumptions)


def test_cli_inspect_json_counts_without_weights():
    out = subprocess.run([sys.executable, "-m", "engine.cli", "inspect", "--config", "512", "--json"],
                         capture_output=True, text=True, check=True).stdout
    params = json.loads(out)["params"]
    assert params == {"unet": 1_438_854_980, "vae": 83_653_863, "text_encoder": 354_032_641,
                      "image_encoder": 683_800_065, "image_proj": 48_787_456}


def test_plans_use_a_vae_calibration_measured_on_this_device(private_fit_cache):
    import torch

    from engine.device import probe_device
    from engine.estimate.timing import AETimeModel
    from engine.models.autoencoder import AutoencoderKL
    from engine.planner.estimators import Estimators

    spec = load_spec("tiny")
    cpu = probe_device()
    before = make_plan(spec, 128, 128, 16, cpu, estimators=Estimators(spec, cpu))
    assert not any("calibrated" in a for a in before.assumptions)
    AETimeModel.calibrate(AutoencoderKL(spec.vae).eval(), device="cpu", dtype=torch.float32, budget_s=2)
    after = make_plan(spec, 128, 128, 16, cpu, estimators=Estimators(spec, cpu))
    assert "VAE times calibrated on this device" in after.assumptions


def test_xformers_is_planned_only_where_its_kernels_ran():
    from dataclasses import replace

    spec, card = load_spec("tiny"), catalog_device("rtx-4090")  # the rule, not the model: tiny fits fast
    assert make_plan(spec, 128, 128, 16, card).settings.attention == "sdpa"
    probed = replace(card, source="probe", xformers=True)
    assert make_plan(spec, 128, 128, 16, probed, calibrate=False).settings.attention == "xformers"
