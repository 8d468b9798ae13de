"""engine.Pipeline: images of every kind, the output's views and files, stopping, plans, threads."""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import engine
from engine import EngineError, InvalidArgument, Pipeline
from engine.pipeline.image_io import EXAMPLE_IMAGE
from engine.pipeline.options import GenerateOptions
from engine.pipeline.pipe import as_image_input
from engine.pipeline.resume import RunState
from engine.pipeline.video_io import read_metadata, read_video

SMALL = dict(height=64, width=64, frames=2, steps=2, seed=5, progress=False)
PROMPT = "a lake"


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return Pipeline(tiny_model, "cpu")


@pytest.fixture(scope="module")
def out(pipe):
    return pipe(str(EXAMPLE_IMAGE), PROMPT, **SMALL)


def _tensors(model):
    return [(t, t.data_ptr(), t.dtype, t.device) for t in list(model.parameters()) + list(model.buffers())]


def test_pipeline_is_exported_and_logging_is_quiet():
    assert engine.Pipeline is Pipeline and engine.VideoOutput.__name__ == "VideoOutput"
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("engine").handlers)
    root = Path(engine.__file__).parent
    assert (root / "py.typed").is_file()
    assert '"py.typed"' in (root.parent / "pyproject.toml").read_text()


def test_every_image_kind_reads_as_the_same_picture():
    picture = Image.open(EXAMPLE_IMAGE)
    array = np.array(picture.convert("RGB"))
    ref = as_image_input(picture, "image")
    assert ref.dtype == torch.uint8 and ref.shape == (3, picture.height, picture.width)
    for source in (array, torch.from_numpy(array).permute(2, 0, 1), array.astype(np.float32) / 255.0):
        assert torch.equal(as_image_input(source, "image"), ref)
    assert as_image_input(str(EXAMPLE_IMAGE), "image") == str(EXAMPLE_IMAGE)  # paths stay paths


def test_output_views(out, pipe):
    assert not out.stopped and out.video.shape == (2, 3, 64, 64)
    assert out.frames.dtype == np.uint8 and out.frames.shape == (2, 64, 64, 3)
    assert [im.size for im in out.images()] == [(64, 64)] * 2
    assert out.prompt == PROMPT and out.seed == 5 and out.config == "tiny"
    assert out.plan is pipe.plan(64, 64, 2, steps=2)  # planned for the device, cached per workload
    assert set(out.timings) == {"text_encode", "image_encode", "vae_encode", "denoise", "vae_decode"}


def test_numpy_image_gives_the_path_video(pipe, out):
    array = np.asarray(Image.open(EXAMPLE_IMAGE).convert("RGB"))
    assert torch.equal(pipe(array, PROMPT, **SMALL).video, out.video)


def test_save_picks_the_container_and_records_the_run(out, tmp_path):
    for name in ("v.mp4", "v.webm", "v.gif"):
        path = out.save(tmp_path / name)
        assert read_video(path).shape == (2, 64, 64, 3)
        comment = json.loads(read_metadata(path))
        assert comment["prompt"] == PROMPT and comment["seed"] == 5 and comment["config"] == "tiny"
        assert comment["plan"] == out.plan.as_dict() and comment["settings"] == out.settings.to_dict()
        sidecar = json.loads((tmp_path / (name + ".json")).read_text())
        assert sidecar["options"]["steps"] == 2 and [s["name"] for s in sidecar["stages"]][-1] == "vae_decode"
    out.save(tmp_path / "f.png")
    assert json.loads(read_metadata(tmp_path / "f_0001.png"))["seed"] == 5
    assert (tmp_path / "f.png.json").is_file()
    out.save(str(tmp_path / "frames") + "/")
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["frame_0000.png", "frame_0001.png"]
    assert (tmp_path / "frames.json").is_file()
    with pytest.raises(InvalidArgument, match=r"`path` .*\.avi.* \.mp4, \.webm, \.gif or \.png"):
        out.save(tmp_path / "v.avi")
    assert not (tmp_path / "v.avi").exists() and not (tmp_path / "v.avi.json").exists()


