"""Masks as plain augmentation: the control arm of the masked-image ablation.

The masked-image modality gives the model ``(x0 ⊙ M, M)`` as a second input and asks its head for
``x0``; the question is whether that beats simply showing the model masked images. The control
arm therefore has *no* masked modality, and a fraction ``p`` of its training images is replaced by
``x0 ⊙ M`` itself (masked pixels at 0, the middle grey of ``[-1, 1]``), with ``M`` drawn by the
masked modality's own :meth:`random_mask` (same ratio ρ, same patch): the same masks, applied to
the diffusion target instead of fed as a modality.

The wrapper is a :class:`unidiff.data.InMemoryDataset` whose :meth:`batch` masks the rows it
returns; it is handed to :func:`unidiff.train.train` only (evaluation, the reference classifier and
the FID statistics see the plain data). Which rows are masked and how is a function of the batch's
item indices alone, so a resumed run draws the same masks at the same step.
"""

from __future__ import annotations

from typing import Any, Dict, Union

import torch

from unidiff.data.datasets import InMemoryDataset

# Odd 63-bit multipliers: the batch's seed is a hash of its (position, item) pairs.
_MIX_ITEM, _MIX_POS = 0x9E3779B97F4A7C15 >> 1, 0xBF58476D1CE4E5B9 >> 1


class MaskAugmented(InMemoryDataset):
    """``base``'s items with ``x0 ⊙ M`` instead of ``x0`` on a fraction ``p`` of each batch.

    mask_modality: a masked-image modality (only its ``random_mask`` is used: ρ and the patch).
    """

    def __init__(self, base: InMemoryDataset, mask_modality: Any, p: float):
        super().__init__(base.images, base.labels, base.sources, base.hflip, base.extras)
        self.mask_modality, self.p = mask_modality, float(p)

    def _generator(self, index: torch.Tensor) -> torch.Generator:
        idx = index.detach().cpu().long()
        pos = torch.arange(len(idx), dtype=torch.long)
        seed = int(((idx + 1) * _MIX_ITEM + (pos + 1) * _MIX_POS).sum()) & ((1 << 63) - 1)
        return torch.Generator().manual_seed(seed)

    def batch(self, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = super().batch(index)
        x0 = out["image"]  # (B, C, H, W) in [-1, 1]
        g = self._generator(index)
        mask = self.mask_modality.random_mask(x0.shape[0], torch.device("cpu"), g)  # (B, 1, H, W), 1 = visible
        chosen = (torch.rand(x0.shape[0], generator=g) < self.p).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        mask = torch.where(chosen, mask, torch.ones_like(mask)).to(device=x0.device, dtype=x0.dtype)
        out["image"] = x0 * mask
        return out

    def to(self, device: Union[str, torch.device]) -> "MaskAugmented":
        return MaskAugmented(super().to(device), self.mask_modality, self.p)
