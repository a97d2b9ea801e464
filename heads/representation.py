"""Representation-vector modality (DESIGN.md §4, "joint image-representation").

``x_m`` is a (B, dim) float vector from a frozen encoder (the multi-tower model, CLIP, DINOv2,
optionally PCA-reduced).
- encoder: Linear(dim -> E) -> Linear(E -> C·H·W) -> unit RMS (a rank-E linear map into S);
- head: pooled features -> adaLN LayerNorm -> Linear -> GELU -> zero-init Linear(-> dim);
- loss: MSE (mean over dims), the Gaussian NLL with unit variance up to scale and constant;
- expected encoding: the encoder applied to the predicted vector.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unidiff.errors import DataError
from unidiff.modality import BackboneOutput, Modality, ModalityTask, check_array

from .common import NullEncoding, PooledHead, VectorToImage, check_int, gaussian_log_likelihood


class RepresentationModality(Modality):
    """A real vector per image.

    Options:
        dim: the vector dimension.
        embed_dim: the bottleneck width E of the encoder (default 64).
    """

    kind = "representation"
    tasks = (
        ModalityTask("representation_to_image", "generate", "images from given representation vectors"),
        ModalityTask("image_to_representation", "read", "the representation head read from images alone"),
    )
    npz_key = "representations"
    npz_doc = "float32 N×dim"

    def __init__(
        self,
        name: str,
        image_shape: Tuple[int, int, int],
        hidden_size: int,
        patch_size: int,
        weight: float = 1.0,
        loss_weight: float = 1.0,
        *,
        dim: int,
        embed_dim: int = 64,
    ):
        super().__init__(name, image_shape, hidden_size, patch_size, weight, loss_weight)
        self.dim = check_int(self.kind, "dim", dim)
        embed_dim = check_int(self.kind, "embed_dim", embed_dim)
        self.proj = nn.Linear(self.dim, embed_dim)
        self.to_image = VectorToImage(embed_dim, self.image_shape)
        self.null = NullEncoding(self.image_shape)
        # One hidden layer of width D: a vector regression needs more than a linear probe.
        self.regressor = PooledHead(self.hidden_size, self.dim, mlp_hidden=self.hidden_size)

    def _check(self, r: torch.Tensor) -> torch.Tensor:
        if r.ndim != 2 or r.shape[1] != self.dim or not r.dtype.is_floating_point:
            raise DataError(
                f"modality {self.name!r}: expected a (B, {self.dim}) float tensor, got {r.dtype} {tuple(r.shape)}"
            )
        return r

    # --- encoder ---------------------------------------------------------------------------------
    def encode(self, x_m: torch.Tensor) -> torch.Tensor:
        """(B, dim) -> (B, C, H, W), unit RMS."""
        r = self._check(x_m).to(self.proj.weight.dtype)
        return self.to_image(self.proj(r))

    def null_encoding(self, batch_size: int) -> torch.Tensor:
        return self.null(batch_size)

    # --- head ------------------------------------------------------------------------------------
    def head(self, feats: BackboneOutput) -> torch.Tensor:
        """-> predicted vector (B, dim); zero at init."""
        return self.regressor(feats)

    def expected_encoding(self, pred: torch.Tensor) -> torch.Tensor:
        """The head predicts the vector's mean, so its encoding is ``E(r̂)``."""
        return self.encode(pred)

    def loss(self, pred: torch.Tensor, x_m: torch.Tensor) -> torch.Tensor:
        """MSE per sample (B,), mean over the ``dim`` entries."""
        return (pred.float() - self._check(x_m).float()).pow(2).mean(dim=1)

    def log_likelihood(self, pred: torch.Tensor, x_m: torch.Tensor) -> torch.Tensor:
        """``log N(r; r̂, I)`` (B,) in nats, constant included (DESIGN.md §2 L_0)."""
        return gaussian_log_likelihood(pred, self._check(x_m))

    def readout(self, pred: torch.Tensor) -> torch.Tensor:
        return pred

    # --- sample files ----------------------------------------------------------------------------
    def to_array(self, value: torch.Tensor) -> np.ndarray:
        """(N, dim) -> float32 N×dim."""
        return np.asarray(value.float().cpu().numpy(), dtype=np.float32)

    def from_array(self, array: np.ndarray, where: str) -> Dict[str, torch.Tensor]:
        """N×dim real numbers -> ``{name: (N, dim) float32}``. (The default inputs of
        representation_to_image are the validation rows' vectors, when the data has them.)"""
        arr = check_array(array, where, ("N", self.dim), "float")
        return {self.name: torch.as_tensor(arr, dtype=torch.float32)}

    # --- metrics ---------------------------------------------------------------------------------
    def metrics(self, pred: torch.Tensor, x_m: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{"cosine", "mse"}`` batch means (0-dim tensors) of read-out vectors vs the truth."""
        pred, x_m = pred.float(), x_m.float()
        return {
            "cosine": F.cosine_similarity(pred, x_m, dim=1).mean(),
            "mse": (pred - x_m).pow(2).mean(),
        }
