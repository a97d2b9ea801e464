"""Evaluation metrics: FID, IS, KID, precision/recall with pluggable features, a reference
classifier, image and retrieval scores.

FID needs a feature extractor that knows the data. Inception-v3 is the standard for natural
images, but it says little about 8x8 digits, so for small labelled datasets we train a
**reference classifier** (a small CNN) on the training split and use its penultimate layer as the
FID features (the same idea as the LeNet features of MNIST-FID papers). Its validation accuracy is
reported beside every FID so a reader knows how good the features are, and it doubles as the judge
of class-conditional samples (DESIGN.md §4: "class→image": is the sample of the asked class?).

Natural images use the standard FID Inception-v3 (:func:`inception_feature_module`, loaded only
from a local weights file). Every image set is turned into features once (:func:`extract_features`);
the metrics are computed from features (:func:`generative_metrics`), and the statistics of a real
set are cached per dataset and feature extractor (:func:`reference_statistics`).

All public functions return plain Python floats (or dicts of them) so results go straight to JSON.
Images are (B, C, H, W) float in [-1, 1] throughout.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import AnyDataset, DataInfo, infinite_batches, iter_batches
from .errors import CheckpointError, UnidiffError
from .io import atomic_write, write_npz

Images = Union[torch.Tensor, AnyDataset, Iterable[torch.Tensor]]

# ----------------------------------------------------------------------------------------------
# Reference classifier


class ReferenceClassifier(nn.Module):
    """A small CNN classifier whose penultimate layer gives FID features for small datasets.

    One conv at full resolution, then stride-2 convs until the map is 4x4 or smaller, a 4x4 adaptive
    pool (keeps the spatial layout that tells digits apart), a ``feature_dim`` linear layer (the
    features), and a linear classifier. GroupNorm rather than BatchNorm: features of one image do
    not depend on the rest of its batch in any mode.

    Args:
        image_shape: (C, H, W) of the inputs.
        num_classes: K.
        width: channels of the stem; each stage doubles them (at most 4x).
        feature_dim: F, the feature width.
    """

    def __init__(self, image_shape: Sequence[int], num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()
        C, H, W = (int(s) for s in image_shape)
        self.image_shape, self.num_classes, self.width, self.feature_dim = (C, H, W), num_classes, width, feature_dim

        def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())

        layers, c, size = [block(C, width, 1)], width, max(H, W)
        while size > 4:
            c_out = min(2 * c, 4 * width)
            layers.append(block(c, c_out, 2))
            c, size = c_out, (size + 1) // 2
        self.conv = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.proj = nn.Sequential(nn.Flatten(), nn.Linear(c * 16, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, F) penultimate-layer features."""
        return self.proj(self.pool(self.conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, K) logits."""
        return self.head(self.features(x))

    def arch(self) -> Dict[str, object]:
        """The constructor arguments (stored beside the cached weights)."""
        return {
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "width": self.width,
            "feature_dim": self.feature_dim,
        }


@torch.no_grad()
def classifier_accuracy(classifier: nn.Module, dataset: AnyDataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``classifier`` on a labelled dataset (NaN when it is empty)."""
    device = next(classifier.parameters()).device
    preds, targets = [], []
    for batch in iter_batches(dataset, batch_size):
        preds.append(classifier(batch["image"].to(device).float()).argmax(-1).cpu())
        targets.append(batch["label"].cpu())
    if not preds:
        return float("nan")
    return accuracy(torch.cat(preds), torch.cat(targets), num_classes=getattr(classifier, "num_classes", None))


def train_reference_classifier(
    train: AnyDataset,
    val: AnyDataset,
    info: DataInfo,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    width: int = 32,
    feature_dim: int = 128,
    device: Union[str, torch.device] = "cpu",
) -> Tuple[ReferenceClassifier, float]:
    """Train a :class:`ReferenceClassifier` on ``train``; returns it (eval mode, frozen) and its val accuracy.

    Deterministic for a given seed and machine: the initialisation runs in a forked RNG and the
    batches come from :func:`unidiff.data.infinite_batches` (a function of ``(seed, step)``).
    AdamW with a cosine decay to zero. The default 300 steps of 64 are ~13 epochs of digits (~98%
    val accuracy, a few seconds on one CPU core) but a third of an epoch of MNIST or CIFAR-10:
    pass more ``steps`` there (the val accuracy is recorded, so an under-trained judge shows).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ReferenceClassifier(info.image_shape, max(info.num_classes, 2), width, feature_dim)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    # Not diffusers' get_scheduler("cosine"): the same curve, but it computes the angle as
    # π·2·½·(s/steps), which differs from π·s/steps in the last bit at ~20% of the steps, and the
    # cached judges (the cache key holds the recipe, not this code) and every recorded FID were
    # trained with this one.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    batches = infinite_batches(train, batch_size, seed)
    for _ in range(steps):
        batch = next(batches)
        logits = model(batch["image"].to(device).float())
        loss = F.cross_entropy(logits, batch["label"].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval().requires_grad_(False)
    return model, classifier_accuracy(model, val)


def _cache_key(train: AnyDataset, val: AnyDataset, info: DataInfo, hparams: Dict[str, object]) -> str:
    """Hash of what determines the classifier: the data (content), its description, the recipe."""
    desc = {
        "version": 1,
        "info": {"name": info.name, "image_shape": list(info.image_shape), "num_classes": info.num_classes},
        "train": [len(train), train.fingerprint()],
        "val": [len(val), val.fingerprint()],
        "hparams": hparams,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def get_reference_classifier(
    train: AnyDataset,
    val: AnyDataset,
    info: DataInfo,
    cache_dir: str,
    device: Union[str, torch.device] = "cpu",
    **hparams,
) -> Tuple[ReferenceClassifier, float]:
    """The reference classifier of this data, trained once and cached.

    Cached as ``cache_dir/reference_<hash>.safetensors`` plus a ``.json`` with its architecture and
    val accuracy; the hash covers the data content, the data description and ``hparams`` (the
    keyword arguments of :func:`train_reference_classifier`). An unreadable cache entry is retrained.
    Only the main process should call this in a multi-process run (it writes files).
    """
    from safetensors.torch import load_file, save_file

    hp = {"steps": 300, "batch_size": 64, "lr": 2e-3, "seed": 0, "width": 32, "feature_dim": 128}
    unknown = set(hparams) - set(hp)
    if unknown:
        raise TypeError(f"unknown reference classifier options: {sorted(unknown)}")
    hp.update(hparams)
    stem = os.path.join(cache_dir, f"reference_{_cache_key(train, val, info, hp)}")
    weights, meta = stem + ".safetensors", stem + ".json"
    if os.path.isfile(weights) and os.path.isfile(meta):
        try:
            with open(meta) as f:
                record = json.load(f)
            arch = record["arch"]
            model = ReferenceClassifier(arch["image_shape"], arch["num_classes"], arch["width"], arch["feature_dim"])
            model.load_state_dict(load_file(weights))
            return model.to(device).eval().requires_grad_(False), float(record["val_accuracy"])
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            warnings.warn(f"reference classifier cache {weights} is unreadable ({e}); retraining")
    model, acc = train_reference_classifier(train, val, info, device=device, **hp)
    os.makedirs(cache_dir, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(weights, lambda p: save_file(state, p))
    record = {"arch": model.arch(), "val_accuracy": acc, "hparams": hp, "data": info.name}

    def dump(p: str) -> None:
        with open(p, "w") as f:
            json.dump(record, f, indent=2)

    atomic_write(meta, dump)
    return model, acc


class ClassifierFeatures(nn.Module):
    """The reference classifier's features as a torchmetrics FID feature extractor.

    torchmetrics' ``FrechetInceptionDistance(feature=<module>)`` reads ``num_features`` (so it
    never runs a dummy 299x299 image through us) and feeds the images it is given unchanged
    (``normalize`` only applies to its own Inception), here (B, C, H, W) floats in [-1, 1].
    """

    def __init__(self, classifier: ReferenceClassifier):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = int(classifier.feature_dim)

    def extract(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, C, H, W) -> {"features": (B, F), "logits": (B, K)} (the logits give an Inception
        Score in the classifier's classes)."""
        f = self.classifier.features(x.float())
        return {"features": f, "logits": self.classifier.head(f)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x.float())  # (B, F)


