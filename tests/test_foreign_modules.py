"""The tracer on modules we did not write: real CPU allocator peaks vs fake-tensor predictions.

One fast row per cause fixed in :mod:`engine.estimate.tracing.kernels` (``group_norm``'s
channels-last output, ATen's strides of size-1 dims, oneDNN's channels-last path, CPU 3-D
convolution scratch, ``layer_norm`` of a strided input), and temporal VAEs under the autoencode
runtime (``num_frames`` per chunk). ``benchmarks/foreign_modules.py`` measures full-size rows.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from engine.estimate.tracing import measure_cpu_peak_bytes, trace_call
from engine.runtime.autoencode import (apply_autoencode_policy, decode_frames,
                                       remove_autoencode_policy)

diffusers = pytest.importorskip("diffusers")

TOL = 0.05


def _check(fn, *args, warm=None):
    """Predicted vs measured peak of new bytes of ``fn(*args)``; returns (pred, real)."""
    with torch.no_grad():
        fn(*(warm or args))  # one-time lazies (oneDNN primitives) are not the call's cost
        measure_cpu_peak_bytes(lambda: fn(*(warm or args)))
        real = measure_cpu_peak_bytes(lambda: fn(*args))
        pred = trace_call(fn, *args).peak_new_bytes
    assert abs(pred - real) <= TOL * real, (pred, real, (pred - real) / real)
    return pred, real


def _sd_vae(widths=(32, 64)):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths), layers_per_block=1,
        latent_channels=4, norm_num_groups=32).eval()


def _svd_vae(widths=(32, 64)):
    torch.manual_seed(0)
    return diffusers.AutoencoderKLTemporalDecoder(
        block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * len(widths),
        layers_per_block=1, latent_channels=4).eval()


@pytest.mark.parametrize("frames", [1, 3])
def test_diffusers_autoencoderkl_decode(frames):
    # frames > 1: the mid-block attention hands GroupNorm a channels-last tensor, which the
    # CPU kernel keeps (the meta kernel does not); frames == 1: for real that tensor is NOT
    # channels-last, because of how ATen strides its size-1 batch dim
    vae = _sd_vae()
    _check(functools.partial(decode_frames, vae, mode="batched"), torch.randn(frames, 4, 24, 24))


def test_channels_last_conv():
    conv = nn.Conv2d(32, 48, 3, padding=1).eval()
    x = torch.randn(4, 32, 24, 24).to(memory_format=torch.channels_last)
    _check(conv, x)


@pytest.mark.parametrize("batch,kernel", [(1, (3, 1, 1)), (1, (3, 3, 3)), (2, (3, 3, 3))])
def test_conv3d_scratch(batch, kernel):
    # batch 1 runs the slow im2col kernel (columns many times the output), batch 2 oneDNN
    conv = nn.Conv3d(16, 16, kernel, padding=tuple(k // 2 for k in kernel)).eval()
    _check(conv, torch.randn(batch, 16, 6, 24, 24))


def test_layer_norm_of_strided_input():
    norm = nn.LayerNorm(32)
    _check(norm, torch.randn(2, 32, 40, 32).transpose(1, 2))


def test_temporal_decoder_trace_and_chunks():
    vae = _svd_vae()
    z = torch.randn(4, 4, 16, 16)
    _check(lambda z: vae.decode(z, num_frames=4).sample, z)
    # every chunk is decoded as a clip of its own: num_frames = the chunk's frame count
    seen = []
    vae.decoder.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("num_frames", args[-1] if len(args) > 2
                                                       else None)), with_kwargs=True)
    with torch.no_grad():
        whole = vae.decode(z, num_frames=4).sample
        seen.clear()
        chunked = decode_frames(vae, z, "chunk:3")
        assert seen == [3, 1]
        apply_autoencode_policy(vae, decode="chunk:2")
        try:
            seen.clear()
            by_policy = vae.decode(z, num_frames=4).sample
            assert seen == [2, 2]
            seen.clear()
            assert torch.equal(vae.decode(z, 4).sample, by_policy)  # positional num_frames
        finally:
            remove_autoencode_policy(vae)
        assert torch.equal(vae.decode(z, num_frames=4).sample, whole)
    assert chunked.shape == whole.shape
    # the temporal convolutions see fewer frames, so chunking changes the output
    assert not torch.allclose(chunked, whole, atol=1e-5)


@pytest.mark.slow
def test_temporal_decoder_memory_model():
    from engine.estimate.vae import VAEMemoryModel

    vae = _svd_vae()
    model = VAEMemoryModel.for_vae(vae, device_type="cpu", cache=None)
    z = torch.randn(4, 4, 16, 16)
    for mode in ("batched", "chunk:2"):
        with torch.no_grad():
            decode_frames(vae, z[:2], mode)
            real = measure_cpu_peak_bytes(lambda: decode_frames(vae, z, mode))
        # two blocks: a downsample factor of 2, so 16x16 latents are 32x32 pixels
        traced = model.trace("decode", 4, 32, 32, mode).peak_new_bytes
        assert abs(traced - real) <= TOL * real, (mode, traced, real)
