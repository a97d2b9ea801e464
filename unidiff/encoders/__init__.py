"""Representation encoders for the joint image-representation setting (DESIGN.md §4).

- ``multitower``: the 3-/4-tower image-text metric-learning encoder (Zhu et al., KDD 2024) and
  its losses, its files (``save_encoder`` / ``load_encoder``) and ``encode_images``
  (retrieval is scored by ``unidiff.metrics.recall_at_k``);
- ``training``: its training (``EncoderConfig``, ``train_encoder``, cached in ``out_dir``; pair
  sampling and views);
- ``text``: titles / query phrases from class names, the character tokenizer, the text tower;
- ``pca``: ``PCAWhitener`` for reducing representations fitted on train;
- ``external``: frozen CLIP / DINOv2 from local weights.
"""

from .external import ExternalEncoder, load_external_encoder
from .multitower import (
    MultiTowerEncoder,
    encode_images,
    info_nce,
    load_encoder,
    multitower_losses,
    save_encoder,
    symmetric_info_nce,
)
from .pca import PCAWhitener
from .training import EncoderConfig, train_encoder

__all__ = [
    "EncoderConfig", "MultiTowerEncoder", "train_encoder", "load_encoder", "save_encoder", "encode_images",
    "info_nce", "symmetric_info_nce", "multitower_losses", "PCAWhitener", "ExternalEncoder",
    "load_external_encoder",
]
