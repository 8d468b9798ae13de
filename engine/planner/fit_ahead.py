"""A cold plan's fits, shared with a helper process so that two cores trace at once.

The first plan of an architecture traces its laws (seconds each, see
:mod:`engine.estimate.unet.fits` and :mod:`engine.estimate.vae`), one after the other in the
planning process. Before it searches, the planner asks :func:`start_helper` for a helper: a forked
process that walks the heavy fits from the other end (the UNet's batch regimes, last in the
planner's order, then the VAE laws) while the planning process fits in its own order (weights,
encoders, VAE, UNet). Both go through the same code and the same cache;
:meth:`engine.estimate.laws.cache.FitCache.fitting` locks each key while it is fitted. The
planning process waits for an entry the helper is fitting; the helper skips one the planning
process holds and takes its next job, so the two meet in the middle whichever is faster. The plan
is the same as a sequential one: only who traced which law differs.

No helper where it cannot help or might harm: one usable core, no ``fork`` (macOS and Windows
spawn, which would re-import torch for seconds), a process that runs other threads (forking one
can deadlock; the web server plans sequentially), or ``ENGINE_PARALLEL_FITS=0``. A helper that
fails leaves its fits to the planning process, which fits what it does not find.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
import threading
from typing import Callable

log = logging.getLogger(__name__)

Job = tuple[str, Callable[[], object]]


def parallel_fits_allowed() -> bool:
    """Whether a helper process may be forked here (see the module docstring)."""
    if os.environ.get("ENGINE_PARALLEL_FITS", "1").strip() == "0":
        return False
    if "fork" not in multiprocessing.get_all_start_methods() or threading.active_count() > 1:
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores >= 2


def helper_jobs(est, candidates, work, batch_of: Callable) -> list[Job]:
    """The missing fits the helper may take, in its order: the UNet laws of every candidate's
    batch regime, the last the planner asks for first, then the VAE laws of every precision.

    Read from the cache alone (no torch): an empty list on a warm cache. ``batch_of(settings)``
    is the UNet batch of a candidate.
    """
    unet: dict[tuple, Job | None] = {}
    vae: dict[str, Job | None] = {}
    for s in candidates:
        precision, attention, batch = s.precision.value, s.attention, batch_of(s)
        regime = (precision, attention, min(batch, 2))
        if regime not in unet:  # None: fitted already
            unet[regime] = None if est.stages.is_fitted(
                "denoise", precision=precision, attention=attention, cfg_batch=batch) else (
                f"UNet batch {batch} ({precision}, {attention})", functools.partial(
                    est.stages.estimate, "denoise", height=work.height, width=work.width,
                    frames=work.frames, precision=precision, attention=attention, cfg_batch=batch))
        dtype = est.vae_dtype(precision)
        if dtype not in vae:
            vae[dtype] = None if est.vae_fitted(precision) else (
                f"VAE ({dtype})", functools.partial(est.vae_memory, precision))
    return [job for job in (*list(unet.values())[::-1], *vae.values()) if job is not None]


def lead_job(jobs: list[Job]) -> Job | None:
    """The UNet regime the planner asks for first, which the helper reaches last (None with one
    regime or none): the planning process fits it after the encoders, before the VAE, so that the
    helper takes the VAE after its first regime and each process traces about half."""
    unet = [job for job in jobs if job[0].startswith("UNet")]
    return unet[-1] if len(unet) > 1 else None


def start_helper(est, jobs: list[Job]):
    """Fork a process that runs ``jobs`` silently; return it (to :func:`reap`), or None when no
    helper is allowed or there is nothing to fit."""
    if not jobs or not parallel_fits_allowed():
        return None
    # torch before the fork: both processes need it, and imported once it costs one core ~2 s, not two
    import torch  # noqa: F401
    try:
        helper = multiprocessing.get_context("fork").Process(
            target=_run_jobs, args=(est, jobs), name="engine-fit-helper", daemon=True)
        helper.start()
    except OSError as err:  # no processes left to fork: fit everything here
        log.info("no helper for the cold fits (%s); fitting them in this process", err)
        return None
    log.info("a helper process (pid %d) fits %s", helper.pid, ", ".join(name for name, _ in jobs))
    return helper


def reap(helper, *, stop: bool = False) -> None:
    """Wait for a helper to end: after a finished search it has fitted what the plan waited for
    and is done or about to be. ``stop`` (the search failed or was interrupted) ends it first;
    its entries are written atomically, so nothing half-written stays in the cache."""
    if helper is not None:
        if stop and helper.is_alive():
            helper.terminate()
        helper.join()


def _run_jobs(est, jobs: list[Job]) -> None:
    from ..estimate.laws.cache import FitHeldElsewhere, skip_held_fits

    # The helper's fits are the planning process's to report: no progress bar here. A fit the
    # planning process holds is skipped; a failure is left to the planning process, which fits
    # what it does not find and reports errors.
    est.silence(lambda what: contextlib.nullcontext())
    skip_held_fits()
    for name, job in jobs:
        try:
            job()
        except FitHeldElsewhere:
            continue
        except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the planner reports it
            return
        except Exception as err:  # noqa: BLE001 - see above
            log.debug("helper fit %s failed (%s); the planning process will fit it", name, err)
            return
