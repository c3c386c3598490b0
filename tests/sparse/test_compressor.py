"""TopKCompressor: mass conservation (error feedback), momentum correction, clipping,
warm-up, ablation, state round trip; SparsePayload wire form and the codec registry."""

from __future__ import annotations

import math

import pytest
import torch

from elastic.codecs import (
    DENSE_TAG,
    HEADER_BYTES,
    TOPK_TAG,
    SelectionConfig,
    SparsePayload,
    SparsePayloadError,
    TopKCompressor,
    add_into,
    all_finite,
    break_even_density,
    decoder_for,
    decompress,
    pack_payloads,
    register_decoder,
    unpack_payloads,
)
from tests.sparse.conftest import DEVICES, make_buffer

N = 20_000
SAMPLED = SelectionConfig(exact_below=0)  # small buffers, but through the sampled path


def grads(steps: int, n: int = N, seed: int = 0, device: str = "cpu"):
    """Gradient-like steps: a drifting mean direction plus noise, varying scale."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen)
    for step in range(steps):
        scale = 1.0 + 0.5 * math.sin(step)
        yield (scale * (0.3 * base + torch.randn(n, generator=gen))).to(device)


def run(comp: TopKCompressor, steps: int, name: str = "w", device: str = "cpu",
        world_size: int = 4, intake: float = 1.0):
    """Compress `steps` gradients; returns float64 sums of gradients, of the velocity
    increments that entered v (reference momentum with DGC masking; `intake` of each
    gradient into u, the rest straight into v), and of what was sent."""
    total_g = total_u = sent = None
    u = None
    for step, g in enumerate(grads(steps, device=device)):
        g64 = g.double()
        if comp.clip_norm is not None:
            limit = comp.clip_norm / math.sqrt(world_size)
            g64 = g64 * min(1.0, limit / (float(g64.norm()) + 1e-12))
        u = intake * g64 if u is None else comp.momentum * u + intake * g64
        payload = comp.compress(name, g, step, world_size=world_size, intake=intake)
        dense = decompress(payload).double()
        total_g = g64 if total_g is None else total_g + g64
        entered = u + (1.0 - intake) * g64 if comp.momentum else g64
        total_u = entered.clone() if total_u is None else total_u + entered
        sent = dense if sent is None else sent + dense
        if comp.momentum and not payload.is_dense:
            u[payload.indices.long()] = 0.0
    return total_g, total_u, sent


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    err = float((a - b).abs().max())
    scale = float(b.abs().max())
    assert err <= rel * scale, f"max error {err} vs scale {scale}"


# -- mass conservation -----------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp16", [False, True])
def test_error_feedback_keeps_all_the_mass(fp16: bool, device: str) -> None:
    comp = TopKCompressor(density=0.01, fp16_values=fp16, selection=SAMPLED)
    total_g, _, sent = run(comp, 40, device=device)
    residual = comp.residual("w").double()
    # Mass: sum of sent + residual == sum of gradients, to float32 accumulation rounding.
    assert_close(sent + residual, total_g)
    assert float(residual.norm()) > 0.0
    assert comp.residual_norm() == pytest.approx(float(residual.norm()), rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp16", [False, True])
def test_momentum_correction_keeps_the_velocity_mass(fp16: bool, device: str) -> None:
    # With momentum correction, v accumulates velocity increments u_t = m u_{t-1} + g_t
    # (u zeroed where sent). The conserved mass is sum_t u_t: sent + residual == sum_t u_t.
    comp = TopKCompressor(density=0.01, fp16_values=fp16, momentum=0.9,
                          selection=SAMPLED)
    total_g, total_u, sent = run(comp, 40, device=device)
    assert_close(sent + comp.residual("w").double(), total_u)
    assert not torch.allclose(total_u, total_g)


@pytest.mark.parametrize("intake", [0.0, 0.5])
def test_a_stale_gradients_intake_into_the_velocity(intake: float) -> None:
    # With staleness, only `intake` of each gradient enters the velocity u; the rest
    # enters v directly. Nothing is lost: sent + residual == what entered v.
    comp = TopKCompressor(density=0.01, momentum=0.9, selection=SAMPLED)
    total_g, total_u, sent = run(comp, 40, intake=intake)
    assert_close(sent + comp.residual("w").double(), total_u)
    full = TopKCompressor(density=0.01, momentum=0.9, selection=SAMPLED)
    _, total_full, _ = run(full, 40)
    # Less of the gradients is repeated by momentum: intake 0 is no momentum at all.
    assert float(total_u.norm()) < float(total_full.norm())
    if intake == 0.0:
        assert_close(total_u, total_g)


def test_intake_outside_0_1_is_refused() -> None:
    with pytest.raises(ValueError, match="intake=1.5 must be in"):
        TopKCompressor(density=0.01, momentum=0.9).compress("w", torch.ones(2048), 0,
                                                            intake=1.5)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_mass_through_warmup_dense_steps(momentum: float) -> None:
    comp = TopKCompressor(density=0.005, momentum=momentum, warmup_steps=10,
                          warmup_start_density=0.5, fp16_values=True, selection=SAMPLED)
    total_g, total_u, sent = run(comp, 25)
    assert_close(sent + comp.residual("w").double(), total_u if momentum else total_g)


def test_fp32_values_are_sent_exactly() -> None:
    comp = TopKCompressor(density=0.01)
    g = next(grads(1))
    payload = comp.compress("w", g, 0)
    idx = payload.indices.long()
    assert torch.equal(payload.values, g[idx])
    assert float(comp.residual("w")[idx].abs().max()) == 0.0
    assert payload.count == 200


def test_fp16_overflow_is_clamped_and_kept() -> None:
    comp = TopKCompressor(density=0.01, fp16_values=True, min_sparse_numel=0)
    g = torch.zeros(1000)
    g[3] = 1e6
    payload = comp.compress("w", g, 0)
    assert bool(torch.isfinite(payload.values).all())
    assert float(comp.residual("w")[3]) == pytest.approx(1e6 - 65504.0)


def test_without_error_feedback_unsent_mass_is_dropped() -> None:
    comp = TopKCompressor(density=0.01, error_feedback=False, selection=SAMPLED)
    total = sent = 0.0
    for step, g in enumerate(grads(10)):
        payload = comp.compress("w", g, step, world_size=4)
        # Each step sends exactly the top-k of that step's gradient alone.
        ref = torch.topk(g.abs(), payload.count).indices.sort().values
        assert torch.equal(payload.indices.long(), ref)
        total = total + g.double()
        sent = sent + decompress(payload).double()
    assert comp.residual("w") is None and comp.residual_norm() == 0.0
    dropped = float((total - sent).norm())
    assert dropped > 0.9 * float(total.norm())


def test_gradient_is_not_modified() -> None:
    g = make_buffer("normal", N)
    keep = g.clone()
    for comp in (TopKCompressor(), TopKCompressor(error_feedback=False, clip_norm=0.1),
                 TopKCompressor(momentum=0.5), TopKCompressor(density=0.9)):
        for step in range(3):
            comp.compress("w", g, step, world_size=2)
            comp.compress("w", g, step, world_size=2, dense=True)
    assert torch.equal(g, keep)


# -- clipping, warm-up, dense decision -------------------------------------------------------

def test_local_clipping_scales_with_world_size() -> None:
    comp = TopKCompressor(density=0.5, clip_norm=2.0, error_feedback=True)
    g = make_buffer("normal", 10_000) * 100
    payload = comp.compress("w", g, 0, world_size=4, dense=True)
    # Clipped to 2 / sqrt(4) = 1 before accumulation.
    assert float(decompress(payload).norm()) == pytest.approx(1.0, rel=1e-5)
    small = torch.full((10_000,), 1e-4)
    comp2 = TopKCompressor(clip_norm=2.0)
    assert torch.equal(decompress(comp2.compress("w", small, 0, dense=True)), small)
    # Mass is conserved for the clipped gradients (run() applies the same clip).
    comp3 = TopKCompressor(density=0.01, clip_norm=50.0)
    total_g, _, sent = run(comp3, 10)
    assert_close(sent + comp3.residual("w").double(), total_g)


def test_warmup_schedule_endpoints() -> None:
    comp = TopKCompressor(density=0.001, warmup_steps=4, warmup_start_density=0.25)
    assert comp.density(0) == 0.25
    assert comp.density(4) == 0.001
    assert comp.density(1000) == 0.001
    values = [comp.density(s) for s in range(5)]
    assert all(a > b for a, b in zip(values, values[1:]))
    ratios = [b / a for a, b in zip(values, values[1:])]
    assert ratios == pytest.approx([ratios[0]] * 4)  # exponential: constant ratio
    assert TopKCompressor(density=0.01).density(0) == 0.01
    assert TopKCompressor(density=0.01, warmup_steps=3).density(0) == 1.0


def test_dense_while_above_break_even_and_for_small_buffers() -> None:
    comp = TopKCompressor(density=0.01, warmup_steps=10, min_sparse_numel=1024)
    assert comp.prefers_dense(N, 0, 4)            # density 1.0
    assert not comp.prefers_dense(N, 10, 4)       # 1% < 1/4
    assert comp.prefers_dense(1000, 10, 4)        # small buffer
    assert comp.compress("bias", torch.randn(1000), 10, world_size=4).is_dense
    assert not comp.compress("w", torch.randn(N), 10, world_size=4).is_dense
    step = next(s for s in range(10) if comp.density(s) < break_even_density(4, 4))
    assert not comp.prefers_dense(N, step, 4) and comp.prefers_dense(N, step - 1, 4)


def test_break_even_density_formula() -> None:
    assert break_even_density(4, 4) == pytest.approx(0.25)    # 1/N for fp32 pairs
    assert break_even_density(8, 2, dense_bytes=2) == pytest.approx(4 / (8 * 6))
    assert break_even_density(1, 2) == 1.0
    with pytest.raises(ValueError, match="world_size"):
        break_even_density(0, 4)


def test_argument_validation() -> None:
    for kwargs, word in [({"density": 0.0}, "density"), ({"momentum": 1.0}, "momentum"),
                         ({"clip_norm": -1.0}, "clip_norm"), ({"warmup_steps": -1}, "warmup"),
                         ({"density": 0.1, "warmup_start_density": 0.01}, "warmup_start")]:
        with pytest.raises(ValueError, match=word):
            TopKCompressor(**kwargs)
    comp = TopKCompressor()
    comp.compress("w", torch.randn(2000), 0)
    with pytest.raises(ValueError, match="2000"):
        comp.compress("w", torch.randn(3000), 1)


# -- state -----------------------------------------------------------------------------------

def test_state_dict_round_trip_continues_identically() -> None:
    a = TopKCompressor(density=0.01, momentum=0.9, fp16_values=True)
    steps = list(grads(12))
    for step, g in enumerate(steps[:6]):
        a.compress("w", g, step)
        a.compress("b", g[:500], step)
    b = TopKCompressor(density=0.01, momentum=0.9, fp16_values=True)
    b.load_state_dict(a.state_dict())
    assert b.residual_norm() == a.residual_norm()
    for step, g in enumerate(steps[6:], start=6):
        pa, pb = a.compress("w", g, step), b.compress("w", g, step)
        assert torch.equal(pa.indices, pb.indices) and torch.equal(pa.values, pb.values)
    state = a.state_dict()
    assert state["buffers"]["w"]["residual"] is not a.residual("w")  # a copy
    with pytest.raises(ValueError, match="format"):
        b.load_state_dict({"buffers": {}})
    a.reset()
    assert a.residual_norm() == 0.0


# -- payload wire form -----------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_payload_bytes_round_trip(device: str) -> None:
    comps = [TopKCompressor(density=0.01), TopKCompressor(density=0.001, fp16_values=True)]
    payloads = [c.compress(f"w{i}", make_buffer("normal", 10_001 + i, i, device), 5)
                for i, c in enumerate(comps)]
    payloads.append(TopKCompressor().compress("b", torch.randn(7, device=device), 0))
    assert payloads[2].is_dense and payloads[2].tag == DENSE_TAG
    for p in payloads:
        raw = p.to_bytes()
        assert raw.dtype == torch.uint8 and raw.numel() == p.nbytes and raw.numel() % 8 == 0
        back = SparsePayload.from_bytes(raw)
        assert back.numel == p.numel and back.dtype == p.dtype and back.tag == p.tag
        assert torch.equal(back.values, p.values)
        assert (back.indices is None) == (p.indices is None)
        if p.indices is not None:
            assert torch.equal(back.indices, p.indices)
    assert payloads[0].nbytes == HEADER_BYTES + 100 * 8
    assert payloads[1].nbytes == HEADER_BYTES + 10 * 6 + 4  # padded to 8
    # Several payloads behind a caller's own header travel as one buffer.
    header = torch.arange(16, dtype=torch.uint8, device=device)
    buf = torch.cat([header, pack_payloads(payloads)])
    out, end = unpack_payloads(buf, offset=16)
    assert end == buf.numel() and len(out) == 3
    assert torch.equal(decompress(out[1]), decompress(payloads[1]))
    # A misaligned start still decodes (the body is copied then).
    shifted = torch.cat([torch.zeros(3, dtype=torch.uint8, device=device), buf])[3:]
    assert torch.equal(unpack_payloads(shifted, 16, count=1)[0][0].indices, payloads[0].indices)


def test_payload_header_and_content_errors() -> None:
    p = TopKCompressor(density=0.01).compress("w", torch.randn(10_000), 5)
    raw = p.to_bytes()
    bad_magic = raw.clone()
    bad_magic[0] = 0
    with pytest.raises(SparsePayloadError, match="magic"):
        SparsePayload.from_bytes(bad_magic)
    unknown = raw.clone()
    unknown[4] = 201
    with pytest.raises(SparsePayloadError, match="tag 201"):
        SparsePayload.from_bytes(unknown)
    with pytest.raises(SparsePayloadError, match="needs"):
        SparsePayload.from_bytes(raw[:-8])
    with pytest.raises(SparsePayloadError, match="offset"):
        SparsePayload.from_bytes(raw, offset=4)
    with pytest.raises(SparsePayloadError, match="expected 9999"):
        SparsePayload.from_bytes(raw, numel=9999)
    with pytest.raises(SparsePayloadError, match="expected 5"):
        unpack_payloads(torch.cat([raw, raw]), numels=[10_000, 5])
    assert len(unpack_payloads(torch.cat([raw, raw]), numels=[10_000, 10_000])[0]) == 2
    for corrupt, message in (
            (lambda i, v: i.__setitem__(0, 10_000), "out of range"),
            (lambda i, v: i.__setitem__(1, int(i[0])), "not strictly ascending"),
            (lambda i, v: v.__setitem__(2, float("nan")), "non-finite"),
            (lambda i, v: v.__setitem__(3, float("-inf")), "non-finite")):
        indices, values = p.indices.clone(), p.values.clone()
        corrupt(indices, values)
        buf = SparsePayload(indices, values, p.numel, p.dtype).to_bytes()
        with pytest.raises(SparsePayloadError, match=message):
            SparsePayload.from_bytes(buf)
        SparsePayload.from_bytes(buf, validate=False)  # the header alone is fine


def test_registry_decodes_by_tag() -> None:
    def signs(payload, out, alpha):
        """A toy kind: the payload carries signs, decoded as +-0.5."""
        out.index_add_(0, payload.indices, payload.values.float().sign() * 0.5, alpha=alpha)

    register_decoder(77, signs)
    idx = torch.tensor([1, 4], dtype=torch.int32)
    p = SparsePayload(idx, torch.tensor([3.0, -2.0]), 6, torch.float32, tag=77)
    back = SparsePayload.from_bytes(p.to_bytes())
    assert decoder_for(back.tag) is signs
    assert decompress(back).tolist() == [0.0, 0.5, 0.0, 0.0, -0.5, 0.0]
    topk = SparsePayload(idx, torch.tensor([3.0, -2.0]), 6, torch.float32, tag=TOPK_TAG)
    assert decompress(topk).tolist() == [0.0, 3.0, 0.0, 0.0, -2.0, 0.0]
    with pytest.raises(ValueError, match="already registered"):
        register_decoder(77, lambda payload, out, alpha: None)
    with pytest.raises(SparsePayloadError, match="no decoder"):
        decoder_for(250)
    with pytest.raises(SparsePayloadError, match="numel=6"):
        add_into(p, torch.zeros(5))


def test_a_nan_gradient_sends_nothing_and_leaves_the_residual_clean() -> None:
    comp = TopKCompressor(0.01, momentum=0.9)
    torch.manual_seed(0)
    comp.compress("g", torch.randn(10_000), 0)
    residual = comp.residual("g").clone()
    bad = torch.randn(10_000)
    bad[7] = float("nan")
    payload = comp.compress("g", bad, 1)
    assert payload.count == 0
    assert comp.skipped_steps == 1
    assert torch.equal(comp.residual("g"), residual)
    assert torch.isfinite(comp.compress("g", torch.randn(10_000), 2).values).all()


def test_all_finite_is_exact_when_the_sum_overflows() -> None:
    huge = torch.full((4,), 3e38)  # finite values whose float32 sum is inf
    assert all_finite(huge) and all_finite(torch.empty(0))
    assert all_finite(torch.full((8,), 60000.0, dtype=torch.float16))
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.ones(1000)
        t[500] = bad
        assert not all_finite(t), bad
    mixed = torch.tensor([float("inf"), float("-inf"), 1.0])  # sums to NaN
    assert not all_finite(mixed)


def test_a_huge_but_finite_gradient_is_sent_not_skipped() -> None:
    comp = TopKCompressor(0.01)
    grad = torch.zeros(10_000)
    grad[:200] = 3e38  # finite; their sum overflows float32
    payload = comp.compress("g", grad, 0)
    assert comp.skipped_steps == 0 and payload.count == 100
    assert torch.equal(payload.values, torch.full((100,), 3e38))
