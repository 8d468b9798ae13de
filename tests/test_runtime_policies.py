"""Removable execution policies: offload (none/model/block), attention backends, precision.

Everything runs on CPU with the tiny config; the CUDA-only parts (side stream, events,
record_stream, pinned host copies) are checked through fakes, and ``@pytest.mark.cuda`` tests
repeat the parity checks on a real device when there is one.
"""
from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch

from engine.models.layers import GroupNorm32
from engine.models.transformers import CrossAttention, SpatialTransformer, TemporalTransformer
from engine.runtime import attention as attn_mod
from engine.runtime import offload as off
from engine.runtime.attention import (resolve_attention, restore_attention_backend,
                                      set_attention_backend, xformers_kernels_work)
from engine.runtime.offload import (OffloadMode, apply_offload, get_offload, offload_host_bytes,
                                    offload_units, reapply_offload, remove_offload)
from engine.runtime.precision import (apply_precision, precision_context, restore_precision,
                                      weight_dtype)

FRAMES, LATENT = 4, 8


@pytest.fixture(scope="module")
def model():
    """A private tiny model: these tests install and remove policies on it."""
    from engine.pipeline.loading import load_model

    return load_model("tiny", None, seed=0)


@pytest.fixture(scope="module")
def inputs(model):
    g = torch.Generator().manual_seed(1)
    ctx_dim = model.spec.unet.context_dim
    return (torch.randn(1, 4, FRAMES, LATENT, LATENT, generator=g), torch.tensor([500]),
            torch.randn(1, 4, FRAMES, LATENT, LATENT, generator=g),
            torch.randn(1, 77 + 16 * FRAMES, ctx_dim, generator=g), torch.tensor([10]))


@torch.no_grad()
def unet_out(model, inputs, device="cpu"):
    return model.apply_model(*(t.to(device) for t in inputs)).cpu()


def pristine(model) -> bool:
    """No hook, no instance ``forward`` and no policy attribute left anywhere."""
    return (get_offload(model) is None and
            not any(hasattr(m, "_hf_hook") or "forward" in m.__dict__ for m in model.modules()))


def snapshot(model):
    return {n: (t.device, t.dtype, t.data_ptr()) for n, t in model.state_dict(keep_vars=True).items()}