class InceptionFeatures(nn.Module):
    """The standard FID Inception-v3 (torch-fidelity's port of TF's ``pt_inception-2015-12-05``)
    taking (B, C, H, W) in [-1, 1]: ``forward`` gives the 2048-d pool features (FID, KID,
    precision/recall), :meth:`extract` those and the 1008 unbiased logits (Inception Score).

    Images are rounded to uint8 RGB (as a saved sample would be), grey ones repeated over three
    channels; the network resizes them to 299x299 with TF1's bilinear resize itself (ADM's and
    torch-fidelity's convention; torchmetrics' default antialiased resize gives other numbers).
    """

    def __init__(self, inception: nn.Module):
        super().__init__()
        self.inception = inception.eval().requires_grad_(False)
        self.num_features = 2048

    @staticmethod
    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, 3, H, W) uint8."""
        x = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def extract(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, C, H, W) -> {"features": (B, 2048), "logits": (B, 1008)}."""
        pool, logits = self.inception(self.to_uint8(x))
        return {"features": pool, "logits": logits}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extract(x)["features"]  # (B, 2048)


INCEPTION_ENV = "UNIDIFF_INCEPTION_WEIGHTS"


def inception_weights_path(configured: Optional[str] = None) -> str:
    """The Inception weights file: ``configured`` (``eval.inception_weights``), else the environment
    variable ``UNIDIFF_INCEPTION_WEIGHTS``; :class:`CheckpointError` when neither names a file."""
    path = configured or os.environ.get(INCEPTION_ENV) or None
    if not path:
        raise CheckpointError(
            f"eval.inception_weights is not set (nor {INCEPTION_ENV}): Inception metrics need a local copy of "
            "torch-fidelity's weights-inception-2015-12-05-6726825d.pth (it is never downloaded)")
    return os.path.expanduser(str(path))


