"""The image head: the primary modality's prediction (DESIGN.md §2).

It reads the patch tokens like DiT's FinalLayer and returns ``ε̂`` (or ``v̂`` / ``x̂0``) in the
de-drifted space; which of the three it is belongs to the diffusion (``UnifiedModel.prediction``),
not to the head.
"""

from __future__ import annotations

from typing import Tuple

from .common import PatchHead


class ImageHead(PatchHead):
    """adaLN (shift, scale from ``feats.c``) -> LayerNorm (no affine) -> zero-init Linear(D -> p·p·C)
    -> unpatchify to (B, C, H, W).

    Zero-initialised linear and modulation: the whole model outputs 0 at init (STYLE.md habit 8),
    so the first ε̂ is the prior mean.

    Args:
        image_shape: ``(C, H, W)`` of the diffusion space S.
        hidden_size: backbone width D.
        patch_size: backbone patch size p.
    """

    def __init__(self, image_shape: Tuple[int, int, int], hidden_size: int, patch_size: int):
        super().__init__(out_shape=image_shape, hidden_size=hidden_size, patch_size=patch_size)
