"""The modality files (DESIGN.md §6): one per modality, found by ``kind``.

The core never imports a particular head; it calls :func:`build_image_head` and
:func:`build_modality`. A new modality is a new file here (a :class:`unidiff.modality.Modality`
subclass) plus one line in ``_MODALITIES``.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Tuple

from torch import nn

from unidiff.errors import ConfigError
from unidiff.modality import Modality

# kind -> "module:Class", imported lazily so an unused modality costs nothing.
_MODALITIES = {
    "label": "heads.label:LabelModality",
    "representation": "heads.representation:RepresentationModality",
    "masked_image": "heads.masked_image:MaskedImageModality",
    "source_image": "heads.source_image:SourceImageModality",
}
MODALITY_KINDS: Tuple[str, ...] = tuple(_MODALITIES)

# Arguments every modality takes from UnifiedModel/the config, beside its own options.
_COMMON = ("name", "image_shape", "hidden_size", "patch_size", "weight", "loss_weight")


def build_image_head(image_shape: Tuple[int, int, int], hidden_size: int, patch_size: int) -> nn.Module:
    """The image head (DiT FinalLayer): features -> (B, C, H, W) ε̂ / v̂ / x̂0."""
    from .image import ImageHead

    return ImageHead(image_shape=tuple(image_shape), hidden_size=hidden_size, patch_size=patch_size)


def modality_class(kind: str) -> type:
    """The :class:`Modality` subclass registered under ``kind``."""
    if kind not in _MODALITIES:
        raise ConfigError(f"unknown modality kind {kind!r}; choose one of {list(MODALITY_KINDS)}")
    module, cls = _MODALITIES[kind].split(":")
    return getattr(importlib.import_module(module), cls)


def modality_options(kind: str) -> Tuple[str, ...]:
    """The options a kind accepts beyond the common ones (``name``, ``weight``, ...), for docs/CLI."""
    params = inspect.signature(modality_class(kind).__init__).parameters
    return tuple(p for p in params if p not in ("self", *_COMMON))


def build_modality(kind: str, **kwargs: Any) -> Modality:
    """Build the modality ``kind`` from the common arguments (``name``, ``image_shape``,
    ``hidden_size``, ``patch_size``, ``weight``, ``loss_weight``) and the kind's own options.

    Unknown kinds, unknown or missing options raise :class:`ConfigError` naming them; each head
    checks the type and range of its options itself.
    """
    cls = modality_class(kind)
    params = inspect.signature(cls.__init__).parameters
    allowed = modality_options(kind)
    for key in kwargs:
        if key not in params or key == "self":
            raise ConfigError(f"modality kind {kind!r} has no option {key!r}; its options are {list(allowed)}")
    for key, p in params.items():
        if key != "self" and p.default is inspect.Parameter.empty and key not in kwargs:
            raise ConfigError(f"modality kind {kind!r} needs option {key!r}")
    return cls(**kwargs)