def inception_feature_module(path: Optional[str]) -> InceptionFeatures:
    """Inception-v3 FID features loaded ONLY from a local weights file (never downloaded).

    ``path`` is torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (the state dict of
    its ``FeatureExtractorInceptionV3``). A missing or unreadable file raises
    :class:`CheckpointError` naming it; a missing torch-fidelity (``pip install unidiff[metrics]``)
    an :class:`UnidiffError`.
    """
    if not path or not os.path.isfile(os.path.expanduser(str(path))):
        raise CheckpointError(
            f"Inception weights file not found: {path!r}; FID on natural images needs a local copy of "
            "torch-fidelity's weights-inception-2015-12-05-6726825d.pth (it is never downloaded)"
        )
    path = os.path.expanduser(str(path))
    try:
        # torch-fidelity reloads the file with weights_only=False; check first that it holds only tensors.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, a pickle with code, not a state dict at all
        raise CheckpointError(f"cannot read the Inception weights file {path}: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not an Inception-v3 FID state dict (it holds a {type(state).__name__})")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise UnidiffError(f"Inception metrics need torch-fidelity (pip install 'unidiff[metrics]'): {e}") from None
    try:
        inception = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                feature_extractor_weights_path=path)
    except RuntimeError as e:  # wrong keys or shapes
        raise CheckpointError(f"{path} is not an Inception-v3 FID state dict: {str(e).splitlines()[0]}") from e
    return InceptionFeatures(inception)


