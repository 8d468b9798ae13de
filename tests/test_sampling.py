"""Sampler maths against closed forms, and DDIM parity with DynamiCrafter's DDIMSampler."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.sampling import (
    BUFFER_NAMES,
    CFGDenoiser,
    ddim_sigmas,
    ddim_timesteps,
    default_concat_conds,
    diffusion_buffers,
    dynamic_rescale_array,
    make_betas,
    rescale_noise_cfg,
    sample_ddim,
)

SHAPE = (2, 4, 3, 4, 4)  # [b, c, frames, h, w], a tiny video latent


def _ac(zero_snr: bool) -> np.ndarray:
    return np.cumprod(1.0 - make_betas(zero_terminal_snr=zero_snr))


def _oracle(x0: torch.Tensor, ac: np.ndarray, parameterization: str):
    """A perfect network for data x0: returns the exact eps (or v) of whatever x_t it is given."""
    def model(x, t):
        a = torch.as_tensor(ac, dtype=torch.float64)[t].view(-1, *([1] * (x.ndim - 1)))
        eps = (x.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()
        out = eps if parameterization == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0.double()
        return out.to(x.dtype)
    return model


def _toy_unet(x, t, cond):
    """Deterministic per-sample network: mixes channels, depends on t and on a dict/list cond."""
    w = torch.linspace(-0.5, 0.5, 16, dtype=x.dtype).view(4, 4)
    h = torch.einsum("ij,bj...->bi...", w, x).tanh() * (1 + t.to(x.dtype).view(-1, 1, 1, 1, 1) / 1000)
    assert cond["tag"] == "toy"  # non-tensor entries pass through batching unchanged
    return h + cond["context"][0] * 0.5 + cond["c_concat"]


# --- schedule -------------------------------------------------------------------------------------

def test_betas_endpoints_and_monotone():
    betas = make_betas()
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(0.00085, rel=1e-12) and betas[-1] == pytest.approx(0.012, rel=1e-12)
    assert np.all(np.diff(betas) > 0)
    assert np.allclose(np.sqrt(betas), np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000), rtol=0, atol=1e-15)


def test_zero_terminal_snr():
    plain, zsnr = _ac(False), _ac(True)
    assert abs(zsnr[-1]) < 1e-12
    assert zsnr[0] == pytest.approx(plain[0], abs=1e-12)
    assert np.all(np.diff(zsnr) < 0)


def test_diffusion_buffers_names_and_values():
    for param in ("eps", "v"):
        bufs = diffusion_buffers(make_betas(zero_terminal_snr=param == "v"), param)
        assert tuple(bufs) == BUFFER_NAMES
        assert all(b.dtype == torch.float32 and b.shape == (1000,) for b in bufs.values())
        assert bufs["alphas_cumprod_prev"][0] == 1.0 and bufs["posterior_variance"][0] == 0.0
        ac = torch.cumprod(1 - bufs["betas"].double(), 0)
        assert torch.allclose(bufs["alphas_cumprod"].double(), ac, atol=1e-6)
        assert torch.allclose(bufs["sqrt_alphas_cumprod"] ** 2, bufs["alphas_cumprod"], atol=1e-6)
    assert torch.all(bufs["sqrt_recip_alphas_cumprod"] == 0)
    assert torch.all(bufs["sqrt_recipm1_alphas_cumprod"] == 0)
    eps = diffusion_buffers(make_betas(), "eps")
    assert torch.allclose(eps["sqrt_recip_alphas_cumprod"], eps["alphas_cumprod"].rsqrt(), rtol=1e-6)


def test_dynamic_rescale_array():
    arr = dynamic_rescale_array(0.7)
    assert arr.shape == (1400,) and arr[0] == 1.0 and arr[399] == pytest.approx(0.7)
    assert np.all(arr[400:] == 0.7)
    assert np.allclose(np.diff(arr[:400]), (0.7 - 1.0) / 399)


def test_ddim_timesteps_spacings():
    assert ddim_timesteps(50, spacing="uniform_trailing").tolist() == list(range(19, 1000, 20))
    assert ddim_timesteps(50, spacing="uniform").tolist() == list(range(1, 1000, 20))
    quad = ddim_timesteps(50, spacing="quad")
    assert quad.dtype == np.int64 and quad[0] == 1 and np.all(np.diff(quad) >= 0) and quad[-1] == 801


def test_ddim_sigmas_closed_form():
    ac = _ac(True)
    ts = ddim_timesteps(50, spacing="uniform_trailing")
    sig, a, a_prev = ddim_sigmas(ac, ts, 1.0)
    assert a_prev[0] == ac[0] and np.array_equal(a_prev[1:], ac[ts[:-1]]) and np.array_equal(a, ac[ts])
    i = 10
    expected = np.sqrt((1 - a_prev[i]) / (1 - a[i]) * (1 - a[i] / a_prev[i]))
    assert sig[i] == pytest.approx(expected, rel=1e-12)
    assert np.all(ddim_sigmas(ac, ts, 0.0)[0] == 0)


def test_ddim_sigmas_match_dynamicrafter_float32_rounding():
    # Reference values printed by DynamiCrafter's make_ddim_sampling_parameters on the float32 buffer.
    ac32 = diffusion_buffers(make_betas(zero_terminal_snr=True), "v")["alphas_cumprod"]
    sig = ddim_sigmas(ac32, ddim_timesteps(50, spacing="uniform_trailing"), 1.0)[0].astype(np.float32)
    expected = [0.028507253155112267, 0.10053111612796783, 0.3224574029445648, 0.8781245946884155,
                0.9999570846557617]
    assert sig[[0, 1, 25, 48, 49]].tolist() == expected


# --- DDIM -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("parameterization,zero_snr,spacing", [
    ("eps", False, "uniform"), ("v", True, "uniform_trailing"), ("v", False, "quad")])
def test_oracle_recovers_x0(parameterization, zero_snr, spacing):
    ac = _ac(zero_snr)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    ts = ddim_timesteps(50, spacing=spacing)
    x_t = float(np.sqrt(ac[ts[-1]])) * x0 + float(np.sqrt(1 - ac[ts[-1]])) * eps
    seen = []
    out = sample_ddim(_oracle(x0, ac, parameterization), x_t, ts, callback=seen.append, disable=True,
                      alphas_cumprod=ac, parameterization=parameterization, eta=0.0)
    # Every pred_x0 is exact; the returned latent is x at t=0 (LVDM's last a_prev is alphas_cumprod[0]).
    assert max((s["pred_x0"] - x0).abs().max().item() for s in seen) < 1e-5
    x_at_0 = float(np.sqrt(ac[0])) * x0 + float(np.sqrt(1 - ac[0])) * eps
    assert torch.allclose(out, x_at_0, atol=1e-5)
    assert [s["i"] for s in seen] == list(range(50)) and [s["t"] for s in seen] == ts[::-1].tolist()
    assert all(s["total"] == 50 for s in seen)


def test_oracle_pred_x0_exact_with_eta_one():
    ac = _ac(True)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    seen = []
    sample_ddim(_oracle(x0, ac, "v"), torch.randn(SHAPE), ddim_timesteps(10, spacing="uniform_trailing"),
                callback=seen.append, disable=True, alphas_cumprod=ac, parameterization="v", eta=1.0,
                generator=torch.Generator().manual_seed(2))
    assert max((s["pred_x0"] - x0).abs().max().item() for s in seen) < 1e-5


def test_dynamic_rescale_ratio_and_last_step():
    ac, scale = _ac(True), dynamic_rescale_array(0.7)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    ts = ddim_timesteps(50, spacing="uniform_trailing")
    seen = []
    sample_ddim(_oracle(x0, ac, "v"), torch.randn(SHAPE), ts, callback=seen.append, disable=True,
                alphas_cumprod=ac, parameterization="v", eta=0.0, scale_arr=scale)
    by_t = {s["t"]: s["pred_x0"] for s in seen}
    for t, t_prev in [(999, 979), (419, 399), (399, 379), (59, 39)]:
        ratio = np.float32(scale[t_prev]) / np.float32(scale[t])
        assert torch.allclose(by_t[t], x0 * float(ratio), atol=1e-5), t
    # DynamiCrafter pairs the last step with itself: ratio 1, not scale_arr[0] / scale_arr[19].
    assert torch.allclose(by_t[19], x0, atol=1e-5)


def test_eta_zero_is_deterministic_and_seed_reproduces():
    ac, ts = _ac(False), ddim_timesteps(8)
    den = CFGDenoiser(_toy_unet, _cond(0.1), _cond(-0.1), scale=5.0)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))

    def run(eta, seed):
        return sample_ddim(den, x, ts, disable=True, alphas_cumprod=ac, eta=eta,
                           generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0.0, 1), run(0.0, 2))
    assert torch.equal(run(1.0, 7), run(1.0, 7))
    assert not torch.allclose(run(1.0, 7), run(1.0, 8))


def test_resume_from_checkpointed_step_matches_full_run():
    ac, ts = _ac(True), ddim_timesteps(12, spacing="uniform_trailing")
    den = CFGDenoiser(_toy_unet, _cond(0.1), _cond(-0.1), scale=5.0)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    gen, saved = torch.Generator().manual_seed(9), {}

    def save(info):
        if info["i"] == 4:
            saved.update(x=info["x"].clone(), rng=gen.get_state())
    kwargs = dict(disable=True, alphas_cumprod=ac, parameterization="v", scale_arr=dynamic_rescale_array(0.7))
    full = sample_ddim(den, x, ts, callback=save, generator=gen, **kwargs)
    resumed_gen = torch.Generator()
    resumed_gen.set_state(saved["rng"])
    resumed = sample_ddim(den, saved["x"], ts, generator=resumed_gen, start_index=5, **kwargs)
    assert torch.equal(full, resumed)


def test_zero_snr_25_trailing_steps_stay_finite():
    # DynamiCrafter's float32 sqrt(1 - a_prev - sigma^2) is sqrt(-6e-8) = NaN here; the radicand is 0.
    ac = _ac(True)
    den = CFGDenoiser(_toy_unet, _cond(0.1))
    out = sample_ddim(den, torch.randn(SHAPE), ddim_timesteps(25, spacing="uniform_trailing"), disable=True,
                      alphas_cumprod=ac, parameterization="v", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()


def test_bit_parity_with_dynamicrafter_run():
    # Golden numbers from DynamiCrafter's DDIMSampler.sample (CFG 7.5, rescale 0.7, v, zero SNR, dynamic
    # rescale 0.7, 50 trailing steps, eta 1, torch.manual_seed(1234)) on CPU with the same toy network.
    g = torch.Generator().manual_seed(0)
    shape = (1, 4, 2, 3, 3)
    x_T = torch.randn(shape, generator=g)
    c, u = torch.randn(shape, generator=g) * 0.1, torch.randn(shape, generator=g) * 0.1

    def net(x, t, cond):
        w = torch.linspace(-0.5, 0.5, 16).view(4, 4)
        return torch.einsum("ij,bj...->bi...", w, x).tanh() * (1 + t.float().view(-1, 1, 1, 1, 1) / 1000) + cond
    out = sample_ddim(CFGDenoiser(net, c, u, 7.5, guidance_rescale=0.7), x_T,
                      ddim_timesteps(50, spacing="uniform_trailing"), disable=True, alphas_cumprod=_ac(True),
                      parameterization="v", scale_arr=dynamic_rescale_array(0.7),
                      generator=torch.Generator().manual_seed(1234))
    expected = [-3.0579962730407715, -1.1112709045410156, -3.3415579795837402, -1.6213066577911377,
                -2.0224084854125977, -0.11661145091056824]
    assert torch.allclose(out.flatten()[:6], torch.tensor(expected), atol=1e-5)
    assert out.sum().item() == pytest.approx(-6.565517425537109, abs=1e-4)


# --- guidance -------------------------------------------------------------------------------------

def _cond(value: float, b: int = SHAPE[0]) -> dict:
    g = torch.Generator().manual_seed(int(abs(value) * 1000) + (value < 0))
    return {"context": [torch.randn(SHAPE, generator=g)[:b]], "c_concat": torch.randn(SHAPE, generator=g)[:b],
            "tag": "toy"}


def test_rescale_noise_cfg_endpoints():
    g = torch.Generator().manual_seed(6)
    cfg, text = torch.randn(SHAPE, generator=g) * 3, torch.randn(SHAPE, generator=g)
    assert torch.equal(rescale_noise_cfg(cfg, text, 0.0), cfg)
    out = rescale_noise_cfg(cfg, text, 1.0)
    dims = list(range(1, len(SHAPE)))
    assert torch.allclose(out.std(dim=dims), text.std(dim=dims), rtol=1e-5)
    assert torch.allclose(out / cfg, (text.std(dim=dims) / cfg.std(dim=dims)).view(-1, 1, 1, 1, 1), rtol=1e-5)


def test_cfg_scale_one_equals_cond_with_one_call():
    calls = []

    def unet(x, t, cond):
        calls.append(cond)
        return _toy_unet(x, t, cond)
    x, t = torch.randn(SHAPE), torch.full((SHAPE[0],), 500)
    for den in (CFGDenoiser(unet, _cond(0.3), _cond(-0.3), scale=1.0, uncond_image=_cond(0.5)),
                CFGDenoiser(unet, _cond(0.3), None, scale=9.0)):
        calls.clear()
        assert torch.equal(den(x, t), _toy_unet(x, t, _cond(0.3))) and len(calls) == 1
        assert den.calls_per_step == 1 and den.branches == 1


@pytest.mark.parametrize("three", [False, True])
def test_batched_equals_sequential(three):
    x, t = torch.randn(SHAPE), torch.full((SHAPE[0],), 321)
    extra = dict(uncond_image=_cond(0.5), cfg_img=1.5) if three else {}
    seq = CFGDenoiser(_toy_unet, _cond(0.3), _cond(-0.3), scale=7.5, guidance_rescale=0.7, **extra)
    bat = CFGDenoiser(_toy_unet, _cond(0.3), _cond(-0.3), scale=7.5, guidance_rescale=0.7, batched=True, **extra)
    assert (seq.calls_per_step, bat.calls_per_step, bat.branches) == (3 if three else 2, 1, 3 if three else 2)
    assert torch.allclose(seq(x, t), bat(x, t), atol=1e-5)


def test_multi_condition_formula():
    x, t = torch.randn(SHAPE), torch.full((SHAPE[0],), 700)
    c, u, ui = _cond(0.3), _cond(-0.3), _cond(0.5)
    e_c, e_u, e_ui = (_toy_unet(x, t, k) for k in (c, u, ui))
    den = CFGDenoiser(_toy_unet, c, u, scale=7.5, uncond_image=ui, cfg_img=2.0)
    assert torch.allclose(den(x, t), e_u + 2.0 * (e_ui - e_u) + 7.5 * (e_c - e_ui), atol=1e-6)
    # cfg_img None equals the text scale, which collapses to plain two-way CFG.
    same = CFGDenoiser(_toy_unet, c, u, scale=7.5, uncond_image=ui)
    assert torch.allclose(same(x, t), e_u + 7.5 * (e_c - e_u), atol=1e-5)
    rescaled = CFGDenoiser(_toy_unet, c, u, scale=7.5, uncond_image=ui, cfg_img=2.0, guidance_rescale=0.7)
    expected = rescale_noise_cfg(e_u + 2.0 * (e_ui - e_u) + 7.5 * (e_c - e_ui), e_c, 0.7)
    assert torch.allclose(rescaled(x, t), expected, atol=1e-6)


def test_default_concat_conds():
    merged = default_concat_conds([_cond(0.3, 1), _cond(-0.3, 1)])
    assert merged["context"][0].shape[0] == 2 and merged["c_concat"].shape[0] == 2
    with pytest.raises(ValueError, match="`concat_conds`"):
        default_concat_conds([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,name", [
    (lambda: ddim_timesteps(0), "`steps`"),
    (lambda: ddim_timesteps(1001), "`steps`"),
    (lambda: ddim_timesteps(50, spacing="linear"), "`timestep_spacing`"),
    (lambda: diffusion_buffers(make_betas(), "x_start"), "`parameterization`"),
    (lambda: ddim_sigmas(_ac(False), ddim_timesteps(10), -1.0), "`eta`"),
    (lambda: make_betas(linear_start=0.1, linear_end=0.01), "`linear_start`"),
    (lambda: sample_ddim(lambda x, t: x, torch.zeros(SHAPE), ddim_timesteps(10, spacing="uniform_trailing"),
                         alphas_cumprod=_ac(True), parameterization="eps"), "`parameterization`"),
    (lambda: sample_ddim(lambda x, t: x, torch.zeros(SHAPE), ddim_timesteps(10), alphas_cumprod=_ac(False),
                         start_index=11), "`start_index`"),
    (lambda: sample_ddim(lambda x, t: x, torch.zeros(SHAPE), ddim_timesteps(10)[::-1],
                         alphas_cumprod=_ac(False)), "`timesteps`"),
    (lambda: sample_ddim(lambda x, t: x, torch.zeros(SHAPE), ddim_timesteps(10), alphas_cumprod=_ac(False),
                         parameterization="x0"), "`parameterization`"),
    (lambda: CFGDenoiser(_toy_unet, {}, {}, 7.5, guidance_rescale=1.5), "`guidance_rescale`"),
    (lambda: CFGDenoiser(_toy_unet, {}, None, 7.5, uncond_image={}), "`uncond_image`"),
    (lambda: CFGDenoiser(_toy_unet, {}, {}, 7.5, cfg_img=2.0), "`cfg_img`"),
])
def test_bad_arguments_raise_value_error(call, name):
    with pytest.raises(ValueError, match=name):
        call()
