"""The SSD scan (unidiff.models.ssd): both chunked forms against the token-by-token recurrence, in
values and gradients (through the output and the final state), with groups, ragged lengths, D of
either shape and an initial state; which form runs when; long decay spans; bf16 and fp16 inputs."""

import pytest
import torch
import torch.nn.functional as F

from unidiff.models import ssd
from unidiff.models.ssd import ssd_chunked, ssd_naive


def rel_err(a, b):
    """max |a - b| / max |b|, in fp32."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _ssd_inputs(b, l, h, p, g, n, seed=0, init=False, D_shape="h"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen)
    dt = F.softplus(torch.randn(b, l, h, generator=gen) - 1.0)  # a spread of step sizes
    A = -torch.rand(h, generator=gen) * 4 - 0.2  # negative decay rates
    B = torch.randn(b, l, g, n, generator=gen)
    C = torch.randn(b, l, g, n, generator=gen)
    D = {"h": torch.randn(h, generator=gen), "hp": torch.randn(h, p, generator=gen), None: None}[D_shape]
    s0 = torch.randn(b, h, p, n, generator=gen) if init else None
    return x, dt, A, B, C, D, s0


# (b, l, h, p, g, n, chunk, initial_state, D): groups 1 / >1 / one per head, length not a multiple
# of the chunk, shorter than the chunk, an exact multiple, a single token.
SSD_CASES = [
    (2, 37, 4, 8, 1, 16, 8, False, "h"),
    (2, 37, 4, 8, 2, 16, 8, True, "h"),
    (1, 5, 4, 8, 4, 16, 16, True, "hp"),
    (2, 64, 6, 4, 3, 8, 16, False, None),
    (1, 1, 2, 4, 1, 4, 8, True, "h"),
    (2, 29, 4, 8, 4, 8, 8, True, "hp"),  # one group per head over several chunks, padded
]


@pytest.mark.parametrize("b,l,h,p,g,n,Q,init,D_shape", SSD_CASES)
def test_ssd_chunked_matches_naive_values_and_grads(b, l, h, p, g, n, Q, init, D_shape):
    inputs = _ssd_inputs(b, l, h, p, g, n, init=init, D_shape=D_shape)
    leaves_a = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    leaves_b = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    x, dt, A, B, C, D, s0 = leaves_a
    y_ref, s_ref = ssd_naive(x, dt, A, B, C, D=D, initial_state=s0)
    x, dt, A, B, C, D, s0 = leaves_b
    y, s = ssd_chunked(x, dt, A, B, C, Q, D=D, initial_state=s0)
    assert y.shape == (b, l, h, p) and s.shape == (b, h, p, n) and s.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(s, s_ref) < 1e-5
    # Gradients through both, from the same random cotangents on y and on the final state.
    gen = torch.Generator().manual_seed(1)
    gy, gs = torch.randn(y.shape, generator=gen), torch.randn(s.shape, generator=gen)
    ((y_ref * gy).sum() + (s_ref * gs).sum()).backward()
    ((y * gy).sum() + (s * gs).sum()).backward()
    for name, ta, tb in zip("x dt A B C D s0".split(), leaves_a, leaves_b):
        if ta is None:
            continue
        assert rel_err(tb.grad, ta.grad) < 2e-5, name


def test_ssd_chunk_size_does_not_change_the_result():
    x, dt, A, B, C, D, s0 = _ssd_inputs(2, 50, 4, 4, 2, 8, seed=3, init=True)
    outs = [ssd_chunked(x, dt, A, B, C, Q, D=D, initial_state=s0) for Q in (1, 7, 16, 64)]
    for y, s in outs[1:]:
        assert rel_err(y, outs[0][0]) < 1e-5 and rel_err(s, outs[0][1]) < 1e-5


def test_ssd_final_state_chains_two_halves():
    # Scanning [first half] then [second half from the first's final state] is one scan.
    x, dt, A, B, C, D, _ = _ssd_inputs(1, 40, 4, 4, 1, 8, seed=4)
    y_all, s_all = ssd_chunked(x, dt, A, B, C, 8, D=D)
    y1, s1 = ssd_chunked(x[:, :23], dt[:, :23], A, B[:, :23], C[:, :23], 8, D=D)
    y2, s2 = ssd_chunked(x[:, 23:], dt[:, 23:], A, B[:, 23:], C[:, 23:], 8, D=D, initial_state=s1)
    assert rel_err(torch.cat([y1, y2], 1), y_all) < 1e-5 and rel_err(s2, s_all) < 1e-5


def test_ssd_rejects_bad_group_count():
    x, dt, A, B, C, _, _ = _ssd_inputs(1, 8, 4, 4, 3, 8)
    with pytest.raises(ValueError, match="groups"):
        ssd_chunked(x, dt, A, B, C, 4)


def _values_and_grads(fn, inputs, seed=1):
    """Output, final state and the gradients of every input under fixed random cotangents."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    x, dt, A, B, C, D, s0 = leaves
    y, s = fn(x, dt, A, B, C, D, s0)
    gen = torch.Generator().manual_seed(seed)
    gy, gs = torch.randn(y.shape, generator=gen), torch.randn(s.shape, generator=gen)
    ((y.float() * gy).sum() + (s * gs).sum()).backward()
    return y, s, [t.grad if t is not None else None for t in leaves]


