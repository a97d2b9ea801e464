"""Mamba-2 mixer (DESIGN.md §5): the causal conv vs nn.Conv1d, the gated RMSNorm vs its formula,
parity with transformers' NemotronHMamba2Mixer, Mamba-2 initialisation, causality, bf16 autocast,
and the optional CUDA kernels vs the reference. The SSD scan itself: test_ssd.py."""

import pytest
import torch
import torch.nn.functional as F

from unidiff.errors import ConfigError
from unidiff.models.mamba2 import Mamba2Mixer, RMSNormGated, causal_depthwise_conv
from test_ssd import rel_err as _rel_err


@pytest.mark.parametrize("L", [11, 2])  # 2: shorter than the kernel
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_causal_conv_matches_nn_conv1d(L, activation, use_bias):
    torch.manual_seed(0)
    Bsz, Cd, K = 2, 6, 4
    conv = torch.nn.Conv1d(Cd, Cd, K, groups=Cd, padding=K - 1, bias=use_bias)
    x = torch.randn(Bsz, L, Cd)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = conv(xa.transpose(1, 2))[..., :L].transpose(1, 2)
    ref = F.silu(ref) if activation == "silu" else ref
    w = conv.weight.detach().squeeze(1).clone().requires_grad_()
    bias = conv.bias.detach().clone().requires_grad_() if use_bias else None
    out = causal_depthwise_conv(xb, w, bias, activation=activation)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w.grad, conv.weight.grad.squeeze(1), atol=1e-5, rtol=1e-5)
    if use_bias:
        torch.testing.assert_close(bias.grad, conv.bias.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups", [1, 4])
def test_gated_rmsnorm_matches_its_formula_in_fp64(groups):
    # norm(y ⊙ silu z) per group times w, differentiated by autograd in fp64: the oracle of the
    # hand-written backward (values and all three gradients).
    torch.manual_seed(0)
    dim = 32
    norm = RMSNormGated(dim, group_size=dim // groups, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    y, z, g = torch.randn(3, 5, dim), torch.randn(3, 5, dim), torch.randn(3, 5, dim)
    leaves = [t.double().requires_grad_() for t in (y, z, norm.weight.detach())]
    yd, zd, wd = leaves
    yg = (yd * F.silu(zd)).unflatten(-1, (groups, -1))
    ref = (wd.unflatten(-1, (groups, -1)) * yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + 1e-5)).flatten(-2)
    (ref * g.double()).sum().backward()
    ya, za = y.clone().requires_grad_(), z.clone().requires_grad_()
    out = norm(ya, za)
    (out * g).sum().backward()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for got, want in ((ya.grad, yd.grad), (za.grad, zd.grad), (norm.weight.grad, wd.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_gated_rmsnorm_takes_permuted_inputs_and_gradients():
    torch.manual_seed(0)
    norm = RMSNormGated(32, group_size=8)
    y = torch.randn(5, 4, 32).transpose(0, 1).requires_grad_()  # not contiguous
    z = torch.randn(4, 5, 32, requires_grad=True)
    out = norm(y, z)
    g = torch.randn(5, 4, 32)
    (out.transpose(0, 1) * g).sum().backward()  # the incoming gradient is not contiguous either
    y2, z2 = y.detach().contiguous().requires_grad_(), z.detach().clone().requires_grad_()
    (norm(y2, z2) * g.transpose(0, 1)).sum().backward()
    torch.testing.assert_close(out, norm(y2, z2))
    torch.testing.assert_close(y.grad, y2.grad)
    torch.testing.assert_close(z.grad, z2.grad)


def test_gated_rmsnorm_rejects_a_ragged_group():
    with pytest.raises(ConfigError, match="group_size"):
        RMSNormGated(30, group_size=8)


def test_causal_conv_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        causal_depthwise_conv(torch.randn(1, 4, 3), torch.randn(3, 4), activation="relu")


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
    # The past is untouched, up to rounding: the factorised scan scales a chunk's rows by a factor
    # that depends on the whole chunk (it cancels exactly in the mathematics, not in the last bit).
    torch.testing.assert_close(y2[:, :t], y[:, :t], atol=1e-6, rtol=0)
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
