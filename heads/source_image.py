"""Source-image modality (DESIGN.md §4, "image transition").

``x_m`` is a paired source image (B, C_src, H, W) in [-1, 1]: another domain (``batch["source"]``)
or a built-in degraded view of the target, so that any image dataset (the embedded digits
included) offers transition tasks. Built-in views (``transform``):
- ``none``: use ``batch[name]`` (the dataset provides the pairs);
- ``downsample``: average-pool by ``downsample_factor`` then nearest-upsample back: the
  low-resolution view (source->target is super-resolution);
- ``edges``: Sobel gradient magnitude of the grayscale image, scaled from [0, 8√2] to [-1, 1]
  (source->target is edge-to-image);
- ``grayscale``: luma (ITU-R BT.601 weights) for 3 channels, the channel mean otherwise
  (source->target is colourisation);
- ``invert``: ``-x`` (a trivially invertible pairing, a sanity check).
``edges`` and ``grayscale`` give one channel, repeated to ``source_channels``; ``downsample`` and
``invert`` keep the image's C channels.

- encoder: 3x3 conv (C_src -> C) -> unit RMS; head: per-token zero-init Linear -> unpatchify to
  (B, C_src, H, W); loss: MSE; expected encoding: the encoder applied to the predicted source.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from unidiff.errors import ConfigError, DataError
from unidiff.modality import BackboneOutput, Modality, ModalityTask, images_from_array, images_to_uint8

from .common import (
    ConvEncoder,
    NullEncoding,
    PatchHead,
    check_choice,
    check_divisible,
    check_int,
    gaussian_log_likelihood,
    masked_mse,
    psnr,
)

TRANSFORMS = ("none", "downsample", "edges", "grayscale", "invert")
# Sobel kernels: the largest response on a [-1, 1] image is 4·2 = 8 per axis, 8√2 in magnitude.
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
_SOBEL_MAX = 8.0 * math.sqrt(2.0)
_LUMA = (0.299, 0.587, 0.114)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W): BT.601 luma for RGB, the channel mean otherwise.

    Both are convex combinations, so [-1, 1] stays [-1, 1].
    """
    if x.shape[1] == 3:
        w = x.new_tensor(_LUMA).view(1, 3, 1, 1)
        return (x * w).sum(dim=1, keepdim=True)
    return x.mean(dim=1, keepdim=True)


def sobel_edges(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, 1, H, W) edge magnitude in [-1, 1] (-1 = flat).

    Replicate padding so the image border is not mistaken for an edge.
    """
    g = F.pad(grayscale(x).float(), (1, 1, 1, 1), mode="replicate")  # (B, 1, H+2, W+2)
    kx = _SOBEL_X.to(g.device).view(1, 1, 3, 3)
    gx = F.conv2d(g, kx)
    gy = F.conv2d(g, kx.transpose(-1, -2))
    mag = torch.sqrt(gx.pow(2) + gy.pow(2)) / _SOBEL_MAX  # [0, 1]
    return (2 * mag - 1).clamp(-1, 1).to(x.dtype)


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool by ``factor`` and nearest-upsample back: (B, C, H, W) -> (B, C, H, W)."""
    low = F.avg_pool2d(x, factor)
    return F.interpolate(low, scale_factor=factor, mode="nearest")


