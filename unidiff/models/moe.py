"""Mixture-of-experts FFN, Nemotron 3 style (DESIGN.md §5).

A sigmoid router in fp32 picks ``top_k`` of ``num_experts`` non-gated squared-ReLU experts per
token; selection uses ``score + bias`` (the bias is the aux-loss-free balancing knob of DeepSeek-V3
§2.1.2, moved outside autograd by :meth:`MoE.update_bias`), the mixing weights use the unbiased
scores. One optional shared expert sees every token. With ``latent_size`` set (LatentMoE, Nemotron 3
white paper) the routed experts run in a narrower width between two shared projections.

Parameter names and layouts follow transformers' ``NemotronHMoE`` (``gate``, ``experts.up_proj``
(E, F, H), ``experts.down_proj`` (E, H, F), ``shared_experts``, ``fc1_latent_proj``,
``fc2_latent_proj``), so its ``state_dict`` loads into :class:`MoE` unchanged: that is the test oracle.

Shape suffixes (torchtitan's convention, ``models/common/moe.py``):
    B batch, L sequence length, D model width, T = B*L tokens,
    H routed-expert width (D, or ``latent_size`` with LatentMoE), F expert hidden width,
    E routed experts, K experts per token, S = T*K token slots (one per (token, chosen expert)),
    G expert groups (group-limited routing).
    e.g. ``x_TD``, ``scores_TE``, ``topk_idx_TK``, ``order_S``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..errors import ConfigError

# torch >= 2.8 has a grouped GEMM (one kernel for all experts, no host sync); older torch falls back.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)², Nemotron-H's MLP activation (transformers' ``relu2``)."""
    return F.relu(x).square()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # grouped_mm is not on autocast's op list, so the experts cast by hand to what F.linear would use.
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


@torch.compiler.assume_constant_result
def _cuda_sm90_or_newer(index: int) -> bool:
    # Evaluated eagerly and frozen into the graph under torch.compile (the device never changes).
    return torch.cuda.get_device_capability(index) >= (9, 0)


def _can_use_grouped_mm(x_SH: torch.Tensor, hidden: int, inner: int) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands on this device (else: the loop twin)."""
    if _GROUPED_MM is None:
        return False
    if x_SH.device.type == "cpu":
        # The CPU kernel runs fp32 and bf16 eagerly, but its compile-time meta function accepts
        # only 16-bit inputs.
        return x_SH.dtype == torch.bfloat16 or (
            x_SH.dtype == torch.float32 and not torch.compiler.is_compiling()
        )
    if x_SH.device.type == "cuda":
        # CUTLASS grouped GEMM: bf16 on sm90+, 16-byte aligned rows.
        return (
            x_SH.dtype == torch.bfloat16
            and _cuda_sm90_or_newer(x_SH.device.index)
            and hidden % 8 == 0
            and inner % 8 == 0
        )
    return False


# ---- the loop path as a torch.library custom op ----------------------------------------------------
# Where grouped_mm does not take the operands (fp32 under torch.compile on the CPU, CUDA before sm90,
# fp32 on CUDA), the experts run one matmul pair per expert over its slice. The slice lengths are
# data (a host read of counts_E), which dynamo cannot trace; registered as an op with a fake (the
# output shape is x's) and a backward, the loop is one opaque node of the compiled graph. It returns
# the pre-activation h_SF as a second, non-differentiable output, for its backward.


@torch.library.custom_op("unidiff::moe_experts_loop", mutates_args=())
def _experts_loop(x_SH: torch.Tensor, counts_E: torch.Tensor, up_EFH: torch.Tensor,
                  down_EHF: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out_SH, h_SF): per expert e, ``h = x up[e]ᵀ``, ``out = relu(h)² down[e]ᵀ`` on its slice."""
    h_SF = x_SH.new_empty(x_SH.shape[0], up_EFH.shape[1])
    out_SH = torch.empty_like(x_SH)
    start = 0
    for e, n in enumerate(counts_E.tolist()):  # one host read for the layer
        rows = slice(start, start + n)
        torch.mm(x_SH[rows], up_EFH[e].t(), out=h_SF[rows])
        torch.mm(squared_relu(h_SF[rows]), down_EHF[e].t(), out=out_SH[rows])
        start += n
    return out_SH, h_SF


@_experts_loop.register_fake
def _(x_SH, counts_E, up_EFH, down_EHF):
    return torch.empty_like(x_SH), x_SH.new_empty(x_SH.shape[0], up_EFH.shape[1])


