"""``benchmarks/cuda_validate.py``: the CPU quick run fills every row; on a card, peaks are measured."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "cuda_validate.py"
KINDS = ("card", "16GiB", "8GiB", "reference")
STAGES = ("text_encode", "image_encode", "vae_encode", "denoise", "vae_decode")


def _validate(tmp_path: Path, device: str) -> dict:
    """The script's own ``main``, in this process (the same code as ``python benchmarks/cuda_validate.py``
    without a second interpreter importing torch and open_clip)."""
    spec = importlib.util.spec_from_file_location("cuda_validate", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--device", device, "--quick", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("cuda_validate_*.json")
    assert path.with_suffix(".md").is_file() and "| denoise |" in path.with_suffix(".md").read_text()
    return json.loads(path.read_text())


def _rows(data: dict) -> dict[str, dict]:
    (config,) = data["configs"]
    assert (config["config"], config["height"], config["width"], config["frames"]) == ("tiny", 64, 96, 4)
    rows = {row["plan"]: row for row in config["rows"]}
    assert set(KINDS) <= set(rows), sorted(rows)
    for kind, row in rows.items():
        assert row["error"] is None, (kind, row["error"])
        assert [s["name"] for s in row["stages"]] == list(STAGES)
        for s in row["stages"]:
            assert s["predicted_allocated_bytes"] > 0 and s["predicted_peak_bytes"] >= s["predicted_allocated_bytes"]
            assert s["predicted_time_s"] > 0 and s["measured_time_s"] > 0 and s["time_ratio"] > 0
        assert row["step"]["predicted_s"] > 0 and row["vae"]["decode"]["measured_calls"] >= 1
    assert any(row["offload"]["mode"] == "block" and sum(row["offload"]["prefetches"].values()) > 0
               for row in rows.values()), "no run exercised the block prefetch"
    assert rows["reference"]["settings"]["cfg"] == "sequential"
    assert rows["reference"]["settings"]["encode_all_frames"] is True
    return rows


@pytest.mark.slow
def test_cpu_quick_run_has_every_plan_and_stage(tmp_path):
    data = _validate(tmp_path, "cpu")
    rows = _rows(data)
    assert data["card"]["kind"] == "cpu" and data["torch"] and data["date"]
    for row in rows.values():  # no allocator statistics on the CPU
        assert all(s["measured_peak_bytes"] is None and s["peak_ratio"] is None for s in row["stages"])
    assert "not enforced" in rows["8GiB"]["enforcement"]
    assert "SDPA spatial attention" in rows["reference"]["note"]
    calibration = data["calibration"]["by_config"]["tiny"]
    assert set(calibration) == set(STAGES) and all(v["time"] > 0 for v in calibration.values())
    assert len(data["calibration"]["samples"]) == len(rows) * len(STAGES)


@pytest.mark.cuda
def test_cuda_quick_run_measures_peaks_and_prefetches_on_the_side_stream(tmp_path):
    data = _validate(tmp_path, "cuda")
    rows = _rows(data)
    assert data["card"]["kind"] == "cuda" and data["card"]["context_bytes"] is not None
    for row in rows.values():
        for s in row["stages"]:
            assert s["measured_allocated_bytes"] > 0 and s["measured_peak_bytes"] > 0, (row["plan"], s)
    assert any(row["offload"]["side_stream_prefetch"] for row in rows.values())
    assert rows["8GiB"]["enforcement"].startswith("enforced")
    by_stage = data["calibration"]["by_config"]["tiny"]
    assert all(v["peak"] > 0 and v["allocated"] > 0 for v in by_stage.values())
