"""Shared fixtures: the tiny model is built once per session (random weights, CPU)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _private_calibration(tmp_path_factory):
    """Runs calibrate the next plans on their device: keep the tests' runs out of the user's store
    (and the tests independent of it)."""
    import os

    os.environ["ENGINE_CALIBRATION_DIR"] = str(tmp_path_factory.mktemp("calibration"))
    # nor time the VAE into the user's fit cache on a first calibrating run (tests that do it
    # give it a budget and a cache of their own), subprocesses included
    os.environ["ENGINE_VAE_TIMING_S"] = "0"


def pytest_configure(config):
    """Under pytest-xdist each worker gets one of the machine's cores: torch's intra-op threads
    would otherwise oversubscribe them (two workers with two threads each on two cores)."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture(scope="session")
def tiny_model():
    from engine.pipeline.loading import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_model("tiny", None, device="cpu", seed=0)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip cleanly on machines without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def private_fit_cache(tmp_path, monkeypatch):
    """A copy of this session's fits (no refitting) without a time model of the tiny VAE measured
    on this CPU, so plans time the VAE from FLOPs whatever the user's cache holds; this process's
    plans look the VAE time models up afresh before and after."""
    import shutil

    from engine.config import load_spec
    from engine.estimate.laws.cache import FitCache, default_cache_dir
    from engine.estimate.timing.model import _cache_key, device_name
    from engine.models.autoencoder import AutoencoderKL
    from engine.planner.estimators import forget_vae_time_models

    if (default_cache_dir() / "fits").is_dir():
        shutil.copytree(default_cache_dir() / "fits", tmp_path / "fit-cache" / "fits")
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "fit-cache"))
    with torch.device("meta"):
        vae = AutoencoderKL(load_spec("tiny").vae)
    FitCache().path(_cache_key(vae, device_name("cpu"), torch.float32)).unlink(missing_ok=True)
    forget_vae_time_models()
    yield FitCache()
    forget_vae_time_models()
