"""Building blocks shared by the modality files: option checks, encoders into S, heads.

Every auxiliary modality (DESIGN.md §1-2) needs the same few pieces: an encoder into the image
space ``S = (C, H, W)`` normalised with :func:`unidiff.modality.unit_rms`, a learned null encoding,
and a decoder head that reads the shared backbone features, either *pooled* (a label, a vector) or
*per token* (an image, DiT's FinalLayer). They live here once instead of a copy per file.

Legend for shapes: ``B`` batch, ``C, H, W`` image space, ``L`` patch tokens, ``R`` register
tokens, ``D`` backbone width, ``p`` patch size.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import torch
from einops import rearrange
from torch import nn

from unidiff.errors import ConfigError
# The image losses and metrics of the heads: the one per-image (masked) MSE and PSNR of unidiff.
from unidiff.metrics import per_image_mse as masked_mse  # noqa: F401 (used by the image heads)
from unidiff.metrics import psnr_from_mse as psnr  # noqa: F401
from unidiff.modality import BackboneOutput, unit_rms
from unidiff.models.embed import unpatchify

# Images live in [-1, 1] (docs/CONTRACTS.md), so the PSNR peak-to-peak range is 2.


# --- option checks (config values reach the heads straight from YAML) -----------------------------
def check_int(kind: str, option: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``, else a ConfigError naming the option and the kind."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"modality kind {kind!r}: option {option!r} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_float(kind: str, option: str, value: Any, low: float, high: float) -> float:
    """``value`` as a float in ``[low, high]``, else a ConfigError naming the option and the kind."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"modality kind {kind!r}: option {option!r} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def check_choice(kind: str, option: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` as one of ``choices``, else a ConfigError naming the option and the kind."""
    if value not in choices:
        raise ConfigError(f"modality kind {kind!r}: option {option!r} must be one of {list(choices)}, got {value!r}")
    return str(value)


def check_divisible(kind: str, image_shape: Tuple[int, int, int], size: int, what: str) -> None:
    """H and W must be multiples of a patch/pooling size (the grid has no partial cells)."""
    _, H, W = image_shape
    if H % size or W % size:
        raise ConfigError(f"modality kind {kind!r}: image size {H}x{W} is not divisible by {what} {size}")


# --- adaLN (DiT) ---------------------------------------------------------------------------------
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DiT's adaLN: ``x * (1 + scale) + shift``; x (B, ..., D), shift/scale (B, D)."""
    extra = x.ndim - shift.ndim  # broadcast (B, D) over the token axis when there is one
    shift = shift.reshape(shift.shape[0], *([1] * extra), shift.shape[-1])
    scale = scale.reshape(scale.shape[0], *([1] * extra), scale.shape[-1])
    return x * (1 + scale) + shift


class AdaLNNorm(nn.Module):
    """LayerNorm without affine parameters, modulated by shift/scale regressed from ``c`` (B, D).

    The modulation is zero-initialised (STYLE.md habit 8), so at init this is a plain LayerNorm.
    """

    def __init__(self, hidden_size: int, cond_size: Optional[int] = None):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_size or hidden_size, 2 * hidden_size))
        nn.init.zeros_(self.ada[-1].weight)
        nn.init.zeros_(self.ada[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (B, ..., D), c: (B, cond_size) -> (B, ..., D)."""
        shift, scale = self.ada(c).chunk(2, dim=-1)  # (B, D) each
        return modulate(self.norm(x), shift, scale)


def zero_linear(in_features: int, out_features: int) -> nn.Linear:
    """A Linear whose weight and bias start at zero: heads output exactly zero at init."""
    lin = nn.Linear(in_features, out_features)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


# --- heads ---------------------------------------------------------------------------------------
POOLS = ("auto", "tokens", "concat")


def pool_features(feats: BackboneOutput, pool: str = "auto") -> torch.Tensor:
    """A summary of the backbone features, (B, D) or (B, 2D).

    ``auto``: the mean of the register tokens when there are any (they exist to gather global
    information), else the mean over the patch tokens; ``tokens``: the mean over the patch tokens;
    ``concat``: the register mean and the token mean side by side (B, 2D), the register half zero
    when the backbone has no registers.
    """
    tokens = feats.tokens.mean(dim=1)  # (B, L, D) -> (B, D)
    has_registers = feats.registers is not None and feats.registers.shape[1] > 0
    if pool == "tokens" or (pool == "auto" and not has_registers):
        return tokens
    registers = feats.registers.mean(dim=1) if has_registers else torch.zeros_like(tokens)  # (B, D)
    return torch.cat([registers, tokens], dim=-1) if pool == "concat" else registers


class PooledHead(nn.Module):
    """Global head: pool -> adaLN LayerNorm -> [Linear -> GELU] -> zero-init Linear -> (B, out_dim).

    Args:
        hidden_size: backbone width D.
        out_dim: output width (number of classes, vector dimension).
        mlp_hidden: width of an optional hidden layer (None or 0: a single linear read-out).
        pool: what is read (:func:`pool_features`); ``concat`` doubles the read width to 2D.
    """

    def __init__(self, hidden_size: int, out_dim: int, mlp_hidden: Optional[int] = None, pool: str = "auto"):
        super().__init__()
        self.pool = check_choice("head", "pool", pool, POOLS)
        width = 2 * hidden_size if pool == "concat" else hidden_size
        # adaLN's modulation comes from the (B, D) conditioning c; the read width may be 2D.
        self.norm = AdaLNNorm(width, cond_size=hidden_size)
        if mlp_hidden:
            self.mlp = nn.Sequential(nn.Linear(width, mlp_hidden), nn.GELU(approximate="tanh"))
            width = mlp_hidden
        else:
            self.mlp = nn.Identity()
        # Zero output at init: logits 0 (uniform p̂) / a zero vector, like DiT's FinalLayer.
        self.out = zero_linear(width, out_dim)

    def forward(self, feats: BackboneOutput) -> torch.Tensor:
        h = self.norm(pool_features(feats, self.pool), feats.c)  # (B, D) or (B, 2D)
        return self.out(self.mlp(h))  # (B, out_dim)


class PatchHead(nn.Module):
    """DiT FinalLayer: adaLN LayerNorm -> zero-init Linear(D -> p·p·C_out) per token -> unpatchify.

    Args:
        out_shape: ``(C_out, H, W)`` of the predicted image.
        hidden_size: backbone width D.
        patch_size: backbone patch size p (tokens are the row-major (H/p)x(W/p) grid).
    """

    def __init__(self, out_shape: Tuple[int, int, int], hidden_size: int, patch_size: int):
        super().__init__()
        C, H, W = (int(s) for s in out_shape)
        if H % patch_size or W % patch_size:
            raise ConfigError(f"image size {H}x{W} is not divisible by the patch size {patch_size}")
        self.out_shape = (C, H, W)
        self.patch_size = int(patch_size)
        self.grid = (H // patch_size, W // patch_size)
        self.norm = AdaLNNorm(hidden_size)
        self.linear = zero_linear(hidden_size, patch_size * patch_size * C)

    def forward(self, feats: BackboneOutput) -> torch.Tensor:
        """-> (B, C_out, H, W)."""
        x = self.linear(self.norm(feats.tokens, feats.c))  # (B, L, p*p*C_out)
        return unpatchify(x, self.patch_size, grid=self.grid)  # (B, C_out, H, W)


# --- encoders into S -----------------------------------------------------------------------------
class NullEncoding(nn.Module):
    """The learned null encoding ``E_m(∅)`` (DESIGN.md §1), unit RMS on use.

    Initialised from N(0, I) rather than zeros: unit RMS is undefined at 0 (and its gradient
    blows up near it), and a random map in high dimension is nearly orthogonal to every real
    encoding, so "absent" starts out distinguishable from every value.
    """

    def __init__(self, image_shape: Tuple[int, int, int]):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, *image_shape))

    def forward(self, batch_size: int) -> torch.Tensor:
        """-> (B, C, H, W), a broadcast view of one unit-RMS map."""
        return unit_rms(self.weight).expand(batch_size, -1, -1, -1)


class VectorToImage(nn.Module):
    """A vector (B, E) -> a unit-RMS map in S (B, C, H, W) through one Linear(E -> C·H·W).

    A full-resolution linear map (E·C·H·W weights: 64·4·32·32 ≈ 262k for SD latents) rather than a
    low-resolution map + upsampling, so an encoding can carry detail at every pixel; the narrow
    ``E`` keeps it small.
    """

    def __init__(self, embed_dim: int, image_shape: Tuple[int, int, int]):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.linear = nn.Linear(embed_dim, math.prod(image_shape))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        C, H, W = self.image_shape
        x = rearrange(self.linear(v), "b (c h w) -> b c h w", c=C, h=H, w=W)
        return unit_rms(x)  # DESIGN.md §1: encodings have unit RMS


class ConvEncoder(nn.Module):
    """An image-valued input (B, C_in, H, W) -> a unit-RMS map in S (B, C, H, W): one 3x3 conv.

    A single conv keeps the encoding local (each pixel of the drift is set by its neighbourhood
    in the input), which is what an inpainting or transition drift should be.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unit_rms(self.conv(x.to(self.conv.weight.dtype)))


# --- image losses and metrics --------------------------------------------------------------------
def gaussian_log_likelihood(
    pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``log N(target; pred, I)`` summed over the (selected) elements, per sample (B,), in nats.

    The L_0 term of the bound (DESIGN.md §2) for a Gaussian head with unit variance:
    ``-½ Σ (x - x̂)² - (n/2) log 2π`` with ``n`` the number of selected elements.
    """
    sq = (pred.float() - target.float()).pow(2)
    weight = torch.ones_like(sq) if weight is None else weight.float().expand_as(sq)
    n = weight.flatten(1).sum(dim=1)
    return -0.5 * (sq * weight).flatten(1).sum(dim=1) - 0.5 * n * math.log(2 * math.pi)
