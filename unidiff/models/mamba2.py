"""The Mamba-2 mixer (DESIGN.md §5): a causal selective state-space layer, in pure PyTorch.

The state-space model (SSD, Dao & Gu 2024, "Transformers are SSMs", eq. 2 / Listing 1) per head:

    s_t = exp(dt_t A) s_{t-1} + dt_t x_t ⊗ B_t        s_t: (p, n), fp32
    y_t = C_t · s_t + D x_t

Two implementations that a test holds together (STYLE.md habit 12):
- :func:`ssd_naive`: the recurrence above, one token at a time; slow, obviously right.
- :func:`ssd_chunked`: the chunked "state-space dual" form: inside a chunk of ``Q`` tokens the
  output is a masked attention-like product (the quadratic "diagonal blocks"); across chunks only
  the ``(p, n)`` states travel. Matmuls run in the input dtype, every exponent/decay and the state
  in fp32.

:class:`Mamba2Mixer` wraps it as Nemotron-H / Mamba-2 do: in_proj -> (z, xBC, dt), depthwise causal
conv + SiLU (shifted multiply-adds with a hand-written backward, pinned to nn.Conv1d by a test),
SSD, D skip, gated group-RMSNorm, out_proj. Its parameter names and layouts are the
ones of ``transformers``' ``NemotronHMamba2Mixer``, which is its test oracle. On CUDA it can
optionally use the ``mamba_ssm`` / ``causal_conv1d`` kernels (imported lazily, never required).

Shape legend: b batch, l sequence, c chunks, q/s positions inside a chunk, h heads, p head dim,
g groups (B and C are shared by the ``r = h/g`` heads of a group), n state size.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from ..errors import ConfigError

__all__ = ["ssd_naive", "ssd_chunked", "causal_depthwise_conv", "Mamba2Mixer", "RMSNormGated"]


def _check_ssd_shapes(x, dt, A, B, C):
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    if dt.shape != (b, l, h) or A.shape != (h,) or B.shape != (b, l, g, n) or C.shape != B.shape:
        raise ValueError(
            f"ssd: expected x (b,l,h,p), dt (b,l,h), A (h,), B/C (b,l,g,n); got x {tuple(x.shape)}, "
            f"dt {tuple(dt.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}"
        )
    if h % g:
        raise ValueError(f"ssd: heads ({h}) must be a multiple of groups ({g})")


def _d_skip(D: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """D x with D of shape (h,) or (h, p); x (b, l, h, p), computed in fp32."""
    D = D.float()
    return (D[:, None] if D.dim() == 1 else D) * x.float()


def ssd_naive(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The SSD recurrence, token by token (the readable reference for :func:`ssd_chunked`).

    Args:
        x: (b, l, h, p) inputs. dt: (b, l, h) step sizes (already softplus'ed and biased).
        A: (h,) negative decay rates. B, C: (b, l, g, n), ``h % g == 0``.
        D: optional (h,) or (h, p) skip. initial_state: optional (b, h, p, n).
    Returns:
        y (b, l, h, p) in x's dtype, and the final state (b, h, p, n) in fp32.
    """
    _check_ssd_shapes(x, dt, A, B, C)
    b, l, h, p = x.shape
    r = h // B.shape[2]
    # Broadcast each group's B, C to its heads; all math in fp32.
    Bh = B.float().repeat_interleave(r, dim=2)  # (b, l, h, n)
    Ch = C.float().repeat_interleave(r, dim=2)  # (b, l, h, n)
    xf, dtf = x.float(), dt.float()
    decay = torch.exp(dtf * A.float())  # (b, l, h)
    s = x.new_zeros(b, h, p, Bh.shape[-1], dtype=torch.float32) if initial_state is None else initial_state.float()
    ys = []
    for t in range(l):
        # s_t = exp(dt_t A) s_{t-1} + dt_t x_t ⊗ B_t
        s = decay[:, t, :, None, None] * s + (dtf[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", s, Ch[:, t]))  # y_t = C_t · s_t
    y = torch.stack(ys, dim=1)  # (b, l, h, p)
    if D is not None:
        y = y + _d_skip(D, x)
    return y.to(x.dtype), s


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD (Dao & Gu 2024, §6 / Listing 1), equal to :func:`ssd_naive`.

    Same arguments and returns as :func:`ssd_naive`, plus ``chunk_size`` (Q). Any length works:
    the tail is zero-padded with ``dt = 0`` (decay 1, no input, so the state is untouched) and
    cropped; a sequence shorter than Q is one chunk of its own length. Groups are never expanded
    to heads: ``C Bᵀ`` and the B/C products are computed once per group, with the group's heads
    folded into the matmul's free dimension. The big products run as batched matmuls in x's dtype
    (bf16 stays bf16); cumulative decays, ``exp`` and the inter-chunk state are fp32, also under
    autocast (which is switched off inside so the choice above holds).
    """
    _check_ssd_shapes(x, dt, A, B, C)
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    mm_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    Q = max(1, min(int(chunk_size), l))
    pad = (-l) % Q

    with torch.autocast(device_type=x.device.type, enabled=False):
        dt = dt.float()
        # dt x once, for both the diagonal blocks and the chunk states (input side of eq. 2).
        xdt = x.float() * dt[..., None]  # (b, l, h, p)
        a = dt * A.float()  # (b, l, h) log-decay per step, fp32
        if pad:
            # Zero padding: dt = 0 -> a = 0 (decay 1) and xdt = 0, so the final state is exact.
            xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
            a = F.pad(a, (0, 0, 0, pad))
            B = F.pad(B, (0, 0, 0, 0, 0, pad))
            C = F.pad(C, (0, 0, 0, 0, 0, pad))

        # Most tensors stay in the input's (b, c, q, h, p) layout, with heads split as (g r) so
        # that one group's r heads sit next to each other: then "a group's heads x p" is one
        # matmul dimension, and for g = 1 these rearranges are free views.
        cs = rearrange(a, "b (c q) h -> b c q h", q=Q).cumsum(2)  # (b, c, q, h) in-chunk Σ a, fp32
        Bc = rearrange(B.to(mm_dtype), "b (c q) g n -> b c g q n", q=Q)  # (b, c, g, q, n)
        Cc = rearrange(C.to(mm_dtype), "b (c q) g n -> b c g q n", q=Q)  # (b, c, g, q, n)
        xdt = rearrange(xdt, "b (c q) h p -> b c q h p", q=Q)  # fp32

        # 1. Diagonal blocks: y_q = Σ_{s≤q} (C_q·B_s) exp(cs_q - cs_s) dt_s x_s, per head.
        # The decay is a difference of in-chunk cumulative sums (as mamba's kernels do): chunks
        # are short, so fp32 keeps it accurate, at one subtraction per entry.
        cs_h = rearrange(cs, "b c q (g r) -> b c g r q", g=g)
        causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
        seg = (cs_h[..., :, None] - cs_h[..., None, :]).masked_fill(~causal, -math.inf)
        CB = Cc @ Bc.transpose(-1, -2)  # (b, c, g, q, s), once per group
        M = (CB.float()[:, :, :, None] * torch.exp(seg)).to(mm_dtype)  # (b, c, g, r, q, s)
        x_h = rearrange(xdt.to(mm_dtype), "b c s (g r) p -> b c g r s p", g=g)
        y = rearrange((M @ x_h).float(), "b c g r q p -> b c q (g r) p")  # (b, c, q, h, p)

        # 2. Each chunk's own contribution to the state at its end, kept transposed (n, r p):
        # S_cᵀ = Σ_s B_sᵀ (exp(cs_last - cs_s) dt_s x_s), one matmul per group.
        to_end = torch.exp(cs[:, :, -1:] - cs)  # (b, c, q, h)
        xw = rearrange((xdt * to_end[..., None]).to(mm_dtype), "b c q (g r) p -> b c g q (r p)", g=g)
        chunk_states = (Bc.transpose(-1, -2) @ xw).float()  # (b, c, g, n, (r p))

        # 3. Inter-chunk recurrence on the states, fp32: S_{k+1} = exp(Σ_chunk a) S_k + S_c[k].
        # c sequential steps on small tensors beat the O(c²) matmul form for long sequences, and
        # unbind (not indexing) keeps the backward to one stack of the gradients.
        chunk_decay = repeat(torch.exp(cs[:, :, -1]), "b c (g r) -> b c g 1 (r p)", g=g, p=p)
        if initial_state is None:
            state = x.new_zeros(b, g, n, r * p, dtype=torch.float32)
        else:
            state = rearrange(initial_state.float(), "b (g r) p n -> b g n (r p)", g=g)
        starts = []
        for dec_k, add_k in zip(chunk_decay.unbind(1), chunk_states.unbind(1)):
            starts.append(state)
            state = dec_k * state + add_k
        start = torch.stack(starts, dim=1).to(mm_dtype)  # (b, c, g, n, (r p)) entering each chunk

        # 4. Off-diagonal blocks: what the entering state contributes, y_q += exp(cs_q) C_q · S.
        y_off = rearrange((Cc @ start).float(), "b c g q (r p) -> b c q (g r) p", p=p)
        y = y + y_off * torch.exp(cs)[..., None]

        y = rearrange(y, "b c q h p -> b (c q) h p")[:, :l]  # (b, l, h, p)
        if D is not None:
            y = y + _d_skip(D, x)
        state = rearrange(state, "b g n (r p) -> b (g r) p n", p=p)
    return y.to(x.dtype), state


class _CausalDepthwiseConv(torch.autograd.Function):
    """out_t = bias + Σ_k w_k ⊙ x_{t-K+1+k} on (B, L, C), with a hand-written backward.

    Equal to ``nn.Conv1d(C, C, K, groups=C, padding=K-1)`` with the first L outputs kept (a test
    holds them together), but in the (B, L, C) layout the mixer already has, and without the
    depthwise-convolution backward, which is slow on CPU. K is 4: a few fused multiply-adds.
    """

    @staticmethod
    def forward(ctx, x, w, bias):
        K, L = w.shape[1], x.shape[1]
        xp = F.pad(x, (0, 0, K - 1, 0))  # (B, L + K - 1, C), zeros before t = 0 keep it causal
        out = xp[:, :L] * w[:, 0]
        for k in range(1, K):
            out.addcmul_(xp[:, k : k + L], w[:, k])
        if bias is not None:
            out.add_(bias)
        ctx.save_for_backward(xp, w)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        xp, w = ctx.saved_tensors
        K, L = w.shape[1], grad.shape[1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # x_j feeds out_{j+K-1-k} through w_k: scatter the output gradient back shifted.
            gxp = grad.new_zeros(xp.shape)
            for k in range(K):
                gxp[:, k : k + L].addcmul_(grad, w[:, k])
            grad_x = gxp[:, K - 1 :]
        if ctx.needs_input_grad[1]:
            grad_w = torch.stack([(grad * xp[:, k : k + L]).sum((0, 1)) for k in range(K)], dim=1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 1))
        return grad_x, grad_w, grad_b


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal depthwise 1-D convolution over L. x (B, L, C), weight (C, K), bias (C,) -> (B, L, C)."""
    # Under autocast, run in the dtype autocast would give a convolution, like nn.Conv1d does.
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _CausalDepthwiseConv.apply(x, weight, bias)


class RMSNormGated(nn.Module):
    """``norm(y * silu(z))`` with one RMS per group of ``group_size`` channels, times a weight.

    Nemotron-H's ``MambaRMSNormGated`` with the gate applied before the norm (``norm_before_gate
    = False``); computed in fp32. y, z: (..., dim) -> (..., dim) fp32.
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = y.float() * F.silu(z.float())
        w = self.weight.float()
        if self.group_size == y.shape[-1]:  # one group: the fused kernel applies the weight too
            return F.rms_norm(y, (self.group_size,), weight=w, eps=self.eps)
        y = rearrange(y, "... (g d) -> ... g d", d=self.group_size)
        y = F.rms_norm(y, (self.group_size,), eps=self.eps)
        return w * rearrange(y, "... g d -> ... (g d)")


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
        return F.silu(causal_depthwise_conv(xBC, w, self.conv1d.bias))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: (B, L, D) -> (B, L, D); output at position t depends on u[:, :t+1] only."""
        Bsz, L, _ = u.shape
        g, n, h = self.n_groups, self.d_state, self.nheads
        ssd_kernel, conv_fn = _fast_kernels() if (self.use_fast_path and u.is_cuda) else (None, None)

        zxbcdt = self.in_proj(u)  # (B, L, d_inner + conv_dim + h)
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, h], dim=-1)
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
