"""The Mamba-2 mixer (DESIGN.md §5): a causal selective state-space layer, in pure PyTorch.

:class:`Mamba2Mixer` is the mixer as Nemotron-H / Mamba-2 build it: in_proj -> (z, xBC, dt),
depthwise causal conv + SiLU (shifted multiply-adds with a hand-written backward, pinned to
nn.Conv1d by a test), the SSD scan (:mod:`unidiff.models.ssd`: chunked, pinned to a token-by-token
recurrence by tests), D skip, gated group-RMSNorm, out_proj. Its parameter names and layouts are
the ones of ``transformers``' ``NemotronHMamba2Mixer``, which is its test oracle. On CUDA it can
optionally use the ``mamba_ssm`` / ``causal_conv1d`` kernels (imported lazily, never required).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..errors import ConfigError
from .ssd import ssd_chunked, ssd_naive  # noqa: F401  (re-exported: the mixer's scan)

__all__ = ["ssd_naive", "ssd_chunked", "causal_depthwise_conv", "Mamba2Mixer", "RMSNormGated"]


class _CausalDepthwiseConv(torch.autograd.Function):
    """``out_t = act(bias + Σ_j w_{K-1-j} ⊙ x_{t-j})`` on (B, L, C), with a hand-written backward.

    Equal to ``nn.Conv1d(C, C, K, groups=C, padding=K-1)`` with the first L outputs kept, then the
    optional SiLU (a test holds them together), but in the (B, L, C) layout the mixer already has,
    with no padded copy (each tap is a shifted in-place multiply-add on a slice), the SiLU fused in
    (the pre-activation is saved; its gradient is one ``silu_backward`` pass), and without the
    depthwise-convolution backward, which is slow on CPU. K is 4: a few fused multiply-adds.
    """

    @staticmethod
    def forward(ctx, x, w, bias, silu):
        K = w.shape[1]
        # Tap j (lag j) multiplies x_{t-j} by w[:, K-1-j]; lags past the start see zeros (causal).
        pre = torch.addcmul(bias, x, w[:, K - 1]) if bias is not None else x * w[:, K - 1]
        for j in range(1, min(K, x.shape[1])):
            pre[:, j:].addcmul_(x[:, :-j], w[:, K - 1 - j])
        ctx.save_for_backward(x, w, pre if silu else None)
        ctx.has_bias, ctx.silu = bias is not None, silu
        return F.silu(pre) if silu else pre

    @staticmethod
    def backward(ctx, grad):
        x, w, pre = ctx.saved_tensors
        K, L = w.shape[1], x.shape[1]
        dpre = torch.ops.aten.silu_backward(grad, pre) if ctx.silu else grad
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # x_s feeds out_{s+j} through w[:, K-1-j]: gather the output gradient shifted back.
            grad_x = dpre * w[:, K - 1]
            for j in range(1, min(K, L)):
                grad_x[:, :-j].addcmul_(dpre[:, j:], w[:, K - 1 - j])
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(w)
            for j in range(min(K, L)):
                grad_w[:, K - 1 - j] = (dpre[:, j:] * x[:, : L - j]).sum(1).sum(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = dpre.sum(1).sum(0)
        return grad_x, grad_w, grad_b, None


def causal_depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, activation: Optional[str] = None
) -> torch.Tensor:
    """Causal depthwise 1-D convolution over L, then ``activation`` (None or "silu"), as
    ``causal_conv1d_fn`` has it. x (B, L, C), weight (C, K), bias (C,) -> (B, L, C)."""
    if activation not in (None, "silu"):
        raise ValueError(f"causal_depthwise_conv: activation must be None or 'silu', got {activation!r}")
    # Under autocast, run in the dtype autocast would give a convolution, like nn.Conv1d does.
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _CausalDepthwiseConv.apply(x, weight, bias, activation == "silu")


class _GatedRMSNorm(torch.autograd.Function):
    """``w ⊙ rmsnorm_groups(y ⊙ silu(z))`` in fp32 with a hand-written backward.

    Per group of ``gs`` channels, with ``ŷ = (y ⊙ silu z) r`` and ``r = (mean(yg²) + eps)^-½``:
    ``∂yg = r (w ⊙ dout - ŷ mean(w ⊙ dout ⊙ ŷ))``, ``∂w = Σ dout ⊙ ŷ``, then through the gate.
    Saves ``silu(z)``, ``yg`` and ``r`` so that the backward is ten passes over (…, dim) tensors.
    """

    @staticmethod
    def forward(ctx, y, z, weight, group_size, eps):
        shape, G = y.shape, y.shape[-1] // group_size
        z32, w = z.float(), weight.float()
        s = F.silu(z32)
        yg = (y.float() * s).reshape(-1, G, group_size)
        # r = (|yg|² / gs + eps)^-1/2 from one reduction pass.
        r = torch.linalg.vector_norm(yg, dim=-1, keepdim=True).pow_(2).div_(group_size).add_(eps).rsqrt_()
        ctx.save_for_backward(y, z32, w, s, yg, r)
        return (yg * r).reshape(shape).mul_(w)

    @staticmethod
    def backward(ctx, dout):
        y, z32, w, s, yg, r = ctx.saved_tensors
        N, G, gs = yg.shape
        wg = w.view(G, gs)
        d = dout.float().reshape(N, G, gs)
        y_hat = yg * r
        P = d * y_hat
        dw = P.sum(0).view(-1)
        c = torch.einsum("ngd,gd->ng", P, wg).unsqueeze(-1).div_(gs)  # mean(w ⊙ dout ⊙ ŷ) per group
        dyg = (d * wg).addcmul_(y_hat, c, value=-1).mul_(r).reshape(dout.shape)
        dy = dyg * s
        dz = torch.ops.aten.silu_backward(dyg.mul_(y.float()), z32)
        return dy.to(y.dtype), dz, dw.to(w.dtype), None, None


class RMSNormGated(nn.Module):
    """``norm(y * silu(z))`` with one RMS per group of ``group_size`` channels, times a weight.

    Nemotron-H's ``MambaRMSNormGated`` with the gate applied before the norm (``norm_before_gate
    = False``); computed in fp32 (also under autocast), with a hand-written backward
    (:class:`_GatedRMSNorm`). y, z: (..., dim) -> (..., dim) fp32.
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        if dim % group_size:
            raise ConfigError(f"RMSNormGated: dim {dim} is not a multiple of group_size {group_size}")
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=y.device.type, enabled=False):
            return _GatedRMSNorm.apply(y, z, self.weight, self.group_size, self.eps)


