"""The unified denoiser: one shared backbone, an image head and one head per auxiliary modality.

DESIGN.md §2: the backbone ``f_θ(z_t, t)`` produces shared token features; the image head predicts
``ε̂`` (or ``v̂`` / ``x̂0``) in the de-drifted space; every auxiliary head predicts ``x̂_m`` and its
expected encoding gives ``Â = Σ_m π_m E_m(x̂_m)``. The model never sees the noise schedule
(STYLE.md habit 1): ``unidiff.diffusion`` owns ``a_t, σ_t, κ_t`` and calls this module.

The modality classes are chosen by config (``modalities``: a list of dicts with ``name``,
``kind`` and the head's options; a kind is a built-in one of ``heads/``, one added with
``heads.register_modality``, or a ``"package.module:Class"`` string); this file knows only the
:class:`Modality` contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

import heads
from .modality import BackboneOutput
from .models.backbone import HybridBackbone


@dataclass
class ModelOutput:
    """image: (B, C, H, W) the image head's raw output (ε̂, v̂ or x̂0 per ``prediction``).
    aux: {modality name: raw prediction} for every auxiliary head.
    aux_loss: scalar MoE auxiliary loss. stats: detached logging statistics."""

    image: torch.Tensor
    aux: Dict[str, Any]
    aux_loss: torch.Tensor
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)


class UnifiedModel(ModelMixin, ConfigMixin):
    """Backbone + image head + auxiliary modality heads.

    Args:
        image_shape: ``[C, H, W]`` of the diffusion space S (pixels or VAE latents).
        backbone_config: keyword arguments of :class:`HybridBackbone` (``in_channels``/``input_size``
            are filled from ``image_shape``).
        modality_configs: one dict per auxiliary modality: ``{"name", "kind", "weight",
            "loss_weight", **options}`` (see ``heads/``). Empty for single-task image diffusion.
        prediction: what the image head predicts: ``epsilon``, ``v_prediction`` or ``sample``
            (diffusers' names, so schedulers take it unchanged).
        predict_image: False drops the image head (the label-only baseline on the same backbone).

    The argument names differ from the submodule names (``backbone``, ``modalities``,
    ``image_head``) on purpose: diffusers' ``ModelMixin.__getattr__`` resolves config keys before
    submodules, so equal names would shadow the modules.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        image_shape: Sequence[int] = (1, 8, 8),
        backbone_config: Optional[Dict[str, Any]] = None,
        modality_configs: Optional[List[Dict[str, Any]]] = None,
        prediction: str = "epsilon",
        predict_image: bool = True,
    ):
        super().__init__()
        C, H, W = (int(s) for s in image_shape)
        self.image_shape = (C, H, W)
        bb = dict(backbone_config or {})
        bb.update(in_channels=C, input_size=(H, W))
        self.backbone = HybridBackbone(**bb)
        D, p = self.backbone.hidden_size, self.backbone.patch_size
        # predict_image=False gives a label-only (classifier) baseline on the same backbone.
        self.image_head = heads.build_image_head(image_shape=(C, H, W), hidden_size=D, patch_size=p) if predict_image else None
        self.prediction = prediction
        self.modalities = nn.ModuleDict()
        for spec in modality_configs or []:
            spec = dict(spec)
            name = spec.pop("name")
            kind = spec.pop("kind")
            self.modalities[name] = heads.build_modality(
                kind, name=name, image_shape=(C, H, W), hidden_size=D, patch_size=p, **spec
            )

    def modality_of_kind(self, kind: str) -> Optional[str]:
        """Name of the first auxiliary modality of ``kind`` (e.g. ``"label"``), or None."""
        return next((name for name, mod in self.modalities.items() if mod.kind == kind), None)

    # --- drift --------------------------------------------------------------------------------
    def aggregate(
        self,
        x_aux: Dict[str, Any],
        drop: Optional[Dict[str, torch.Tensor]] = None,
        batch_size: Optional[int] = None,
    ) -> torch.Tensor:
        """``A(x) = Σ_m π_m E_m(x_m)`` (B, C, H, W), DESIGN.md §1.

        ``drop[m]`` (B,) bool replaces ``E_m(x_m)`` by ``E_m(∅)`` for those rows (modality
        dropout, §2); a modality missing from ``x_aux`` is absent and uses ``E_m(∅)`` everywhere.
        """
        B = batch_size if batch_size is not None else self._batch_size(x_aux)
        A = None
        for name, mod in self.modalities.items():
            e = self.encoding(name, x_aux.get(name), B, None if drop is None else drop.get(name))
            A = mod.weight * e if A is None else A + mod.weight * e
        if A is None:  # no auxiliary modality: plain DDPM
            A = torch.zeros(B, *self.image_shape, device=self.device, dtype=self.dtype)
        return A

    def encoding(self, name: str, x_m: Any, batch_size: int, drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``E_m(x_m)`` with rows in ``drop`` (or all rows when ``x_m`` is None) set to ``E_m(∅)``."""
        mod = self.modalities[name]
        null = mod.null_encoding(batch_size)  # (B, C, H, W)
        if x_m is None:
            return null
        e = mod.encode(x_m)
        if drop is None:
            return e
        return torch.where(drop.view(-1, 1, 1, 1), null.to(e.dtype), e)

    def expected_aggregate(self, aux_pred: Dict[str, Any], known: Optional[Dict[str, Any]] = None) -> torch.Tensor:
        """``Â = Σ_m π_m E_m(x̂_m)``; a modality in ``known`` uses its true encoding instead (§3)."""
        known = known or {}
        A = None
        for name, mod in self.modalities.items():
            e = mod.encode(known[name]) if name in known else mod.expected_encoding(aux_pred[name])
            A = mod.weight * e if A is None else A + mod.weight * e
        return A

    # --- forward ------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None,
                collect_stats: bool = False) -> ModelOutput:
        """z: (B, C, H, W) noisy drifted variable z_t; t: (B,) integer timesteps in [0, T).
        ``collect_stats``: fill ``stats`` with the MoE statistics (training only, see the backbone)."""
        feats: BackboneOutput = self.backbone(z, t, cond, collect_stats=collect_stats)
        image = self.image_head(feats) if self.image_head is not None else None
        aux = {name: mod.head(feats) for name, mod in self.modalities.items()}
        return ModelOutput(image=image, aux=aux, aux_loss=feats.aux_loss, stats=feats.stats)

    @staticmethod
    def _batch_size(x_aux: Dict[str, Any]) -> int:
        for v in x_aux.values():
            while isinstance(v, dict):
                v = next(iter(v.values()))
            if v is not None:
                return v.shape[0]
        raise ValueError("aggregate() needs at least one modality value to know the batch size")