# ---------------------------------------------------------------- offload
@pytest.mark.parametrize("mode", ["none", "model", "block"])
def test_offload_modes_match_and_remove_is_exact(model, inputs, mode):
    before, where = unet_out(model, inputs), snapshot(model)
    handle = apply_offload(model, mode, device="cpu")
    assert handle.config.mode is OffloadMode(mode)
    with handle.onload("unet"):
        first, second = unet_out(model, inputs), unet_out(model, inputs)  # record, then prefetch
    torch.testing.assert_close(first, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(second, before, atol=1e-5, rtol=0)
    if mode == "block":
        assert handle.execution_order[:3] == ("unet.time_embed", "unet.fps_embedding", "unet.input_blocks.0")
        assert handle.execution_order[-1] == "unet.out"
    assert remove_offload(model) == handle.config
    assert pristine(model) and snapshot(model) == where
    assert torch.equal(unet_out(model, inputs), before)


def test_model_mode_stages_swap_components(model, inputs):
    handle = apply_offload(model, "model", device="cpu")
    try:
        with handle.onload("text_encoder", "image_encoder", "image_proj"):
            assert handle.is_resident("text_encoder") and not handle.is_resident("unet")
        with handle.onload("vae"):
            assert handle.is_resident("vae") and not handle.is_resident("text_encoder")
        unet_out(model, inputs)  # no onload("unet"): the safety-net hook loads it, frees the VAE
        assert handle.is_resident("unet") and not handle.is_resident("vae")
        with pytest.raises(ValueError, match="`names`"):
            with handle.onload("transformer"):
                pass
        handle.offload_all()
        assert not any(handle.is_resident(n) for n in handle.names)
    finally:
        remove_offload(model)
    assert pristine(model)


@torch.no_grad()
def test_safety_net_hooks_onload_components_for_callers_that_never_call_onload(model, inputs):
    """Code embedding one module calls no onload(): the hooks on each component (and the VAE's
    encoder/decoder) load it on first use, so calls under offload equal the plain ones exactly."""
    z = torch.randn(2, 4, LATENT, LATENT)
    reference = (model.first_stage_model.decode(z), unet_out(model, inputs))
    for mode in ("model", "block"):
        handle = apply_offload(model, mode, device="cpu")
        try:
            assert torch.equal(model.first_stage_model.decode(z), reference[0])
            assert torch.equal(unet_out(model, inputs), reference[1])
            assert handle.is_resident("unet") or mode == "block"  # used last
        finally:
            remove_offload(model)
    assert pristine(model)


class RecordingTransfer(off._SyncTransfer):
    """A CUDA-like transfer on CPU: prefetches stay 'loading' until waited on; logs every call."""

    def __init__(self, log):
        self.log = log

    def prefetch(self, group):
        self.log.append(("prefetch", group.name))
        group.onload()
        group.state = group.LOADING

    def wait(self, group):
        self.log.append(("wait", group.name))
        super().wait(group)

    def load(self, group):
        self.log.append(("load", group.name))
        super().load(group)

    def release(self, group):
        self.log.append(("release", group.name))
        super().release(group)


def _log_compute(handle, log):
    """Pre-hooks on each unit's first child: they fire after the unit's offload hook, when it computes."""
    removers = []
    for group in handle.blocks["unet"].groups:
        unit = handle.model.get_submodule("model.diffusion_model." + group.name.split(".", 1)[1])
        first = next(iter(unit.children()))
        removers.append(first.register_forward_pre_hook(
            lambda *_, name=group.name: log.append(("compute", name))))
    return removers


def test_block_prefetch_of_next_unit_is_issued_before_current_computes(model, inputs, monkeypatch):
    log = []
    monkeypatch.setattr(off, "_make_transfer", lambda device: RecordingTransfer(log))
    before = unet_out(model, inputs)
    handle = apply_offload(model, "block", device="cpu")
    removers = _log_compute(handle, log)
    try:
        unet_out(model, inputs)  # first pass: records the order, loads on demand
        assert not any(kind == "prefetch" for kind, _ in log)
        log.clear()
        torch.testing.assert_close(unet_out(model, inputs), before, atol=1e-5, rtol=0)
    finally:
        for r in removers:
            r.remove()
        remove_offload(model)
    order = handle.execution_order
    at = {event: i for i, event in enumerate(log)}
    assert log[0] == ("prefetch", order[0])  # the UNet's own hook starts the pipeline
    for cur, nxt in zip(order, order[1:]):
        assert at[("wait", cur)] < at[("prefetch", nxt)] < at[("compute", cur)] < at[("release", cur)]
    assert not any(kind == "load" for kind, _ in log)  # everything arrived by prefetch
    on_device, peak = set(), 0
    for kind, name in log:  # never more than the current and the next unit on the device
        on_device.add(name) if kind == "prefetch" else on_device.discard(name) if kind == "release" else None
        peak = max(peak, len(on_device))
    assert peak == 2
    assert pristine(model)


class FakeStream:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def wait_event(self, event):
        self.log.append(("wait_event", self.name, event.group))

    def synchronize(self):
        self.log.append(("synchronize", self.name))


class FakeEvent:
    def __init__(self, log):
        self.log, self.group = log, None

    def record(self, stream):
        self.log.append(("record", stream.name))


def test_stream_transfer_orders_copies_events_and_record_stream(model, inputs, monkeypatch):
    """The real ``_StreamTransfer`` code path, with torch.cuda's stream API replaced by fakes."""
    log, state = [], {"stream": "compute"}
    side, compute = FakeStream(log, "side"), FakeStream(log, "compute")

    @contextlib.contextmanager
    def stream_ctx(stream):
        state["stream"] = stream.name
        yield
        state["stream"] = "compute"

    def onload(self, non_blocking=False):
        log.append(("copy", self.name, state["stream"]))
        self.event = None

    def record_event(self, stream):
        log.append(("record", stream.name))
        self.group = log[-2][1]  # the group whose copies were just queued

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: side)
    monkeypatch.setattr(torch.cuda, "stream", stream_ctx)
    monkeypatch.setattr(torch.cuda, "Event", lambda: FakeEvent(log))
    monkeypatch.setattr(FakeEvent, "record", record_event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: log.append(("record_stream", s.name)),
                        raising=False)
    monkeypatch.setattr(off._Group, "onload", onload)  # CPU: the copy itself is a no-op anyway
    monkeypatch.setattr(off, "_make_transfer", lambda device: off._StreamTransfer(device))
    before = unet_out(model, inputs)
    handle = apply_offload(model, "block", device="cpu")
    try:
        unet_out(model, inputs)
        log.clear()
        torch.testing.assert_close(unet_out(model, inputs), before, atol=1e-5, rtol=0)
    finally:
        remove_offload(model)
    order = handle.execution_order
    assert ("synchronize", "side") in log  # removal waits for in-flight side-stream copies
    copies = [e for e in log if e[0] == "copy"]
    assert [c[1] for c in copies] == list(order) and all(c[2] == "side" for c in copies)
    for name in order:  # copy on side stream -> event on side stream -> compute waits on it
        i = log.index(("copy", name, "side"))
        assert log[i + 1] == ("record", "side")
        j = log.index(("wait_event", "compute", name))
        assert j > i + 1 and log[j + 1] == ("record_stream", "compute")


