"""The latent side of a run: encode the conditioning frame(s), decode the video, with fallbacks."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..plan.stages import stage as stage_of
from ..runtime.autoencode import decode_frames, encode_moments, sample_moments
from ..sampling.schedule import make_betas


def _in_groups(run, stage: str, total: int, done: list[torch.Tensor], call) -> None:
    """Append ``call(start, frames, mode)`` to ``done`` for each group of the frames ``done`` does
    not hold yet, as many frames a group as the stage's current mode chunks.

    Finished groups stay in ``done``, so a stage that runs out of memory resumes after the last
    finished group with a smaller mode. The run's first group is measured where the device allows
    and the remaining groups are sized from it (:meth:`engine.runtime.executor.Run.size_chunks`).
    """
    key = stage_of(stage).ae_setting
    start = sum(d.shape[0] for d in done)
    while start < total:
        mode = getattr(run.settings, key)
        group = mode.frames_per_call(total - start)
        run.budget.at(stage, len(done))
        first = not done and start + group < total and run.budget.measurable()
        with run.budget.measuring() if first else contextlib.nullcontext({}) as measured:
            done.append(call(start, group, mode))
        start += group
        if first:
            run.size_chunks(stage, group, measured, total - start)


@torch.no_grad()
def encode_remaining(model, x: torch.Tensor, run, done: list[torch.Tensor], generator) -> torch.Tensor:
    """VAE-encode frames ``x`` (the used ones) in groups (:func:`_in_groups`; ``done`` keeps the
    finished groups' posterior moments), then sample the posterior once over all frames (the same
    draw whatever the grouping) and scale it."""
    vae = model.first_stage_model
    _in_groups(run, "vae_encode", x.shape[0], done,
               lambda start, n, mode: encode_moments(vae, x[start:start + n], mode, argument="ae_encode")[0])
    # the model's own KL autoencoder: a posterior, sampled as DynamiCrafter samples it
    return sample_moments(torch.cat(done, dim=0), True, generator) * model.spec.scale_factor


def flat_latents(model, z: torch.Tensor) -> torch.Tensor:
    """[1, C, T, h, w] sampler latents -> [T, C, h, w] VAE inputs (unscaled)."""
    b, c, t, h, w = z.shape
    return (z / model.spec.scale_factor).permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


@torch.no_grad()
def decode_remaining(model, flat: torch.Tensor, run, done: list[torch.Tensor]) -> torch.Tensor:
    """Decode the frames not yet in ``done`` in groups (:func:`_in_groups`; finished frames are kept
    on the CPU); returns all frames."""
    vae = model.first_stage_model
    _in_groups(run, "vae_decode", flat.shape[0], done,
               lambda start, n, mode: decode_frames(vae, flat[start:start + n], mode).cpu())
    return torch.cat(done, dim=0)


def training_alphas_cumprod(spec) -> np.ndarray:
    """The float64 schedule: DynamiCrafter's DDIM computes its coefficients from it (the model's
    float32 buffer differs by up to one ulp, which shifts the result by ~3e-5)."""
    betas = make_betas(spec.timesteps, spec.linear_start, spec.linear_end, spec.rescale_betas_zero_snr)
    return np.cumprod(1.0 - betas)
