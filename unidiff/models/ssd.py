"""The SSD scan of Mamba-2 (Dao & Gu 2024, "Transformers are SSMs", eq. 2 / §6), in pure PyTorch.

Per head, with an fp32 state:

    s_t = exp(dt_t A) s_{t-1} + dt_t x_t ⊗ B_t        s_t: (p, n)
    y_t = C_t · s_t + D x_t

Three implementations that tests hold together (STYLE.md habit 12):

- :func:`ssd_naive`: the recurrence above, one token at a time; slow, obviously right.
- :func:`ssd_chunked` (what the mixer calls): the chunked "state-space dual" form. Inside a chunk
  of ``Q`` tokens the output is a masked attention-like product (the "diagonal blocks"); across
  chunks only the ``(p, n)`` states travel. It has two forms of the diagonal blocks:

  * **factorised** (the default, :class:`_SSDFactorised`): the decay between positions ``s <= q``
    of a chunk, ``exp(cs_q - cs_s)`` (``cs`` the in-chunk cumulative log-decay), is split through
    the chunk's midpoint ``m`` as ``exp(cs_q - m) exp(m - cs_s)``. The first factor scales the
    rows of the output, the second the rows of the input, and what remains between them, the
    causal ``C Bᵀ``, is shared by every head of a group. So no ``(heads, Q, Q)`` decay tensor is
    built, every product is one ``(Q, .) x (., heads*p)`` matmul per chunk and group, and the
    backward is written by hand (below) so that it, too, is matmuls plus a handful of passes over
    ``(l, h, p)`` tensors, with no autograd temporaries. Exact while the factors are representable:
    both stay within ``e^{±span/2}``, ``span = |Σ_chunk dt A|``. It computes in fp32 whatever the
    input dtype (bf16/fp16 inputs are upcast, the output cast back): its log-decay gradient is a
    difference of two sums that cancel inside a chunk, and rounding the two sides to bf16
    separately made the dA and dt gradients 5-30x less accurate than the segment-sum form's.
    On the CPU it is taken when every chunk's span is at most ``_FACTORISED_SPAN_MAX``.
  * **segment-sum** (:func:`_ssd_segsum`, differentiated by autograd): the decay as a difference of
    cumulative sums per ``(head, q, s)``, as mamba's kernels and ``transformers``' torch path do;
    exact for any span. Taken on the CPU when a chunk's span exceeds the limit (one that forgets
    everything many times over, or a state reset), and always on other devices, where choosing by
    the data would cost a device-to-host synchronisation per call. On the CPU its matmuls run in
    the input dtype for bf16/fp16, fp32 otherwise; elsewhere in fp32.

The chunk length is ``min(chunk_size, l)`` whatever the data (it used to be halved until every
span fit, which cost a host sync per call and made shapes data-dependent under ``torch.compile``).

Every cumulative sum, ``exp`` and the inter-chunk state are fp32 in both forms, also under autocast
(which is switched off inside so these choices hold).

Shape legend: b batch, l sequence, c chunks, q/s positions inside a chunk, h heads, p head dim,
g groups (B and C are shared by the ``r = h/g`` heads of a group), n state size.
"""

from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

__all__ = ["ssd_naive", "ssd_chunked"]