def module_fingerprint(module: nn.Module) -> str:
    """A content hash of a module's class and state dict (names, dtypes, shapes, values).

    The identity of a feature extractor (the reference statistics cache key) and of an evaluated
    model (the evaluation shards' folder).
    """
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Features and their statistics


def _image_batches(images: Images, batch_size: int, max_items: Optional[int] = None) -> Iterator[torch.Tensor]:
    """(B, C, H, W) batches from a tensor, a dataset (its ``"image"``s) or an iterable of tensors."""
    if isinstance(images, torch.Tensor):
        stream: Iterable[torch.Tensor] = images.split(batch_size)
    elif hasattr(images, "fingerprint"):  # one of unidiff.data's datasets
        stream = (b["image"] for b in iter_batches(images, batch_size))
    else:
        stream = images
    seen = 0
    if max_items is not None and max_items <= 0:
        return
    for x in stream:
        if max_items is not None:
            x = x[: max_items - seen]
        if len(x) == 0:
            break
        seen += len(x)
        yield x
        if max_items is not None and seen >= max_items:
            break  # before the stream builds another batch


@torch.no_grad()
def extract_features(images: Images, feature_module: nn.Module, batch_size: int = 256,
                     max_items: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Features of (N, C, H, W) images in [-1, 1] on the CPU: ``{"features": (N, F)}`` and, when
    the module has ``extract`` (:class:`ClassifierFeatures`, :class:`InceptionFeatures`), its other
    outputs (``"logits"`` (N, K) for the Inception Score). Each image is seen once."""
    device = next(feature_module.parameters()).device
    parts: Dict[str, list] = {}
    for x in _image_batches(images, batch_size, max_items):
        x = x.to(device)
        out = feature_module.extract(x) if hasattr(feature_module, "extract") else {"features": feature_module(x)}
        for k, v in out.items():
            parts.setdefault(k, []).append(v.cpu())
    if not parts:
        raise ValueError("extract_features got no images")
    return {k: torch.cat(v) for k, v in parts.items()}


@dataclass
class FeatureStats:
    """The moments of a feature set (what FID needs) and, for KID and precision/recall, the
    features of its first ``len(features)`` items.

    n: the number of items; feature_sum (F,) and feature_cov_sum (F, F) float64: ``Σ f`` and
    ``Σ f fᵀ`` (torchmetrics' FID states); features (M, F) float32, M <= n.
    """

    n: int
    feature_sum: torch.Tensor
    feature_cov_sum: torch.Tensor
    features: torch.Tensor

    @classmethod
    def from_features(cls, features: torch.Tensor, keep: Optional[int] = None) -> "FeatureStats":
        """(N, F) features -> their stats, keeping the first ``keep`` rows (all when None)."""
        f = features.double()
        return cls(len(f), f.sum(0), f.T @ f, features[:keep].float().clone())

    @classmethod
    def streamed(cls, batches: Iterable[torch.Tensor], keep: Optional[int] = None) -> "FeatureStats":
        """The stats of a stream of (B, F) feature batches, accumulated batch by batch: only the
        running sums and the first ``keep`` rows (all when None) are held, never the whole set."""
        n, feature_sum, cov_sum, kept, n_kept = 0, None, None, [], 0
        for f in batches:
            f64 = f.detach().cpu().double()  # (B, F)
            if feature_sum is None:
                feature_sum = torch.zeros(f64.shape[1], dtype=torch.float64)
                cov_sum = torch.zeros(f64.shape[1], f64.shape[1], dtype=torch.float64)
            n += len(f64)
            feature_sum += f64.sum(0)
            cov_sum += f64.T @ f64
            room = len(f64) if keep is None else min(len(f64), int(keep) - n_kept)
            if room > 0:
                kept.append(f[:room].detach().cpu().float().clone())
                n_kept += room
        if feature_sum is None:
            raise ValueError("feature statistics got no images")
        features = torch.cat(kept) if kept else torch.zeros(0, feature_sum.numel())
        return cls(n, feature_sum, cov_sum, features)

    @property
    def mu(self) -> torch.Tensor:
        """(F,) float64 mean."""
        return self.feature_sum / self.n

    @property
    def sigma(self) -> torch.Tensor:
        """(F, F) float64 unbiased covariance."""
        mu = self.mu
        return (self.feature_cov_sum - self.n * torch.outer(mu, mu)) / (self.n - 1)


class PrecomputedFeatures(nn.Module):
    """The identity as a torchmetrics feature extractor: the metrics are fed features, not images."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@torch.no_grad()
def feature_statistics(images: Images, feature_module: nn.Module, batch_size: int = 256,
                       max_items: Optional[int] = None, keep: Optional[int] = None) -> FeatureStats:
    """:class:`FeatureStats` of (N, C, H, W) images in [-1, 1] (a tensor, a dataset, an iterable of
    batches; the first ``max_items``), streamed: one batch of ``batch_size`` images and its features
    at a time (:meth:`FeatureStats.streamed`), so a dataset of any size (ImageNet's 1.28M train
    images) fits. The same numbers as :meth:`FeatureStats.from_features` of all features at once,
    up to float64 rounding of the sums."""
    device = next(feature_module.parameters()).device
    return FeatureStats.streamed((feature_module(x.to(device)) for x in _image_batches(images, batch_size, max_items)),
                                 keep)


def _stats_key(dataset: AnyDataset, feature_module: nn.Module, max_items: Optional[int], keep: int) -> str:
    desc = {"version": 1, "data": [len(dataset), dataset.fingerprint()], "max_items": max_items, "keep": keep,
            "features": getattr(feature_module, "fingerprint", None) or module_fingerprint(feature_module)}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def reference_statistics(
    dataset: Images,
    feature_module: nn.Module,
    cache_dir: Optional[str] = None,
    batch_size: int = 256,
    max_items: Optional[int] = None,
    keep: int = 10000,
) -> FeatureStats:
    """:class:`FeatureStats` of a real image set (the first ``max_items`` of it, all when None),
    keeping the features of its first ``keep`` items; computed once and cached.

    With a ``cache_dir`` and one of unidiff.data's datasets, cached as
    ``cache_dir/refstats_<hash>.npz`` (``n``, ``feature_sum``, ``feature_cov_sum``, ``mu``,
    ``sigma``, ``features``), the hash covering the dataset's length and fingerprint, ``max_items``,
    ``keep`` and the feature extractor's identity (:func:`module_fingerprint` of its weights, or its
    own ``fingerprint`` attribute). Written atomically; an unreadable entry is recomputed with a
    warning. Only the main process should call this in a multi-process run (it writes files).
    """
    path = None
    if cache_dir is not None and hasattr(dataset, "fingerprint"):
        path = os.path.join(cache_dir, f"refstats_{_stats_key(dataset, feature_module, max_items, keep)}.npz")
        if os.path.isfile(path):
            try:
                with np.load(path, allow_pickle=False) as f:
                    return FeatureStats(int(f["n"]), torch.from_numpy(f["feature_sum"]),
                                        torch.from_numpy(f["feature_cov_sum"]), torch.from_numpy(f["features"]))
            except (OSError, KeyError, ValueError) as e:
                warnings.warn(f"reference statistics cache {path} is unreadable ({e}); recomputing")
    stats = feature_statistics(dataset, feature_module, batch_size, max_items, keep)
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        write_npz(path, n=np.int64(stats.n), feature_sum=stats.feature_sum.numpy(),
                  feature_cov_sum=stats.feature_cov_sum.numpy(), mu=stats.mu.numpy(), sigma=stats.sigma.numpy(),
                  features=stats.features.numpy())
    return stats


# ----------------------------------------------------------------------------------------------
# FID, Inception Score, KID, precision/recall


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """``‖μ_a - μ_b‖² + Tr(Σ_a + Σ_b - 2 (Σ_a Σ_b)^½)`` through torchmetrics' FID (float64 moments)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if a.n < 2 or b.n < 2:
        raise ValueError(f"FID needs at least 2 items in each set, got {a.n} and {b.n}")
    fid = FrechetInceptionDistance(feature=PrecomputedFeatures(a.feature_sum.numel()), sync_on_compute=False)
    fid.real_features_sum, fid.real_features_cov_sum = a.feature_sum.double(), a.feature_cov_sum.double()
    fid.real_features_num_samples = torch.tensor(a.n)
    fid.fake_features_sum, fid.fake_features_cov_sum = b.feature_sum.double(), b.feature_cov_sum.double()
    fid.fake_features_num_samples = torch.tensor(b.n)
    fid.orig_dtype = torch.float32  # the features' dtype (compute casts its result to it)
    with warnings.catch_warnings():  # "compute called before update": the states were set instead
        warnings.filterwarnings("ignore", message=".*before the ``update`` method.*")
        return float(fid.compute())


@torch.no_grad()
def compute_fid(
    real_images: Images,
    fake_images: Images,
    feature_module: nn.Module,
    batch_size: int = 256,
    max_items: Optional[int] = None,
) -> float:
    """Fréchet distance between the feature Gaussians of real and generated images.

    ``FID = ‖μ_r - μ_f‖² + Tr(Σ_r + Σ_f - 2 (Σ_r Σ_f)^½)`` (:func:`frechet_distance`).
    Images: (N, C, H, W) in [-1, 1] (a tensor, a dataset, or an iterable of batches); each set
    needs at least 2 images. ``feature_module`` maps such a batch to (B, F)
    (:class:`ClassifierFeatures`, :class:`InceptionFeatures`).
    """
    stats = [FeatureStats.from_features(extract_features(x, feature_module, batch_size, max_items)["features"], keep=0)
             for x in (real_images, fake_images)]
    return frechet_distance(*stats)


def fid_floor(
    train: Images, val: Images, feature_module: nn.Module, batch_size: int = 256, max_items: Optional[int] = None
) -> float:
    """FID of real training images against real validation images, with the same features.

    The best FID a model can hope for at this sample size: a generated set is compared with it.
    """
    return compute_fid(train, val, feature_module, batch_size, max_items)


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> Tuple[float, float]:
    """Inception Score (mean, std over ``splits``) of (N, K) logits through torchmetrics'
    ``InceptionScore``; its random split assignment is drawn from ``seed`` (reproducible)."""
    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():  # "will save all extracted features": they are given
        warnings.simplefilter("ignore", UserWarning)
        metric = InceptionScore(feature=PrecomputedFeatures(logits.shape[1]), splits=splits, sync_on_compute=False)
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the std of one split is NaN
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> Tuple[float, float]:
    """KID (mean, std over ``subsets`` random subsets) of (N, F) real and (M, F) fake features
    through torchmetrics' ``KernelInceptionDistance`` (cubic polynomial kernel MMD²); subsets of
    ``min(subset_size, N, M)`` items drawn from ``seed``."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(int(subset_size), len(real), len(fake))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), subsets=subsets, subset_size=size,
                                         sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """(N,) distance of each row of x (N, F) to its k-th nearest other row."""
    radii = []
    for start in range(0, len(x), chunk):
        d = torch.cdist(x[start:start + chunk], x)  # (c, N); the row itself is at distance 0
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Share of ``points`` inside at least one ball ``‖p - centres[j]‖ <= radii[j]``."""
    inside = 0
    for start in range(0, len(points), chunk):
        d = torch.cdist(points[start:start + chunk], centres)  # (c, M)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / len(points)


@torch.no_grad()
def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024) -> Tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of (N, F) real, (M, F) fake features.

    Each set's manifold is the union of balls around its points with radius the distance to the
    point's k-th nearest neighbour in the same set. Precision: the share of fake points inside the
    real manifold (fidelity); recall: the share of real points inside the fake manifold (coverage).
    Distances in the features' dtype; ``chunk`` rows of distances at a time.
    """
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} items in each set, got {len(real)} and {len(fake)}")
    real, fake = real.to(fake.dtype), fake
    precision = _coverage(fake, real, _knn_radii(real, k, chunk), chunk)
    recall = _coverage(real, fake, _knn_radii(fake, k, chunk), chunk)
    return precision, recall


GENERATIVE_METRICS = ("fid", "is", "kid", "pr")


def generative_metrics(reference: FeatureStats, fake: Dict[str, torch.Tensor], which: Sequence[str] = ("fid",),
                       seed: int = 0, kid_subsets: int = 100, kid_subset_size: int = 1000, pr_k: int = 3,
                       ) -> Dict[str, float]:
    """The metrics ``which`` (of :data:`GENERATIVE_METRICS`) of generated features against a reference.

    ``fake``: :func:`extract_features` of the samples. Keys: ``fid``; ``inception_score`` and
    ``inception_score_std`` (from ``fake["logits"]``: the Inception's, or the reference
    classifier's with its features); ``kid``, ``kid_std``; ``precision``, ``recall`` (k = ``pr_k``).
    KID and precision/recall use the reference's kept features.
    """
    unknown = sorted(set(which) - set(GENERATIVE_METRICS))
    if unknown:
        raise ValueError(f"unknown generative metrics {unknown}; choices: {list(GENERATIVE_METRICS)}")
    out: Dict[str, float] = {}
    feats = fake["features"]
    if "fid" in which:
        out["fid"] = frechet_distance(reference, FeatureStats.from_features(feats, keep=0))
    if "is" in which:
        if "logits" not in fake:
            raise ValueError("the Inception Score needs logits: a feature module with extract() giving 'logits'")
        out["inception_score"], out["inception_score_std"] = inception_score(fake["logits"], seed=seed)
    if "kid" in which:
        out["kid"], out["kid_std"] = kernel_inception_distance(reference.features, feats, kid_subsets, kid_subset_size,
                                                               seed=seed)
    if "pr" in which:
        out["precision"], out["recall"] = precision_recall(reference.features, feats.to(reference.features.dtype), pr_k)
    return out


# ----------------------------------------------------------------------------------------------
# Classification, reconstruction and retrieval scores


def accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: Optional[int] = None) -> float:
    """Top-1 accuracy through torchmetrics. ``pred``: (N, K) logits/probabilities or (N,) labels."""
    from torchmetrics.functional import accuracy as tm_accuracy

    target = target.long()
    if num_classes is None:
        num_classes = pred.shape[1] if pred.ndim == 2 else int(max(pred.max(), target.max())) + 1
    # torchmetrics' multiclass task needs K >= 2; a one-class problem is scored the same with K = 2.
    return float(tm_accuracy(pred, target, task="multiclass", num_classes=max(num_classes, 2), average="micro"))


