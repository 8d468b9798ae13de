"""Issue 11: every bad input answered in one sentence, before any work (the classes other than
checkpoints, images and prompts, which have their own tests)."""
from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from engine.cli import main
from engine.config import load_spec
from engine.device.spec import catalog_device, parse_device, vram_device
from engine.errors import DoesNotFit, InvalidArgument, WrongType
from engine.pipeline.image_io import EXAMPLE_IMAGE
from engine.pipeline.options import GenerateOptions, default_fs, resolve_options
from engine.planner.search import make_plan

FAST = ["--steps", "1", "--frames", "2", "--height", "64", "--width", "64", "--quiet"]


def _error(capsys, argv, monkeypatch=None, *, before_planning=True) -> str:
    """Run ``engine argv`` in-process; it must exit 2 with one line; returns the message."""
    if monkeypatch is not None and before_planning:  # planning or loading would be too late
        def too_late(*a, **k):
            raise AssertionError("the bad input was found only after planning started")
        monkeypatch.setattr("engine.planner.search.make_plan", too_late)
        monkeypatch.setattr("engine.pipeline.loading.load_model", too_late)
    assert main(argv) == 2
    # a cold fit of the memory laws (once per code version) draws a progress bar: not an error line
    err = [ln for ln in re.split(r"[\r\n]", capsys.readouterr().err) if ln.strip()
           and not re.match(r"^(engine: fitting|fitting \d)", ln)]
    assert len(err) == 1 and "Traceback" not in err[0], err
    verb = argv[0]
    assert err[0].startswith(f"engine {verb}: error: ") and "`" in err[0], err[0]
    return err[0].split(": error: ", 1)[1]


# 1. silently wrong values: a user's 0 or empty value is never replaced by a default


@pytest.mark.parametrize("flag, value, message", [
    ("--steps", "0", "`--steps` 0 must be between 1 and"),
    ("--frames", "0", "`--frames` 0 must be at least 1"),
    ("--fps", "0", "`--fps` 0 must be between 1 and 240"),
    ("--fps", str(2 ** 64), "`--fps` 18446744073709551616 must be between 1 and 240"),
    ("--fs", "0", "`--fs` 0 must be between 1 and 1000"),
    ("--fs", str(2 ** 64), "`--fs` 18446744073709551616 must be between 1 and 1000"),
    ("--cfg", "0", "`--cfg` 0.0 must be positive"),
    ("--cfg", "nan", "`--cfg` nan is not a finite number"),
    ("--eta", "inf", "`--eta` inf is not a finite number"),
    ("--height", "0", "`--height` 0 must be a positive multiple"),
    ("--image", "", "`--image` is an empty path"),
    ("--max-memory", "0", "`--max-memory` '0' must be positive"),
    ("--png-dir", "", "`--png-dir` is an empty path"),
    ("--ckpt", "", "`--ckpt` is an empty path"),
    ("--seed", str(2 ** 64), "`--seed` 18446744073709551616 is too large"),
])
def test_generate_rejects_zero_and_empty(capsys, monkeypatch, tmp_path, flag, value, message):
    argv = ["generate", *FAST, "--out", str(tmp_path / "x.mp4"), flag, value]
    assert _error(capsys, argv, monkeypatch).startswith(message)


@pytest.mark.parametrize("argv, message", [
    (["--vram", ""], "`--vram` '' is not a size"),
    (["--gpu", ""], "`--gpu` '' is not in the catalogue"),
    (["--steps", "0", "--vram", "8GiB"], "`--steps` 0 must be between 1 and"),
])
def test_plan_rejects_zero_and_empty(capsys, argv, message):
    assert _error(capsys, ["plan", "--config", "tiny", *argv]).startswith(message)


def test_zero_reserve_and_empty_prompt_are_kept(capsys, monkeypatch, tmp_path):
    seen = {}

    def record(*args, **kwargs):  # the plan's inputs are the point; estimating is not needed
        seen.update(kwargs)
        raise DoesNotFit("`stop` here.")
    monkeypatch.setattr("engine.planner.search.make_plan", record)
    _error(capsys, ["generate", *FAST, "--out", str(tmp_path / "x.mp4"), "--reserve", "0", "--prompt", ""])
    assert seen["reserve_bytes"] == 0
    spec = load_spec("tiny")
    opts = resolve_options(GenerateOptions(prompt="", guidance_rescale=0.0, eta=0.0), spec)
    assert (opts.prompt, opts.guidance_rescale, opts.eta) == ("", 0.0, 0.0)


def test_negative_seed_draws_one_and_says_which(caplog):
    with caplog.at_level(logging.WARNING, logger="engine.pipeline.options"):
        opts = resolve_options(GenerateOptions(seed=-1), load_spec("tiny"), name=lambda f: f"--{f}")
    assert 0 <= opts.seed < 2 ** 31
    assert f"pass `--seed` {opts.seed} to repeat this run" in caplog.text
    assert resolve_options(opts, load_spec("tiny")).seed == opts.seed  # resolving again keeps it


