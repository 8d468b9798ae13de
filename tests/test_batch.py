"""``engine batch``: validation before work, the manifest, resuming, failures recorded, and a real
2-process ``accelerate launch`` on this CPU (slow)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.batch.jobs import read_jobs
from engine.batch.manifest import Manifest
from engine.cli import main
from engine.config import load_spec
from engine.pipeline.image_io import EXAMPLE_IMAGE

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"height": 64, "width": 64, "frames": 4, "steps": 2}


def _write_jobs(path: Path, jobs: list) -> Path:
    path.write_text("".join((j if isinstance(j, str) else json.dumps(j)) + "\n" for j in jobs))
    return path


def _job(job_id: str, **kw) -> dict:
    return {"id": job_id, "image": str(EXAMPLE_IMAGE), "prompt": f"prompt {job_id}", **SMALL, **kw}


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_every_bad_line_is_named_in_one_sentence(tmp_path):
    (tmp_path / "cat.png").write_bytes(EXAMPLE_IMAGE.read_bytes())
    path = _write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "ok", "image": "cat.png", **SMALL},      # relative to the jobs file's folder
        {"image": "cat.png", "heigth": 64},
        {"image": "cat.png", "height": 65},
        {"image": "cat.png", "steps": "2"},
        '{"image": "cat.png"',
        "",
        {"image": "missing.png"},
        {"id": "ok", "image": "cat.png"},
        {"id": "../x", "image": "cat.png"},
        {"prompt": "no image"},
    ])
    jobs = read_jobs(path, load_spec("tiny"))
    assert [j.id for j in jobs.valid] == ["ok"]
    assert jobs.valid[0].options.image == str(tmp_path / "cat.png")
    bad = {b.line: b.message for b in jobs.invalid}
    assert sorted(bad) == [2, 3, 4, 5, 7, 8, 9, 10]  # the blank line 6 is not a job
    assert all(m.startswith(f"jobs.jsonl line {n}: ") and m.count(". ") == 0 for n, m in bad.items())
    assert "did you mean 'height'" in bad[2]
    assert "multiple of 16" in bad[3]
    assert "must be an integer, not a string" in bad[4]
    assert "not valid JSON" in bad[5]
    assert "does not exist" in bad[7]
    assert "already used by line 1" in bad[8]
    assert "cannot name an output file" in bad[9]
    assert "`image` is missing" in bad[10]


def test_a_malformed_line_exits_2_before_any_model_is_loaded(tmp_path, monkeypatch, capsys):
    import engine.pipeline.loading

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the jobs were validated")

    monkeypatch.setattr(engine.pipeline.loading, "load_model", no_load)
    path = _write_jobs(tmp_path / "jobs.jsonl", [_job("a"), '{"id": "b", "image": ', _job("c", cfg=0)])
    rc = main(["batch", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "jobs.jsonl line 2: the line is not valid JSON" in err
    assert "jobs.jsonl line 3: `cfg` 0 must be positive" in err
    assert not (tmp_path / "out").exists()


def test_manifest_survives_a_cut_line_and_merges_idempotently(tmp_path):
    m0, m1 = Manifest(tmp_path, rank=0), Manifest(tmp_path, rank=1)
    m0.append({"id": "a", "status": "done", "finished_at": "1"})
    with open(m1.rank_path, "w") as fh:
        fh.write('{"id": "b", "stat')  # a crash in the middle of a write
    m1.append({"id": "b", "status": "done", "finished_at": "2"})
    assert [r["id"] for r in m0.records()] == ["a", "b"]
    m0.merge()
    assert not list(tmp_path.glob("manifest.rank*.jsonl"))
    (tmp_path / "manifest.rank0.jsonl").write_text((tmp_path / "manifest.jsonl").read_text())
    m0.merge()  # a merge repeated after an interruption adds nothing twice
    assert [r["id"] for r in _manifest(tmp_path)] == ["a", "b"]


def test_batch_records_failures_goes_on_and_resumes(tmp_path, monkeypatch, capsys):
    import engine.pipeline.generate as pipeline_generate

    real = pipeline_generate.generate

    def oom_for_one(model, opts, plan=None, **kw):
        if opts.prompt == "prompt oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, opts, plan, **kw)

    monkeypatch.setattr(pipeline_generate, "generate", oom_for_one)
    jobs = _write_jobs(tmp_path / "jobs.jsonl", [
        _job("a"), _job("missing", image=str(tmp_path / "nope.png")), _job("oom"), _job("b", frames=2)])
    out = tmp_path / "out"
    rc = main(["batch", str(jobs), "--out", str(out), "--skip-invalid"])
    captured = capsys.readouterr()
    assert rc == 1  # some jobs failed
    records = {r["id"]: r for r in _manifest(out)}
    assert sorted(records) == ["a", "b", "missing", "oom"]
    assert records["missing"]["status"] == "failed" and "does not exist" in records["missing"]["error"]
    assert records["oom"]["status"] == "failed" and "ran out of memory" in records["oom"]["error"]
    for job_id in ("a", "b"):
        rec = records[job_id]
        assert rec["status"] == "done" and rec["rank"] == 0 and rec["measured_peak_bytes"] is None
        assert rec["settings"]["precision"] and rec["predicted_time_s"] > 0 and rec["measured_time_s"] > 0
        assert (out / f"{job_id}.mp4").stat().st_size > 0
        sidecar = json.loads((out / f"{job_id}.json").read_text())
        assert sidecar["job"]["id"] == job_id and sidecar["settings"] == rec["settings"]
    assert "[rank 0/1] job 1/3 (a): done" in captured.err
    assert "4 jobs: 2 done, 0 skipped, 2 failed" in captured.out
    assert not list(out.glob(".partial-*")) and not list(out.glob("manifest.rank*"))

    stamp = (out / "a.mp4").stat().st_mtime_ns
    (out / "b.mp4").unlink()  # recorded as done, but its video is gone: it runs again
    rc = main(["batch", str(jobs), "--out", str(out), "--skip-invalid"])
    assert rc == 1
    assert "4 jobs: 1 done, 1 skipped, 2 failed" in capsys.readouterr().out
    assert (out / "a.mp4").stat().st_mtime_ns == stamp and (out / "b.mp4").stat().st_size > 0
    assert [r["id"] for r in _manifest(out)].count("a") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(jobs: Path, out: Path, home: Path) -> subprocess.CompletedProcess:
    # torchrun's launcher (--multi_gpu) starts the processes; `--device cpu` makes each rank ask
    # accelerate for the CPU, so they talk over gloo. (`--cpu --num_processes 2` starts only one
    # process unless mpirun is used.) HF_HOME: no user accelerate config is read.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "engine", "batch", str(jobs), "--out", str(out),
           "--device", "cpu"]
    env = {**os.environ, "HF_HOME": str(home), "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


@pytest.mark.slow
def test_two_processes_split_the_jobs_and_a_rerun_skips_them(tmp_path, capsys):
    jobs = _write_jobs(tmp_path / "jobs.jsonl", [_job(f"j{i}", seed=i) for i in range(5)])
    out = tmp_path / "out"
    first = _launch(jobs, out, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    records = _manifest(out)
    ids = [r["id"] for r in records]
    assert sorted(ids) == [f"j{i}" for i in range(5)]  # each job once: none twice, none dropped
    assert {r["rank"] for r in records} == {0, 1} and {r["world"] for r in records} == {2}
    assert all(r["status"] == "done" and (out / f"{r['id']}.mp4").stat().st_size > 0 for r in records)
    assert "[rank 1/2]" in first.stderr and "5 jobs: 5 done, 0 skipped, 0 failed" in first.stdout

    # the rerun, in this process (one rank): the two ranks' manifest says every job is done
    assert main(["batch", str(jobs), "--out", str(out), "--device", "cpu"]) == 0
    assert "5 jobs: 0 done, 5 skipped, 0 failed" in capsys.readouterr().out
    assert len(_manifest(out)) == 5