def test_offload_errors_and_reapply(model):
    with pytest.raises(ValueError, match="`mode`.*none, model, block"):
        apply_offload(model, "sequential", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="`device`.*device='cpu'"):
            apply_offload(model, "model", device="cuda")
    with pytest.raises(ValueError, match="`mode` 'block' needs"):
        apply_offload(torch.nn.Linear(2, 2), "block", device="cpu")
    with pytest.raises(ValueError, match="`config` is required"):
        reapply_offload(model)
    handle = apply_offload(model, "block", device="cpu")
    again = reapply_offload(model)
    assert again is not handle and again.config == handle.config and get_offload(model) is again
    with pytest.raises(ValueError, match="remove_offload"):
        apply_precision(model, "bf16")
    remove_offload(model)
    assert pristine(model)


def test_offload_on_a_plain_module():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4)
    ref = net(x)
    handle = apply_offload(net, "model", device="cpu")
    assert handle.names == ("model",) and torch.equal(net(x), ref)
    remove_offload(net)
    assert torch.equal(net(x), ref) and "forward" not in net.__dict__


def test_offload_host_bytes_on_meta():
    from engine.config import load_spec
    from engine.models import build_model

    meta = build_model(load_spec("tiny"), device="meta")
    tensors = [t for name in ("model", "first_stage_model", "cond_stage_model", "embedder",
                              "image_proj_model")
               for t in list(meta.get_submodule(name).parameters()) + list(meta.get_submodule(name).buffers())]
    expected = sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in tensors)
    assert offload_host_bytes(meta, "none") == 0
    assert offload_host_bytes(meta, "model", torch.float16) == expected
    assert offload_host_bytes(meta, "block", torch.float16) == expected
    assert offload_host_bytes(meta, "model") == sum(t.numel() * t.element_size() for t in tensors)
    units = offload_units(meta, "block", torch.float16)
    assert units[0][0] == "unet.time_embed" and units[-1][0] == "image_proj"
    assert all(n > 0 for _, n in units)


# ---------------------------------------------------------------- attention
def test_attention_backends_agree(model, inputs):
    ref = unet_out(model, inputs)
    for backend in ("naive", "sdpa", "chunked:64"):
        previous = set_attention_backend(model, backend)
        try:
            torch.testing.assert_close(unet_out(model, inputs), ref, atol=1e-5, rtol=0)
        finally:
            restore_attention_backend(model, previous)


def test_attention_set_restore_round_trip(model):
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CrossAttention)}
    original = {n: m.backend for n, m in layers.items()}
    previous = set_attention_backend(model, "sdpa", spatial="chunked:128", temporal="naive")
    assert previous == original
    for owner, expected in ((SpatialTransformer, "chunked:128"), (TemporalTransformer, "naive")):
        found = [m.backend for o in model.modules() if isinstance(o, owner)
                 for m in o.modules() if isinstance(m, CrossAttention)]
        assert found and set(found) == {expected}
    restore_attention_backend(model, previous)
    assert {n: m.backend for n, m in layers.items()} == original
    with pytest.raises(ValueError, match="`attention`"):
        set_attention_backend(model, "flash")
    with pytest.raises(ValueError, match="`backend` 'auto' needs a `device`"):
        set_attention_backend(model, "auto")
    with pytest.raises(ValueError, match="`previous`"):
        restore_attention_backend(model, {"model.nothing": "sdpa"})
    assert set_attention_backend(model, "auto", device="cpu") == original  # resolves to sdpa
    restore_attention_backend(model, original)