# Largest in-chunk decay span |Σ dt A| for which :func:`ssd_chunked` takes its factorised form: its
# exp factors then stay within e^{±50} (~5e21), far from fp32 overflow (~3e38) even after the
# matmuls' sums (all but one product's upper triangle, which overflows harmlessly and is discarded:
# see the backward). Longer spans take the segment-sum form.
_FACTORISED_SPAN_MAX = 100.0


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

    Same arguments and returns as :func:`ssd_naive`, plus ``chunk_size``. The chunk length is a
    static function of the shapes, ``Q = min(chunk_size, l)``: nothing about it is read from the
    data, so no call waits on the device to learn it and ``torch.compile`` sees fixed shapes. Any
    length works: the tail is zero-padded with ``dt = 0`` (decay 1, no input, so the state is
    untouched) and cropped. Groups are never expanded to heads: ``C Bᵀ`` and the B/C products are
    computed once per group, with the group's heads folded into the matmul's free dimension.

    Which form runs (module docstring) depends on the device, never on a device-to-host copy:

    * CPU: the ``unidiff::ssd_chunked_cpu`` custom op. It takes the factorised form when every
      chunk's span fits (:func:`_fits_factorised`, a read of a CPU tensor: no device to wait on),
      else the segment-sum form. As a ``torch.library`` op it is one opaque node for
      ``torch.compile`` (no graph break, no retracing of its loops), with a registered backward.
    * any other device (CUDA, meta): the segment-sum form with fp32 matmuls, exact for any span and
      made of plain tensor ops, so it runs with ``torch.cuda.set_sync_debug_mode("error")`` and
      compiles like the rest of the model. (On CUDA the mixer prefers mamba_ssm's kernel anyway.)

    Not twice differentiable.
    """
    _check_ssd_shapes(x, dt, A, B, C)
    Q = max(1, min(int(chunk_size), x.shape[1]))
    # Autocast off (module docstring); devices without autocast (meta) have nothing to switch off.
    no_autocast = torch.amp.is_autocast_available(x.device.type)
    with torch.autocast(device_type=x.device.type, enabled=False) if no_autocast else contextlib.nullcontext():
        if x.device.type == "cpu":
            y, final = _ssd_chunked_cpu(x, dt, A, B, C, D, initial_state, Q)[:2]
            return y, final
        return _ssd_segsum(x, dt, A, B, C, Q, D, initial_state, mm_dtype=torch.float32)


def _fits_factorised(dt: torch.Tensor, A: torch.Tensor, Q: int) -> bool:
    """Whether every chunk's decay span ``|Σ_chunk dt A|`` is at most ``_FACTORISED_SPAN_MAX``, so
    that the factorised form is exact at chunk length Q (module docstring). Reads the data: only the
    CPU op calls it (a host tensor, so no device synchronisation)."""
    a = dt.detach().float() * A.detach().float()  # (b, l, h) <= 0
    span = -_pad_len(a, (-a.shape[1]) % Q).unflatten(1, (-1, Q)).sum(2)  # (b, c, h); the pad adds 0
    return bool(span.max() <= _FACTORISED_SPAN_MAX)


# ---- layout helpers: chunks with a group's heads folded into the matmul columns -----------------


def _pad_len(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad dimension 1 (the sequence) of a (b, l, ...) tensor by ``pad`` at the end."""
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) if pad else t


def _mul_padded(t: torch.Tensor, s: torch.Tensor, pad: int) -> torch.Tensor:
    """``t * s`` in fp32, written into a (b, l + pad, ...) buffer whose tail is zero: one pass."""
    if not pad:
        return torch.mul(t, s).float()
    out = t.new_empty((t.shape[0], t.shape[1] + pad) + t.shape[2:], dtype=torch.float32)
    out[:, t.shape[1]:].zero_()
    torch.mul(t, s, out=out[:, : t.shape[1]])
    return out


def _heads_to_cols(t: torch.Tensor, Q: int, g: int) -> torch.Tensor:
    """(b, c*Q, (g r), p) -> (b*c*g, Q, r*p): one matrix per chunk and group (a view for g = 1)."""
    return rearrange(t, "b (c q) (g r) p -> (b c g) q (r p)", q=Q, g=g)


def _cols_to_heads(t: torch.Tensor, b: int, g: int, p: int) -> torch.Tensor:
    """Inverse of :func:`_heads_to_cols`, as (b, c, Q, h, p)."""
    return rearrange(t, "(b c g) q (r p) -> b c q (g r) p", b=b, g=g, p=p)


def _group_to_chunks(t: torch.Tensor, Q: int) -> torch.Tensor:
    """B or C: (b, c*Q, g, n) -> (b*c*g, Q, n)."""
    return rearrange(t, "b (c q) g n -> (b c g) q n", q=Q)


def _per_head_cols(v: torch.Tensor, g: int, p: int) -> torch.Tensor:
    """A per-(chunk, head) scale (b, c, h) as per-column scales of the folded layout: (b*c*g, 1, r*p)."""
    return repeat(v, "b c (g r) -> (b c g) 1 (r p)", g=g, p=p)


