"""Tests for ``engine.estimate``: fake tracing against real CPU allocations, scaling laws, cache.

Traced-vs-real checks compare ``TraceResult.peak_new_bytes`` with the profiler-measured peak of
new CPU allocations and accept a relative error of ``PEAK_TOLERANCE`` (PyTorch's own
``test_mem_tracker.py`` uses +/-10% against ``active_bytes.all.peak``). oneDNN is switched off in
those checks because its convolution reorders depend on the CPU's ISA; the native kernels'
workspaces are modelled exactly.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.estimate import (
    FitCache,
    MemKind,
    Tracer,
    architecture_hash,
    default_cache_dir,
    fit_scaling_law,
    measure_cpu_peak_bytes,
    trace_call,
)
from engine.estimate.laws.scaling import ScalingLaw, parse_term

PEAK_TOLERANCE = 0.10


# -- small models ------------------------------------------------------------------------------
class Attention(nn.Module):
    """GroupNorm + multi-head self-attention over h*w tokens, residual."""

    def __init__(self, c: int, heads: int = 2):
        super().__init__()
        self.norm = nn.GroupNorm(8, c)
        self.qkv = nn.Linear(c, 3 * c)
        self.out = nn.Linear(c, c)
        self.heads = heads

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = (t.reshape(b, -1, self.heads, c // self.heads).transpose(1, 2)
                   for t in self.qkv(y).chunk(3, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
        return x + self.out(o).transpose(1, 2).reshape(b, c, h, w)


class ConvNet(nn.Module):
    def __init__(self, c: int = 32):
        super().__init__()
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.norm = nn.GroupNorm(8, c)
        self.attn = Attention(c)
        self.up = nn.Conv2d(c, c, 3, padding=1)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x):
        h = self.attn(F.silu(self.norm(self.conv_in(x))))
        h = self.up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(h))


class PerFrame(nn.Module):
    """Calls the same decoder once per frame in a Python loop (a per-frame VAE decode)."""

    def __init__(self):
        super().__init__()
        self.decoder = ConvNet(16)

    def forward(self, x):
        return torch.cat([self.decoder(x[i:i + 1]) for i in range(x.shape[0])])


def _mlp():
    return nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(),
                         nn.Linear(1024, 256))


CASES = {
    "mlp": (_mlp, (64, 256)),
    "convnet_groupnorm_attention": (ConvNet, (2, 3, 24, 24)),
    "module_called_in_loop_4x": (PerFrame, (4, 3, 16, 16)),
}


@contextlib.contextmanager
def _onednn_disabled():
    # ``torch.backends.mkldnn.flags`` would also touch TF32 settings and warn; flip just this.
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(before)


# -- tracing vs real -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_traced_peak_matches_measured_cpu_peak(name):
    make, shape = CASES[name]
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(shape)
    with torch.no_grad(), _onednn_disabled():
        traced = trace_call(model, x)
        model(x)  # warm-up: lazy one-time allocations are not part of the call's cost
        real = measure_cpu_peak_bytes(lambda: model(x))
    assert real > 0
    assert abs(traced.peak_new_bytes - real) / real <= PEAK_TOLERANCE, (traced, real)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert traced.peak_by_kind[MemKind.WEIGHTS] == weights
    assert traced.peak_by_kind[MemKind.INPUTS] == x.numel() * x.element_size()
    assert traced.peak_bytes == sum(traced.peak_by_kind.values())
    assert traced.output_shapes == (tuple(model(x).shape),)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_traced_peak_matches_cuda_active_bytes():
    from engine.estimate import measure_cuda_peak_bytes

    model, x = _mlp().cuda().eval(), torch.randn(64, 256, device="cuda")
    with torch.no_grad():
        traced = trace_call(model, x, device="cuda")
        model(x)  # cuBLAS workspace and kernels are set up once, outside the measured call
        real = measure_cuda_peak_bytes(lambda: model(x))
    assert abs(traced.peak_new_bytes - real) / real <= PEAK_TOLERANCE, (traced, real)


def test_loop_peak_is_one_frame_not_all_frames():
    model, x = PerFrame().eval(), torch.empty(8, 3, 32, 32, device="meta")
    with torch.no_grad():
        looped = trace_call(model, x)
        batched = trace_call(model.decoder, x)
    # per frame: one frame's working set plus the growing list of decoded frames
    assert looped.peak_new_bytes < 0.5 * batched.peak_new_bytes
    assert looped.flops == batched.flops  # same work, different memory


def test_tracing_leaves_modules_untouched_and_restores_on_error():
    model = ConvNet(16).eval()
    before = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        trace_call(model, x, device="cuda")

        def boom(inp):
            model(inp)
            raise KeyError("inside the traced call")

        with pytest.raises(KeyError):
            trace_call(boom, x)
        after = dict([*model.named_parameters(), *model.named_buffers()])
        assert all(after[n] is t for n, t in before.items())
        assert torch._C._len_torch_dispatch_stack() == 0
        assert torch.equal(model(x), expected)


def test_views_and_inplace_ops_are_not_double_counted():
    n = 1000

    def fn(x):
        y = x * 2                 # the only new storage
        y.view(10, 100).add_(1)   # a view, updated in place
        y.unsqueeze(0).t().mul_(3)  # a view of a view
        x.add_(1)                 # in place on the input: no allocation
        return y[::2]             # a view of y

    res = trace_call(fn, torch.zeros(n))
    assert res.peak_new_bytes == n * 4
    assert res.retained_bytes == n * 4
    assert res.peak_by_kind[MemKind.INPUTS] == n * 4


def test_dropped_outputs_are_temporaries():
    # var_mean returns (var, mean); the mean is dropped before the next op: a temporary.
    res = trace_call(lambda x: torch.var_mean(x, dim=1)[0] * 1, torch.zeros(4, 256))
    assert res.peak_by_kind[MemKind.TEMPORARIES] == 16
    assert res.peak_by_kind[MemKind.ACTIVATIONS] == 16  # var, alive during ``* 1``
    assert res.peak_new_bytes == 32


def test_linear_flops_are_2mnk():
    m, k, n = 8, 64, 32
    res = trace_call(nn.Linear(k, n), torch.randn(m, k))
    assert res.flops == 2 * m * n * k
    assert res.bytes_moved > 0


def test_meta_module_of_one_gib_traces_fast_without_memory():
    with torch.device("meta"):
        big = nn.Linear(16384, 16384)  # 1 GiB of fp32 weights
    x = torch.empty(4, 16384, device="meta")
    trace_call(nn.Linear(2, 2), torch.zeros(1, 2))  # one-time import and setup costs, untimed
    start = time.perf_counter()
    res = trace_call(big, x, device="cuda")
    assert time.perf_counter() - start < 1.0
    assert res.peak_by_kind[MemKind.WEIGHTS] >= 2 ** 30
    assert res.peak_new_bytes == 4 * 16384 * 4  # the output, already a 512-byte multiple
    assert res.flops == 2 * 4 * 16384 * 16384
    assert big.weight.device.type == "meta"


def test_cuda_rounding_and_allocator_term():
    res = trace_call(lambda x: x + 1, torch.empty(10, device="meta"), device="cuda")
    assert res.peak_new_bytes == 512 and res.peak_bytes == 1024
    assert res.allocator_overhead_bytes == 2 * 2 ** 20 - 1024
    assert trace_call(lambda x: x + 1, torch.empty(10), device="cpu").peak_new_bytes == 40


def test_sdpa_backend_choice_on_cuda():
    q = torch.empty(1, 8, 1024, 64, device="meta", dtype=torch.float16)
    attn = lambda a, b, c: F.scaled_dot_product_attention(a, b, c)  # noqa: E731
    flash = trace_call(attn, q, q, q, device="cuda")
    math = trace_call(attn, q, q, q, device="cuda", sdpa_backend="math")
    scores = 8 * 1024 * 1024 * 2
    assert flash.peak_new_bytes < scores < math.peak_new_bytes
    with pytest.raises(ValueError, match="sdpa_backend"):
        trace_call(attn, q, q, q, sdpa_backend="fastest")


def test_tracer_is_reentrant_and_snapshots():
    tracer, real = Tracer(), torch.zeros(100)
    with tracer:
        with tracer:  # joins the running trace
            x = tracer.fake(real)  # tensors made inside the context would already be fakes
            y = x + 1
        assert tracer.snapshot("current")[MemKind.ACTIVATIONS] == 400
        tracer.reset_peak()
        z = y * 2
        del z  # dropped before any other op ran: a temporary
        peak = tracer.snapshot("peak")
        assert (peak[MemKind.ACTIVATIONS], peak[MemKind.TEMPORARIES]) == (400, 400)
    assert tracer.snapshot("peak")[MemKind.INPUTS] == 400
    assert tracer.result(y).output_shapes == ((100,),)
    with pytest.raises(RuntimeError, match="inside"):
        tracer.fake(torch.zeros(1))


def test_trace_call_rejects_non_callable_and_data_dependent_calls():
    with pytest.raises(TypeError, match="`fn`"):
        trace_call(3)
    with pytest.raises(RuntimeError, match="`fn` needs tensor values"):
        trace_call(lambda x: x.sum().item(), torch.zeros(3))


def test_closure_captured_module_and_tensor_are_moved_to_the_planned_device():
    model, x = nn.Linear(16, 16), torch.randn(4, 16)  # real, on CPU, captured by the lambda
    res = trace_call(lambda: model(x).relu(), device="cuda")
    assert res.device == "cuda:0"
    assert res.peak_by_kind[MemKind.WEIGHTS] == 1024 + 512  # weight, bias in 512-byte blocks
    assert res.peak_by_kind[MemKind.INPUTS] == 512
    assert json.loads(json.dumps(res.to_dict()))["peak_by_kind"]["weights"] == 1536
    assert model.weight.device.type == "cpu"


# -- scaling laws --------------------------------------------------------------------------------
def test_scaling_law_recovers_known_coefficients():
    truth = {"1": 1e6, "n*hw": 48.0, "n*hw^2": 0.02}
    law_true = ScalingLaw(tuple(truth), tuple(truth.values()))
    grid = [{"n": n, "hw": hw} for n in (1, 2, 4, 8) for hw in (64, 256, 1024)]
    samples = [(f, law_true.predict(f)) for f in grid]
    holdout = [({"n": 16, "hw": 2560}, law_true.predict({"n": 16, "hw": 2560}))]
    law = fit_scaling_law(samples, list(truth), holdout=holdout)
    for got, want in zip(law.coefficients, truth.values()):
        assert got == pytest.approx(want, rel=1e-6)
    assert law.max_rel_residual < 1e-9 and law.holdout_max_rel_residual < 1e-6
    assert law.extrapolates({"n": 16, "hw": 2560}) and not law.extrapolates(grid[0])
    again = ScalingLaw.from_dict(json.loads(json.dumps(law.to_dict())))
    assert again.predict({"n": 3, "hw": 500}) == law.predict({"n": 3, "hw": 500})
    start = time.perf_counter()
    for _ in range(1000):
        law.predict({"n": 16, "hw": 2560})
    assert (time.perf_counter() - start) / 1000 < 1e-4


def test_scaling_law_fitted_on_traces_predicts_a_larger_shape():
    block = Attention(32).eval()

    def peak(n, h, w):
        x = torch.empty(n, 32, h, w, device="meta")
        with torch.no_grad():
            return trace_call(block, x, device="cuda", sdpa_backend="math").peak_new_bytes

    # The math path materialises n*heads*hw^2 scores: the quadratic term must carry it.
    terms = ["1", "n*hw", "n*hw^2"]
    samples = [({"n": n, "hw": h * w}, peak(n, h, w)) for n in (1, 2) for h, w in
               ((16, 16), (16, 32), (32, 32))]
    held = [({"n": 4, "hw": 48 * 48}, peak(4, 48, 48))]
    law = fit_scaling_law(samples, terms, holdout=held)
    assert law.max_rel_residual < 0.02 and law.holdout_max_rel_residual < 0.02
    # scores and their softmax are alive together: 2 tensors * 2 heads * 4 bytes per hw^2
    assert law.coefficients[2] == pytest.approx(2 * 2 * 4, rel=0.05)


def test_scaling_law_input_errors():
    with pytest.raises(ValueError, match="`terms`"):
        parse_term("n+hw")
    with pytest.raises(ValueError, match="`samples`"):
        fit_scaling_law([({"n": 1}, 1.0)], ["1", "n"])
    law = ScalingLaw(("1", "n"), (1.0, 2.0))
    with pytest.raises(KeyError, match="`features`"):
        law.predict({"hw": 3})


# -- cache ---------------------------------------------------------------------------------------
def test_cache_round_trip_and_key_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    cache = FitCache()
    assert cache.dir == tmp_path / "fits"
    key = architecture_hash(_mlp(), "decode/batched")
    assert key == architecture_hash(_mlp(), "decode/batched")
    assert key != architecture_hash(_mlp(), "decode/per_frame")
    wider = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(),
                          nn.Linear(1024, 512))
    assert key != architecture_hash(wider, "decode/batched")
    assert key != architecture_hash(_mlp().half(), "decode/batched")
    strided = nn.Conv2d(3, 3, 3, stride=2)
    assert architecture_hash(nn.Conv2d(3, 3, 3)) != architecture_hash(strided)

    assert cache.get_laws(key) is None
    law = ScalingLaw(("1", "n*hw"), (3.0, 5.0), max_rel_residual=0.01)
    cache.put_laws(key, {"peak_bytes": law}, meta={"device": "cuda"})
    loaded = FitCache(tmp_path).get_laws(key)["peak_bytes"]
    assert loaded.predict({"n": 2, "hw": 10}) == law.predict({"n": 2, "hw": 10}) == 103.0


def test_cache_concurrent_writes_leave_a_complete_file(tmp_path):
    cache = FitCache(tmp_path)
    payloads = [{"writer": i, "data": list(range(2000))} for i in range(8)]
    threads = [threading.Thread(target=cache.put, args=("k", p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = cache.get("k")
    assert got in payloads
    assert [p.name for p in cache.dir.iterdir()] == ["k.json"]  # no temp files left
    (cache.dir / "bad.json").write_text("{not json")
    assert cache.get("bad") is None
    with pytest.raises(ValueError, match="`key`"):
        cache.path("../escape")


def test_cache_default_dir_is_the_platform_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("ENGINE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    import platformdirs

    assert default_cache_dir() == Path(platformdirs.user_cache_dir("engine"))
    if sys.platform.startswith("linux"):
        assert default_cache_dir() == tmp_path / "xdg" / "engine"
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"  # ENGINE_CACHE_DIR wins


def test_cache_in_an_unwritable_dir_warns_once_and_keeps_fits_in_memory(tmp_path, monkeypatch,
                                                                          caplog):
    from engine.estimate.laws import cache as cache_module

    # A directory under a regular file cannot be created by anyone, root included (tests may
    # run as root, which ignores chmod).
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(cache_module, "_warned_unwritable", False)
    monkeypatch.setattr(cache_module, "_IN_MEMORY", {})
    law = ScalingLaw(("1", "n"), (1.0, 2.0))
    with caplog.at_level(logging.WARNING, logger=cache_module.__name__):
        FitCache().put_laws("a", {"peak_bytes": law}, meta={"fit": 1})
        FitCache().put_fit("b", arch="x")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot be written" in warnings[0].getMessage()
    assert FitCache().get_laws("a")["peak_bytes"].predict({"n": 3}) == 7.0
    assert FitCache().get_fit("b").sections == {"arch": "x"}
    assert FitCache(tmp_path / "other").get_fit("b") is None  # per directory


def test_cache_entries_of_another_schema_read_as_absent(tmp_path):
    from engine.estimate.laws.cache import SCHEMA_VERSION

    cache = FitCache(tmp_path)
    cache.put_fit("k", laws={"flops": ScalingLaw(("1",), (2.0,))}, meta={"m": 1}, extra=[1])
    fit = cache.get_fit("k")
    assert fit.meta == {"m": 1} and fit.sections == {"extra": [1]} and "flops" in fit.laws
    cache.put("k", {**cache.get("k"), "schema": SCHEMA_VERSION - 1})
    assert cache.get_fit("k") is None and cache.get_laws("k") is None