class SourceImageModality(Modality):
    """A paired source image.

    Options:
        source_channels: channels of the source image (default: C).
        transform: the built-in source view of the target (see the module docstring); ``none``
            reads ``batch[name]``.
        downsample_factor: pooling factor of ``transform: downsample`` (default 4).
    """

    kind = "source_image"
    tasks = (
        ModalityTask("transition", "generate", "target images from given source images"),
        ModalityTask("target_to_source", "read", "the source head read from target images alone"),
    )
    npz_key = "sources"
    npz_doc = "uint8 N×H×W×C_src"

    def __init__(
        self,
        name: str,
        image_shape: Tuple[int, int, int],
        hidden_size: int,
        patch_size: int,
        weight: float = 1.0,
        loss_weight: float = 1.0,
        *,
        source_channels: Optional[int] = None,
        transform: str = "none",
        downsample_factor: int = 4,
    ):
        super().__init__(name, image_shape, hidden_size, patch_size, weight, loss_weight)
        C, H, W = self.image_shape
        self.transform = check_choice(self.kind, "transform", transform, TRANSFORMS)
        self.source_channels = check_int(self.kind, "source_channels", C if source_channels is None else source_channels)
        self.downsample_factor = check_int(self.kind, "downsample_factor", downsample_factor)
        if self.transform == "downsample":
            check_divisible(self.kind, self.image_shape, self.downsample_factor, "downsample_factor")
        if self.transform in ("downsample", "invert") and self.source_channels != C:
            raise ConfigError(
                f"modality kind {self.kind!r}: transform {self.transform!r} keeps the image's {C} channels, "
                f"but option 'source_channels' is {self.source_channels}"
            )
        self.encoder = ConvEncoder(self.source_channels, C)
        self.null = NullEncoding(self.image_shape)
        self.decoder = PatchHead((self.source_channels, H, W), self.hidden_size, self.patch_size)

    # --- data ------------------------------------------------------------------------------------
    def make_source(self, image: torch.Tensor) -> torch.Tensor:
        """The built-in source view of a target image (B, C, H, W) -> (B, source_channels, H, W)."""
        if self.transform == "downsample":
            return downsample(image, self.downsample_factor)
        if self.transform == "invert":
            return -image
        if self.transform == "edges":
            return sobel_edges(image).expand(-1, self.source_channels, -1, -1).contiguous()
        if self.transform == "grayscale":
            return grayscale(image).expand(-1, self.source_channels, -1, -1).contiguous()
        raise ConfigError(f"modality {self.name!r} has transform 'none': the batch must provide {self.name!r}")

    def from_batch(self, batch: Dict[str, Any], generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``batch[name]`` if the dataset provides it, else the built-in view of ``batch["image"]``."""
        if batch.get(self.name) is not None:
            return self._check(batch[self.name])
        if self.transform == "none":
            raise DataError(f"modality {self.name!r} (transform 'none') needs batch[{self.name!r}]; batch has {sorted(batch)}")
        return self.make_source(batch["image"])

    def _check(self, src: torch.Tensor) -> torch.Tensor:
        want = (self.source_channels, *self.image_shape[1:])
        if src.ndim != 4 or tuple(src.shape[1:]) != want:
            raise DataError(f"modality {self.name!r}: source images must be (B, {', '.join(map(str, want))}), got {tuple(src.shape)}")
        return src

    # --- encoder ---------------------------------------------------------------------------------
    def encode(self, x_m: torch.Tensor) -> torch.Tensor:
        """(B, source_channels, H, W) -> (B, C, H, W), unit RMS."""
        return self.encoder(self._check(x_m))

    def null_encoding(self, batch_size: int) -> torch.Tensor:
        return self.null(batch_size)

    # --- head ------------------------------------------------------------------------------------
    def head(self, feats: BackboneOutput) -> torch.Tensor:
        """-> predicted source image (B, source_channels, H, W); zero at init."""
        return self.decoder(feats)

    def expected_encoding(self, pred: torch.Tensor) -> torch.Tensor:
        """The head predicts the source image's mean, so its encoding is ``E(x̂_src)``."""
        return self.encode(pred)

    def loss(self, pred: torch.Tensor, x_m: torch.Tensor) -> torch.Tensor:
        """MSE per sample (B,), mean over all pixels and channels."""
        return masked_mse(pred, self._check(x_m))

    def log_likelihood(self, pred: torch.Tensor, x_m: torch.Tensor) -> torch.Tensor:
        """``log N(x_src; x̂_src, I)`` (B,) in nats, constant included."""
        return gaussian_log_likelihood(pred, self._check(x_m))

    def readout(self, pred: torch.Tensor) -> torch.Tensor:
        """The predicted source image clipped to [-1, 1]."""
        return pred.clamp(-1, 1)

    # --- sample files ----------------------------------------------------------------------------
    def to_array(self, value: torch.Tensor) -> np.ndarray:
        """(N, C_src, H, W) in [-1, 1] -> uint8 N×H×W×C_src."""
        return images_to_uint8(value)

    def from_array(self, array: np.ndarray, where: str) -> Dict[str, torch.Tensor]:
        """N×H×W×C_src uint8 (or float in [-1, 1]) -> ``{name: (N, C_src, H, W)}`` in [-1, 1]."""
        return {self.name: images_from_array(array, where, (self.source_channels, *self.image_shape[1:]))}

    def default_inputs(self, n: int, rows: Callable[[], Dict[str, torch.Tensor]],
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """transition without given sources: the rows' own sources (paired data), else the
        built-in view of their images."""
        return self.from_batch(rows(), generator)

    # --- metrics ---------------------------------------------------------------------------------
    def metrics(self, pred: torch.Tensor, x_m: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{"mse", "psnr"}`` batch means (0-dim tensors)."""
        mse = masked_mse(pred, x_m)  # (B,)
        return {"mse": mse.mean(), "psnr": psnr(mse).mean()}