def _factorised_forward(x, dt, A, B, C, D, initial_state, Q):
    """Chunked SSD with the factorised diagonal blocks; its hand-written backward is
    :func:`_factorised_backward`. Returns y, the final state and what the backward needs.

    Forward, per chunk and group, with ``m = tot/2`` (``tot`` the chunk's total log-decay):

        xs    = exp(m - cs) ⊙ dt x                    (rows of the input scaled)
        y_in  = tril(C Bᵀ) xs + C S̃,   S̃ = exp(m) S   (S: the state entering the chunk)
        y     = exp(cs - m) ⊙ y_in + D x
        U     = exp(tot - m) Bᵀ xs                     (the chunk's own contribution to its end state)
        S'    = exp(tot) S + U                         (fp32 recurrence over chunks)

    The result does not depend on ``m`` (it cancels in every product), so the backward treats it as
    a constant. Then every gradient with respect to a log-decay is a "gradient ⊙ value" sum:
    ``∂/∂cs_q = Σ_p dy ⊙ (y - Dx) - Σ_p dxs ⊙ xs`` and ``∂/∂tot_k = Σ dS_{k+1} ⊙ S_{k+1}``
    (decay and contribution together), summed back through the cumulative sum to ``a = dt A``.
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    pad = (-l) % Q
    c = (l + pad) // Q

    dtf = dt.float()
    cs = _pad_len(dtf * A.float(), pad).view(b, c, Q, h).cumsum(2)  # (b, c, q, h) in-chunk Σ a
    half = torch.exp(0.5 * cs[:, :, -1])  # (b, c, h) exp(m) = exp(tot - m) = exp(tot/2)
    w_in = torch.exp(0.5 * cs[:, :, -1:] - cs)  # (b, c, q, h) exp(m - cs), within e^{±span/2}

    # xs = exp(m - cs) dt x in one pass over x (the padded tail stays 0: no input there).
    coef = (w_in.view(b, c * Q, h)[:, :l] * dtf)[..., None]  # (b, l, h, 1)
    xs = _mul_padded(x, coef, pad)  # (b, c*Q, h, p) fp32
    xs = _heads_to_cols(xs, Q, g)  # (bcg, q, r p)
    Bc = _group_to_chunks(_pad_len(B, pad).float(), Q)  # (bcg, q, n)
    Cc = _group_to_chunks(_pad_len(C, pad).float(), Q)
    CB = torch.bmm(Cc, Bc.transpose(1, 2)).tril_()  # (bcg, q, s) causal inside the chunk
    half_cols = _per_head_cols(half, g, p)  # (bcg, 1, r p)

    # The chunks' own contributions, then the fp32 recurrence S_{k+1} = exp(tot_k) S_k + U_k.
    U = torch.bmm(Bc.transpose(1, 2), xs).mul_(half_cols).view(b, c, g, n, r * p)
    decay = (half_cols * half_cols).view(b, c, g, 1, r * p)
    states = x.new_empty(b, c + 1, g, n, r * p, dtype=torch.float32)  # entering each chunk, + final
    if initial_state is None:
        states[:, 0].zero_()
    else:
        states[:, 0] = rearrange(initial_state.float(), "b (g r) p n -> b g n (r p)", g=g)
    for k in range(c):
        torch.addcmul(U[:, k], decay[:, k], states[:, k], out=states[:, k + 1])

    S_t = states[:, :-1].reshape(b * c * g, n, r * p) * half_cols  # exp(m) S
    y_in = torch.bmm(CB, xs).baddbmm_(Cc, S_t)  # (bcg, q, r p)
    w_out = torch.exp(cs - 0.5 * cs[:, :, -1:])  # (b, c, q, h) exp(cs - m)
    y = (_cols_to_heads(y_in, b, g, p) * w_out[..., None]).reshape(b, c * Q, h, p)[:, :l]
    if D is not None:
        y.addcmul_(x, D.float()[:, None] if D.dim() == 1 else D.float())  # y is ours: in place
    # A copy, not a view of the saved states, so that callers may modify it in place.
    final = rearrange(states[:, -1], "b g n (r p) -> b (g r) p n", p=p).clone()

    return y.to(x.dtype), final, (CB, xs, y_in, cs, states, S_t)

def _factorised_backward(grad_y, grad_final, x, dt, A, B, C, D, saved, Q, has_initial_state):
    """The gradients of :func:`_factorised_forward` (derivation in its docstring) with respect to
    x, dt, A, B, C, D (None without D) and the initial state (None without one)."""
    CB, xs, y_in, cs, states, S_t = saved
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    pad = (-l) % Q
    c = (l + pad) // Q
    # B and C in the chunk layout again: cheaper than keeping a padded fp32 copy of each.
    Bc = _group_to_chunks(_pad_len(B, pad).float(), Q)  # (bcg, q, n)
    Cc = _group_to_chunks(_pad_len(C, pad).float(), Q)
    dtf = dt.float()
    half = torch.exp(0.5 * cs[:, :, -1])
    half_cols = _per_head_cols(half, g, p)
    w_in = torch.exp(0.5 * cs[:, :, -1:] - cs)  # exp(m - cs)
    w_out = torch.exp(cs - 0.5 * cs[:, :, -1:])  # exp(cs - m)

    dy = grad_y.float()
    Dv = None if D is None else (D.float()[:, None] if D.dim() == 1 else D.float())  # (h, 1|p)
    dD = None
    if D is not None:
        dD = (dy * x).sum((0, 1))  # (h, p)
        dD = (dD.sum(-1) if D.dim() == 1 else dD).to(D.dtype)

    # Output side: y = exp(cs - m) ⊙ y_in (+ D x).
    w_out_l = w_out.view(b, c * Q, h)[:, :l, :, None]
    dy_in32 = _mul_padded(dy, w_out_l, pad).view(b, c, Q, h, p)
    g_out = (dy_in32 * _cols_to_heads(y_in, b, g, p)).sum(-1)  # (b, c, q, h) = Σ_p dy ⊙ (y - Dx)
    dy_in = _heads_to_cols(dy_in32.view(b, c * Q, h, p), Q, g)  # (bcg, q, r p)

    # y_in = tril(C Bᵀ) xs + C S̃. The product's upper triangle (s > q) pairs exp(cs_q - m) with
    # exp(m - cs_s) the wrong way round, up to e^{span}: it may overflow, and tril_ discards it.
    dCB = torch.bmm(dy_in, xs.transpose(1, 2)).tril_()  # (bcg, q, s)
    dC = torch.bmm(dCB, Bc).baddbmm_(dy_in, S_t.transpose(1, 2))  # (bcg, q, n)
    # dS̃ -> gradient of the entering state: exp(m) dS̃.
    dstart = torch.bmm(Cc.transpose(1, 2), dy_in).mul_(half_cols).view(b, c, g, n, r * p)

    # Recurrence backward: dS_k = exp(m_k) dS̃_k + exp(tot_k) dS_{k+1}; dU_k = dS_{k+1}.
    decay = (half_cols * half_cols).view(b, c, g, 1, r * p)
    dstates = x.new_empty(b, c + 1, g, n, r * p, dtype=torch.float32)
    dstates[:, c] = rearrange(grad_final.float(), "b (g r) p n -> b g n (r p)", g=g)
    for k in range(c - 1, -1, -1):
        torch.addcmul(dstart[:, k], decay[:, k], dstates[:, k + 1], out=dstates[:, k])
    d_init = None
    if has_initial_state:
        d_init = rearrange(dstates[:, 0], "b g n (r p) -> b (g r) p n", p=p)
    dU = dstates[:, 1:]  # (b, c, g, n, r p)
    # ∂/∂tot_k through both exp(tot_k) S_k and exp(tot_k - m) Bᵀ xs: Σ dS_{k+1} ⊙ S_{k+1}.
    d_tot = rearrange((dU * states[:, 1:]).sum(3), "b c g (r p) -> b c (g r) p", p=p).sum(-1)  # (b, c, h)

    # U = exp(tot - m) Bᵀ xs.
    dU_mm = dU.reshape(b * c * g, n, r * p) * half_cols
    dxs = torch.bmm(CB.transpose(1, 2), dy_in).baddbmm_(Bc, dU_mm)  # (bcg, s, r p)
    dB = torch.bmm(dCB.transpose(1, 2), Cc).baddbmm_(xs, dU_mm.transpose(1, 2))  # (bcg, s, n)

    # Input side: xs = exp(m - cs) dt ⊙ x. With v = Σ_p dxs ⊙ x: ∂/∂dt (through xs) = exp(m - cs) v,
    # and Σ_p dxs ⊙ xs (the log-decay side) = exp(m - cs) dt v.
    dxs_l = _cols_to_heads(dxs, b, g, p).reshape(b, c * Q, h, p)[:, :l]  # (b, l, h, p)
    w_in_l = w_in.view(b, c * Q, h)[:, :l]
    v = (dxs_l * x).sum(-1)  # (b, l, h)
    dx = dxs_l * (w_in_l * dtf)[..., None]
    if D is not None:
        dx.addcmul_(dy, Dv)
    g_in = _pad_len(w_in_l * dtf * v, pad).view(b, c, Q, h)

    # Log-decays: cs = cumsum(a) within the chunk; tot = cs at the chunk's last position.
    dcs = g_out - g_in
    dcs[:, :, -1] += d_tot
    da = dcs.flip(2).cumsum(2).flip(2).reshape(b, c * Q, h)[:, :l]  # (b, l, h)
    ddt = da * A.float() + w_in_l * v
    dA = (da * dtf).sum((0, 1))
    dB = rearrange(dB, "(b c g) q n -> b (c q) g n", b=b, g=g)[:, :l]
    dC = rearrange(dC, "(b c g) q n -> b (c q) g n", b=b, g=g)[:, :l]
    return dx.to(x.dtype), ddt.to(dt.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD, d_init


# ---- the CPU custom op: one opaque, differentiable node for torch.compile -----------------------
#
# Registered with torch.library so that torch.compile traces it as a single operator with a known
# output shape (its "fake" below) and a known backward, instead of tracing into it: the form
# choice reads the data (a Python bool, which would break the graph), and the chunk recurrence is
# a Python loop over chunks (which dynamo would unroll into one kernel per chunk). The op returns
# what the factorised backward needs as extra, non-differentiable outputs, whose shapes depend only
# on the input shapes and Q; the segment-sum form (taken for long spans) leaves them empty and its
# backward recomputes the forward under autograd.


def _saved_shapes(x, B, Q):
    """Shapes of (CB, xs, y_in, cs, states, S_t) of :func:`_factorised_forward` at chunk length Q."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    c, rp = -(-l // Q), (h // g) * p
    return [(b * c * g, Q, Q), (b * c * g, Q, rp), (b * c * g, Q, rp), (b, c, Q, h), (b, c + 1, g, n, rp),
            (b * c * g, n, rp)]


