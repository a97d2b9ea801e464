"""Non-causal grouped-query self-attention (DESIGN.md §5 ``*`` sublayers).

Positions enter once, as 2-D sin-cos at the input (``embed.PatchEmbed``); the few attention layers of
the hybrid stack then mix globally, while the Mamba layers carry the scan-ordered local structure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..errors import ConfigError


class Attention(nn.Module):
    """GQA attention through ``scaled_dot_product_attention`` (which picks the fused CPU/CUDA kernel).

    Args:
        hidden_size: D. num_heads: query heads. num_kv_heads: key/value heads (divides num_heads;
        None = num_heads, i.e. plain MHA). qk_norm: RMS-normalise q and k per head (stabilises bf16).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None, qk_norm: bool = True, bias: bool = False):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if hidden_size % num_heads:
            raise ConfigError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        if num_heads % num_kv_heads:
            raise ConfigError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=bias)
        self.kv_proj = nn.Linear(hidden_size, 2 * num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=bias)
        self.qk_norm = qk_norm
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.q_proj(x), "b l (h d) -> b h l d", h=self.num_heads)  # (B, Hq, L, d)
        k, v = rearrange(self.kv_proj(x), "b l (two h d) -> two b h l d", two=2, h=self.num_kv_heads)  # (B, Hkv, L, d)
        # QK-norm in fp32, cast back: under bf16 autocast the projections are bf16 while the norm
        # weights stay fp32, and nn.RMSNorm has no fused kernel for mixed dtypes (it warns).
        if self.qk_norm:
            q, k = self.q_norm(q.float()).to(v.dtype), self.k_norm(k.float()).to(v.dtype)
        # enable_gqa broadcasts the Hkv groups over the Hq heads inside the kernel (no repeat_interleave copy).
        y = F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(rearrange(y, "b h l d -> b l (h d)"))
