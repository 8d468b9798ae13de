"""Random argument vectors for ``engine generate`` and ``engine plan`` on the tiny config: every run
either succeeds or exits 2 with one line on stderr and no traceback (issue 11).

Runs in-process (``engine.cli.main``) with stdout/stderr redirected; successful generate runs stay
cheap (1 step, 2 frames, 64x64 unless the field itself is being fuzzed)."""
from __future__ import annotations

import contextlib
import io
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.cli import main
from engine.pipeline.image_io import EXAMPLE_IMAGE

pytestmark = pytest.mark.slow

# A cold fit of the memory laws draws a progress bar on stderr once per machine: not an error line.
_PROGRESS = re.compile(r"^(engine: fitting|fitting \d|\s*$)")

SIZES = st.sampled_from(["0", "1", "1MiB", "64MiB", "8GiB", "-1", "8XB", "", "1e3", "nan"])
# plan's cards: a catalogued or --vram card would fit the CUDA memory laws (minutes, once per code
# version); these fail before estimating, and without them the plan is for this machine (the CPU)
CARDS = st.sampled_from(["0", "-1", "8XB", "", "nan", "1e3"])
INTS = st.one_of(st.integers(-3, 3), st.sampled_from([-2 ** 70, 2 ** 64, 999999]))
FRAMES = st.one_of(st.integers(-3, 3), st.just(2 ** 64)).map(str)  # no long video that would fit
FLOATS = st.one_of(st.sampled_from(["0", "1", "7.5", "-1", "nan", "inf", "1e400", "x"]),
                   st.floats(-10, 10).map(str))
PATHS = st.sampled_from(["", "MISSING", "DIR", "EMPTY", str(EXAMPLE_IMAGE), "x.txt"])

GENERATE_FLAGS = {
    "--steps": INTS.map(str), "--frames": FRAMES, "--height": st.sampled_from(["0", "-64", "8", "63", "64", "x"]),
    "--width": st.sampled_from(["0", "32", "64", "65"]), "--fs": INTS.map(str), "--fps": INTS.map(str),
    "--seed": INTS.map(str), "--cfg": FLOATS, "--cfg-img": FLOATS, "--eta": FLOATS,
    "--mode": st.sampled_from(["i2v", "interp", "loop", "zoom"]), "--image": PATHS, "--image2": PATHS,
    "--ckpt": PATHS, "--out": st.sampled_from(["x.mp4", "x.gif", "x.txt", "DIR", ""]),
    "--device": st.sampled_from(["cpu", "CPU", "banana", "mps", "cuda:7", "cuda", "", "cpu:3"]),
    "--max-memory": SIZES, "--reserve": SIZES, "--prompt": st.text(max_size=20),
    "--force": st.sampled_from(["", "reference", "cfg=sequential", "colour=red", "ae_decode=chunk:0",
                                "ae_decode=tile:8x8", "precision=fp8", "offload=block"]),
    "--config": st.sampled_from(["tiny", "banana", "", "DIR"]),
}
PLAN_FLAGS = {
    "--height": GENERATE_FLAGS["--height"], "--width": GENERATE_FLAGS["--width"], "--frames": INTS.map(str),
    "--steps": INTS.map(str), "--vram": CARDS, "--reserve": SIZES, "--force": GENERATE_FLAGS["--force"],
    "--gpu": st.sampled_from(["rtx4090", "", "a100", "banana"]),
}


def _path(value: str, tmp) -> str:
    return {"MISSING": str(tmp / "missing.png"), "DIR": str(tmp), "EMPTY": str(tmp / "empty.ckpt")}.get(value, value)


def _run(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as stop:  # argparse's usage errors (one line too: engine.cli._Parser)
            rc = stop.code
    return rc, err.getvalue()


def _check(rc: int, err: str, verb: str, argv) -> None:
    assert "Traceback" not in err, argv
    if rc == 0:
        return
    assert rc == 2, (argv, rc, err)
    lines = [ln for ln in re.split(r"[\r\n]", err) if not _PROGRESS.match(ln)]
    assert len(lines) == 1 and lines[0].startswith(f"engine {verb}: error: "), (argv, err)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    (d / "empty.ckpt").touch()
    return d


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picked=st.dictionaries(st.sampled_from(sorted(GENERATE_FLAGS)), st.none(), min_size=1, max_size=3),
       data=st.data())
def test_generate_argument_vectors(tmp, picked, data):
    values = {flag: data.draw(GENERATE_FLAGS[flag], label=flag) for flag in picked}
    values.setdefault("--out", "x.mp4")
    base = {"--steps": "1", "--frames": "2", "--height": "64", "--width": "64"}
    argv = ["generate", "--quiet"]
    for flag, value in {**base, **values}.items():
        if flag in ("--image", "--image2", "--ckpt", "--config"):
            value = _path(value, tmp)
        if flag == "--out" and value not in ("", "DIR"):
            value = str(tmp / value)
        argv += [f"{flag}={_path(value, tmp)}"]
    rc, err = _run(argv)
    _check(rc, err, "generate", argv)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picked=st.dictionaries(st.sampled_from(sorted(PLAN_FLAGS)), st.none(), min_size=1, max_size=3),
       data=st.data())
def test_plan_argument_vectors(tmp, picked, data):
    values = {flag: data.draw(PLAN_FLAGS[flag], label=flag) for flag in picked}
    base = {"--height": "64", "--width": "64", "--frames": "2", "--steps": "2"}
    argv = ["plan", "--config", "tiny", "--json"] + [f"{k}={v}" for k, v in {**base, **values}.items()]
    rc, err = _run(argv)
    _check(rc, err, "plan", argv)