def _naive(x, dt, A, B, C, D, s0):
    return ssd_naive(x, dt, A, B, C, D=D, initial_state=s0)


def _chunked(Q):
    return lambda x, dt, A, B, C, D, s0: ssd_chunked(x, dt, A, B, C, Q, D=D, initial_state=s0)


def _assert_matches_naive(inputs, Q, tol=1e-5, grad_tol=2e-5):
    y_ref, s_ref, g_ref = _values_and_grads(_naive, inputs)
    y, s, g = _values_and_grads(_chunked(Q), inputs)
    assert rel_err(y, y_ref) < tol and rel_err(s, s_ref) < tol
    for name, ga, gb in zip("x dt A B C D s0".split(), g, g_ref):
        if gb is not None:
            assert rel_err(ga, gb) < grad_tol, name


@pytest.fixture
def segsum_calls(monkeypatch):
    """Counts the calls of the segment-sum form (still running it)."""
    calls = []
    real = ssd._ssd_segsum

    def counting(*args, **kwargs):
        calls.append(args[5])  # the chunk size it ran with
        return real(*args, **kwargs)

    monkeypatch.setattr(ssd, "_ssd_segsum", counting)
    return calls


def test_the_factorised_form_runs_for_ordinary_decays(segsum_calls):
    inputs = _ssd_inputs(2, 37, 4, 8, 2, 16, init=True)
    assert ssd._fits_factorised(inputs[1], inputs[2], 8)
    _assert_matches_naive(inputs, 8)
    assert segsum_calls == []


def test_the_two_forms_agree():
    inputs = _ssd_inputs(2, 45, 6, 4, 3, 8, seed=5, init=True, D_shape="hp")
    x, dt, A, B, C, D, s0 = inputs
    y_f, s_f, g_f = _values_and_grads(_chunked(16), inputs)
    y_s, s_s, g_s = _values_and_grads(lambda *t: ssd._ssd_segsum(*t[:5], 16, *t[5:]), inputs)
    assert rel_err(y_f, y_s) < 1e-5 and rel_err(s_f, s_s) < 1e-5
    for ga, gb in zip(g_f, g_s):
        assert rel_err(ga, gb) < 2e-5


def test_long_spans_near_the_limit_stay_accurate(segsum_calls):
    # Every chunk's span just under the limit: the factors reach e^{±47}, the result must not care.
    x, dt, A, B, C, D, s0 = _ssd_inputs(1, 64, 4, 8, 1, 16, seed=6, init=True)
    A = torch.full((4,), -1.0)
    dt = torch.full_like(dt, 0.95 * ssd._FACTORISED_SPAN_MAX / 32) * (1 + 0.05 * torch.rand_like(dt))
    dt = dt * (0.95 * ssd._FACTORISED_SPAN_MAX / dt.unflatten(1, (-1, 32)).sum(2).max())  # max span = 95
    assert ssd._fits_factorised(dt, A, 32)
    _assert_matches_naive((x, dt, A, B, C, D, s0), 32, tol=1e-5, grad_tol=1e-4)
    assert segsum_calls == []


def test_spans_over_the_limit_take_the_segment_sum_form_at_the_same_chunk(segsum_calls):
    # Per-step log-decay -3: a 64-chunk spans 192 (over the limit of 100). The chunk length stays 64
    # (a static function of the shapes); the form changes.
    x, dt, A, B, C, D, s0 = _ssd_inputs(1, 100, 4, 8, 1, 16, seed=7, init=True)
    dt, A = torch.full_like(dt, 1.5), torch.full((4,), -2.0)
    assert not ssd._fits_factorised(dt, A, 64) and ssd._fits_factorised(dt, A, 32)
    _assert_matches_naive((x, dt, A, B, C, D, s0), 64)
    assert segsum_calls == [64, 64]  # the forward, and its recomputation in the backward


