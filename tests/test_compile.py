"""torch.compile over the fast paths (issue 10): no graph breaks in the SSD scan, the Mamba-2 mixer,
the MoE dispatch and a whole backbone; compiled values and gradients equal eager ones (and the
readable twins); the custom ops' registrations (fake, autograd) pass ``torch.library.opcheck``.

Graph breaks are counted by ``torch._dynamo.explain`` (the mixer) and forbidden by
``fullgraph=True`` (every compile here). Most tests compile with the ``aot_eager`` backend: it runs dynamo and AOTAutograd (so the fake
functions and the registered backwards are exercised, and a data-dependent Python value would
fail), without inductor's C++ code generation, which takes minutes on this project's CPUs. One test
compiles the SSD op with inductor, the backend the benchmark times. Sizes are tiny.
"""

import pytest
import torch

from unidiff.models import moe as moe_mod
from unidiff.models import ssd
from unidiff.models.backbone import HybridBackbone
from unidiff.models.mamba2 import Mamba2Mixer
from unidiff.models.moe import MoE
from unidiff.models.presets import get_preset
from unidiff.models.ssd import ssd_chunked, ssd_naive

from ssd_fixtures import ssd_inputs


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _values_and_grads(fn, inputs, seed=1):
    leaves = [t.clone().requires_grad_() for t in inputs]
    y, s = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    ((y * torch.randn(y.shape, generator=gen)).sum() + (s * torch.randn(s.shape, generator=gen)).sum()).backward()
    return y.detach(), s.detach(), [t.grad for t in leaves]