@torch.library.custom_op("unidiff::moe_experts_loop_backward", mutates_args=())
def _experts_loop_backward(grad_SH: torch.Tensor, x_SH: torch.Tensor, h_SF: torch.Tensor, counts_E: torch.Tensor,
                           up_EFH: torch.Tensor, down_EHF: torch.Tensor) -> List[torch.Tensor]:
    """[dx, d_up, d_down]: with ``a = relu(h)²``: ``d_a = g down``, ``d_down = gᵀ a``,
    ``d_h = 2 relu(h) ⊙ d_a``, ``d_up = d_hᵀ x``, ``dx = d_h up``, per expert slice."""
    dx_SH = torch.empty_like(x_SH)
    d_up, d_down = torch.zeros_like(up_EFH), torch.zeros_like(down_EHF)
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        rows = slice(start, start + n)
        g, h = grad_SH[rows], h_SF[rows]
        relu_h = F.relu(h)
        torch.mm(g.t(), relu_h.square(), out=d_down[e])
        d_h = torch.mm(g, down_EHF[e]).mul_(relu_h).mul_(2)
        torch.mm(d_h.t(), x_SH[rows], out=d_up[e])
        torch.mm(d_h, up_EFH[e], out=dx_SH[rows])
        start += n
    return [dx_SH, d_up, d_down]


@_experts_loop_backward.register_fake
def _(grad_SH, x_SH, h_SF, counts_E, up_EFH, down_EHF):
    return [torch.empty_like(x_SH), torch.empty_like(up_EFH), torch.empty_like(down_EHF)]


def _experts_loop_setup_context(ctx, inputs, output):
    x_SH, counts_E, up_EFH, down_EHF = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x_SH, output[1], counts_E, up_EFH, down_EHF)


def _experts_loop_grad(ctx, grad_SH, _grad_h):
    x_SH, h_SF, counts_E, up_EFH, down_EHF = ctx.saved_tensors
    dx, d_up, d_down = _experts_loop_backward(grad_SH, x_SH, h_SF, counts_E, up_EFH, down_EHF)
    return dx, None, d_up, d_down


torch.library.register_autograd("unidiff::moe_experts_loop", _experts_loop_grad,
                               setup_context=_experts_loop_setup_context)