@functools.lru_cache(maxsize=None)
def _fast_kernels():
    """The optional CUDA kernels, imported on first use: (mamba_chunk_scan_combined or None,
    causal_conv1d_fn or None). Either package may be absent; the pure-PyTorch path is the default."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # ImportError, or a broken triton/CUDA install
        mamba_chunk_scan_combined = None
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        causal_conv1d_fn = None
    return mamba_chunk_scan_combined, causal_conv1d_fn


class Mamba2Mixer(nn.Module):
    """Causal Mamba-2 mixer over a sequence (DESIGN.md §5). x (B, L, D) -> (B, L, D).

    Args:
        hidden_size: model width D. ``d_inner = expand * D`` channels run through the SSM as
            ``d_inner / headdim`` heads.
        d_state: SSM state size n. d_conv: causal depthwise conv kernel. n_groups: B/C groups.
        chunk_size: SSD chunk Q. dt_min, dt_max, dt_init_floor, A_init_range: Mamba-2 init.
        dt_limit: clamp of dt after softplus (Nemotron-H clamps below at ``time_step_min``).
        conv_bias / bias: biases of the conv / the two projections. norm_eps: gated RMSNorm eps.
        use_fast_path: on CUDA, use ``mamba_ssm``/``causal_conv1d`` when they import.

    Parameter names and layouts equal ``transformers``' ``NemotronHMamba2Mixer`` (in_proj output
    split as ``[z (d_inner), xBC (d_inner + 2 g n), dt (heads)]``), so its weights load here.
    """

    def __init__(
        self,
        hidden_size: int,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        n_groups: int = 1,
        chunk_size: int = 64,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_init_range: Tuple[float, float] = (1, 16),
        dt_limit: Tuple[float, float] = (0.0, float("inf")),
        conv_bias: bool = True,
        bias: bool = False,
        norm_eps: float = 1e-5,
        use_fast_path: bool = True,
    ):
        super().__init__()
        d_inner = expand * hidden_size
        if d_inner % headdim:
            raise ConfigError(f"mamba: expand * hidden_size = {d_inner} is not a multiple of headdim = {headdim}")
        nheads = d_inner // headdim
        if nheads % n_groups:
            raise ConfigError(f"mamba: number of heads {nheads} is not a multiple of n_groups = {n_groups}")
        if not 0 < dt_min <= dt_max:
            raise ConfigError(f"mamba: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.hidden_size, self.d_inner, self.d_state = hidden_size, d_inner, d_state
        self.nheads, self.headdim, self.n_groups = nheads, headdim, n_groups
        self.chunk_size, self.dt_limit, self.use_fast_path = chunk_size, tuple(dt_limit), use_fast_path
        self.conv_dim = d_inner + 2 * n_groups * d_state  # x, B, C go through the conv together

        self.in_proj = nn.Linear(hidden_size, d_inner + self.conv_dim + nheads, bias=bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1, bias=conv_bias
        )
        self.dt_bias = nn.Parameter(torch.empty(nheads))
        self.A_log = nn.Parameter(torch.empty(nheads))
        self.D = nn.Parameter(torch.empty(nheads))
        self.norm = RMSNormGated(d_inner, group_size=d_inner // n_groups, eps=norm_eps)
        self.out_proj = nn.Linear(d_inner, hidden_size, bias=bias)
        self._init_ssm(dt_min, dt_max, dt_init_floor, A_init_range)

    @torch.no_grad()
    def _init_ssm(self, dt_min, dt_max, dt_init_floor, A_init_range):
        """Mamba-2 initialisation of the SSM parameters (the projections keep nn.Linear's)."""
        # dt log-uniform in [dt_min, dt_max], floored; dt_bias = softplus⁻¹(dt) = dt + log(1 - e^{-dt}).
        u = torch.rand(self.nheads)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # A = -exp(A_log), A_log = log U(A_init_range): a spread of memory lengths across heads.
        lo, hi = A_init_range
        self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(lo, hi)))
        self.D.fill_(1.0)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # mamba's convention, for optimisers that honour it

    def _conv(self, xBC: torch.Tensor, conv_fn) -> torch.Tensor:
        """Depthwise causal conv over L + SiLU. xBC (B, L, conv_dim) -> (B, L, conv_dim)."""
        w = self.conv1d.weight.squeeze(1)  # (conv_dim, K)
        if conv_fn is not None:
            out = conv_fn(xBC.transpose(1, 2).contiguous(), w, self.conv1d.bias, activation="silu")
            return out.transpose(1, 2)
        return causal_depthwise_conv(xBC, w, self.conv1d.bias, activation="silu")

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: (B, L, D) -> (B, L, D); output at position t depends on u[:, :t+1] only: exactly in the
        mathematics, up to rounding in the numbers (the factorised SSD scales a chunk's rows by a
        factor computed from the whole chunk, which can move the last fp32 bit of earlier outputs,
        and so occasionally flip a bf16 rounding under autocast; see ssd.py)."""
        Bsz, L, _ = u.shape
        g, n, h = self.n_groups, self.d_state, self.nheads
        ssd_kernel, conv_fn = _fast_kernels() if (self.use_fast_path and u.is_cuda) else (None, None)

        # in_proj as three matmuls on row blocks of its weight, the same numbers as one matmul then a
        # split, but the backward assembles the gradient of the small weight, not of the (B, L, ·)
        # activation (which would be one more full pass over the widest tensor of the layer).
        sizes = [self.d_inner, self.conv_dim, h]
        bias = self.in_proj.bias.split(sizes) if self.in_proj.bias is not None else (None,) * 3
        z, xBC, dt = (F.linear(u, w, b_) for w, b_ in zip(self.in_proj.weight.split(sizes), bias))
        xBC = self._conv(xBC, conv_fn)  # (B, L, conv_dim)
        x, B, C = torch.split(xBC, [self.d_inner, g * n, g * n], dim=-1)
        x = rearrange(x, "b l (h p) -> b l h p", p=self.headdim)
        B = rearrange(B, "b l (g n) -> b l g n", g=g)
        C = rearrange(C, "b l (g n) -> b l g n", g=g)

        # Discretisation parameters in fp32 whatever the autocast dtype (tiny, and exp-sensitive).
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)  # (B, L, h)
        A = -torch.exp(self.A_log.float())  # (h,) < 0: a decay

        if ssd_kernel is not None:
            y = ssd_kernel(x, dt, A, B, C, self.chunk_size, D=self.D.float())
        else:
            y, _ = ssd_chunked(x, dt, A, B, C, self.chunk_size, D=self.D)
        y = rearrange(y, "b l h p -> b l (h p)")

        y = self.norm(y, z)  # gated group-RMSNorm, fp32
        return self.out_proj(y.to(u.dtype))  # (B, L, D)
