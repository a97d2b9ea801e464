"""Input/output plumbing of the backbone: patches, 2-D sin-cos positions, timestep embedding.

Images are not sequences (DESIGN.md §5): the patch grid is flattened row-major here, and the scan
orders of ``unidiff.models.scan`` permute it per Mamba sublayer. ``patchify``/``unpatchify`` are
exact inverses (a test says so) and are what every image-shaped head uses.
"""

from __future__ import annotations

from typing import Tuple

import torch
from diffusers.models.embeddings import get_timestep_embedding
from einops import rearrange
from torch import nn

from ..errors import ConfigError


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), row-major patches, ``(p1 p2 c)`` inside a patch."""
    return rearrange(x, "b c (gh p1) (gw p2) -> b (gh gw) (p1 p2 c)", p1=p, p2=p)


def unpatchify(x: torch.Tensor, p: int, grid: Tuple[int, int]) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, gh*p, gw*p); the inverse of :func:`patchify`."""
    gh, gw = grid
    return rearrange(x, "b (gh gw) (p1 p2 c) -> b c (gh p1) (gw p2)", gh=gh, gw=gw, p1=p, p2=p)


def sincos_2d(dim: int, grid: Tuple[int, int], temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE / DiT): (gh*gw, dim), row-major.

    Half the channels encode the row, half the column, each as [sin, cos] of geometric frequencies.
    Not diffusers' ``get_2d_sincos_pos_embed``: it puts the column half first and rescales the grid
    by ``base_size``/``interpolation_scale``, so it gives other numbers at initialisation (the main
    job's digits would change); same frequencies otherwise.
    """
    if dim % 4 != 0:
        raise ConfigError(f"hidden_size={dim} must be divisible by 4 for the 2-D sin-cos position embedding")
    gh, gw = grid
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij")
    out_r = rows.reshape(-1, 1) * omega  # (L, dim/4)
    out_c = cols.reshape(-1, 1) * omega
    return torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], dim=1).float()  # (L, dim)


class PatchEmbed(nn.Module):
    """Conv patch embedding of a (B, C, H, W) input into (B, L, D) tokens plus fixed 2-D positions.

    Not diffusers' ``PatchEmbed``: that one adds its own position table (above) and flattens with
    ``flatten(2).transpose(1, 2)``; its ``proj`` is the same ``Conv2d``, but the checkpoint keys
    (``pos`` is a non-persistent buffer here) and the positions would differ.
    """

    def __init__(self, in_channels: int, input_size: Tuple[int, int], patch_size: int, hidden_size: int):
        super().__init__()
        H, W = input_size
        if H % patch_size or W % patch_size:
            raise ConfigError(
                f"image size {H}x{W} is not divisible by the patch size {patch_size} (model.backbone.patch_size)"
            )
        self.in_channels, self.input_size, self.patch_size = in_channels, (H, W), patch_size
        self.grid = (H // patch_size, W // patch_size)
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos", sincos_2d(hidden_size, self.grid)[None], persistent=False)  # (1, L, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (self.in_channels, *self.input_size):
            raise ValueError(f"expected input (B, {self.in_channels}, {self.input_size[0]}, {self.input_size[1]}), got {tuple(x.shape)}")
        x = self.proj(x)  # (B, D, gh, gw)
        return rearrange(x, "b d gh gw -> b (gh gw) d") + self.pos.to(x.dtype)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of integer timesteps followed by an MLP (DDPM / DiT)."""

    def __init__(self, hidden_size: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def frequencies(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, freq_dim) [cos, sin] features, computed in fp32 (timesteps up to 1000).

        diffusers' ``get_timestep_embedding`` with ``flip_sin_to_cos=True, downscale_freq_shift=0``
        is ``[cos(t ω_i), sin(t ω_i)]``, ``ω_i = max_period^(-i/half)``: DiT's features, bit for bit.
        The MLP stays ours (diffusers' ``TimestepEmbedding`` is the same Linear-SiLU-Linear, but
        under other state-dict keys: existing checkpoints would not load).
        """
        return get_timestep_embedding(t, self.freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0,
                                      max_period=self.max_period)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        f = self.frequencies(t)
        return self.mlp(f.to(self.mlp[0].weight.dtype))  # (B, D)