class DenseMLP(nn.Module):
    """Non-gated MLP ``down(relu(up(x))²)`` (Nemotron-H's ``NemotronHMLP``; the ``-`` sublayer and
    the shared expert). x: (..., D) -> (..., D)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        if hidden_size <= 0 or intermediate_size <= 0:
            raise ConfigError(
                f"DenseMLP needs positive sizes, got hidden_size={hidden_size}, intermediate_size={intermediate_size}"
            )
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(squared_relu(self.up_proj(x)))


class TopkRouter(nn.Module):
    """Sigmoid top-k router with a selection-only correction bias (DESIGN.md §5, DeepSeek-V3 §2.1.2).

    Args:
        hidden_size: D. num_experts: E. top_k: K.
        routed_scaling_factor: multiplies the mixing weights.
        norm_topk_prob: renormalise the K chosen scores to sum to 1 before scaling.
        n_group, topk_group: group-limited routing: experts split into ``n_group`` equal groups, a
            group's score is the sum of its two best biased scores, only the best ``topk_group``
            groups are eligible (DeepSeek-V3's node-limited routing; 1/1 disables it).

    forward(x_TD (T, D)) -> (topk_idx_TK (T, K) int64, topk_weight_TK (T, K) fp32, scores_TE (T, E) fp32).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        routed_scaling_factor: float = 1.0,
        norm_topk_prob: bool = True,
        n_group: int = 1,
        topk_group: int = 1,
    ):
        super().__init__()
        if num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ConfigError(f"router needs 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
        if n_group < 1 or num_experts % n_group != 0:
            raise ConfigError(f"n_group={n_group} must be >= 1 and divide num_experts={num_experts}")
        if not 1 <= topk_group <= n_group:
            raise ConfigError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
        if top_k > topk_group * (num_experts // n_group):
            raise ConfigError(
                f"top_k={top_k} exceeds the experts in topk_group={topk_group} groups of {num_experts // n_group}"
            )
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.norm_topk_prob = norm_topk_prob
        self.n_group, self.topk_group = n_group, topk_group
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        # A buffer, not a Parameter: it never sees a gradient, only update_bias() moves it.
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)  # transformers' initializer_range for the gate
        nn.init.zeros_(self.e_score_correction_bias)

    def _limit_to_groups(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """Mask (to -inf) every expert outside the ``topk_group`` best groups."""
        choice_TGE = rearrange(choice_TE, "t (g e) -> t g e", g=self.n_group)
        # A group is rated by its two best experts, so one outlier cannot carry it (DeepSeek-V3).
        best = min(2, choice_TGE.shape[-1])
        group_score_TG = choice_TGE.topk(best, dim=-1).values.sum(-1)
        group_idx = group_score_TG.topk(self.topk_group, dim=-1).indices
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, group_idx, True)
        choice_TGE = choice_TGE.masked_fill(~keep_TG[..., None], float("-inf"))
        return rearrange(choice_TGE, "t g e -> t (g e)")

    def forward(self, x_TD: torch.Tensor):
        # fp32 even under autocast: sigmoid scores cluster near 0.5 and differ below bf16 resolution,
        # and the top-k choice is discrete, so rounding would flip experts (§5).
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE = logits_TE.sigmoid()
        # The bias steers *which* experts are picked, never *how much* they contribute.
        choice_TE = scores_TE.detach() + self.e_score_correction_bias.float()
        if self.n_group > 1:
            choice_TE = self._limit_to_groups(choice_TE)
        topk_idx_TK = choice_TE.topk(self.top_k, dim=-1).indices
        topk_weight_TK = scores_TE.gather(1, topk_idx_TK)
        if self.norm_topk_prob:
            topk_weight_TK = topk_weight_TK / (topk_weight_TK.sum(-1, keepdim=True) + 1e-20)
        return topk_idx_TK, topk_weight_TK * self.routed_scaling_factor, scores_TE


class GroupedExperts(nn.Module):
    """E non-gated squared-ReLU MLPs with stacked weights, run over token slots sorted by expert.

    Layout and names of transformers' ``NemotronHExperts``: ``up_proj`` (E, F, H), ``down_proj``
    (E, H, F); expert e maps x to ``down_proj[e] @ relu(up_proj[e] @ x)²``.

    forward(x_SH (S, H) slots sorted by expert, counts_E (E,) int64 slots per expert) -> (S, H).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        if intermediate_size is None or intermediate_size <= 0:
            raise ConfigError(f"MoE intermediate_size must be a positive int, got {intermediate_size!r}")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Per expert, what nn.Linear would get from DiT's xavier_uniform init.
        for w in (self.up_proj, self.down_proj):
            bound = (6.0 / (w.shape[1] + w.shape[2])) ** 0.5
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x_SH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x_SH)
        x_SH = x_SH.to(dtype)
        if not _can_use_grouped_mm(x_SH, self.hidden_size, self.intermediate_size):
            # The per-expert loop as one custom op (hand-written backward): torch.compile sees one
            # node instead of a graph break at the host read of the counts.
            return _experts_loop(x_SH, counts_E, self.up_proj.to(dtype), self.down_proj.to(dtype))[0]
        # Group boundaries stay on the device: no host sync at all on this path.
        offs_E = counts_E.cumsum(0).to(torch.int32)
        up_EHF = self.up_proj.to(dtype).transpose(1, 2)
        down_EFH = self.down_proj.to(dtype).transpose(1, 2)
        h_SF = squared_relu(_GROUPED_MM(x_SH, up_EHF, offs=offs_E))
        return _GROUPED_MM(h_SF, down_EFH, offs=offs_E)

    def forward_loop(self, x_SH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """The readable twin (STYLE habit 12): one matmul pair per expert over its contiguous slice.
        One host sync for the whole layer (``counts_E.tolist()``), none per expert."""
        up_EFH, down_EHF = self.up_proj.to(x_SH.dtype), self.down_proj.to(x_SH.dtype)
        chunks = x_SH.split(counts_E.tolist())
        out = [F.linear(squared_relu(F.linear(x_NH, up_EFH[e])), down_EHF[e]) for e, x_NH in enumerate(chunks)]
        return torch.cat(out)


class MoE(nn.Module):
    """The ``E`` sublayer: routed experts + optional shared expert, optional LatentMoE (DESIGN.md §5).

    Args:
        hidden_size: D.
        num_experts, top_k: E routed experts, K per token.
        intermediate_size: F, each routed expert's hidden width (default ``hidden_size``).
        shared_intermediate_size: the shared expert's hidden width; 0/None = no shared expert.
        latent_size: LatentMoE width H < D: routed experts run between ``fc1_latent_proj`` (D -> H)
            and ``fc2_latent_proj`` (H -> D); routing and the shared expert stay at full width.
        routed_scaling_factor, norm_topk_prob, n_group, topk_group: see :class:`TopkRouter`.
        aux_loss_coef: weight of DeepSeek-V3's sequence-wise balance loss (0 = aux-loss-free only).
        bias_update_rate: step of the selection-bias update in :meth:`update_bias`.

    forward(x (B, L, D), collect_stats=False) -> (y (B, L, D), aux_loss () fp32). In training mode
    every forward adds its routing counts to ``tokens_per_expert`` (the balancing state of
    :meth:`update_bias`); the logging statistics of :meth:`stats` (``last_load``,
    ``last_router_entropy``) are computed only when ``collect_stats`` is set, so sampling and
    evaluation forwards pay nothing for them.

    Note for DDP: ``tokens_per_expert`` must stay per-process until :meth:`update_bias` all-reduces
    it, so wrap with ``broadcast_buffers=False`` (the bias is identical on every rank anyway).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int = 8,
        top_k: int = 2,
        intermediate_size: Optional[int] = None,
        shared_intermediate_size: Optional[int] = None,
        latent_size: Optional[int] = None,
        routed_scaling_factor: float = 1.0,
        norm_topk_prob: bool = True,
        n_group: int = 1,
        topk_group: int = 1,
        aux_loss_coef: float = 0.0,
        bias_update_rate: float = 1e-3,
    ):
        super().__init__()
        if latent_size is not None and latent_size <= 0:
            raise ConfigError(f"MoE latent_size must be a positive int or None, got {latent_size!r}")
        if aux_loss_coef < 0 or bias_update_rate < 0:
            raise ConfigError(
                f"MoE aux_loss_coef={aux_loss_coef} and bias_update_rate={bias_update_rate} must be >= 0"
            )
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.latent_size = latent_size
        self.aux_loss_coef = float(aux_loss_coef)
        self.bias_update_rate = float(bias_update_rate)
        expert_width = latent_size or hidden_size  # H

        self.gate = TopkRouter(
            hidden_size, num_experts, top_k, routed_scaling_factor, norm_topk_prob, n_group, topk_group
        )
        self.experts = GroupedExperts(num_experts, expert_width, intermediate_size or hidden_size)
        self.shared_experts = (
            DenseMLP(hidden_size, shared_intermediate_size) if shared_intermediate_size else None
        )
        if latent_size is not None:
            self.fc1_latent_proj = nn.Linear(hidden_size, latent_size, bias=False)
            self.fc2_latent_proj = nn.Linear(latent_size, hidden_size, bias=False)
        else:
            self.fc1_latent_proj = nn.Identity()
            self.fc2_latent_proj = nn.Identity()

        # Non-persistent: the state_dict stays exactly transformers' NemotronHMoE's. The counts are
        # emptied by every update_bias(), i.e. at every optimiser step, before any checkpoint.
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        self.register_buffer("last_load", torch.zeros(num_experts), persistent=False)
        self.register_buffer("last_router_entropy", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor, collect_stats: bool = False):
        B, L, D = x.shape
        x_TD = rearrange(x, "b l d -> (b l) d")
        topk_idx_TK, topk_weight_TK, scores_TE = self.gate(x_TD)
        routed_TD, counts_E = self._routed(x_TD, topk_idx_TK, topk_weight_TK)
        y_TD = routed_TD.to(x.dtype)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        # Only training batches steer the bias; eval/sampling forwards leave the counts alone.
        if self.training:
            self.tokens_per_expert.add_(counts_E)
        if collect_stats:
            self._record_stats(scores_TE.detach(), counts_E)
        aux_loss = self._aux_loss(scores_TE, topk_idx_TK, B, L)
        return rearrange(y_TD, "(b l) d -> b l d", b=B), aux_loss

    def _routed(self, x_TD, topk_idx_TK, topk_weight_TK):
        """Sort-based dispatch, grouped expert GEMM, weighted index_add combine. Returns (T, D), (E,)."""
        T, K = topk_idx_TK.shape
        h_TH = self.fc1_latent_proj(x_TD)  # (T, H), LatentMoE's shared down projection
        flat_idx_S = topk_idx_TK.flatten()  # slot s belongs to token s // K
        # A stable sort makes each expert's slots one contiguous run, in token order.
        order_S = flat_idx_S.argsort(stable=True)
        token_S = order_S // K
        # bincount, written as a fixed-size scatter: bincount's output shape is data-dependent and
        # breaks the torch.compile graph.
        counts_E = flat_idx_S.new_zeros(self.num_experts).scatter_add_(0, flat_idx_S, torch.ones_like(flat_idx_S))
        out_SH = self.experts(h_TH[token_S], counts_E)
        # The gate weights are fp32 (router); combine in fp32, as transformers does, then go back.
        out_SH = out_SH.float() * topk_weight_TK.flatten()[order_S, None]
        combined_TH = out_SH.new_zeros(T, out_SH.shape[-1]).index_add_(0, token_S, out_SH)
        # fc2 is linear, so projecting after the combine equals projecting each expert's output.
        return self.fc2_latent_proj(combined_TH.to(h_TH.dtype)), counts_E

    @torch.no_grad()
    def _record_stats(self, scores_TE: torch.Tensor, counts_E: torch.Tensor) -> None:
        """The logging statistics of this forward into ``last_load`` / ``last_router_entropy``."""
        self.last_load.copy_(counts_E.float() / counts_E.sum().clamp_min(1))
        p_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        self.last_router_entropy.copy_(-(p_TE * p_TE.clamp_min(1e-20).log()).sum(-1).mean())

    def _aux_loss(self, scores_TE, topk_idx_TK, B: int, L: int) -> torch.Tensor:
        """DeepSeek-V3's complementary sequence-wise balance loss (its Eqs. 17-20):
        ``coef · mean_b Σ_e f_be P_be``, f_be = E/(K L) · #slots of sequence b on expert e (no
        gradient), P_be = mean over the sequence of the sum-normalised sigmoid scores. ≈ coef when
        balanced, up to coef·E/K when one expert takes all."""
        if self.aux_loss_coef == 0.0:
            return scores_TE.new_zeros(())
        E, K = self.num_experts, self.top_k
        p_BLE = rearrange(scores_TE / scores_TE.sum(-1, keepdim=True), "(b l) e -> b l e", b=B)
        P_BE = p_BLE.mean(1)
        idx_BS = rearrange(topk_idx_TK, "(b l) k -> b (l k)", b=B)
        slots_BE = torch.zeros_like(P_BE).scatter_add_(1, idx_BS, torch.ones_like(idx_BS, dtype=P_BE.dtype))
        f_BE = slots_BE * (E / (K * L))
        return self.aux_loss_coef * (f_BE * P_BE).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free balancing step (DeepSeek-V3 §2.1.2): ``bias += rate · sign(mean load - load)``
        over the tokens counted since the last call, then reset the counts. Call after each real
        optimiser step; with torch.distributed up, counts are summed over ranks first so every rank
        applies the same update and the replicas never drift apart."""
        counts_E = self.tokens_per_expert.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts_E)
        load_E = counts_E.double()
        # No tokens since the last call gives sign(0) = 0: no update.
        step_E = torch.sign(load_E.mean() - load_E) * self.bias_update_rate
        bias = self.gate.e_score_correction_bias
        bias.add_(step_E.to(bias.dtype))
        self.tokens_per_expert.zero_()

    def stats(self) -> Dict[str, torch.Tensor]:
        """Detached logging statistics of the last forward run with ``collect_stats=True`` (zeros
        before the first one): ``load`` (E,) fraction of slots per expert, ``load_max_over_mean``
        (1 = balanced), ``router_entropy`` (nats, of the normalised scores; log E = uniform), and
        ``bias_abs_max`` (the current selection bias)."""
        load = self.last_load.float()
        return {
            "load": load.clone(),
            "load_max_over_mean": load.max() * self.num_experts,
            "router_entropy": self.last_router_entropy.float().clone(),
            "bias_abs_max": self.gate.e_score_correction_bias.abs().max().float(),
        }


def update_moe_biases(model: nn.Module) -> int:
    """Run :meth:`MoE.update_bias` on every MoE in ``model`` (works through DDP/compile wrappers).
    The training loop calls it after each real optimiser step, outside autograd. Returns the count."""
    n = 0
    for module in model.modules():
        if isinstance(module, MoE):
            module.update_bias()
            n += 1
    return n