def test_empty_timestep_spacing_is_not_the_default():
    with pytest.raises(InvalidArgument, match=r"^`opts.timestep_spacing` '' is unknown; use one of uniform"):
        resolve_options(GenerateOptions(timestep_spacing=""), load_spec("tiny"))


# 2. checked too late: device, checkpoint and resume paths before the config, planning or loading


@pytest.mark.parametrize("device, message", [
    ("banana", "`--device` 'banana' is not a device; use cpu, cuda or cuda:N"),
    ("mps", "`--device` 'mps' is a device type this engine does not run on"),
    ("cpu:1", "`--device` 'cpu:1' is not a device"),
])
def test_generate_device_checked_first(capsys, monkeypatch, tmp_path, device, message):
    monkeypatch.setattr("engine.config.load_spec", lambda *a: pytest.fail("config read before --device"))
    argv = ["generate", *FAST, "--out", str(tmp_path / "x.mp4"), "--device", device]
    assert _error(capsys, argv, monkeypatch).startswith(message)


def test_absent_cuda_device_checked_first(capsys, monkeypatch, tmp_path):
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    argv = ["generate", *FAST, "--out", str(tmp_path / "x.mp4"), "--device", f"cuda:{count + 3}"]
    assert _error(capsys, argv, monkeypatch).startswith(f"`--device` 'cuda:{count + 3}' is not available here")


@pytest.mark.parametrize("kind, message", [
    ("dir", "is a directory; pass the checkpoint file inside it"),
    ("missing", "does not exist; pass the path of a DynamiCrafter model.ckpt"),
    ("empty", "is empty (0 bytes)"),
])
def test_ckpt_checked_before_planning(capsys, monkeypatch, tmp_path, kind, message):
    path = {"dir": tmp_path, "missing": tmp_path / "nope.ckpt", "empty": tmp_path / "empty.ckpt"}[kind]
    if kind == "empty":
        path.touch()
    argv = ["generate", *FAST, "--out", str(tmp_path / "x.mp4"), "--ckpt", str(path)]
    assert message in _error(capsys, argv, monkeypatch)


def test_image2_and_resume_checked_before_planning(capsys, monkeypatch, tmp_path):
    argv = ["generate", *FAST, "--out", str(tmp_path / "x.mp4"), "--mode", "interp",
            "--image2", str(tmp_path / "last.png")]
    assert "`--image2`" in _error(capsys, argv, monkeypatch)
    argv = ["generate", "--out", str(tmp_path / "x.mp4"), "--resume", str(tmp_path)]
    assert _error(capsys, argv, monkeypatch).startswith(f"`--resume` {str(tmp_path)!r} is a directory")


# 3. no raw tracebacks: a device string anywhere


def test_library_generate_refuses_an_unknown_device(tiny_model):
    from engine.pipeline.generate import generate

    with pytest.raises(InvalidArgument, match=r"^`device` 'banana' is not a device"):
        generate(tiny_model, GenerateOptions(steps=1, frames=2, height=64, width=64), device="banana",
                 progress=False)
    with pytest.raises(WrongType, match=r"^`device` has type dict"):
        generate(tiny_model, GenerateOptions(steps=1, frames=2, height=64, width=64), device={"cuda": 0},
                 progress=False)


def test_parse_device_canonical_forms():
    import torch

    assert parse_device("CPU") == "cpu" and parse_device("cuda:1") == "cuda:1"
    assert parse_device(torch.device("cuda", 2)) == "cuda:2" and parse_device(torch.device("cpu")) == "cpu"


# 4. messages that blame only what the user passed


def test_make_plan_frames_zero_says_frames():
    with pytest.raises(InvalidArgument, match=r"^`frames` 0 must be >= 1; DynamiCrafter models are trained on 16\.$"):
        make_plan(load_spec("tiny"), 64, 64, 0, catalog_device("rtx-4090"))


def test_tiny_vram_blames_the_card_not_the_reserve(capsys):
    msg = _error(capsys, ["plan", "--config", "tiny", "--vram", "1MiB"])
    assert "has 1 MiB of device memory (`--vram`), no more than the default reserve" in msg
    assert not msg.startswith("`--reserve`")
    with pytest.raises(DoesNotFit, match=r"^`reserve_bytes` 2 MiB leaves nothing"):
        make_plan(load_spec("tiny"), 64, 64, 2, vram_device("1MiB"), reserve_bytes=2 ** 21)


def test_generate_infeasible_names_its_own_flags_and_host_ram(capsys, tmp_path):
    msg = _error(capsys, ["generate", *FAST, "--out", str(tmp_path / "x.mp4"), "--max-memory", "1MiB"])
    assert "host RAM" in msg and "`--max-memory`" in msg and "`--height`" in msg
    assert "--vram" not in msg and "card" not in msg and "reserve" not in msg.split(";")[1]


