"""A cold plan's fits shared with a helper process: same plan, same laws, no fit traced twice."""
from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from engine.config import load_spec
from engine.device.spec import catalog_device
from engine.estimate.laws.cache import FitCache, FitHeldElsewhere, skip_held_fits
from engine.planner import fit_ahead
from engine.planner.estimators import Estimators
from engine.planner.search import _unet_calls, candidate_settings, make_plan
from engine.plan.plan import Workload
from engine.plan.settings import parse_force

needs_fork = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                                reason="the helper is forked; this platform has no fork")

def _cold_plan(cache: Path, parallel: bool, monkeypatch) -> dict:
    """A plan on an empty cache, in this process (a fresh estimator bundle: nothing in memory)."""
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(cache))
    monkeypatch.setattr(fit_ahead, "parallel_fits_allowed", lambda: parallel)
    spec, device = load_spec("tiny"), catalog_device("rtx-4090-laptop")
    d = make_plan(spec, 64, 64, 4, device, estimators=Estimators(spec, device)).as_dict()
    d.pop("planning_ms")
    return d


def _laws(cache: Path) -> dict:
    """Every fitted entry's content, without the timings that differ from run to run."""
    out = {}
    for path in sorted((cache / "fits").glob("*.json")):
        payload = json.loads(path.read_text())
        meta = payload.get("meta", {})
        for key in [k for k in meta if k.endswith("_seconds")]:
            del meta[key]
        out[path.name] = payload
    return out


@needs_fork
def test_cold_plan_with_a_helper_equals_the_sequential_one(tmp_path, monkeypatch):
    parallel, sequential = tmp_path / "parallel", tmp_path / "sequential"
    assert _cold_plan(parallel, True, monkeypatch) == _cold_plan(sequential, False, monkeypatch)
    assert _laws(parallel) == _laws(sequential)  # the same entries, the same numbers


def _request(spec, device):
    work = Workload.for_spec(spec, 64, 64, 4)
    candidates = candidate_settings(device, parse_force(None, "--force"), spec.perframe_ae)
    return work, candidates, lambda s: _unet_calls(s, work)[1]


@needs_fork
def test_the_helper_fits_what_the_plan_then_only_reads(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    # earlier tests may leave threads behind (tqdm's monitor): what is tested here is the helper's
    # work, not when one is allowed (the CLI plans before it starts any thread)
    monkeypatch.setattr(fit_ahead, "parallel_fits_allowed", lambda: True)
    spec, device = load_spec("tiny"), catalog_device("rtx-4090-laptop")
    work, candidates, batch_of = _request(spec, device)
    jobs = fit_ahead.helper_jobs(Estimators(spec, device), candidates, work, batch_of)
    names = [name for name, _ in jobs]
    # the regime the planner reaches last comes first, the VAE after the UNet
    assert names[0].startswith("UNet batch 1") and names[-1].startswith("VAE"), names
    helper = fit_ahead.start_helper(Estimators(spec, device), jobs)
    assert helper is not None
    fit_ahead.reap(helper)
    assert helper.exitcode == 0
    est = Estimators(spec, device)  # a fresh bundle: nothing in memory, the helper's entries on disk
    assert fit_ahead.helper_jobs(est, candidates, work, batch_of) == []
    make_plan(spec, 64, 64, 4, device, estimators=est)
    assert not [key for key in est.stages.fit_seconds if key.startswith("denoise")], est.stages.fit_seconds


def test_no_helper_when_switched_off(monkeypatch):
    monkeypatch.setenv("ENGINE_PARALLEL_FITS", "0")
    assert not fit_ahead.parallel_fits_allowed()
    assert fit_ahead.start_helper(None, [("job", lambda: None)]) is None


def test_a_held_fit_is_skipped_by_a_helper(tmp_path):
    cache = FitCache(tmp_path)
    with cache.fitting("k"):
        skip_held_fits(True)
        try:
            with pytest.raises(FitHeldElsewhere), cache.fitting("k"):
                pass
        finally:
            skip_held_fits(False)


def _hold_and_write(root: str, seconds: float) -> None:
    cache = FitCache(root)
    with cache.fitting("k"):
        time.sleep(seconds)
        cache.put_fit("k", meta={"by": "child"})


@needs_fork
def test_a_held_fit_is_waited_for_and_then_read(tmp_path):
    child = multiprocessing.get_context("fork").Process(target=_hold_and_write, args=(str(tmp_path), 1.0))
    child.start()
    cache = FitCache(tmp_path)
    deadline = time.monotonic() + 30
    while not (tmp_path / "fits" / "k.lock").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # the child holds the lock now
    with cache.fitting("k"):
        found = cache.get_fit("k")
    child.join()
    assert found is not None and found.meta["by"] == "child"


def _hold_family_then_store(root: str, digest: str, reference: str, seconds: float) -> None:
    """Another process fitting one VAE family: holds its lock, then stores the reference laws."""
    from engine.estimate.vae.laws import FamilyLaws

    cache = FitCache(root)
    with cache.fitting(digest):
        time.sleep(seconds)
        laws, meta = FamilyLaws.load(FitCache(reference), digest)
        laws.store(cache, digest, meta)


@needs_fork
def test_a_vae_family_held_elsewhere_is_left_for_last_and_then_read(tmp_path, monkeypatch):
    import torch

    from engine.estimate.vae import VAEMemoryModel
    from engine.estimate.vae import laws as vae_laws
    from engine.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(load_spec("tiny").vae)
    fit = {"device_type": "cuda", "dtype": torch.float16}
    reference = VAEMemoryModel.for_vae(vae, cache=FitCache(tmp_path / "reference"), index_key="index", **fit)
    digests = FitCache(tmp_path / "reference").get_fit("index").sections["vae_index"]["keys"]
    held = next(iter(digests))  # the family this process would fit first
    child = multiprocessing.get_context("fork").Process(target=_hold_family_then_store, args=(
        str(tmp_path / "shared"), digests[held], str(tmp_path / "reference"), 1.5))
    child.start()
    deadline = time.monotonic() + 30
    while not (tmp_path / "shared" / "fits" / f"{digests[held]}.lock").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    held_until = time.monotonic() + 1.4  # the child holds the lock until then at least
    fitted, real_fit = [], vae_laws.fit_families

    def recorded(twin, wanted, *args):
        fitted.append(("/".join(wanted[0]), time.monotonic()))
        return real_fit(twin, wanted, *args)
    monkeypatch.setattr(vae_laws, "fit_families", recorded)
    model = VAEMemoryModel.for_vae(vae, cache=FitCache(tmp_path / "shared"), **fit)
    child.join()
    assert [name for name, _ in fitted] == [name for name in digests if name != held]
    assert fitted[0][1] < held_until  # the other families were fitted meanwhile, not after waiting
    assert model.report[held]["source"] == "cache"  # waited for, then read: not traced twice
    for mode in ("batched", "per-frame", "tile:32x32"):
        assert model.predict("decode", 4, 64, 64, mode).as_dict() == reference.predict("decode", 4, 64, 64, mode).as_dict()
