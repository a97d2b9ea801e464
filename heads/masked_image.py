"""Masked-image modality (DESIGN.md §4, "masked-image training").

``x_m = {"image": x0 ⊙ M, "mask": M, "target": x0}`` with ``M`` (B, 1, H, W), 1 = visible: a random
patch mask with a fixed fraction ρ of masked patches, built from the batch's image.
- encoder: 3x3 conv on ``concat(x0 ⊙ M, M)`` -> C channels -> unit RMS ("conv on visible pixels");
  the mask channel tells a masked pixel from a visible black one;
- head: per-token zero-init Linear -> unpatchify: the full image;
- loss: MSE on the masked pixels (the visible ones are given, there is nothing to learn there);
- expected encoding: the encoding of the prediction with an all-visible mask (see
  :meth:`MaskedImageModality.expected_encoding`).
Sampling with a known masked image (§3 conditional) is inpainting.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
from einops import repeat

from unidiff.errors import DataError
from unidiff.modality import BackboneOutput, Modality, ModalityTask, check_array

from .common import (
    ConvEncoder,
    NullEncoding,
    PatchHead,
    check_divisible,
    check_float,
    check_int,
    gaussian_log_likelihood,
    masked_mse,
    psnr,
)


class MaskedImageModality(Modality):
    """An image with a patch mask.

    Options:
        mask_ratio: ρ, the fraction of masked patches (default 0.5); exactly ``round(ρ·N)`` of the
            ``N`` mask patches are masked in every sample.
        mask_patch: side of a mask patch in pixels (default: the backbone patch size).
    """

    kind = "masked_image"
    tasks = (ModalityTask("inpaint", "generate", "full images from given images and masks"),)
    npz_key = "masks"
    npz_doc = "uint8 N×H×W, 1 = visible"
    needs_image = True  # the npz holds the mask; the masked image comes from the task's images

    def __init__(
        self,
        name: str,
        image_shape: Tuple[int, int, int],
        hidden_size: int,
        patch_size: int,
        weight: float = 1.0,
        loss_weight: float = 1.0,
        *,
        mask_ratio: float = 0.5,
        mask_patch: Optional[int] = None,
    ):
        super().__init__(name, image_shape, hidden_size, patch_size, weight, loss_weight)
        self.mask_ratio = check_float(self.kind, "mask_ratio", mask_ratio, 0.0, 1.0)
        self.mask_patch = check_int(self.kind, "mask_patch", self.patch_size if mask_patch is None else mask_patch)
        check_divisible(self.kind, self.image_shape, self.mask_patch, "mask_patch")
        C, H, W = self.image_shape
        self.encoder = ConvEncoder(C + 1, C)  # image channels + the mask channel
        self.null = NullEncoding(self.image_shape)
        self.decoder = PatchHead(self.image_shape, self.hidden_size, self.patch_size)

    # --- data ------------------------------------------------------------------------------------
    def random_mask(self, batch_size: int, device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, 1, H, W) float patch mask, 1 = visible, exactly ``round(ρ·N)`` masked patches each.

        Which patches: the first ``round(ρ·N)`` of a random permutation (argsort of uniform
        noise, as in MAE), drawn from ``generator`` so a seeded generator reproduces the mask.
        """
        _, H, W = self.image_shape
        gh, gw = H // self.mask_patch, W // self.mask_patch
        n = gh * gw
        n_masked = int(round(self.mask_ratio * n))
        gen_device = generator.device if generator is not None else device
        noise = torch.rand(batch_size, n, generator=generator, device=gen_device).to(device)  # (B, N)
        masked = noise.argsort(dim=1)[:, :n_masked]  # (B, n_masked) patch indices
        keep = torch.ones(batch_size, n, device=device)
        keep.scatter_(1, masked, 0.0)
        return repeat(keep, "b (gh gw) -> b 1 (gh p1) (gw p2)", gh=gh, gw=gw, p1=self.mask_patch, p2=self.mask_patch)

    def from_batch(self, batch: Dict[str, Any], generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """``{"image": x0 ⊙ M, "mask": M, "target": x0}`` from ``batch["image"]``.

        ``batch["mask"]`` ((B, 1, H, W) or (B, H, W), 1 = visible) overrides the random mask.
        ``"target"`` carries the true image for the loss on the masked pixels; the encoder never
        reads it.
        """
        if "image" not in batch:
            raise KeyError(f"modality {self.name!r} builds its value from batch['image']; batch has {sorted(batch)}")
        x0 = batch["image"]  # (B, C, H, W)
        B = x0.shape[0]
        if batch.get("mask") is not None:
            mask = batch["mask"]
            mask = mask[:, None] if mask.ndim == 3 else mask
            if tuple(mask.shape) != (B, 1, *x0.shape[2:]):
                raise DataError(f"modality {self.name!r}: batch['mask'] must be (B, 1, H, W) = {(B, 1, *x0.shape[2:])}, got {tuple(mask.shape)}")
            if not ((mask == 0) | (mask == 1)).all():
                raise DataError(f"modality {self.name!r}: batch['mask'] must hold only 0 (masked) and 1 (visible)")
            mask = mask.to(device=x0.device, dtype=x0.dtype)
        else:
            mask = self.random_mask(B, x0.device, generator).to(x0.dtype)
        return {"image": x0 * mask, "mask": mask, "target": x0}

    # --- encoder ---------------------------------------------------------------------------------
    def encode(self, x_m: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``{"image", "mask"}`` -> (B, C, H, W), unit RMS. ``"image"`` is re-masked, so an
        unmasked image may be passed in."""
        mask = x_m["mask"]
        return self.encoder(torch.cat([x_m["image"] * mask, mask], dim=1))

    def null_encoding(self, batch_size: int) -> torch.Tensor:
        return self.null(batch_size)

    # --- head ------------------------------------------------------------------------------------
    def head(self, feats: BackboneOutput) -> torch.Tensor:
        """-> the full image (B, C, H, W); zero at init."""
        return self.decoder(feats)

    def expected_encoding(self, pred: torch.Tensor) -> torch.Tensor:
        """The encoding of the predicted image with an all-visible mask.

        The head predicts the full image, so the predicted modality value is "everything visible";
        re-masking it with a random mask would add noise to Â for no reason. Where the masked
        image is known (inpainting, §3) its true encoding replaces this anyway.
        """
        ones = torch.ones_like(pred[:, :1])  # (B, 1, H, W)
        return self.encode({"image": pred, "mask": ones})

    def _target(self, x_m: Dict[str, torch.Tensor]) -> torch.Tensor:
        if "target" not in x_m:
            raise DataError(f"modality {self.name!r}: the loss needs x_m['target'] (the full image); build x_m with from_batch()")
        return x_m["target"]

    def loss(self, pred: torch.Tensor, x_m: Dict[str, torch.Tensor]) -> torch.Tensor:
        """MSE over the masked pixels (B,), normalised by their count (C·#masked pixels).

        A sample with no masked pixel (ρ = 0 or an all-ones override mask) has loss 0.
        """
        return masked_mse(pred, self._target(x_m), 1 - x_m["mask"])

    def log_likelihood(self, pred: torch.Tensor, x_m: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``log N(x0_masked; x̂0_masked, I)`` (B,) over the masked pixels, in nats (constant included)."""
        return gaussian_log_likelihood(pred, self._target(x_m), 1 - x_m["mask"])

    def readout(self, pred: torch.Tensor) -> torch.Tensor:
        """The predicted full image, clipped to the data range [-1, 1]."""
        return pred.clamp(-1, 1)

    # --- sample files ----------------------------------------------------------------------------
    def to_array(self, value: Any) -> Optional[np.ndarray]:
        """A known value's mask as uint8 N×H×W (1 = visible); None for a read-out (a generated
        full image has no mask to report)."""
        if not isinstance(value, dict):
            return None
        return np.ascontiguousarray(value["mask"][:, 0].round().to(torch.uint8).cpu().numpy())

    def from_array(self, array: np.ndarray, where: str) -> Dict[str, torch.Tensor]:
        """N×H×W masks of 0 (masked) and 1 (visible) -> ``{"mask": (N, 1, H, W) float}``, the
        override that :meth:`from_batch` applies to the task's images."""
        _, H, W = self.image_shape
        arr = check_array(array, where, ("N", H, W), "float")
        if not np.isin(arr, (0, 1)).all():
            raise DataError(f"{where}: masks must hold only 0 (masked) and 1 (visible)")
        return {"mask": torch.as_tensor(arr, dtype=torch.float32)[:, None]}

    def default_inputs(self, n: int, rows: Callable[[], Dict[str, torch.Tensor]],
                       generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """inpaint without given masks: random masks of the run's ratio on the rows' images."""
        return self.from_batch({"image": rows()["image"]}, generator)

    # --- metrics ---------------------------------------------------------------------------------
    def metrics(self, pred: torch.Tensor, x_m: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``{"masked_mse", "masked_psnr"}`` batch means (0-dim tensors) over the masked region."""
        mse = masked_mse(pred, self._target(x_m), 1 - x_m["mask"])  # (B,)
        return {"masked_mse": mse.mean(), "masked_psnr": psnr(mse).mean()}