@torch.library.custom_op("unidiff::ssd_chunked_cpu", mutates_args=(), device_types="cpu")
def _ssd_chunked_cpu(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: Optional[torch.Tensor], initial_state: Optional[torch.Tensor], Q: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """(y, final, factorised (a bool tensor), CB, xs, y_in, cs, states, S_t): see the comment above."""
    # Contiguous outputs, as the fake function promises (a copy only for a padded tail or g > 1).
    if _fits_factorised(dt, A, Q):
        y, final, saved = _factorised_forward(x, dt, A, B, C, D, initial_state, Q)
        return (y.contiguous(), final, torch.ones((), dtype=torch.bool)) + tuple(t.contiguous() for t in saved)
    y, final = _ssd_segsum(x, dt, A, B, C, Q, D, initial_state)
    empty = tuple(x.new_empty(shape, dtype=torch.float32) for shape in _saved_shapes(x, B, Q))
    return (y.contiguous(), final.contiguous().clone(), torch.zeros((), dtype=torch.bool)) + empty


@_ssd_chunked_cpu.register_fake
def _(x, dt, A, B, C, D, initial_state, Q):
    b, l, h, p = x.shape
    n = B.shape[-1]
    saved = tuple(x.new_empty(shape, dtype=torch.float32) for shape in _saved_shapes(x, B, Q))
    return (x.new_empty(b, l, h, p), x.new_empty(b, h, p, n, dtype=torch.float32),
            x.new_empty((), dtype=torch.bool)) + saved


def _autograd_reentered():
    """The dispatch state of a plain call, for recomputing under autograd inside an op's body:
    torch.library runs the body with the autograd keys excluded (``_AutoDispatchBelowAutograd``)."""
    K = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (K.AutogradOther, K.AutogradNestedTensor, K.AutogradFunctionality, K.ADInplaceOrView):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


@torch.library.custom_op("unidiff::ssd_chunked_cpu_backward", mutates_args=(), device_types="cpu")
def _ssd_chunked_cpu_backward(
    grad_y: torch.Tensor, grad_final: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
    B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor], initial_state: Optional[torch.Tensor],
    saved: List[torch.Tensor], Q: int,
) -> List[torch.Tensor]:
    """Gradients (x, dt, A, B, C, D, initial_state) of :func:`_ssd_chunked_cpu`; an empty tensor
    stands for D or the initial state when the call had none."""
    factorised, saved = saved[0], saved[1:]
    if bool(factorised):
        grads = _factorised_backward(grad_y, grad_final, x, dt, A, B, C, D, saved, Q, initial_state is not None)
    else:
        # The segment-sum form (long spans only): recompute it under autograd and differentiate.
        # The op's body runs below the autograd dispatch key: re-enter it for the recomputation
        # (torch.func.vjp would work too, but its wrapper tensors break under dispatch modes such
        # as torch.utils.flop_counter's).
        inputs = (x, dt, A, B, C, D, initial_state)
        where = [i for i, t in enumerate(inputs) if t is not None]
        with _autograd_reentered(), torch.enable_grad():
            leaves = [inputs[i].detach().requires_grad_(True) for i in where]
            full = list(inputs)
            for i, t in zip(where, leaves):
                full[i] = t
            y, final = _ssd_segsum(*full[:5], Q, *full[5:])
            found = iter(torch.autograd.grad((y, final), leaves, (grad_y, grad_final), allow_unused=True))
        grads = [next(found) if t is not None else None for t in inputs]
        grads = [torch.zeros_like(t) if g is None and t is not None else g for g, t in zip(grads, inputs)]
    # Contiguous, as the fake function promises (an input may be a strided view).
    return [g.contiguous() if g is not None else x.new_empty(0) for g in grads]


