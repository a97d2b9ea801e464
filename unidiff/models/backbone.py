"""The shared denoising backbone: a hybrid Mamba-Transformer MoE stack (DESIGN.md §5).

The stack is data (STYLE.md habit 5): a layer pattern string with one pre-norm residual sublayer per
character, Nemotron-H's ``hybrid_override_pattern`` convention:

    M  Mamba-2 mixer over a 2-D scan order of the patch grid   (unidiff.models.scan / mamba2)
    *  non-causal grouped-query self-attention                 (unidiff.models.attention)
    E  MoE FFN: sigmoid router, shared expert, LatentMoE       (unidiff.models.moe)
    -  dense squared-ReLU MLP                                  (unidiff.models.moe.DenseMLP)

Every sublayer is adaLN-Zero conditioned (DiT): ``x + gate(c) * f(norm(x) * (1 + scale(c)) + shift(c))``
with the (shift, scale, gate) projection zero-initialised, so the stack is the identity at
initialisation and the zero-initialised heads make the whole denoiser output zero.

Token layout (docs/CONTRACTS.md): ``(B, L + R, D)``, L patch tokens in row-major order, then R
learned register tokens that pooling heads read.
"""

from __future__ import annotations

import inspect
from typing import Dict, Optional, Sequence, Tuple

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..errors import ConfigError
from ..modality import BackboneOutput
from .attention import Attention
from .embed import PatchEmbed, TimestepEmbedder
from .moe import MoE, DenseMLP
from .scan import SCAN_ORDERS, ScanMixer

LAYER_KINDS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
SCAN_MODES = ("cycle", "bidirectional") + tuple(SCAN_ORDERS)


