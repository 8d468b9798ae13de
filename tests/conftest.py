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
