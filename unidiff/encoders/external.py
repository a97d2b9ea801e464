"""Frozen external image encoders for the representation modality (DESIGN.md §4): CLIP
or DINOv2 in place of the multi-tower encoder, whenever their weights are already on local disk.

Weights are only ever read from a local path: nothing is downloaded (``local_files_only=True``
for transformers; open_clip gets a file or a ``local-dir:`` folder). Both loaders return an
:class:`ExternalEncoder`, a frozen module mapping images in the project's convention
((N, C, H, W) in [-1, 1], any size, 1 or 3 channels) to (N, dim) features, which is what
``encode_images`` and the representation head expect.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError, DataError

KINDS = ("clip", "dinov2")
# Preprocessing constants of the two families (used when the checkpoint does not say otherwise).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class ExternalEncoder(nn.Module):
    """A frozen backbone behind the preprocessing its weights were trained with.

    Args:
        backbone: the loaded model (kept in eval mode, no gradients).
        features: ``(backbone, pixels (N, 3, S, S)) -> (N, dim)``.
        image_size: S, the side the backbone expects.
        mean, std: per-channel normalisation of [0, 1] pixels.
        kind: ``"clip"`` or ``"dinov2"``; dim: the feature size.
    """

    def __init__(self, backbone: nn.Module, features: Callable, image_size: int, mean: Sequence[float],
                 std: Sequence[float], kind: str, dim: int):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self._features = features
        self.image_size, self.kind, self.dim = int(image_size), kind, int(dim)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "ExternalEncoder":
        # Frozen: stays in eval mode (no dropout / drop-path) whatever the caller asks.
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1], C in {1, 3} -> (N, 3, S, S) normalised pixels."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DataError(f"{self.kind} encoder needs (N, 1|3, H, W) images; got shape {tuple(images.shape)}")
        x = (images.float().to(self.mean.device) + 1) / 2  # [-1, 1] -> [0, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB
        if x.shape[-2:] != (self.image_size, self.image_size):
            # Tiny data (8x8 digits) is upsampled: the backbone's patch grid needs its own size.
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, dim) float32."""
        return self._features(self.backbone, self.preprocess(images)).float()

    encode_image = forward


def _check_path(kind: str, path) -> Path:
    if path is None or str(path).strip() == "":
        raise CheckpointError(f"external encoder {kind!r} needs a local weights path; got {path!r} (nothing is downloaded)")
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"external encoder {kind!r}: weights path {str(p)!r} does not exist (nothing is downloaded)")
    if p.is_dir() and not any(p.iterdir()):
        raise CheckpointError(f"external encoder {kind!r}: weights folder {str(p)!r} is empty")
    return p


def _load_dinov2(p: Path, device) -> ExternalEncoder:
    from transformers import AutoModel

    if not p.is_dir():
        raise CheckpointError(f"dinov2 weights path {str(p)!r} must be a folder written by save_pretrained (config.json + weights)")
    try:
        model = AutoModel.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot load dinov2 weights from {str(p)!r}: {e}") from e
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    size = int(getattr(model.config, "image_size", 224))
    proc = p / "preprocessor_config.json"
    if proc.is_file():
        # The processor's crop size is what the weights were trained at (224 for DINOv2).
        pc = json.loads(proc.read_text())
        mean, std = pc.get("image_mean", mean), pc.get("image_std", std)
        crop = pc.get("crop_size")
        size = int(crop.get("height", size)) if isinstance(crop, dict) else int(crop or size)
    # pooler_output is the final-layernormed CLS token, DINOv2's global image descriptor.
    feats = lambda m, x: m(pixel_values=x).pooler_output  # (N, hidden)
    return ExternalEncoder(model.to(device), feats, size, mean, std, "dinov2", model.config.hidden_size)


def _load_clip(p: Path, device, model_name: Optional[str]) -> ExternalEncoder:
    try:
        import open_clip
    except ImportError as e:
        raise ConfigError("external encoder 'clip' needs the open_clip package: pip install open_clip_torch") from e
    try:
        if p.is_dir():
            # A folder as written by open_clip's push_to_hf_hub (open_clip_config.json + weights).
            model = open_clip.create_model(f"local-dir:{p}", device=device)
        else:
            if not model_name:
                raise ConfigError(f"clip weights file {str(p)!r} needs model_name (e.g. 'ViT-B-32') to build the architecture")
            model = open_clip.create_model(model_name, pretrained=str(p), device=device)
    except (OSError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"cannot load clip weights from {str(p)!r}: {e}") from e
    visual = model.visual
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    mean = getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN
    std = getattr(visual, "image_std", None) or OPENAI_CLIP_STD
    feats = lambda m, x: m.encode_image(x)  # (N, embed_dim), CLIP's projected image embedding
    dim = getattr(visual, "output_dim", None) or int(feats(model.eval(), torch.zeros(1, 3, size, size, device=device)).shape[1])
    return ExternalEncoder(model, feats, size, mean, std, "clip", dim)


def load_external_encoder(kind: str, path, *, model_name: Optional[str] = "ViT-B-32",
                          device: str | torch.device = "cpu") -> ExternalEncoder:
    """A frozen CLIP (open_clip) or DINOv2 (transformers) image encoder from local weights.

    kind: ``"clip"`` or ``"dinov2"``. path: for DINOv2 a ``save_pretrained`` folder; for CLIP a
    checkpoint file (with ``model_name``) or an open_clip ``local-dir`` folder. A missing or
    empty path is a CheckpointError naming it; nothing is ever downloaded.
    Returns a callable module: images (N, C, H, W) in [-1, 1] -> (N, dim) features.
    """
    if kind not in KINDS:
        raise ConfigError(f"external encoder kind={kind!r}: must be one of {KINDS}")
    p = _check_path(kind, path)
    return _load_dinov2(p, device) if kind == "dinov2" else _load_clip(p, device, model_name)