@_ssd_chunked_cpu_backward.register_fake
def _(grad_y, grad_final, x, dt, A, B, C, D, initial_state, saved, Q):
    return [t.new_empty(t.shape) if t is not None else x.new_empty(0) for t in (x, dt, A, B, C, D, initial_state)]


def _ssd_cpu_setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, initial_state, Q = inputs
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)  # no zero gradients for the saved outputs
    ctx.save_for_backward(x, dt, A, B, C, D, initial_state, *output[2:])
    ctx.Q = Q


def _ssd_cpu_backward(ctx, grad_y, grad_final, *unused):
    x, dt, A, B, C, D, initial_state, *saved = ctx.saved_tensors
    y_shape, state_shape = x.shape, (x.shape[0], x.shape[2], x.shape[3], B.shape[-1])
    grad_y = x.new_zeros(y_shape) if grad_y is None else grad_y  # an output the loss did not use
    grad_final = x.new_zeros(state_shape, dtype=torch.float32) if grad_final is None else grad_final
    grads = _ssd_chunked_cpu_backward(grad_y, grad_final, x, dt, A, B, C, D, initial_state, saved, ctx.Q)
    present = (True,) * 5 + (D is not None, initial_state is not None)
    return tuple(g if keep else None for g, keep in zip(grads, present)) + (None,)


