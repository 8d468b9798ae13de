"""The autoencoding planner over synthetic models (properties), and the time model's pieces."""
from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from engine.estimate.timing import AETimeModel, DirectionTiming, call_layout
from engine.planner.autoencode import (TIE_TOLERANCE, AEChoice, InfeasibleBudget,
                                       candidate_modes, force_mode, format_bytes,
                                       plan_autoencoding)
from engine.plan.aemode import AEMode

GIB = 2 ** 30
FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@dataclasses.dataclass(frozen=True)
class FakeMemory:
    """Stage memory with the fields the planner reads."""

    activation_bytes: int
    weights_bytes: int
    input_bytes: int
    allocator_bytes: int = 0

    @property
    def allocated_bytes(self) -> int:
        return self.weights_bytes + self.input_bytes + self.activation_bytes


@dataclasses.dataclass(frozen=True)
class SyntheticMemoryModel:
    """Monotone in frames per call and tile area, like a real VAE: activations of one call,
    its attention scores, and (chunked or tiled) the assembled output of the whole run."""

    weights: int = 300 << 20
    per_px: float = 2.0e5        # bytes per latent pixel per frame in flight
    per_px2: float = 16.0        # attention scores
    allocator: int = 0

    def predict(self, direction, frames, height, width, mode):
        lay = call_layout(AEMode.parse(mode), frames, height, width, 8)
        k = max(size for size, _ in lay.chunks)
        thw = lay.call_hw[0] * lay.call_hw[1]
        act = k * (self.per_px * thw + self.per_px2 * thw * thw)
        if lay.copied:
            act += frames * 3 * height * width * 4
        return FakeMemory(int(act), self.weights, frames * 4 * (height // 8) * (width // 8) * 4,
                          self.allocator)


def synthetic_time(per_call_s=0.02, knots=((16.0, 2e-11), (1024.0, 1.5e-11),
                                           (65536.0, 3e-11)), blend=2e-10) -> AETimeModel:
    terms = DirectionTiming(per_call_s, tuple(knots), 6.0e8, 2048.0, 3, 8)
    enc = dataclasses.replace(terms, flops_hw=2.6e8, out_channels=8, out_scale=1)
    return AETimeModel(terms, enc, 8, blend, 3e-9, 1e-10, source="synthetic")


class ConstantTime:
    """Every mode takes the same time except by a per-mode offset (a bare ``predict``)."""

    def __init__(self, offsets=None):
        self.offsets = offsets or {}

    def predict(self, direction, frames, height, width, mode):
        return 1.0 + self.offsets.get(str(AEMode.parse(mode)), 0.0)


runs = st.tuples(st.sampled_from(["decode", "encode"]), st.integers(1, 24),
                 st.integers(4, 96).map(lambda v: v * 8), st.integers(4, 128).map(lambda v: v * 8))
knots = st.lists(st.tuples(st.floats(1, 1e5), st.floats(1e-12, 1e-10)), min_size=1,
                 max_size=5, unique_by=lambda kv: round(kv[0])).map(
    lambda ks: tuple(sorted(ks)))


def _plan(run, budget, resident=0, memory=None, time_model=None, **kwargs):
    direction, frames, height, width = run
    return plan_autoencoding(direction, frames, height, width, budget_bytes=int(budget),
                             resident_bytes=resident, memory_model=memory or SyntheticMemoryModel(),
                             time_model=time_model or synthetic_time(), **kwargs)


def _all_peaks(run, resident=0, memory=None):
    memory = memory or SyntheticMemoryModel()
    direction, frames, height, width = run
    return {str(m): resident + memory.predict(direction, frames, height, width, m).allocated_bytes
            for m in candidate_modes(frames, height, width)}


# ---------------------------------------------------------------- properties
@FAST
@given(run=runs, budget_gib=st.floats(0.05, 64), resident=st.integers(0, 4 * GIB),
       knots=knots, per_call=st.floats(0, 0.2))
def test_choice_fits_budget_and_is_fastest(run, budget_gib, resident, knots, per_call):
    tm = synthetic_time(per_call, knots)
    peaks = _all_peaks(run, resident)
    budget = int(budget_gib * GIB)
    assume(min(peaks.values()) <= budget)
    choice = _plan(run, budget, resident, time_model=tm)
    assert choice.fits and choice.peak_bytes <= budget
    assert choice.peak_bytes == peaks[str(choice.mode)]
    fitting = [m for m, p in peaks.items() if p <= budget]
    fastest = min(tm.predict(run[0], *run[1:], m) for m in fitting)
    assert choice.time_s <= fastest * (1 + TIE_TOLERANCE) + 1e-12
    assert len(choice.rejected) == len(peaks) - 1


@FAST
@given(run=runs, low=st.floats(0.05, 16), factor=st.floats(1.0, 16.0), knots=knots,
       per_call=st.floats(0, 0.2))
def test_larger_budget_never_slower(run, low, factor, knots, per_call):
    tm = synthetic_time(per_call, knots)
    assume(min(_all_peaks(run).values()) <= low * GIB)
    small = _plan(run, low * GIB, time_model=tm)
    large = _plan(run, low * factor * GIB, time_model=tm)
    # Exact monotonicity up to the tie tolerance: the tie rule may trade <1 % for fewer calls.
    assert large.time_s <= small.time_s * (1 + TIE_TOLERANCE) + 1e-12


@FAST
@given(run=runs, fraction=st.floats(0.0, 0.999), resident=st.integers(0, 2 * GIB))
def test_impossible_budget_one_sentence_with_minimum(run, fraction, resident):
    need = min(_all_peaks(run, resident).values())
    budget = int(need * fraction)
    with pytest.raises(InfeasibleBudget) as info:
        _plan(run, budget, resident)
    message = str(info.value)
    assert info.value.need_bytes == need
    assert format_bytes(need, budget) in message
    assert message.startswith("`--vram` ") and message.endswith(".")
    assert message.count(". ") == 0 and message.count(";") == 1  # one sentence
    assert isinstance(info.value, ValueError)


@FAST
@given(run=runs, budget_gib=st.floats(0.01, 8), resident=st.integers(0, GIB),
       chunk=st.one_of(st.none(), st.integers(1, 24)),
       tile=st.one_of(st.none(), st.integers(8, 96).map(lambda v: v * 8)))
def test_forced_mode_reports_fit(run, budget_gib, resident, chunk, tile):
    direction, frames, height, width = run
    mode = AEMode(chunk=chunk, tile=None if tile is None else (tile, tile))
    budget = int(budget_gib * GIB)
    mem = SyntheticMemoryModel()
    choice = force_mode(direction, frames, height, width, str(mode), budget_bytes=budget,
                        resident_bytes=resident, memory_model=mem, time_model=synthetic_time())
    expected = resident + mem.predict(direction, frames, height, width, mode).allocated_bytes
    assert choice.forced and choice.mode == mode and choice.peak_bytes == expected
    assert choice.fits == (expected <= budget)


def test_ties_prefer_fewer_larger_calls():
    run = ("decode", 16, 320, 512)
    peaks = _all_peaks(run)
    assert _plan(run, 64 * GIB, time_model=ConstantTime()).mode == AEMode()
    # when batched does not fit, the largest chunk that fits wins, untiled before tiled
    budget = sorted(peaks.values())[-2]
    choice = _plan(run, budget, time_model=ConstantTime())
    fitting = [AEMode.parse(m) for m, p in peaks.items() if p <= budget]
    best_k = max(m.chunk or 16 for m in fitting)
    assert (choice.mode.chunk or 16) == best_k
    if any((m.chunk or 16) == best_k and m.tile is None for m in fitting):
        assert choice.mode.tile is None
    # within the tolerance counts as a tie; beyond it the faster mode wins
    near = ConstantTime({"per-frame": -TIE_TOLERANCE / 2})
    assert _plan(run, 64 * GIB, time_model=near).mode == AEMode()
    far = ConstantTime({"per-frame": -3 * TIE_TOLERANCE})
    assert _plan(run, 64 * GIB, time_model=far).mode == AEMode(chunk=1)


def test_rejections_name_bytes_and_budget():
    run = ("decode", 8, 256, 256)
    budget = sorted(_all_peaks(run).values())[2]
    choice = _plan(run, budget)
    reasons = dict(choice.rejected)
    over = [r for r in reasons.values() if "budget" in r and ">" in r and "fits" not in r]
    assert over and all("GiB" in r or "MiB" in r for r in over)
    assert str(choice.mode) not in reasons
    data = choice.as_dict()
    assert data["mode"] == str(choice.mode) and data["fits"] is True


def test_explicit_candidates_and_argument_errors():
    run = ("decode", 4, 256, 256)
    choice = _plan(run, 64 * GIB, candidates=["per-frame", "chunk:2+tile:128x128"])
    assert str(choice.mode) in ("per-frame", "chunk:2+tile:128x128")
    with pytest.raises(ValueError, match="`candidates`"):
        _plan(run, 64 * GIB, candidates=["tile:100x100"])
    with pytest.raises(ValueError, match="`height`"):
        _plan(("decode", 4, 250, 256), 64 * GIB)
    with pytest.raises(ValueError, match="`ae_decode`"):
        force_mode("decode", 4, 256, 256, "chunk:zero", budget_bytes=GIB, resident_bytes=0,
                   memory_model=SyntheticMemoryModel(), time_model=synthetic_time())


def test_candidates_cover_chunks_and_smaller_tiles():
    modes = candidate_modes(16, 320, 512)
    assert {m.chunk for m in modes} == {None, 8, 4, 2, 1}
    tiles = {m.tile for m in modes if m.tile}
    assert (512, 512) not in tiles and (384, 384) in tiles and (128, 128) in tiles
    assert all(t[0] % 8 == 0 and t[1] % 8 == 0 for t in tiles)
    assert {m.chunk for m in candidate_modes(6, 64, 64)} == {None, 3, 2, 1}
    assert candidate_modes(1, 64, 64) == [AEMode()]


# ---------------------------------------------------------------- time model pieces
@FAST
@given(frames=st.integers(1, 20), h=st.integers(1, 64), w=st.integers(1, 64),
       chunk=st.one_of(st.none(), st.integers(1, 20)),
       th=st.integers(1, 40), tw=st.integers(1, 40),
       overlap=st.one_of(st.none(), st.integers(0, 8)))
def test_call_layout_matches_runtime_grid(frames, h, w, chunk, th, tw, overlap):
    from engine.runtime.autoencode import _tile_grid

    assume(overlap is None or overlap < min(th, tw))
    mode = AEMode(chunk=chunk, tile=(th * 8, tw * 8),
                  overlap=None if overlap is None else overlap * 8)
    lay = call_layout(mode, frames, h * 8, w * 8, 8)
    grid = _tile_grid(mode, h, w, 8, "mode")
    if grid is None:
        assert not lay.tiled and lay.tiles == 1 and lay.call_hw == (h, w)
    else:
        assert lay.tiles == len(grid[0]) * len(grid[1])
        assert lay.call_hw == (grid[0][0][1] - grid[0][0][0], grid[1][0][1] - grid[1][0][0])
    k = min(chunk or frames, frames)
    assert sum(size * n for size, n in lay.chunks) == frames
    assert sum(n for _, n in lay.chunks) == math.ceil(frames / k)


def test_time_model_round_trip_and_terms():
    tm = synthetic_time()
    assert AETimeModel.from_dict(tm.to_dict()) == tm
    parts = tm.breakdown("decode", 16, 320, 512, "chunk:4+tile:256x256")
    assert parts["calls"] == 4 * 6 and parts["blend"] > 0 and parts["copy"] == 0
    assert parts["total"] == pytest.approx(sum(parts[k] for k in
                                               ("overhead", "compute", "blend", "copy")))
    assert tm.breakdown("decode", 16, 320, 512, "batched")["copy"] == 0
    assert tm.breakdown("decode", 16, 320, 512, "chunk:4")["copy"] > 0
    # s(p) is held flat outside the knots
    assert tm.decode.seconds_per_flop(1.0) == tm.decode.knots[0][1]
    assert tm.decode.seconds_per_flop(1e9) == tm.decode.knots[-1][1]
    assert tm.extrapolates("decode", 1, 8, 8, "batched")


def test_from_flops_needs_flops_source_and_scales():
    terms = {"decode": (6e8, 2048.0), "encode": (2.6e8, 2048.0)}
    slow = AETimeModel.from_flops(1e12, 0.01, flop_terms=terms)
    fast = AETimeModel.from_flops(2e12, 0.01, flop_terms=terms)
    t_slow = slow.breakdown("decode", 16, 320, 512, "per-frame")
    t_fast = fast.breakdown("decode", 16, 320, 512, "per-frame")
    assert t_fast["compute"] == pytest.approx(t_slow["compute"] / 2)
    assert t_slow["overhead"] == pytest.approx(16 * 0.01)
    with pytest.raises(ValueError, match="`vae` or `flop_terms`"):
        AETimeModel.from_flops(1e12, 0.01)


# ---------------------------------------------------------------- the real tiny VAE
@pytest.mark.slow
def test_real_tiny_vae_models_plan(tmp_path):
    torch = pytest.importorskip("torch")
    from engine.config import load_spec
    from engine.estimate.laws.cache import FitCache
    from engine.estimate.vae import VAEMemoryModel
    from engine.models.autoencoder import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(load_spec("tiny").vae).eval()
    cache = FitCache(tmp_path)
    tm = AETimeModel.calibrate(vae, budget_s=1.0, cache=cache)
    assert tm.source == "measured" and tm.decode.per_call_s >= 0
    assert AETimeModel.calibrate(vae, budget_s=1.0, cache=cache) == tm  # loaded, not re-measured
    paper = AETimeModel.from_flops(1e11, 0.001, vae=vae)
    assert paper.decode.flops_hw == pytest.approx(tm.decode.flops_hw)
    mem = VAEMemoryModel.for_vae(vae, device_type="cpu", cache=cache)
    run = ("decode", 8, 256, 256)
    peaks = _all_peaks(run, memory=mem)
    for budget in sorted(set(peaks.values()))[::3]:
        choice = _plan(run, budget, memory=mem, time_model=tm)
        assert choice.peak_bytes <= budget and isinstance(choice, AEChoice)
    with pytest.raises(InfeasibleBudget, match="VAE decode needs even"):
        _plan(run, min(peaks.values()) - 1, memory=mem, time_model=tm)
