"""The contract between the modality-agnostic core and the modality files in ``heads/``.

DESIGN.md §1-2: every auxiliary modality ``m`` has
- an encoder ``E_m : X_m -> R^S`` into the image space ``S = (C, H, W)``, normalised to unit RMS;
- a learned null encoding ``E_m(∅)`` used when the modality is absent or dropped;
- a decoder head reading the shared backbone features;
- a loss ``ℓ_m(x_m, x̂_m)`` (its head's negative log-likelihood, up to constants);
- an *expected encoding* ``E_m(x̂_m)`` of its prediction (for a label, ``Σ_k p̂_k E(k)``), which
  gives the predicted drift ``Â = Σ_m π_m E_m(x̂_m)``.

The core (``unidiff.model``, ``unidiff.diffusion``, the CLI, ``unidiff.evaluate``) only ever talks
to :class:`Modality`; it never imports a particular head nor branches on a kind. A head is found by
its ``kind`` through :func:`heads.modality_class` (built-in kinds, kinds added with
:func:`heads.register_modality`, or a ``"package.module:Class"`` kind string).

Legend for shapes: ``B`` batch, ``N`` rows of an ``.npz`` array, ``C, H, W`` image-space
channels/height/width, ``L`` patch tokens, ``R`` register tokens, ``D`` backbone width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .errors import DataError

# The sampler's generic tasks (``unidiff.diffusion.Task``); no modality task may take these names.
GENERIC_TASKS: Tuple[str, ...] = ("joint", "conditional", "image_to_aux")
# What a modality task does: "generate" images conditioned on the modality's known value (§3
# conditional), or "read" the modality off given images (§3 image→aux).
TASK_ACTIONS: Tuple[str, ...] = ("generate", "read")


@dataclass
class BackboneOutput:
    """What the shared backbone hands to every head.

    tokens:    (B, L, D) patch-token features after the backbone's final (unmodulated) LayerNorm, row-major
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


@dataclass(frozen=True)
class ModalityTask:
    """A named sampling task of a modality kind (DESIGN.md §3), declared in ``Modality.tasks``.

    name:   the task name, the same in ``unidiff sample --task``, :func:`unidiff.diffusion.sample`
            and the docs (``class_to_image``, ``image_to_label``, ...).
    action: ``"generate"``: images conditioned on the modality's known value; ``"read"``: the
            modality read off given images.
    help:   one line for the docs and error messages.
    kind:   the modality kind that declares it (filled by the registry, ``heads.modality_tasks``).
    """

    name: str
    action: str
    help: str = ""
    kind: str = ""


@dataclass
class GenerationEval:
    """What ``unidiff evaluate`` hands to :meth:`Modality.generation_metrics` (DESIGN.md §3).

    images:   (N, C, H, W) joint samples in [-1, 1], on the CPU.
    values:   this modality's read-outs generated with them (N rows), on the CPU.
    classify: the reference classifier, ``(N, C, H, W) -> (N,)`` int64 class indices of the
              dataset's classes; None when the data has no class labels.
    generate: ``known value (N rows) -> (N, C, H, W)`` images sampled conditioned on it, with the
              run's evaluation guidance settings (the value may live on any device).
    n:        ``eval.n_samples``, the number of conditional samples to draw.
    """

    images: torch.Tensor
    values: Any
    classify: Optional[Callable[[torch.Tensor], torch.Tensor]]
    generate: Callable[[Any], torch.Tensor]
    n: int