def test_a_single_step_reset_takes_the_segment_sum_form(segsum_calls):
    x, dt, A, B, C, D, s0 = _ssd_inputs(1, 30, 4, 8, 1, 16, seed=8, init=True)
    dt = dt.clone()
    dt[0, 11, 2] = 200.0  # exp(dt A) <= e^-40 ... e^-880: the state of head 2 is wiped at step 11
    assert not ssd._fits_factorised(dt, A, 1)  # not even at one token per chunk
    # The chunked form's in-chunk cumulative sums of log-decays this large (~ -800) carry absolute
    # rounding ~1e-4 in fp32 (the recurrence multiplies decays step by step and does not); dt = 200
    # amplifies it in dA (2.8e-4 relative, checked against an fp64 recurrence), hence the bound.
    _assert_matches_naive((x, dt, A, B, C, D, s0), 8, grad_tol=1e-3)
    assert segsum_calls == [8, 8]  # the forward, and its recomputation in the backward


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_fp32(dtype, segsum_calls):
    # bf16/fp16 x, B, C are upcast and the scan runs in fp32, so values and gradients equal the fp32
    # recurrence on the same (rounded) inputs up to the final cast. That includes dA and dt, whose
    # in-chunk terms cancel: rounding those sums to bf16 separately cost 5-30x accuracy there.
    x, dt, A, B, C, D, s0 = _ssd_inputs(2, 40, 4, 8, 2, 16, seed=9, init=True)
    x, B, C = (t.to(dtype) for t in (x, B, C))
    up = lambda t: t.float() if t is not None else None  # noqa: E731
    y_ref, s_ref, g_ref = _values_and_grads(_naive, [up(t) for t in (x, dt, A, B, C, D, s0)])
    y, s, g = _values_and_grads(_chunked(16), (x, dt, A, B, C, D, s0))
    assert y.dtype == dtype and s.dtype == torch.float32 and segsum_calls == []
    # What remains is the casts: of y to dtype, of its incoming gradient (hence every gradient), and
    # of the x, B, C gradients. (Measured: about 3e-3 in bf16, 5e-4 in fp16; the segment-sum form,
    # with bf16 matmuls, gets dA to 1.2e-2.)
    cast_tol = 5e-3 if dtype == torch.bfloat16 else 1e-3
    assert rel_err(y, y_ref) < cast_tol and rel_err(s, s_ref) < 1e-5
    for name, ga, gb in zip("x dt A B C D s0".split(), g, g_ref):
        assert ga.dtype == {"x": dtype, "B": dtype, "C": dtype}.get(name, torch.float32), name
        assert rel_err(ga, gb) < cast_tol, name


def test_the_final_state_is_the_callers_to_modify():
    x, dt, A, B, C, D, s0 = _ssd_inputs(1, 20, 4, 8, 1, 16, seed=11)
    y, s = ssd_chunked(x.requires_grad_(), dt, A, B, C, 8, D=D)
    s.mul_(2)  # a copy, not a view of what the backward saved
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_the_segment_sum_backward_runs_under_a_dispatch_mode():
    # The segment-sum form's backward recomputes its forward under autograd inside the CPU op; it
    # must also run under a TorchDispatchMode (the benchmarks count FLOPs with one), and agree.
    from torch.utils.flop_counter import FlopCounterMode

    x, dt, A, B, C, D, s0 = _ssd_inputs(1, 100, 4, 8, 1, 16, seed=7, init=True)
    dt, A = torch.full_like(dt, 1.5), torch.full((4,), -2.0)
    assert not ssd._fits_factorised(dt, A, 64)
    y_ref, s_ref, g_ref = _values_and_grads(_naive, (x, dt, A, B, C, D, s0))
    counter = FlopCounterMode(display=False)
    with counter:
        y, s, g = _values_and_grads(_chunked(64), (x, dt, A, B, C, D, s0))
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    for name, ga, gb in zip("x dt A B C D s0".split(), g, g_ref):
        if gb is not None:
            assert rel_err(ga, gb) < 2e-5, name
