"""A modality that lives outside ``heads/``: the stroke thickness of a digit (its mean ink).

The example of README.md "A modality can live in your own package": everything the core needs is
declared on the class (the :class:`unidiff.modality.Modality` contract); no core file knows it.
A config names it as ``kind: "custom_modality_fixture:ThicknessModality"`` (this folder on the
path) or, after ``heads.register_modality("thickness", ThicknessModality)``, as ``kind: thickness``.

``x_m`` is a (B,) float in [0, 1]: the mean of ``(image + 1) / 2`` over the pixels, derived from
the image in :meth:`ThicknessModality.from_batch` (or given, e.g. from an ``.npz``).
- encoder: Linear(1 -> E) -> SiLU -> Linear(E -> C·H·W) -> unit RMS; a learned null encoding;
- head: mean-pooled tokens -> LayerNorm -> zero-init Linear(D -> 1): a regression;
- loss: squared error; metrics: mean absolute error.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
from einops import rearrange
from torch import nn

from unidiff.errors import DataError
from unidiff.modality import BackboneOutput, Modality, ModalityTask, check_array, unit_rms


def mean_ink(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B,) mean ink in [0, 1]."""
    return ((images.float() + 1) / 2).flatten(1).mean(dim=1)


class ThicknessModality(Modality):
    """Stroke thickness (mean ink) of the image, a scalar regression.

    Options:
        embed_dim: width of the encoder's hidden layer (default 16).
    """

    kind = "thickness"
    tasks = (
        ModalityTask("thickness_to_image", "generate", "images of a given stroke thickness"),
        ModalityTask("image_to_thickness", "read", "the thickness head read from images alone"),
    )
    npz_key = "thickness"
    npz_doc = "float32 N in [0, 1]"

    def __init__(
        self,
        name: str,
        image_shape: Tuple[int, int, int],
        hidden_size: int,
        patch_size: int,
        weight: float = 1.0,
        loss_weight: float = 1.0,
        *,
        embed_dim: int = 16,
    ):
        super().__init__(name, image_shape, hidden_size, patch_size, weight, loss_weight)
        C, H, W = self.image_shape
        self.encoder = nn.Sequential(nn.Linear(1, embed_dim), nn.SiLU(), nn.Linear(embed_dim, C * H * W))
        self.null = nn.Parameter(torch.randn(1, C, H, W))
        self.norm = nn.LayerNorm(hidden_size)
        self.out = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def from_batch(self, batch: Dict[str, Any], generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``batch[name]`` when given, else the mean ink of ``batch["image"]``."""
        if batch.get(self.name) is not None:
            return batch[self.name].float()
        return mean_ink(batch["image"])

    def encode(self, x_m: torch.Tensor) -> torch.Tensor:
        C, H, W = self.image_shape
        e = self.encoder(x_m.float()[:, None].to(self.out.weight.dtype))  # (B, C*H*W)
        return unit_rms(rearrange(e, "b (c h w) -> b c h w", c=C, h=H, w=W))

    def null_encoding(self, batch_size: int) -> torch.Tensor:
        return unit_rms(self.null).expand(batch_size, -1, -1, -1)

    def head(self, feats: BackboneOutput) -> torch.Tensor:
        """-> (B,) predicted thickness; 0 at init."""
        return self.out(self.norm(feats.tokens.mean(dim=1))).squeeze(-1)

    def expected_encoding(self, pred: torch.Tensor) -> torch.Tensor:
        return self.encode(pred)

    def loss(self, pred: torch.Tensor, x_m: torch.Tensor) -> torch.Tensor:
        return (pred.float() - x_m.float()).pow(2)

    def readout(self, pred: torch.Tensor) -> torch.Tensor:
        return pred.float().clamp(0, 1)

    # --- sample files and metrics ------------------------------------------------------------------
    def to_array(self, value: torch.Tensor) -> np.ndarray:
        return np.asarray(value.float().cpu().numpy(), dtype=np.float32)

    def from_array(self, array: np.ndarray, where: str) -> Dict[str, torch.Tensor]:
        arr = check_array(array, where, ("N",), "float")
        if ((arr < 0) | (arr > 1)).any():
            raise DataError(f"{where}: thickness must be in [0, 1]")
        return {self.name: torch.as_tensor(arr, dtype=torch.float32)}

    def default_inputs(self, n: int, rows: Callable[[], Dict[str, torch.Tensor]],
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """thickness_to_image without given values: the thickness of the validation images."""
        return self.from_batch({"image": rows()["image"]})

    def metrics(self, readout: torch.Tensor, x_m: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"mae": (readout.float() - x_m.float()).abs().mean()}
