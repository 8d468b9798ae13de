"""The latent side of a run: encode the conditioning frame(s), decode the video, with fallbacks."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..runtime.autoencode import decode_frames, encode_moments, sample_moments
from ..sampling.schedule import make_betas


@torch.no_grad()
@torch.no_grad()
def encode_remaining(model, x: torch.Tensor, run, done: list[torch.Tensor], generator) -> torch.Tensor:
    """VAE-encode frames ``x`` (the used ones) not yet in ``done``, a group of
    ``run.settings.ae_encode``'s chunk at a time, then sample the posterior once and scale it.

    As :func:`decode_remaining`: finished groups' moments stay in ``done``, so an encode that runs
    out of memory resumes after the last finished group; the first group is measured where the
    device allows and the others sized from it. The posterior noise is drawn once over all frames
    (the same draw whatever the grouping)."""
    vae, start, total = model.first_stage_model, sum(d.shape[0] for d in done), x.shape[0]
    while start < total:
        mode = run.settings.ae_encode
        group = min(mode.chunk or total - start, total - start)
        run.budget.at("vae_encode", len(done))
        first = not done and start + group < total and run.budget.measurable()
        with run.budget.measuring() if first else contextlib.nullcontext({}) as measured:
            done.append(encode_moments(vae, x[start:start + group], mode, argument="ae_encode")[0])
        start += group
        if first:
            run.size_chunks("vae_encode", group, measured, total - start)
    # the model's own KL autoencoder: a posterior, sampled as DynamiCrafter samples it
    return sample_moments(torch.cat(done, dim=0), True, generator) * model.spec.scale_factor


def flat_latents(model, z: torch.Tensor) -> torch.Tensor:
    """[1, C, T, h, w] sampler latents -> [T, C, h, w] VAE inputs (unscaled)."""
    b, c, t, h, w = z.shape
    return (z / model.spec.scale_factor).permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


@torch.no_grad()
def decode_remaining(model, flat: torch.Tensor, run, done: list[torch.Tensor]) -> torch.Tensor:
    """Decode the frames not yet in ``done``, one group of ``run.settings.ae_decode``'s chunk at a
    time.

    Finished groups are appended to ``done`` (on the CPU) as they complete, so a decode that runs
    out of memory resumes after the last finished group with a smaller mode; returns all frames.
    The run's first group is measured where the device allows, and the remaining groups are sized
    from that measurement (:meth:`engine.runtime.executor.Run.size_chunks`).
    """
    start, total = sum(d.shape[0] for d in done), flat.shape[0]
    while start < total:
        mode = run.settings.ae_decode
        group = min(mode.chunk or total - start, total - start)
        run.budget.at("vae_decode", len(done))
        first = not done and start + group < total and run.budget.measurable()
        with run.budget.measuring() if first else contextlib.nullcontext({}) as measured:
            done.append(decode_frames(model.first_stage_model, flat[start:start + group], mode).cpu())
        start += group
        if first:
            run.size_chunks("vae_decode", group, measured, total - start)
    return torch.cat(done, dim=0)


def training_alphas_cumprod(spec) -> np.ndarray:
    """The float64 schedule: DynamiCrafter's DDIM computes its coefficients from it (the model's
    float32 buffer differs by up to one ulp, which shifts the result by ~3e-5)."""
    betas = make_betas(spec.timesteps, spec.linear_start, spec.linear_end, spec.rescale_betas_zero_snr)
    return np.cumprod(1.0 - betas)
