"""Class label modality (DESIGN.md §4, "joint image-label").

- encoder: class embedding (K, E) -> Linear(E -> C·H·W) -> unit RMS, one map ``E(k)`` in S per class;
- head: pooled features -> adaLN LayerNorm -> [Linear -> GELU] -> zero-init Linear(-> K) class logits;
- loss: cross-entropy, which bounds the label term of the drift (DESIGN.md §2:
  ``‖E(y) - Σ_k p̂_k E(k)‖ ≤ 2·max_k‖E(k)‖·(1 - p̂_y)`` and ``1 - p̂_y ≤ -log p̂_y``);
- expected encoding: ``Σ_k p̂_k E(k)`` with ``p̂ = softmax(logits)``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unidiff.errors import ConfigError, DataError
from unidiff.modality import BackboneOutput, GenerationEval, Modality, ModalityTask, check_array

from .common import NullEncoding, PooledHead, VectorToImage, POOLS, check_choice, check_int


class LabelModality(Modality):
    """A class label ``y ∈ {0, ..., K-1}``; ``x_m`` is a (B,) integer tensor.

    Options:
        num_classes: K.
        embed_dim: width E of the class embedding before the map into S (default 64).
        head_hidden: width of a hidden GELU layer in the classifier head (default 0: linear).
        head_pool: what the classifier reads (``heads.common.pool_features``): ``auto`` (the
            registers), ``tokens`` (the patch-token mean) or ``concat`` (both, 2D wide).
    """

    kind = "label"
    tasks = (
        ModalityTask("class_to_image", "generate", "images of given classes (drift and classifier guidance)"),
        ModalityTask("image_to_label", "read", "the label head read from images alone"),
    )
    npz_key = "labels"
    npz_doc = "int64 N"
    metric_aliases = {"accuracy": "label_accuracy"}

    def __init__(
        self,
        name: str,
        image_shape: Tuple[int, int, int],
        hidden_size: int,
        patch_size: int,
        weight: float = 1.0,
        loss_weight: float = 1.0,
        *,
        num_classes: int,
        embed_dim: int = 64,
        head_hidden: int = 0,
        head_pool: str = "auto",
    ):
        super().__init__(name, image_shape, hidden_size, patch_size, weight, loss_weight)
        self.num_classes = check_int(self.kind, "num_classes", num_classes, minimum=2)
        embed_dim = check_int(self.kind, "embed_dim", embed_dim)
        self.embed = nn.Embedding(self.num_classes, embed_dim)
        self.to_image = VectorToImage(embed_dim, self.image_shape)
        self.null = NullEncoding(self.image_shape)
        head_hidden = check_int(self.kind, "head_hidden", head_hidden, minimum=0)
        self.classifier = PooledHead(self.hidden_size, self.num_classes, mlp_hidden=head_hidden,
                                     pool=check_choice(self.kind, "head_pool", head_pool, POOLS))

    @classmethod
    def resolve_options(cls, options: Dict[str, Any], info: Any) -> Dict[str, Any]:
        """``num_classes`` from the dataset (``info.num_classes``) when not set; a value that
        disagrees with the data is an error (a head with the wrong K would train silently on
        clipped labels)."""
        options = dict(options)
        k_data = getattr(info, "num_classes", None)
        name = getattr(info, "name", "?")
        if options.get("num_classes") is None:
            if not k_data:
                raise ConfigError(f"num_classes: dataset {name!r} has no class labels; set it or drop the label modality")
            options["num_classes"] = int(k_data)
        elif k_data and int(options["num_classes"]) != int(k_data):
            raise ConfigError(f"num_classes: {options['num_classes']} disagrees with the {k_data} classes of dataset {name!r}")
        return options

    # --- encoder ---------------------------------------------------------------------------------
    def _check_labels(self, y: torch.Tensor) -> torch.Tensor:
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.ndim != 1:
            raise DataError(f"modality {self.name!r}: labels must be a (B,) integer tensor, got {y.dtype} {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            bad = y[(y < 0) | (y >= self.num_classes)][0].item()
            raise DataError(f"modality {self.name!r}: label {bad} is out of range [0, {self.num_classes})")
        return y

    def class_encodings(self) -> torch.Tensor:
        """The table of all class encodings ``E(k)``: (K, C, H, W), each unit RMS."""
        return self.to_image(self.embed.weight)

    def encode(self, x_m: torch.Tensor) -> torch.Tensor:
        """(B,) labels -> ``E(y)`` (B, C, H, W)."""
        return self.to_image(self.embed(self._check_labels(x_m)))

    def null_encoding(self, batch_size: int) -> torch.Tensor:
        return self.null(batch_size)

    # --- head ------------------------------------------------------------------------------------
    def head(self, feats: BackboneOutput) -> torch.Tensor:
        """-> logits (B, K); zero at init (uniform p̂)."""
        return self.classifier(feats)

    def expected_encoding(self, pred: torch.Tensor) -> torch.Tensor:
        """``Σ_k p̂_k E(k)`` (B, C, H, W) from logits (B, K) (DESIGN.md §2).

        The K encodings are computed once per call and contracted with p̂; the mixture is not
        renormalised (a confident p̂ gives a unit-RMS ``E(k)``, an unsure one a shorter average).
        """
        p = pred.float().softmax(dim=-1)  # (B, K)
        table = self.class_encodings()  # (K, C, H, W)
        return torch.einsum("bk,kchw->bchw", p.to(table.dtype), table)

    def loss(self, pred: torch.Tensor, x_m: torch.Tensor) -> torch.Tensor:
        """Cross-entropy per sample (B,)."""
        return F.cross_entropy(pred.float(), self._check_labels(x_m), reduction="none")

    def log_likelihood(self, pred: torch.Tensor, x_m: torch.Tensor) -> torch.Tensor:
        """``log p̂_y`` (B,) in nats."""
        logp = F.log_softmax(pred.float(), dim=-1)  # (B, K)
        return logp.gather(1, self._check_labels(x_m)[:, None]).squeeze(1)

    def average_predictions(self, preds: List[torch.Tensor]) -> torch.Tensor:
        """Average several noisy readings as probabilities, not logits (DESIGN.md §3 image→label).

        Returns log of the mean softmax, so it is again a valid logit vector for ``readout``/``loss``.
        """
        probs = torch.stack([p.float().softmax(-1) for p in preds]).mean(0)  # (B, K)
        return probs.clamp_min(1e-12).log()

    def readout(self, pred: torch.Tensor) -> torch.Tensor:
        """The most probable class (B,) int64."""
        return pred.argmax(dim=-1)

    # --- sample files ----------------------------------------------------------------------------
    def to_array(self, value: torch.Tensor) -> np.ndarray:
        """(N,) labels -> int64 N."""
        return np.asarray(value.long().cpu().numpy(), dtype=np.int64)

    def from_array(self, array: np.ndarray, where: str) -> Dict[str, torch.Tensor]:
        """int N class indices in [0, K) -> ``{name: (N,) int64}``."""
        arr = check_array(array, where, ("N",), "int")
        bad = arr[(arr < 0) | (arr >= self.num_classes)]
        if bad.size:
            raise DataError(f"{where}: class {int(bad[0])} is out of range [0, {self.num_classes})")
        return {self.name: torch.from_numpy(arr.astype(np.int64))}

    def default_inputs(self, n: int, rows: Callable[[], Dict[str, torch.Tensor]],
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """class_to_image without given labels: cycle over the K classes, ``n`` labels (balanced)."""
        return torch.arange(n) % self.num_classes

    # --- metrics ---------------------------------------------------------------------------------
    def metrics(self, pred_labels: torch.Tensor, x_m: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{"accuracy"}`` of read-out labels (B,) against the truth (B,): a 0-dim tensor (batch mean)."""
        return {"accuracy": (pred_labels == x_m).float().mean()}

    def generation_metrics(self, ev: GenerationEval) -> Dict[str, float]:
        """With a reference classifier of the dataset's classes (DESIGN.md §3):
        ``joint_consistency``: the generated label equals the classifier's reading of its image;
        ``class_conditional_accuracy``: the classifier recovers the conditioning class of
        class→image samples (classes cycled, ``ev.n`` samples)."""
        if ev.classify is None:
            return {}
        out = {"joint_consistency": float((ev.classify(ev.images) == ev.values.long()).float().mean())}
        cond = torch.arange(ev.n) % self.num_classes  # cycle over the classes: balanced
        out["class_conditional_accuracy"] = float((ev.classify(ev.generate(cond)) == cond).float().mean())
        return out
