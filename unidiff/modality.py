"""The contract between the modality-agnostic core and the modality files in ``heads/``.

DESIGN.md §1-2: every auxiliary modality ``m`` has
- an encoder ``E_m : X_m -> R^S`` into the image space ``S = (C, H, W)``, normalised to unit RMS;
- a learned null encoding ``E_m(∅)`` used when the modality is absent or dropped;
- a decoder head reading the shared backbone features;
- a loss ``ℓ_m(x_m, x̂_m)`` (its head's negative log-likelihood, up to constants);
- an *expected encoding* ``E_m(x̂_m)`` of its prediction (for a label, ``Σ_k p̂_k E(k)``), which
  gives the predicted drift ``Â = Σ_m π_m E_m(x̂_m)``.

The core (``unidiff.model``, ``unidiff.diffusion``) only ever talks to :class:`Modality`; it never
imports a particular head. A head is found by its ``kind`` through :func:`heads.build_modality`.

Legend for shapes: ``B`` batch, ``C, H, W`` image-space channels/height/width, ``L`` patch tokens,
``R`` register tokens, ``D`` backbone width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional, Tuple

import torch
from torch import nn


@dataclass
class BackboneOutput:
    """What the shared backbone hands to every head.

    tokens:    (B, L, D) patch-token features after the final adaLN-modulated norm, row-major
               patch order (the layout of ``unidiff.models.embed.unpatchify``).
    registers: (B, R, D) register-token features (R may be 0), for heads that pool.
    c:         (B, D) the conditioning vector (timestep embedding + extra conditions), for heads
               that want their own adaLN modulation (DiT's FinalLayer).
    aux_loss:  scalar MoE auxiliary loss (0 when disabled).
    stats:     detached logging statistics (per-expert load, router entropy, ...).
    """

    tokens: torch.Tensor
    registers: torch.Tensor
    c: torch.Tensor
    aux_loss: torch.Tensor
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)


def unit_rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale each sample of ``x`` (B, ...) to unit root-mean-square (DESIGN.md §1).

    Keeps ``‖E_m(x)‖² = |S|`` fixed so the drift cannot grow without bound while training.
    """
    dims = tuple(range(1, x.ndim))
    return x * torch.rsqrt(x.float().pow(2).mean(dim=dims, keepdim=True).to(x.dtype) + eps)


class Modality(nn.Module):
    """Base class of an auxiliary modality (label, representation, masked image, source image).

    Subclasses set ``kind`` and implement the abstract methods. ``x_m`` (the modality's value)
    is whatever structure the modality needs (a LongTensor of labels, a (B, K) vector, a dict of
    tensors); the core only moves it around, indexes its batch dimension through
    :meth:`select`, and hands it back to the modality.

    Args:
        name: key of this modality in the batch dict and in the model (e.g. ``"label"``).
        image_shape: ``(C, H, W)`` of the diffusion space S.
        hidden_size: backbone width D (heads read (B, L, D) features).
        patch_size: backbone patch size (for heads that unpatchify).
        weight: π_m, the fixed aggregation weight in ``A(x) = Σ_m π_m E_m(x_m)``.
        loss_weight: λ_m, the constant head-loss weight.
    """

    kind: ClassVar[str] = ""

    def __init__(
        self,
        name: str,
        image_shape: Tuple[int, int, int],
        hidden_size: int,
        patch_size: int,
        weight: float = 1.0,
        loss_weight: float = 1.0,
    ):
        super().__init__()
        self.name = name
        self.image_shape = tuple(int(s) for s in image_shape)
        self.hidden_size = int(hidden_size)
        self.patch_size = int(patch_size)
        self.weight = float(weight)
        self.loss_weight = float(loss_weight)

    # --- data -------------------------------------------------------------------------------
    def from_batch(self, batch: Dict[str, Any], generator: Optional[torch.Generator] = None) -> Any:
        """Extract ``x_m`` from a data batch (default ``batch[self.name]``).

        Modalities derived from the image (masked image, built-in source transforms) override
        this; ``generator`` makes random masks reproducible.
        """
        if self.name not in batch:
            raise KeyError(f"batch has no entry {self.name!r} for modality {self.name!r}; has {sorted(batch)}")
        return batch[self.name]

    def select(self, x_m: Any, index: torch.Tensor) -> Any:
        """``x_m`` restricted to the batch rows ``index`` (tensors and dicts of tensors)."""
        if isinstance(x_m, dict):
            return {k: self.select(v, index) for k, v in x_m.items()}
        return x_m[index]

    # --- encoder into S ----------------------------------------------------------------------
    def encode(self, x_m: Any) -> torch.Tensor:
        """``E_m(x_m)``: (B, C, H, W), unit RMS per sample."""
        raise NotImplementedError

    def null_encoding(self, batch_size: int) -> torch.Tensor:
        """``E_m(∅)``: (B, C, H, W), the learned null encoding (unit RMS), repeated."""
        raise NotImplementedError

    # --- decoder head ------------------------------------------------------------------------
    def head(self, feats: BackboneOutput) -> Any:
        """Raw prediction from shared features (logits, a vector, an image)."""
        raise NotImplementedError

    def expected_encoding(self, pred: Any) -> torch.Tensor:
        """``E_m(x̂_m)`` of a raw prediction: (B, C, H, W), differentiable in ``pred``."""
        raise NotImplementedError

    def loss(self, pred: Any, x_m: Any) -> torch.Tensor:
        """Per-sample head loss ``ℓ_m`` (B,), e.g. cross-entropy for a label."""
        raise NotImplementedError

    def readout(self, pred: Any) -> Any:
        """Turn a raw prediction into a value of ``X_m`` (argmax label, vector, image)."""
        raise NotImplementedError

    def log_likelihood(self, pred: Any, x_m: Any) -> torch.Tensor:
        """``log p_θ(x_m | z_1)`` (B,) in nats, the L_0 term of the bound (DESIGN.md §2).

        Default: ``-loss`` (exact for cross-entropy; for Gaussian heads the subclass adds the
        normalising constant).
        """
        return -self.loss(pred, x_m)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, kind={self.kind!r}, weight={self.weight}, loss_weight={self.loss_weight}"
