"""Mamba-2 mixer (DESIGN.md §5): chunked SSD vs the token-by-token recurrence (values and
gradients), the causal conv vs nn.Conv1d, parity with transformers' NemotronHMamba2Mixer, Mamba-2
initialisation, causality, bf16 autocast, and the optional CUDA kernels vs the reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from unidiff.errors import ConfigError
from unidiff.models.mamba2 import Mamba2Mixer, causal_depthwise_conv, ssd_chunked, ssd_naive


def _rel_err(a, b):
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
    assert _rel_err(y, y_ref) < 1e-5
    assert _rel_err(s, s_ref) < 1e-5
    # Gradients through both, from the same random cotangents on y and on the final state.
    gen = torch.Generator().manual_seed(1)
    gy, gs = torch.randn(y.shape, generator=gen), torch.randn(s.shape, generator=gen)
    ((y_ref * gy).sum() + (s_ref * gs).sum()).backward()
    ((y * gy).sum() + (s * gs).sum()).backward()
    for name, ta, tb in zip("x dt A B C D s0".split(), leaves_a, leaves_b):
        if ta is None:
            continue
        assert _rel_err(tb.grad, ta.grad) < 2e-5, name


def test_ssd_chunk_size_does_not_change_the_result():
    x, dt, A, B, C, D, s0 = _ssd_inputs(2, 50, 4, 4, 2, 8, seed=3, init=True)
    outs = [ssd_chunked(x, dt, A, B, C, Q, D=D, initial_state=s0) for Q in (1, 7, 16, 64)]
    for y, s in outs[1:]:
        assert _rel_err(y, outs[0][0]) < 1e-5 and _rel_err(s, outs[0][1]) < 1e-5


def test_ssd_final_state_chains_two_halves():
    # Scanning [first half] then [second half from the first's final state] is one scan.
    x, dt, A, B, C, D, _ = _ssd_inputs(1, 40, 4, 4, 1, 8, seed=4)
    y_all, s_all = ssd_chunked(x, dt, A, B, C, 8, D=D)
    y1, s1 = ssd_chunked(x[:, :23], dt[:, :23], A, B[:, :23], C[:, :23], 8, D=D)
    y2, s2 = ssd_chunked(x[:, 23:], dt[:, 23:], A, B[:, 23:], C[:, 23:], 8, D=D, initial_state=s1)
    assert _rel_err(torch.cat([y1, y2], 1), y_all) < 1e-5 and _rel_err(s2, s_all) < 1e-5


def test_ssd_rejects_bad_group_count():
    x, dt, A, B, C, _, _ = _ssd_inputs(1, 8, 4, 4, 3, 8)
    with pytest.raises(ValueError, match="groups"):
        ssd_chunked(x, dt, A, B, C, 4)


def test_causal_conv_matches_nn_conv1d():
    torch.manual_seed(0)
    Bsz, L, Cd, K = 2, 11, 6, 4
    conv = torch.nn.Conv1d(Cd, Cd, K, groups=Cd, padding=K - 1)
    x = torch.randn(Bsz, L, Cd)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = conv(xa.transpose(1, 2))[..., :L].transpose(1, 2)
    w = conv.weight.detach().squeeze(1).clone().requires_grad_()
    bias = conv.bias.detach().clone().requires_grad_()
    out = causal_depthwise_conv(xb, w, bias)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w.grad, conv.weight.grad.squeeze(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bias.grad, conv.bias.grad, atol=1e-5, rtol=1e-5)


# ---- parity with transformers' Nemotron-H mixer -------------------------------------------------

HID, HEADS, HEADDIM, NSTATE, CHUNK, SEQ = 32, 8, 8, 16, 16, 37  # 37: not a multiple of the chunk


def _hf_mixer(n_groups):
    nh = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    from transformers import NemotronHConfig

    cfg = NemotronHConfig(
        hidden_size=HID, mamba_num_heads=HEADS, mamba_head_dim=HEADDIM, ssm_state_size=NSTATE,
        n_groups=n_groups, chunk_size=CHUNK, conv_kernel=4, use_conv_bias=True, use_bias=False,
        layer_norm_epsilon=1e-5, layers_block_type=["linear_attention"], vocab_size=16,
    )
    torch.manual_seed(0)
    hf = nh.NemotronHMamba2Mixer(cfg, layer_idx=0)
    with torch.no_grad():  # transformers' init is deterministic (A = 1..h, dt_bias = 1): randomise
        for name, prm in hf.named_parameters():
            prm.normal_(0.0, 0.3)
        hf.A_log.copy_(torch.log(torch.rand(HEADS) * 8 + 0.5))
        # Some dt below Nemotron-H's clamp at time_step_min, so the dt limit is exercised too.
        hf.dt_bias.copy_(torch.randn(HEADS) * 2 - 4)
        hf.norm.weight.add_(1.0)
    return hf


def _ours_from(hf, n_groups):
    ours = Mamba2Mixer(HID, d_state=NSTATE, d_conv=4, expand=2, headdim=HEADDIM, n_groups=n_groups,
                       chunk_size=CHUNK, dt_limit=hf.time_step_limit, norm_eps=1e-5)
    ours.load_state_dict(hf.state_dict())  # strict: same names and shapes
    return ours


@pytest.mark.parametrize("n_groups", [1, 2])
@pytest.mark.parametrize("train", [False, True])
def test_parity_with_transformers_nemotron_h(n_groups, train):
    hf = _hf_mixer(n_groups)
    ours = _ours_from(hf, n_groups)
    hf.train(train), ours.train(train)
    x = torch.randn(2, SEQ, HID)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = hf(xa), ours(xb)  # on CPU transformers runs its PyTorch path
    assert _rel_err(yb, ya) < 1e-5
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert _rel_err(xb.grad, xa.grad) < 1e-5
    hf_params = dict(hf.named_parameters())
    for name, prm in ours.named_parameters():
        assert _rel_err(prm.grad, hf_params[name].grad) < 1e-4, name


# ---- the mixer on its own ------------------------------------------------------------------------

def test_mamba2_initialisation():
    dt_min, dt_max = 1e-3, 0.1
    m = Mamba2Mixer(64, d_state=8, headdim=8, dt_min=dt_min, dt_max=dt_max, A_init_range=(1, 16))
    dt = F.softplus(m.dt_bias)  # dt_bias is the inverse softplus of the initial dt
    assert (dt >= dt_min * (1 - 1e-4)).all() and (dt <= dt_max * (1 + 1e-4)).all()
    A = -torch.exp(m.A_log)
    assert (A <= -1 + 1e-5).all() and (A >= -16 - 1e-4).all()
    assert torch.equal(m.D, torch.ones(16))
    assert m.in_proj.out_features == 2 * 128 + 2 * 8 + 16 and m.conv1d.groups == 128 + 2 * 8


def test_mixer_is_causal():
    torch.manual_seed(0)
    m = Mamba2Mixer(16, d_state=8, headdim=8, n_groups=2, chunk_size=4)
    x = torch.randn(2, 13, 16)
    y = m(x)
    t = 6
    x2 = x.clone()
    x2[:, t] += torch.randn(2, 16)
    y2 = m(x2)
    torch.testing.assert_close(y2[:, :t], y[:, :t], atol=0, rtol=0)  # the past is untouched
    assert (y2[:, t:] - y[:, t:]).abs().amax(dim=(0, 2)).min() > 0  # every later output moves


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    m = Mamba2Mixer(32, d_state=16, headdim=8, n_groups=2, chunk_size=8)
    x = torch.randn(2, 21, 32)
    y32 = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = m(x)
    assert torch.isfinite(y16).all()
    assert _rel_err(y16, y32) < 5e-2
    y16.float().sum().backward()  # and it trains
    assert torch.isfinite(m.A_log.grad).all() and m.A_log.grad.abs().sum() > 0


def test_mixer_config_errors():
    with pytest.raises(ConfigError, match="headdim"):
        Mamba2Mixer(20, headdim=16)
    with pytest.raises(ConfigError, match="n_groups"):
        Mamba2Mixer(32, headdim=16, n_groups=3)


# ---- CUDA -----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_reference_path_matches_cpu():
    torch.manual_seed(0)
    m = Mamba2Mixer(32, d_state=16, headdim=8, n_groups=2, chunk_size=8, use_fast_path=False)
    x = torch.randn(2, 37, 32)
    y_cpu = m(x)
    y_gpu = m.cuda()(x.cuda()).cpu()
    assert _rel_err(y_gpu, y_cpu) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fast_path_matches_reference():
    pytest.importorskip("mamba_ssm")
    torch.manual_seed(0)
    m = Mamba2Mixer(64, d_state=16, headdim=16, n_groups=2, chunk_size=16).cuda()
    x = torch.randn(2, 70, 64, device="cuda", requires_grad=True)
    y_fast = m(x)
    m.use_fast_path = False
    y_ref = m(x)
    assert _rel_err(y_fast, y_ref) < 1e-3