torch.library.register_autograd("unidiff::ssd_chunked_cpu", _ssd_cpu_backward, setup_context=_ssd_cpu_setup_context)


def _ssd_segsum(x, dt, A, B, C, Q, D=None, initial_state=None, mm_dtype=None):
    """Chunked SSD with segment-sum decays, differentiated by autograd (exact for any span).
    ``mm_dtype``: the matmuls' dtype; None = x's for bf16/fp16, else fp32."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    if mm_dtype is None:
        mm_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    pad = (-l) % Q

    dt = dt.float()
    # dt x once, for both the diagonal blocks and the chunk states (input side of eq. 2).
    xdt = x.float() * dt[..., None]  # (b, l, h, p)
    a = dt * A.float()  # (b, l, h) log-decay per step, fp32
    # Zero padding: dt = 0 -> a = 0 (decay 1) and xdt = 0, so the final state is exact.
    xdt, a, B, C = (_pad_len(t, pad) for t in (xdt, a, B, C))

    # Most tensors stay in the input's (b, c, q, h, p) layout, with heads split as (g r) so that
    # one group's r heads sit next to each other: then "a group's heads x p" is one matmul
    # dimension, and for g = 1 these rearranges are free views.
    cs = rearrange(a, "b (c q) h -> b c q h", q=Q).cumsum(2)  # (b, c, q, h) in-chunk Σ a, fp32
    Bc = rearrange(B.to(mm_dtype), "b (c q) g n -> b c g q n", q=Q)  # (b, c, g, q, n)
    Cc = rearrange(C.to(mm_dtype), "b (c q) g n -> b c g q n", q=Q)  # (b, c, g, q, n)
    xdt = rearrange(xdt, "b (c q) h p -> b c q h p", q=Q)  # fp32

    # 1. Diagonal blocks: y_q = Σ_{s≤q} (C_q·B_s) exp(cs_q - cs_s) dt_s x_s, per head, with the
    # decay as a difference of in-chunk cumulative sums (as mamba's kernels do).
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

    # 3. Inter-chunk recurrence on the states, fp32: S_{k+1} = exp(Σ_chunk a) S_k + S_c[k]. c
    # sequential steps on small tensors beat the O(c²) matmul form for long sequences, and unbind
    # (not indexing) keeps the backward to one stack of the gradients.
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
