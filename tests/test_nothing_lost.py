"""Nothing the user had or computed is lost: outputs checked before any work, interrupted runs
saved and resumed to the same video, no partial video ever at ``--out``."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine.pipeline.generate import generate
from engine.pipeline.image_io import EXAMPLE_IMAGE
from engine.pipeline.options import GenerateOptions
from engine.pipeline.resume import Interrupted, RunState
from engine.pipeline.video_io import read_video

FAST = dict(image=str(EXAMPLE_IMAGE), prompt="a lake", steps=3, height=64, width=96, frames=4)
CLI = [sys.executable, "-m", "engine.cli", "generate", "--height", "64", "--width", "64", "--frames", "4"]


def test_a_stopped_or_interrupted_run_resumes_to_the_same_video(tiny_model, tmp_path):
    ref = generate(tiny_model, GenerateOptions(**FAST), progress=False)
    stopped = generate(tiny_model, GenerateOptions(**FAST), progress=False,
                       callback_on_step_end=lambda step, t, x: step == 0)
    assert stopped.stopped and stopped.video is None and stopped.state.steps_done == 1

    def interrupt(step, t, x):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match=r"stopped after 2 of 3 denoising steps \(interrupted\)") as info:
        generate(tiny_model, GenerateOptions(**FAST), progress=False, callback_on_step_end=interrupt)
    for state in (stopped.state, info.value.state):
        path = state.save(tmp_path / "run.resume.pt")
        done = generate(tiny_model, None, resume=RunState.load(path), progress=False)
        assert torch.equal(done.video, ref.video)
        assert done.denoise_steps == FAST["steps"] - state.steps_done  # no step repeated


def test_resume_refuses_another_config_and_bad_files(tiny_model, tmp_path):
    state = generate(tiny_model, GenerateOptions(**FAST), progress=False).state
    state.config = "512"
    with pytest.raises(ValueError, match=r"^`resume` was saved from config '512'"):
        generate(tiny_model, None, resume=state)
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"^`--resume` .* cannot be read"):
        RunState.load(bad, "--resume")


@pytest.mark.parametrize("out,pattern", [
    ("{tmp}", r"`--out` .* is a directory"),
    ("{tmp}/x.avi", r"`--out` .* has no supported video extension; end it in .mp4, .webm, .gif"),
    ("/proc/nope/x.mp4", r"`--out` cannot be written in '/proc/nope'"),
])
def test_outputs_are_checked_before_planning_and_loading(tmp_path, out, pattern):
    import re

    start = time.perf_counter()
    run = subprocess.run(CLI + ["--out", out.format(tmp=tmp_path), "--config", "1024"], capture_output=True,
                         text=True)
    assert run.returncode == 2 and re.search(pattern, run.stderr), run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
    assert time.perf_counter() - start < 30  # no 1024 plan, no model: just the check


@pytest.mark.slow
def test_sigterm_saves_the_run_and_resume_finishes_it(tiny_model, tmp_path):
    out = tmp_path / "v.mp4"
    args = CLI + ["--steps", "24", "--out", str(out)]
    # the CLI's runs use this process's thread count, so the in-process run below is bit-comparable
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = ""
    while "DDIM" not in seen and proc.poll() is None:
        seen += os.read(proc.stderr.fileno(), 4096).decode(errors="replace")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert not out.exists() and not list(tmp_path.glob(".partial-*"))
    saved = out.with_suffix(".resume.pt")
    assert saved.is_file() and "continue with: engine generate" in err and "Traceback" not in err
    subprocess.run(CLI + ["--resume", str(saved), "--out", str(out), "--quiet"], check=True, capture_output=True,
                   env=env)
    # the uninterrupted run, in this process: the CLI's demo model is the fixture's (tiny, seed 0)
    from engine import Pipeline
    from engine.commands.generate import DEMO_PROMPT

    whole = Pipeline(tiny_model, "cpu")(str(EXAMPLE_IMAGE), DEMO_PROMPT, height=64, width=64, frames=4,
                                        steps=24, progress=False).save(tmp_path / "whole.mp4")
    assert (read_video(out) == read_video(whole)).all()