def parse_pattern(pattern: str) -> Tuple[str, ...]:
    """Validate a layer pattern (e.g. ``"MEMEM*E"``) and return its characters."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"layer pattern must be a non-empty string over {sorted(LAYER_KINDS)}, got {pattern!r}")
    bad = sorted({ch for ch in pattern if ch not in LAYER_KINDS})
    if bad:
        allowed = ", ".join(f"'{k}' ({v})" for k, v in LAYER_KINDS.items())
        raise ConfigError(f"layer pattern {pattern!r} has unknown character(s) {bad}; allowed: {allowed}")
    return tuple(pattern)


class Sublayer(nn.Module):
    """One pre-norm residual sublayer with adaLN-Zero modulation from the conditioning vector c."""

    def __init__(self, kind: str, mixer: nn.Module, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.kind = kind
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=eps)
        self.mixer = mixer
        # (shift, scale, gate) from SiLU(c); zero-initialised in HybridBackbone.initialize_weights.
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, collect_stats: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        shift, scale, gate = self.adaLN(c)[:, None].chunk(3, dim=-1)  # each (B, 1, D)
        h = self.norm(x) * (1 + scale) + shift
        # Only the MoE keeps statistics; the other mixers take the features alone.
        out = self.mixer(h, collect_stats=collect_stats) if self.kind == "E" else self.mixer(h)
        aux = x.new_zeros((), dtype=torch.float32)
        if isinstance(out, tuple):  # the MoE returns (y, aux_loss)
            out, aux = out
        return x + gate * out, aux


def create_block(
    kind: str,
    index: int,
    *,
    hidden_size: int,
    grid: Tuple[int, int],
    num_registers: int,
    num_heads: int,
    num_kv_heads: Optional[int],
    qk_norm: bool,
    mlp_ratio: float,
    scan: str,
    mamba: Dict,
    moe: Dict,
    norm_eps: float,
) -> Sublayer:
    """Build the sublayer for one pattern character (mamba's ``create_block`` idea).

    ``index`` counts sublayers of the same kind, so the k-th ``M`` scans in order
    ``SCAN_ORDERS[k % 4]`` when ``scan == "cycle"`` (row, row reversed, column, column reversed).
    """
    if kind == "M":
        order = SCAN_ORDERS[index % len(SCAN_ORDERS)] if scan == "cycle" else scan
        mixer = ScanMixer(hidden_size, grid, order=order, num_registers=num_registers, **mamba)
    elif kind == "*":
        mixer = Attention(hidden_size, num_heads, num_kv_heads, qk_norm=qk_norm)
    elif kind == "E":
        mixer = MoE(hidden_size, **moe)
    elif kind == "-":
        mixer = DenseMLP(hidden_size, int(hidden_size * mlp_ratio))
    else:  # parse_pattern has already rejected it; kept so the factory is safe on its own
        raise ConfigError(f"unknown layer kind {kind!r}; allowed: {sorted(LAYER_KINDS)}")
    return Sublayer(kind, mixer, hidden_size, eps=norm_eps)


class HybridBackbone(ModelMixin, ConfigMixin):
    """Hybrid Mamba-Transformer MoE denoising backbone: ``(z_t, t, cond) -> BackboneOutput``.

    Args:
        in_channels, input_size: the image space S = (C, H, W) it reads.
        patch_size: p; H and W must be divisible by it (else ConfigError).
        hidden_size: D. pattern: the layer pattern string (module docstring).
        num_heads, num_kv_heads, qk_norm: attention (GQA).
        mlp_ratio: dense ``-`` MLP width = mlp_ratio * D.
        scan: ``cycle`` (default), ``bidirectional``, or one fixed order of ``SCAN_ORDERS``.
        d_state, d_conv, expand, headdim, n_groups, chunk_size: Mamba-2 mixer.
        num_experts, top_k, moe_intermediate_size, shared_intermediate_size, latent_size,
        routed_scaling_factor, n_group, topk_group, aux_loss_coef, bias_update_rate: MoE
        (``moe_intermediate_size`` None = mlp_ratio * D / top_k, so the routed experts a token uses
        add up to a dense MLP's width; ``shared_intermediate_size`` None = moe_intermediate_size, so
        the shared expert adds one more expert's width, 0 = no shared expert).
        num_registers: R learned register tokens appended after the patches.
        cond_dim: width of an optional extra condition vector added to the timestep embedding.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        input_size: Sequence[int] = (8, 8),
        patch_size: int = 1,
        hidden_size: int = 64,
        pattern: str = "M*ME",
        num_heads: int = 4,
        num_kv_heads: Optional[int] = None,
        qk_norm: bool = True,
        mlp_ratio: float = 4.0,
        scan: str = "cycle",
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 16,
        n_groups: int = 1,
        chunk_size: int = 64,
        num_experts: int = 4,
        top_k: int = 2,
        moe_intermediate_size: Optional[int] = None,
        shared_intermediate_size: Optional[int] = None,
        latent_size: Optional[int] = None,
        routed_scaling_factor: float = 1.0,
        n_group: int = 1,
        topk_group: int = 1,
        aux_loss_coef: float = 0.0,
        bias_update_rate: float = 1e-3,
        num_registers: int = 0,
        cond_dim: int = 0,
        freq_dim: int = 256,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        kinds = parse_pattern(pattern)
        if scan not in SCAN_MODES:
            raise ConfigError(f"scan={scan!r} is not one of {list(SCAN_MODES)}")
        for key, val in (("hidden_size", hidden_size), ("patch_size", patch_size), ("top_k", top_k), ("num_experts", num_experts)):
            if int(val) < 1:
                raise ConfigError(f"{key}={val} must be >= 1")
        if top_k > num_experts:
            raise ConfigError(f"top_k={top_k} exceeds num_experts={num_experts}")
        H, W = (int(s) for s in input_size)
        self.hidden_size, self.patch_size, self.pattern = hidden_size, patch_size, pattern
        self.num_registers = num_registers

        self.patch_embed = PatchEmbed(in_channels, (H, W), patch_size, hidden_size)  # (B, L, D)
        self.grid = self.patch_embed.grid
        self.t_embed = TimestepEmbedder(hidden_size, freq_dim)
        self.cond_embed = nn.Linear(cond_dim, hidden_size) if cond_dim > 0 else None
        self.registers = nn.Parameter(torch.zeros(1, num_registers, hidden_size)) if num_registers > 0 else None

        moe_width = moe_intermediate_size or max(1, int(mlp_ratio * hidden_size / top_k))
        moe_kwargs = dict(
            num_experts=num_experts,
            top_k=top_k,
            intermediate_size=moe_width,
            shared_intermediate_size=moe_width if shared_intermediate_size is None else shared_intermediate_size,
            latent_size=latent_size,
            routed_scaling_factor=routed_scaling_factor,
            n_group=n_group,
            topk_group=topk_group,
            aux_loss_coef=aux_loss_coef,
            bias_update_rate=bias_update_rate,
        )
        mamba_kwargs = dict(d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, n_groups=n_groups, chunk_size=chunk_size)
        counts: Dict[str, int] = {}
        layers = []
        for ch in kinds:
            layers.append(
                create_block(
                    ch, counts.get(ch, 0), hidden_size=hidden_size, grid=self.grid, num_registers=num_registers,
                    num_heads=num_heads, num_kv_heads=num_kv_heads, qk_norm=qk_norm, mlp_ratio=mlp_ratio,
                    scan=scan, mamba=mamba_kwargs, moe=moe_kwargs, norm_eps=norm_eps,
                )
            )
            counts[ch] = counts.get(ch, 0) + 1
        self.layers = nn.ModuleList(layers)
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.initialize_weights()

    # Initialisation lives in one place (STYLE.md habit 8).
    def initialize_weights(self) -> None:
        """Xavier for plain linears (DiT), patch conv like a linear, N(0, 0.02) for t-MLP and registers;
        the Mamba-2 parameters (A_log, dt_bias, D, conv) keep the mixer's own Mamba-2 init; MoE experts
        keep theirs. Zero: every adaLN projection, so each residual branch starts closed."""
        for layer in self.layers:
            if isinstance(layer.mixer, Attention):
                for lin in (layer.mixer.q_proj, layer.mixer.kv_proj, layer.mixer.o_proj):
                    nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(layer.adaLN[-1].weight)
            nn.init.zeros_(layer.adaLN[-1].bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        if self.registers is not None:
            nn.init.normal_(self.registers, std=0.02)

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None,
                collect_stats: bool = False) -> BackboneOutput:
        """z: (B, C, H, W); t: (B,) timesteps; cond: (B, cond_dim) or None -> BackboneOutput.

        ``collect_stats`` fills ``BackboneOutput.stats`` with :meth:`moe_stats` of this forward (the
        training objective asks for it); otherwise ``stats`` is empty and no statistic is computed.
        """
        B = z.shape[0]
        x = self.patch_embed(z)  # (B, L, D)
        L = x.shape[1]
        if self.registers is not None:
            x = torch.cat([x, self.registers.expand(B, -1, -1).to(x.dtype)], dim=1)  # (B, L + R, D)
        c = self.t_embed(t)  # (B, D)
        if self.cond_embed is not None:
            if cond is None:
                raise ValueError("this backbone was built with cond_dim > 0 and needs a cond tensor")
            c = c + self.cond_embed(cond)
        aux_loss = torch.zeros((), device=z.device, dtype=torch.float32)
        for layer in self.layers:
            x, aux = layer(x, c, collect_stats)
            aux_loss = aux_loss + aux
        x = self.final_norm(x)
        stats = self.moe_stats() if collect_stats else {}
        return BackboneOutput(tokens=x[:, :L], registers=x[:, L:], c=c, aux_loss=aux_loss, stats=stats)

    @torch.no_grad()
    def moe_stats(self) -> Dict[str, torch.Tensor]:
        """Per-expert load and router entropy of the last ``collect_stats=True`` forward, averaged
        over the MoE sublayers (detached); ``{}`` without MoE sublayers."""
        stats = [layer.mixer.stats() for layer in self.layers if isinstance(layer.mixer, MoE)]
        stats = [s for s in stats if s]
        if not stats:
            return {}
        return {f"moe/{k}": torch.stack([s[k].float() for s in stats]).mean(0) for k in stats[0]}

    def num_parameters_active(self) -> int:
        """Parameters a token touches: routed experts count top_k / num_experts of their weights."""
        total = sum(p.numel() for p in self.parameters())
        for layer in self.layers:
            if isinstance(layer.mixer, MoE):
                routed = sum(p.numel() for p in layer.mixer.experts.parameters())
                total -= routed - routed * layer.mixer.top_k // layer.mixer.num_experts
        return total


def backbone_options() -> Tuple[str, ...]:
    """The keyword names HybridBackbone accepts (for config validation)."""
    sig = inspect.signature(HybridBackbone.__init__)
    return tuple(k for k in sig.parameters if k != "self")


def validate_backbone_options(options: Dict) -> None:
    """Reject unknown backbone keys by name (configs: ``model.backbone.<key>``)."""
    allowed = set(backbone_options()) - {"in_channels", "input_size"}
    bad = sorted(set(options) - allowed)
    if bad:
        raise ConfigError(f"unknown backbone option(s) {bad} (model.backbone); allowed: {sorted(allowed)}")