def masked_sq_err(pred: torch.Tensor, target: torch.Tensor,
                  mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-image sum of squared errors where ``mask`` (B, 1 or C, H, W) is 1 (everywhere when None)
    and the per-image count of those values: (B,), (B,). Differentiable in ``pred``: the one
    squared-error computation behind every image MSE/PSNR of unidiff (the heads' losses too)."""
    sq = (pred.float() - target.float()).pow(2)  # (B, C, H, W)
    if mask is None:
        return sq.flatten(1).sum(dim=1), torch.full((sq.shape[0],), float(sq[0].numel()), device=sq.device)
    weight = mask.float().expand_as(sq)
    return (sq * weight).flatten(1).sum(dim=1), weight.flatten(1).sum(dim=1)


def per_image_mse(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-image MSE (B,) over the values where ``mask`` is 1 (all when None); an image with an
    empty mask gets 0 (its count is clamped to 1: nothing to reconstruct)."""
    sse, count = masked_sq_err(pred, target, mask)
    return sse / count.clamp(min=1.0)


def psnr_from_mse(mse: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR in dB from per-image MSEs (B,); ``data_range`` 2 for images in [-1, 1]. A perfect
    reconstruction is capped at the PSNR of an MSE of 1e-10 instead of infinity."""
    return 10.0 * torch.log10(data_range**2 / mse.clamp(min=1e-10))


def mse(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error of (B, C, H, W) images (all images the same size: the per-image mean)."""
    return float(per_image_mse(pred, target).mean())


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean per-image PSNR in dB of (B, C, H, W) images; ``data_range`` 2 for [-1, 1] images."""
    return float(psnr_from_mse(per_image_mse(pred, target), data_range).mean())


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """MSE pooled over the region where ``mask`` is 1 in every image (mask: (B, 1 or C, H, W)),
    e.g. inpainted pixels: the total squared error over the total count."""
    sse, count = masked_sq_err(pred, target, mask)
    return float(sse.sum() / count.sum().clamp_min(1))


def masked_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean per-image PSNR over the masked region; images with an empty mask are skipped."""
    _, count = masked_sq_err(pred, target, mask)
    keep = count > 0
    if not keep.any():
        return float("nan")
    return float(psnr_from_mse(per_image_mse(pred, target, mask)[keep], data_range).mean())


def cosine(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows of (N, K) vectors (representation predictions)."""
    from torchmetrics.functional import cosine_similarity

    return float(cosine_similarity(pred.float(), target.float(), reduction="mean"))


def recall_at_k(
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_features: torch.Tensor,
    gallery_labels: torch.Tensor,
    ks: Sequence[int] = (1,),
    exclude_self: bool = False,
    chunk: int = 1024,
) -> Dict[str, float]:
    """Retrieval Recall@K: the share of queries with at least one same-class item among their K
    nearest gallery items, by cosine similarity. Returns ``{"recall@K": float}`` for every K.

    The image-retrieval Recall@K is torchmetrics' *hit rate* (its ``retrieval_recall`` is the share
    of all relevant items retrieved, another number), scored here per query by
    ``retrieval_hit_rate``. query_features: (Nq, F) with labels (Nq,); gallery_features: (Ng, F)
    with labels (Ng,). ``exclude_self``: the queries are the gallery (val against itself), so query
    ``i`` is not its own neighbour. A K above the number of candidates counts them all. ``chunk``
    bounds the similarity block in memory to (chunk, Ng).
    """
    from torchmetrics.functional.retrieval import retrieval_hit_rate

    q = F.normalize(torch.as_tensor(query_features).float(), dim=-1)
    g = F.normalize(torch.as_tensor(gallery_features).float(), dim=-1)
    ql, gl = torch.as_tensor(query_labels).long().cpu(), torch.as_tensor(gallery_labels).long().cpu()
    if exclude_self and len(q) != len(g):
        raise ValueError(f"recall_at_k(exclude_self=True) needs the queries to be the gallery; got {len(q)} queries "
                         f"and {len(g)} gallery items")
    candidates = len(g) - int(exclude_self)
    if candidates < 1 or len(q) == 0 or not all(int(k) >= 1 for k in ks):
        raise ValueError(f"recall_at_k needs queries, a gallery and K >= 1; got {len(q)} queries, {candidates} "
                         f"candidates, K = {list(ks)}")
    hits = {int(k): 0.0 for k in ks}
    for start in range(0, len(q), chunk):
        sim = (q[start:start + chunk] @ g.T).cpu()  # (c, Ng)
        relevant = gl[None, :] == ql[start:start + chunk, None]  # (c, Ng) bool
        for i in range(len(sim)):
            keep = torch.arange(len(g)) != start + i if exclude_self else slice(None)
            for k in hits:
                hits[k] += float(retrieval_hit_rate(sim[i, keep], relevant[i, keep], top_k=min(k, candidates)))
    return {f"recall@{k}": h / len(q) for k, h in hits.items()}