def test_xformers_is_probed_not_assumed(monkeypatch):
    assert xformers_kernels_work("cpu") is False
    assert resolve_attention("auto", "cpu") == "sdpa"
    assert resolve_attention("chunked:64", "cpu") == "chunked:64"
    if "xformers" not in sys.modules:  # not installed here: forcing it names the way out
        with pytest.raises(ModuleNotFoundError, match=r"^`attention` 'xformers' was forced.*\.$"):
            resolve_attention("xformers", "cpu")

    def no_operator(*_args, **_kwargs):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    ops = types.SimpleNamespace(memory_efficient_attention=no_operator)
    monkeypatch.setitem(sys.modules, "xformers", types.SimpleNamespace(ops=ops))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    attn_mod._probe_xformers.cache_clear()
    try:
        assert xformers_kernels_work("cpu") is False
        with pytest.raises(RuntimeError, match="`attention`.*No operator found.*attention=auto"):
            resolve_attention("xformers", "cpu")
        ops.memory_efficient_attention = lambda q, k, v: q
        attn_mod._probe_xformers.cache_clear()
        assert resolve_attention("auto", "cpu") == "xformers"
    finally:
        attn_mod._probe_xformers.cache_clear()


# ---------------------------------------------------------------- precision
def test_precision_cast_keeps_schedule_and_norms_fp32(model, inputs):
    ref = unet_out(model, inputs)
    assert weight_dtype("fp32-autocast") is torch.float32 and weight_dtype("bf16") is torch.bfloat16
    previous = apply_precision(model, "bf16")
    try:
        assert previous.dtype is torch.float32
        unet = model.model.diffusion_model
        assert unet.time_embed[0].weight.dtype is torch.bfloat16
        assert all(m.weight.dtype is torch.float32 for m in model.modules() if isinstance(m, GroupNorm32))
        assert model.alphas_cumprod.dtype in (torch.float32, torch.float64)
        x = [t.to(torch.bfloat16) if t.is_floating_point() else t for t in inputs]
        with precision_context("bf16", "cpu"):
            out = model.apply_model(*x).float()
        assert out.dtype is torch.float32 and (out - ref).abs().max() < 0.1
    finally:
        restore_precision(model, previous)
    assert all(p.dtype is torch.float32 for p in model.parameters())


def test_precision_context_and_errors(monkeypatch):
    assert isinstance(precision_context("fp32-autocast", "cpu"), contextlib.nullcontext)
    assert isinstance(precision_context("fp16", "cpu"), contextlib.nullcontext)
    with pytest.raises(ValueError, match="`precision` 'fp8'"):
        precision_context("fp8", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ValueError, match=r"^`precision` 'bf16' is not supported natively by Tesla T4; use"):
        apply_precision(torch.nn.Linear(2, 2), "bf16", device="cuda")
    ctx = precision_context("fp32-autocast", "cuda")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype is torch.float16


# ---------------------------------------------------------------- real CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["none", "model", "block"])
def test_cuda_offload_parity_and_restore(model, inputs, mode):
    before, where = unet_out(model, inputs), snapshot(model)
    apply_offload(model, "none", device="cuda")  # reference: the same CUDA kernels, no offload
    reference = unet_out(model, inputs, "cuda")
    remove_offload(model)
    handle = apply_offload(model, mode, device="cuda")
    try:
        if mode != "none":
            host = handle.blocks["unet"].groups[0].host if mode == "block" else handle.components["vae"].host
            assert all(h.is_pinned() for h in host)
        with handle.onload("unet"):
            outs = [unet_out(model, inputs, "cuda") for _ in range(2)]
        for out in outs:
            torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
        if mode == "block":
            assert all(g.state == "offloaded" for g in handle.blocks["unet"].groups)
    finally:
        remove_offload(model)
    assert snapshot(model).keys() == where.keys()
    assert all(t.device.type == "cpu" and not t.is_pinned() for t in model.state_dict().values())
    assert torch.equal(unet_out(model, inputs), before)


@pytest.mark.cuda
def test_cuda_block_offload_holds_at_most_two_units(model, inputs):
    torch.cuda.synchronize()
    handle = apply_offload(model, "block", device="cuda")
    try:
        with handle.onload("unet"):
            unet_out(model, inputs, "cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        unet_out(model, inputs, "cuda")
        torch.cuda.synchronize()
        units = sorted((n for name, n in offload_units(model, "block") if name.startswith("unet.")),
                       reverse=True)
        unet_bytes = sum(units)
        # weights on the device never approach the whole UNet (activations are tiny here)
        assert torch.cuda.max_memory_allocated() - base < unet_bytes
    finally:
        remove_offload(model)