def unit_rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale each sample of ``x`` (B, ...) to unit root-mean-square (DESIGN.md §1).

    Keeps ``‖E_m(x)‖² = |S|`` fixed so the drift cannot grow without bound while training.
    """
    dims = tuple(range(1, x.ndim))
    return x * torch.rsqrt(x.float().pow(2).mean(dim=dims, keepdim=True).to(x.dtype) + eps)


# --- .npz arrays (``unidiff sample`` inputs and outputs) -----------------------------------------
def _shape_text(shape: Sequence[Any]) -> str:
    return "×".join(str(s) for s in shape)


def check_array(array: Any, where: str, shape: Sequence[Any], dtype: str) -> np.ndarray:
    """``array`` checked against ``shape`` (ints or names for free sizes, e.g. ``("N", 4)``) and a
    dtype family (``"int"``: any integer dtype; ``"float"``: any real number dtype); else a one-line
    :class:`DataError` starting with ``where`` (the file and key, e.g. ``--inputs 'in.npz' array
    'labels'``)."""
    arr = np.asarray(array)
    want = "integer" if dtype == "int" else "real-number"
    ok_dtype = arr.dtype.kind in ("iu" if dtype == "int" else "iuf")
    ok_shape = arr.ndim == len(shape) and all(not isinstance(s, int) or arr.shape[i] == s for i, s in enumerate(shape))
    if not (ok_dtype and ok_shape):
        raise DataError(f"{where}: must be a {_shape_text(shape)} {want} array, got {arr.dtype} {_shape_text(arr.shape) or 'scalar'}")
    return arr


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 N×H×W×C (the ``images`` of a sample ``.npz``)."""
    x = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())


def images_from_array(array: Any, where: str, shape: Tuple[int, int, int]) -> torch.Tensor:
    """N×H×W×C uint8 (as :func:`images_to_uint8` writes) or float in [-1, 1] -> (N, C, H, W) float
    in [-1, 1]; ``shape`` is ``(C, H, W)`` (an N×H×W array is read as C = 1)."""
    C, H, W = shape
    arr = np.asarray(array)
    if arr.ndim == 3 and C == 1:
        arr = arr[..., None]
    arr = check_array(arr, where, ("N", H, W, C), "float")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1.0 if arr.dtype == np.uint8 else x.float().clamp(-1, 1)