def _assert_close_all(got, ref, rtol, atol):
    for a, b in zip(got[:2], ref[:2]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    for name, a, b in zip("x dt A B C D s0".split(), got[2], ref[2]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)


def _breaks(fn, *args):
    """Number of graph breaks dynamo finds in ``fn(*args)``, with their reasons."""
    explanation = torch._dynamo.explain(fn)(*args)
    return explanation.graph_break_count, [b.reason for b in explanation.break_reasons]


@pytest.mark.parametrize("reset", [False, True], ids=["factorised", "segment_sum"])
def test_ssd_chunked_compiles_to_one_graph_and_matches_the_recurrence(reset):
    # Both CPU forms: ordinary decays (factorised) and a state reset (segment-sum, whose backward
    # recomputes under torch.func). Oracle: the token-by-token recurrence, eager.
    inputs = ssd_inputs()
    if reset:
        inputs[1][0, 7, 1] = 300.0  # exp(dt A) < e^-60 at one step of head 1
        assert not ssd._fits_factorised(inputs[1], inputs[2], 8)

    def chunked(x, dt, A, B, C, D, s0):
        return ssd_chunked(x, dt, A, B, C, 8, D=D, initial_state=s0)

    compiled = torch.compile(chunked, backend="aot_eager", fullgraph=True)
    ref = _values_and_grads(lambda x, dt, A, B, C, D, s0: ssd_naive(x, dt, A, B, C, D=D, initial_state=s0), inputs)
    # fp32 against an fp32 recurrence: the chunked sums round differently; the reset's in-chunk
    # cumulative sums (~ -600) carry ~1e-4 absolute rounding into dA (test_ssd.py says why).
    _assert_close_all(_values_and_grads(compiled, inputs), ref, rtol=1e-4, atol=1e-3 if reset else 1e-4)


def test_ssd_on_another_device_reads_no_data():
    # Off the CPU the form and the chunk length come from shapes alone. Meta tensors have no data:
    # any .item(), bool(tensor) or tolist() raises, so finishing proves there is no host read (and
    # hence no device synchronisation on CUDA); the gpu test checks it under set_sync_debug_mode.
    x, dt, A, B, C, D, s0 = (t.to("meta") for t in ssd_inputs(l=37))
    y, s = ssd_chunked(x, dt, A, B, C, 16, D=D, initial_state=s0)
    assert y.shape == x.shape and s.shape == s0.shape and y.device.type == "meta"
    with pytest.raises(RuntimeError):  # the premise: a data read on meta fails
        bool(dt.sum() > 0)


def test_the_other_devices_form_compiles_to_one_graph_and_matches_the_recurrence():
    # What CUDA runs (segment-sum, fp32 matmuls), compiled on the CPU with fullgraph: a
    # data-dependent Python value anywhere in it would be a graph break, i.e. an error here.
    def segsum(x, dt, A, B, C, D, s0):
        return ssd._ssd_segsum(x, dt, A, B, C, 8, D, s0, mm_dtype=torch.float32)

    inputs = ssd_inputs(l=19)
    ref = _values_and_grads(lambda x, dt, A, B, C, D, s0: ssd_naive(x, dt, A, B, C, D=D, initial_state=s0), inputs)
    got = _values_and_grads(torch.compile(segsum, backend="aot_eager", fullgraph=True), inputs)
    _assert_close_all(got, ref, rtol=1e-4, atol=1e-4)


def test_the_custom_ops_pass_opcheck():
    # Schema, fake (meta) function, autograd registration and the dispatcher's view of them agree.
    x, dt, A, B, C, D, s0 = ssd_inputs(l=13)
    for Q in (4, 13):
        args = (x.requires_grad_(), dt.requires_grad_(), A.requires_grad_(), B, C, D, s0, Q)
        torch.library.opcheck(torch.ops.unidiff.ssd_chunked_cpu.default, args)
    gen = torch.Generator().manual_seed(2)
    counts = torch.tensor([3, 0, 4, 1])
    x_SH = torch.randn(8, 6, generator=gen, requires_grad=True)
    up, down = torch.randn(4, 5, 6, generator=gen), torch.randn(4, 6, 5, generator=gen)
    torch.library.opcheck(torch.ops.unidiff.moe_experts_loop.default, (x_SH, counts, up.requires_grad_(), down))


def test_the_experts_loop_op_matches_the_readable_loop_in_values_and_gradients():
    # The op's hand-written backward against autograd through GroupedExperts.forward_loop.
    torch.manual_seed(0)
    experts = moe_mod.GroupedExperts(4, 6, 5)
    counts = torch.tensor([3, 0, 4, 1])  # an idle expert: an empty slice
    x = torch.randn(8, 6)
    g = torch.randn(8, 6)

    def run(fn):
        experts.zero_grad()
        xi = x.clone().requires_grad_()
        out = fn(xi)
        (out * g).sum().backward()
        return out.detach(), xi.grad, experts.up_proj.grad.clone(), experts.down_proj.grad.clone()

    ref = run(lambda xi: experts.forward_loop(xi, counts))
    got = run(lambda xi: moe_mod._experts_loop(xi, counts, experts.up_proj, experts.down_proj)[0])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _mixer():
    torch.manual_seed(0)
    m = Mamba2Mixer(32, d_state=8, headdim=8, chunk_size=8)
    with torch.no_grad():
        m.D.normal_()
    return m


def _grads(module, fn, x):
    module.zero_grad()
    xi = x.clone().requires_grad_()
    out = fn(xi)
    out = out[0] if isinstance(out, tuple) else out
    out.float().square().mean().backward()
    return [out.detach(), xi.grad] + [p.grad.clone() for p in module.parameters() if p.grad is not None]


def test_mamba_mixer_has_no_graph_breaks_and_compiled_matches_eager():
    m = _mixer()
    x = torch.randn(2, 21, 32)
    count, reasons = _breaks(m, x)  # what torch._dynamo.explain reports
    assert count == 0, reasons
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    for a, b in zip(_grads(m, compiled, x), _grads(m, m, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ssd_compiled_by_inductor_takes_strided_inputs():
    # The backend the benchmark times, on the op alone (inductor's C++ code generation of a whole
    # sublayer takes minutes on this project's CPUs). Inductor hands the op strided views, as the
    # mixer does (x, B, C are slices of one conv output), and checks the strides the fake promises.
    x, dt, A, B, C, D, s0 = ssd_inputs(l=20)
    xBC = torch.cat([x.flatten(2), B.flatten(2), C.flatten(2)], dim=-1)  # (b, l, h p + 2 g n)

    def chunked(xBC, dt, A, D, s0):
        xv, Bv, Cv = xBC.split([16, 16, 16], dim=-1)
        y, s = ssd_chunked(xv.unflatten(2, (4, 4)), dt, A, Bv.unflatten(2, (2, 8)), Cv.unflatten(2, (2, 8)), 8,
                           D=D, initial_state=s0)
        return y * 2, s

    def parts(fn):
        leaves = [t.clone().requires_grad_() for t in (xBC, dt, A, D, s0)]
        y, s = fn(*leaves)
        (y.square().sum() + s.sum()).backward()
        return [y.detach(), s.detach()] + [t.grad for t in leaves]

    for a, b in zip(parts(torch.compile(chunked, fullgraph=True)), parts(chunked)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_moe_has_no_graph_breaks_and_compiled_matches_eager(dtype):
    # fp32 takes the loop op under compile, bf16 (autocast) the grouped matmul.
    torch.manual_seed(0)
    m = MoE(16, num_experts=4, top_k=2, intermediate_size=8, shared_intermediate_size=8, aux_loss_coef=0.01)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(2, 6, 16)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast("cpu", enabled=False)
    with ctx:
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
        got, ref = _grads(m, compiled, x), _grads(m, m, x)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "fp32" else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b.float(), **tol)


def test_whole_backbone_has_no_graph_breaks_and_compiled_matches_eager():
    # Every sublayer kind (debug preset: M * E -), registers, training mode (the MoE counts).
    torch.manual_seed(0)
    bb = HybridBackbone(in_channels=1, input_size=(8, 8), **get_preset("debug"))
    with torch.no_grad():
        for layer in bb.layers:
            layer.adaLN[-1].weight.normal_(std=0.1)
    z, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 900])
    compiled = torch.compile(bb, backend="aot_eager", fullgraph=True)  # a graph break is an error

    def run(model):
        bb.zero_grad()
        out = model(z, t)
        (out.tokens.square().mean() + out.registers.square().mean()).backward()
        return [out.tokens.detach(), out.registers.detach()] + [p.grad.clone() for p in bb.parameters()
                                                               if p.grad is not None]

    got, ref = run(compiled), run(bb)
    assert len(got) == len(ref) > 10
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