def test_stop_is_prompt_clean_and_resumable(pipe, out, tmp_path):
    model, before = pipe.model, _tensors(pipe.model)
    steps = []

    def stop(step, timestep, latents):
        steps.append(step)
        assert isinstance(latents, torch.Tensor) and latents.ndim == 5 and int(timestep) > 0
        return True

    stopped = pipe(str(EXAMPLE_IMAGE), PROMPT, callback_on_step_end=stop, **SMALL)
    assert stopped.stopped and stopped.frames is None and stopped.video is None and stopped.images() == []
    assert steps == [0] and stopped.state.steps_done == 1
    assert _tensors(model) == before  # weights, dtypes and places as loaded
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    with pytest.raises(InvalidArgument, match="`save` .*stopped"):
        stopped.save(tmp_path / "x.mp4")
    saved = RunState.load(stopped.state.save(tmp_path / "s.pt"))
    assert torch.equal(pipe(resume=saved, progress=False).video, out.video)


def test_bad_arguments_are_one_sentence(pipe, tiny_model):
    with pytest.raises(InvalidArgument, match="`image` is required"):
        pipe(None, PROMPT, **SMALL)
    with pytest.raises(InvalidArgument, match="`height` 65 must be a positive multiple"):
        pipe(str(EXAMPLE_IMAGE), PROMPT, **{**SMALL, "height": 65})
    with pytest.raises(InvalidArgument, match="`plan` must be an engine Plan"):
        pipe(str(EXAMPLE_IMAGE), PROMPT, plan="fast", progress=False)
    with pytest.raises(InvalidArgument, match="`opts.image` is required"):
        engine.generate(tiny_model, GenerateOptions(), progress=False)


def test_plan_for_a_capped_budget(pipe):
    plan = pipe.plan(64, 64, 2, steps=2, max_memory="3GiB")
    assert plan.device.kind == "cpu" and plan.budget_bytes <= 3 * 2**30 and plan.fits
    assert pipe.plan(64, 64, 2, steps=2, max_memory=3 * 2**30) is plan
    with pytest.raises(InvalidArgument, match="`force`"):
        pipe(str(EXAMPLE_IMAGE), PROMPT, plan=plan, force="cfg=sequential", progress=False)


def test_threads_with_different_plans_get_their_own_outputs(pipe):
    plans = [pipe.plan(64, 64, 2, steps=2, force="cfg=sequential"), pipe.plan(64, 96, 2, steps=2)]
    seeds = [11, 12]
    alone = [pipe(str(EXAMPLE_IMAGE), PROMPT, plan=p, seed=s, progress=False).video for p, s in zip(plans, seeds)]
    together: dict[int, torch.Tensor] = {}

    def work(i):
        together[i] = pipe(str(EXAMPLE_IMAGE), PROMPT, plan=plans[i], seed=seeds[i], progress=False).video

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together[0].shape == (2, 3, 64, 64) and together[1].shape == (2, 3, 64, 96)
    assert all(torch.equal(together[i], alone[i]) for i in range(2))


@pytest.mark.cuda
def test_weights_stay_on_the_card_until_release():
    pipe = Pipeline.from_config("tiny", device="cuda")
    plan = pipe.plan(64, 64, 2, steps=2, force="offload=none")
    pipe(str(EXAMPLE_IMAGE), PROMPT, plan=plan, progress=False)
    assert next(pipe.model.parameters()).device.type == "cuda"  # kept for the next call
    pipe.release()
    assert {p.device.type for p in pipe.model.parameters()} == {"cpu"}
    assert {p.dtype for p in pipe.model.parameters()} == {torch.float32}


def test_a_lazy_pipeline_plans_before_it_loads_the_weights():
    pipe = Pipeline.from_config("tiny", device="cpu", lazy=True)
    plan = pipe.plan(64, 64, 4, steps=2)
    assert pipe._model is None and "weights not loaded yet" in repr(pipe)  # planning needed no weights
    out = pipe(str(EXAMPLE_IMAGE), "a lake", plan=plan, steps=2, progress=False)
    assert out.frames.shape == (4, 64, 64, 3) and pipe._model is not None
    with pytest.raises(EngineError, match="^`ckpt` .* does not exist"):
        Pipeline.from_config("tiny", "/nope/model.ckpt", lazy=True)  # said at once, not at the first call