class Modality(nn.Module):
    """Base class of an auxiliary modality (label, representation, masked image, source image).

    ``x_m`` (the modality's value) is whatever structure the modality needs (a LongTensor of
    labels, a (B, K) vector, a dict of tensors); the core only moves it around, indexes its batch
    dimension through :meth:`select`, and hands it back to the modality.

    **A new modality must** set ``kind`` and implement :meth:`encode`, :meth:`null_encoding`,
    :meth:`head`, :meth:`expected_encoding`, :meth:`loss` and :meth:`readout` (the §1-2 maths).
    Its constructor takes the common arguments below, then its own options as keyword arguments
    (they become ``modalities[i].options`` in a config; unknown ones are rejected by name).

    **Optional, with a default:**

    ========================  ===========================================================================
    ``from_batch``            its value from a data batch (default ``batch[name]``; derived modalities
                              build it from ``batch["image"]``)
    ``log_likelihood``        ``log p(x_m | z)`` for the bound (default ``-loss``)
    ``resolve_options``       options only the data knows (a label's ``num_classes``; default: none)
    ``tasks``                 its named sampling tasks (default: none; ``joint`` always works)
    ``npz_key``               key of its arrays in a sample ``.npz`` (default None: not written/read)
    ``to_array``              a value -> its ``.npz`` array (default: a tensor as float32/int64)
    ``from_array``            an ``.npz`` array -> batch entries for :meth:`from_batch` (default: not
                              readable, so its conditional task needs :meth:`default_inputs`)
    ``needs_image``           :meth:`from_batch` also needs the task's input images (default False)
    ``default_inputs``        its conditional task's value when no array is given (default: from the
                              validation rows, if they hold ``name``)
    ``average_predictions``   mean of raw predictions over noise draws (default: elementwise mean)
    ``metrics``               image→m read-out scores (default: none)
    ``metric_aliases``        top-level names of some read-out scores in ``metrics.json`` (default: none)
    ``generation_metrics``    scores of joint/conditional samples in ``unidiff evaluate`` (default: none)
    ========================  ===========================================================================

    Args:
        name: key of this modality in the batch dict and in the model (e.g. ``"label"``).
        image_shape: ``(C, H, W)`` of the diffusion space S.
        hidden_size: backbone width D (heads read (B, L, D) features).
        patch_size: backbone patch size (for heads that unpatchify).
        weight: π_m, the fixed aggregation weight in ``A(x) = Σ_m π_m E_m(x_m)``.
        loss_weight: λ_m, the constant head-loss weight.
    """

    kind: ClassVar[str] = ""
    # Named sampling tasks of this kind (DESIGN.md §3); ``ModalityTask.kind`` is filled by the registry.
    tasks: ClassVar[Tuple[ModalityTask, ...]] = ()
    # Key of this kind's arrays in sample ``.npz`` files (``labels``, ``masks``, ...), and a few words
    # on their layout for the docs and errors (``int64 N``).
    npz_key: ClassVar[Optional[str]] = None
    npz_doc: ClassVar[str] = ""
    # True when from_batch builds the value from batch["image"] even when from_array gave entries.
    needs_image: ClassVar[bool] = False
    # {read-out score: top-level metrics.json key}, e.g. a label's accuracy -> "label_accuracy".
    metric_aliases: ClassVar[Dict[str, str]] = {}

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

    # --- config ------------------------------------------------------------------------------
    @classmethod
    def resolve_options(cls, options: Dict[str, Any], info: Any) -> Dict[str, Any]:
        """The options with what only the data knows filled in (``info`` is the dataset's
        ``unidiff.data.DataInfo``). Raise ``ConfigError("<option>: why")`` for a value the data
        contradicts; the config prefixes ``modalities[i].options.``. Default: unchanged."""
        return options

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
        """``log p_θ(x_m | z_0)`` (B,) in nats (diffusers' index 0, the least noisy step), the L_0 term of the bound (DESIGN.md §2).

        Default: ``-loss`` (exact for cross-entropy; for Gaussian heads the subclass adds the
        normalising constant).
        """
        return -self.loss(pred, x_m)

    def average_predictions(self, preds: List[Any]) -> Any:
        """One raw prediction from several noise draws of image→m (DESIGN.md §3): default the
        elementwise mean (tensors, or dicts of tensors); a label averages probabilities instead."""
        first = preds[0]
        if isinstance(first, dict):
            return {k: self.average_predictions([p[k] for p in preds]) for k in first}
        return torch.stack([p.float() for p in preds]).mean(dim=0)

    # --- sample files (``unidiff sample``) ---------------------------------------------------
    def to_array(self, value: Any) -> Optional[np.ndarray]:
        """A value of ``X_m`` (N rows: a read-out or a known value) as its ``.npz`` array under
        ``npz_key``, or None when there is nothing to write. Default: a tensor as float32 (real)
        or int64 (integer) numpy array."""
        if not torch.is_tensor(value):
            return None
        value = value.detach().cpu()
        return value.float().numpy() if value.is_floating_point() else value.long().numpy()

    def from_array(self, array: np.ndarray, where: str) -> Dict[str, torch.Tensor]:
        """An ``.npz`` array (N rows, as :meth:`to_array` writes it) as batch entries that
        :meth:`from_batch` turns into ``x_m`` (default ``{name: tensor}``). Shape, dtype and range
        are checked here: a one-line :class:`DataError` starting with ``where`` (file and key).
        Default: this kind reads no arrays."""
        raise DataError(f"{where}: modality kind {self.kind!r} cannot read .npz arrays")

    def default_inputs(
        self, n: int, rows: Callable[[], Dict[str, torch.Tensor]], generator: Optional[torch.Generator] = None
    ) -> Optional[Any]:
        """The known value for this kind's conditional task when no array is given, or None if
        there is none (the CLI then asks for ``--inputs`` with ``npz_key``).

        ``n`` is the requested sample count; ``rows()`` loads the task's input rows on first call
        (the ``--inputs`` images, or the validation split). Default: ``from_batch`` of the rows when
        they hold ``batch[name]``.
        """
        batch = rows()
        return self.from_batch(batch, generator) if self.name in batch else None

    # --- metrics (``unidiff evaluate``) ------------------------------------------------------
    def metrics(self, readout: Any, x_m: Any) -> Dict[str, torch.Tensor]:
        """Scores of read-outs (image→m) against the true values: ``{name: 0-dim tensor}`` batch
        means, written as ``image_to_<name>/<score>``. Default: none."""
        return {}

    def generation_metrics(self, ev: GenerationEval) -> Dict[str, float]:
        """Scores of generated samples (joint samples with their generated values, conditional
        samples of :attr:`GenerationEval.generate`), written as top-level ``metrics.json`` keys.
        Default: none."""
        return {}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, kind={self.kind!r}, weight={self.weight}, loss_weight={self.loss_weight}"