def test_gpu_typo_lists_the_nearest_names():
    with pytest.raises(InvalidArgument, match=r"\(nearest: rtx-4090, "):
        catalog_device("rtx4090")
    with pytest.raises(InvalidArgument, match=r"\(nearest: a100-40gb, a100-80gb"):
        catalog_device("a100")
    assert catalog_device("NVIDIA GeForce RTX 4090").slug == "rtx-4090"


def test_convert_checks_its_paths_first(capsys, tmp_path):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")
    base = ["convert", "--config", "tiny", "--ckpt", str(ckpt), "--out"]
    assert "is a directory" in _error(capsys, base + [str(tmp_path)])
    assert "is the `--ckpt` file itself" in _error(capsys, base + [str(ckpt)])
    assert "must end in .safetensors" in _error(capsys, base + [str(tmp_path / "m.pt")])


def test_convert_reads_a_legacy_checkpoint_as_its_warning_says(tmp_path, caplog, tiny_model):
    import torch

    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": tiny_model.state_dict()}, legacy, _use_new_zipfile_serialization=False)
    with caplog.at_level(logging.WARNING, logger="engine.checkpoint"):
        assert main(["convert", "--config", "tiny", "--ckpt", str(legacy), "--out",
                     str(tmp_path / "m.safetensors")]) == 0
    assert "engine convert --config CONFIG --ckpt" in caplog.text
    assert (tmp_path / "m.safetensors").stat().st_size > 0


# 5. interpolation defaults


def test_interp_and_loop_take_dynamicrafters_fs():
    s512, s256 = load_spec("512"), load_spec("256")
    assert default_fs(s512, "interp") == default_fs(s512, "loop") == 5
    assert default_fs(s512, "i2v") == 24 and default_fs(s256, "interp") == 3
    opts = resolve_options(GenerateOptions(mode="interp", image2=str(EXAMPLE_IMAGE)), s512)
    assert opts.fs == 5
    assert resolve_options(GenerateOptions(mode="loop", fs=24), s512).fs == 24  # asked for: kept


# 6. the library's own inputs


@pytest.mark.parametrize("field, value, message", [
    ("height", "512", r"^`height` '512' has type str; GenerateOptions takes an int there, e\.g\. height=320\.$"),
    ("frames", 16.0, r"^`frames` 16\.0 has type float"),
    ("cfg", "7.5", r"^`cfg` '7\.5' has type str; GenerateOptions takes a number"),
    ("steps", True, r"^`steps` True has type bool"),
    ("prompt", None, r"^`prompt` None has type NoneType; GenerateOptions takes a string"),
])
def test_generate_options_types(field, value, message):
    with pytest.raises(WrongType, match=message):
        GenerateOptions(**{field: value})


def test_generate_options_accept_numpy_scalars():
    opts = GenerateOptions(height=np.int64(320), cfg=np.float32(7.5))
    assert type(opts.height) is int and type(opts.cfg) is float


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(height="512"), WrongType, r"^`height` '512' has type str; pass an int, e\.g\. 320\.$"),
    (dict(device={"kind": "cuda"}), WrongType, r"^`device` has type dict; pass a DeviceSpec"),
    (dict(steps=0), InvalidArgument, r"^`steps` 0 must be >= 1"),
    (dict(reserve_bytes=-1), InvalidArgument, r"^`reserve_bytes` -1 must be >= 0"),
    (dict(spec={}), WrongType, r"^`spec` has type dict"),
    (dict(force=1), WrongType, r"^`force` has type int"),
])
def test_make_plan_types(kwargs, error, message):
    args = dict(spec=load_spec("tiny"), height=64, width=64, frames=2, device=catalog_device("rtx-4090"))
    with pytest.raises(error, match=message):
        make_plan(**{**args, **kwargs})


def test_probe_calibrate_config_checked_first_and_named(capsys, monkeypatch):
    monkeypatch.setattr("engine.device.probe_device", lambda *a, **k: pytest.fail("measured before --calibrate"))
    msg = _error(capsys, ["probe", "--no-measure", "--calibrate", "banana"])
    assert msg.startswith("`--calibrate` 'banana' is not a file")


def test_batch_checks_ckpt_before_planning(capsys, monkeypatch, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"id": "a", "steps": 1, "frames": 2, "height": 64, "width": 64}\n')
    monkeypatch.setattr("engine.planner.search.make_plan", lambda *a, **k: pytest.fail("planned first"))
    msg = _error(capsys, ["batch", str(jobs), "--out", str(tmp_path / "out"), "--ckpt", str(tmp_path)])
    assert msg.startswith(f"`--ckpt` {str(tmp_path)!r} is a directory")


def test_a_bad_vae_timing_budget_is_refused_before_the_config_unless_nothing_is_calibrated(
        capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_VAE_TIMING_S", "-3")
    argv = ["generate", "--config", "no-such-config", "--out", str(tmp_path / "x.mp4")]
    assert "`ENGINE_VAE_TIMING_S` must be a number of seconds" in _error(capsys, argv)
    assert "no-such-config" in _error(capsys, argv + ["--no-calibrate"])  # unread: the config's error
