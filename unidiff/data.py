"""Datasets for unidiff: every item is a dict of tensors, images in ``[-1, 1]``.

An item is ``{"image": (C, H, W) float32 in [-1, 1], "label": () int64}``; paired data adds
``"source": (C_src, H, W)`` (the other domain of DESIGN.md §4, "image transition"). Batches are the
same dicts with a leading batch dimension (docs/CONTRACTS.md, "Tensors").

Sources (``data.name``):
- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, no download): the dataset the tests
  and the quick experiments run on. Seeded stratified train/val split.
- ``imagefolder``: torchvision ``ImageFolder`` layout ``root/<class>/<image>``; seeded stratified
  split; RGB or grey as the first image is.
- ``mnist`` / ``cifar10``: torchvision; the official test split is the validation split.
- ``paired``: ``root/A/<name>`` (source) and ``root/B/<name>`` (target) with matching names; no
  classes, so every label is 0 and ``num_classes`` is 1.

Per-item extras (``data.extra_file``): a safetensors file of tensors named ``train.<key>`` and
``val.<key>``, row ``i`` belonging to item ``i`` of that split as :func:`build_datasets` returns it
(after the seeded split and ``max_items``). Items and batches then also carry ``<key>``, e.g. the
frozen-encoder vectors ``"representation"`` (N, K) of DESIGN.md §4, so a modality reads them like
any dataset field; :func:`save_extra_file` writes such a file.

Small datasets live in memory (:class:`InMemoryDataset`): a batch is one index operation, with no
DataLoader per-item overhead. Folders too large for memory stay lazy (:class:`FolderDataset`) and go
through a DataLoader. :func:`infinite_batches` serves both with the same deterministic order, a
function of ``(seed, step)`` only, so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Literal, Optional, Sequence, Tuple, Union, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import ConfigError, DataError
from .io import atomic_write, seed_for

DatasetName = Literal["digits", "imagefolder", "mnist", "cifar10", "paired"]
DATASET_NAMES: Tuple[str, ...] = get_args(DatasetName)

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Folder datasets whose decoded float32 tensors fit under this are loaded into memory when
# ``data.in_memory`` is left unset (1 GiB: e.g. 20k RGB images at 128x128).
AUTO_MEMORY_BYTES = 1 << 30
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
# The fields every item may carry itself; an extra of that name would silently replace them.
RESERVED_KEYS = ("image", "label", "source")


@dataclass
class DataConfig:
    """The ``data:`` section of a run config (an omegaconf structured schema: plain types only).

    name:         which dataset (see the module docstring).
    root:         dataset folder; required for every dataset except ``digits``.
    image_size:   side of the square images after resizing (bilinear, antialiased); None keeps the
                  native size (digits 8, mnist 28, cifar10 32). Required for the folder datasets.
    val_fraction: share of the data held out for validation (ignored by mnist/cifar10, which use
                  their official test split).
    split_seed:   seed of the train/val split and of the ``max_items`` subset.
    download:     let torchvision download mnist/cifar10 into ``root``.
    num_classes:  if set, the data must have exactly this many classes (a guard for configs that
                  size the label head by hand).
    hflip:        random horizontal flips of training batches (off for digits-like data).
    max_items:    keep at most this many items per split (quick runs).
    source_dir, target_dir: sub-folders of ``root`` for paired data.
    in_memory:    load folder datasets into memory; None decides by size (``AUTO_MEMORY_BYTES``).
    num_workers:  DataLoader workers for lazy folder datasets.
    extra_file:   safetensors file of per-item tensors ``train.<key>`` / ``val.<key>`` attached to
                  the splits (module docstring); in-memory data only.
    """

    name: DatasetName = "digits"
    root: Optional[str] = None
    image_size: Optional[int] = None
    val_fraction: float = 0.2
    split_seed: int = 0
    download: bool = False
    num_classes: Optional[int] = None
    hflip: bool = False
    max_items: Optional[int] = None
    source_dir: str = "A"
    target_dir: str = "B"
    in_memory: Optional[bool] = None
    num_workers: int = 0
    extra_file: Optional[str] = None


@dataclass
class DataInfo:
    """What the rest of the code needs to know about a dataset.

    image_shape:  (C, H, W) of ``"image"``: the diffusion space S.
    source_shape: (C, H, W) of ``"source"`` for paired data, else None.
    """

    name: str
    image_shape: Tuple[int, int, int]
    num_classes: int
    class_names: List[str] = field(default_factory=list)
    source_shape: Optional[Tuple[int, int, int]] = None


def validate_data_config(cfg) -> None:
    """Raise :class:`ConfigError` naming the ``data.*`` key of any out-of-range value."""
    if cfg.name not in DATASET_NAMES:
        raise ConfigError(f"data.name={cfg.name!r} is not one of {', '.join(DATASET_NAMES)}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.val_fraction} must be in [0, 1)")
    for key in ("image_size", "max_items", "num_classes"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"data.{key}={value} must be a positive integer (or null)")
    if cfg.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.num_workers} must be >= 0")
    if cfg.extra_file is not None and not str(cfg.extra_file).strip():
        raise ConfigError("data.extra_file='' must be a file path (or null)")


# ----------------------------------------------------------------------------------------------
# Datasets


class InMemoryDataset(Dataset):
    """A dataset held as tensors; :meth:`batch` draws a whole batch with one index operation.

    images:  (N, C, H, W) float32 in [-1, 1].
    labels:  (N,) int64.
    sources: (N, C_src, H, W) float32 in [-1, 1] for paired data, else None.
    hflip:   whether :func:`infinite_batches` flips this dataset's batches at random (train only).
    extras:  key -> (N, ...) per-item tensors carried into items and batches under their key
             (``data.extra_file``). Flips leave them alone: they describe the item, not its pixels.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        sources: Optional[torch.Tensor] = None,
        hflip: bool = False,
        extras: Optional[Dict[str, torch.Tensor]] = None,
    ):
        if images.ndim != 4 or labels.shape != (images.shape[0],):
            shapes = f"{tuple(images.shape)}, {tuple(labels.shape)}"
            raise ValueError(f"images (N, C, H, W) and labels (N,) expected, got {shapes}")
        if sources is not None and sources.shape[0] != images.shape[0]:
            raise ValueError("sources and images must have the same length")
        extras = dict(extras or {})
        for key, value in extras.items():
            if key in RESERVED_KEYS:
                raise ValueError(f"extra {key!r} would shadow the dataset's own {key!r}")
            if value.ndim == 0 or value.shape[0] != images.shape[0]:
                raise ValueError(f"extra {key!r} has shape {tuple(value.shape)}; expected {images.shape[0]} rows")
        self.images, self.labels, self.sources, self.hflip = images, labels.long(), sources, hflip
        self.extras: Dict[str, torch.Tensor] = extras

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        item = {"image": self.images[i], "label": self.labels[i]}
        if self.sources is not None:
            item["source"] = self.sources[i]
        item.update({k: v[i] for k, v in self.extras.items()})
        return item

    def batch(self, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        """index: (B,) int64 on the dataset's device -> a batch dict."""
        out = {"image": self.images[index], "label": self.labels[index]}
        if self.sources is not None:
            out["source"] = self.sources[index]
        out.update({k: v[index] for k, v in self.extras.items()})
        return out

    def subset(self, index: Union[torch.Tensor, np.ndarray, Sequence[int]]) -> "InMemoryDataset":
        index = torch.as_tensor(np.asarray(index), dtype=torch.long, device=self.images.device)
        sources = None if self.sources is None else self.sources[index]
        extras = {k: v[index] for k, v in self.extras.items()}
        return InMemoryDataset(self.images[index], self.labels[index], sources, self.hflip, extras)

    def to(self, device: Union[str, torch.device]) -> "InMemoryDataset":
        """A copy on ``device`` (small datasets can live on the GPU: no host-to-device copies)."""
        sources = None if self.sources is None else self.sources.to(device)
        extras = {k: v.to(device) for k, v in self.extras.items()}
        return InMemoryDataset(self.images.to(device), self.labels.to(device), sources, self.hflip, extras)

    def fingerprint(self) -> str:
        """A content hash of images, labels and sources (a cache key: the reference classifier, the
        representation encoder, the split an extra file was made for).

        The extras are left out on purpose: everything keyed by it is a function of the images and
        labels, so an arm with ``data.extra_file`` shares the reference classifier (the FID judge)
        with an arm without, and an extra file can name the fingerprint of the split it belongs to.
        """
        h = hashlib.sha256()
        for t in (self.images, self.labels, self.sources):
            if t is not None:
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


class FolderDataset(Dataset):
    """A lazy dataset of image files, decoded and resized on access.

    samples: list of ``(target_path, label, source_path_or_None)``.
    mode / source_mode: PIL modes ("L" or "RGB") every target / source image is converted to.
    """

    def __init__(
        self,
        samples: Sequence[Tuple[str, int, Optional[str]]],
        image_size: int,
        mode: str,
        source_mode: Optional[str] = None,
        hflip: bool = False,
    ):
        self.samples, self.image_size, self.mode, self.source_mode = list(samples), image_size, mode, source_mode
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        path, label, source = self.samples[i]
        item = {"image": load_image(path, self.mode, self.image_size), "label": torch.tensor(label, dtype=torch.long)}
        if source is not None:
            item["source"] = load_image(source, self.source_mode or self.mode, self.image_size)
        return item

    def fingerprint(self) -> str:
        """A hash of the file list and labels (the files themselves are not read)."""
        h = hashlib.sha256(repr((self.samples, self.image_size, self.mode, self.source_mode)).encode())
        return h.hexdigest()


AnyDataset = Union[InMemoryDataset, FolderDataset]


def load_image(path: str, mode: str, size: int) -> torch.Tensor:
    """Read an image file as (C, size, size) float32 in [-1, 1]: shorter side to ``size``, centre crop.

    ``mode`` is the PIL mode ("L": C=1, "RGB": C=3). An unreadable file raises :class:`DataError`.
    """
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import v2

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"cannot read image file {path}: {e}") from e
    transform = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    return transform(im) * 2.0 - 1.0  # [0, 1] -> [-1, 1]


def _image_mode(path: str) -> str:
    """"L" for a grey image, else "RGB": the first image of a folder fixes its channel count."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return "L" if im.mode in _GREY_MODES else "RGB"
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"cannot read image file {path}: {e}") from e


def _materialize(ds: FolderDataset) -> InMemoryDataset:
    """Decode every file of a folder dataset once into an :class:`InMemoryDataset`."""
    items = [ds[i] for i in range(len(ds))]
    if not items:
        empty = torch.zeros(0, 1, ds.image_size, ds.image_size)
        return InMemoryDataset(empty, torch.zeros(0, dtype=torch.long), hflip=ds.hflip)
    images = torch.stack([it["image"] for it in items])
    labels = torch.stack([it["label"] for it in items])
    sources = torch.stack([it["source"] for it in items]) if "source" in items[0] else None
    return InMemoryDataset(images, labels, sources, ds.hflip)


# ----------------------------------------------------------------------------------------------
# Splits


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: ``(train_idx, val_idx)``, each in a shuffled order.

    The validation split has exactly ``round(val_fraction * N)`` items, spread over the classes in
    proportion to their sizes (largest remainder), so every class with enough items appears in it.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * val_fraction
    take = np.floor(quota).astype(np.int64)
    # Hand the leftover items to the classes with the largest fractional quotas (stable on ties).
    rest = int(round(val_fraction * len(labels))) - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:rest]] += 1
    take = np.minimum(take, counts)
    train, val = [], []
    for c, k in zip(classes, take):
        idx = rng.permutation(np.flatnonzero(labels == c))
        val.append(idx[:k])
        train.append(idx[k:])
    empty = np.zeros(0, dtype=np.int64)
    train_idx = rng.permutation(np.concatenate(train)) if train else empty
    val_idx = rng.permutation(np.concatenate(val)) if val else empty
    return train_idx.astype(np.int64), val_idx.astype(np.int64)


def _limit(idx: np.ndarray, max_items: Optional[int], seed: int) -> np.ndarray:
    """A seeded random subset of at most ``max_items`` indices (kept in their original order)."""
    if max_items is None or len(idx) <= max_items:
        return idx
    keep = np.sort(np.random.default_rng([seed, 1]).permutation(len(idx))[:max_items])
    return idx[keep]


def _resize(images: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size), bilinear (antialiased when shrinking: no aliasing)."""
    if size is None or images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=size < images.shape[-1])
    # Bilinear weights are a convex combination, so this clamp only removes rounding error.
    return out.clamp_(-1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Builders


def _split_in_memory(cfg, images, labels) -> Tuple[InMemoryDataset, InMemoryDataset]:
    train_idx, val_idx = stratified_split(labels.numpy(), cfg.val_fraction, cfg.split_seed)
    full = InMemoryDataset(_resize(images, cfg.image_size), labels)
    train = full.subset(_limit(train_idx, cfg.max_items, cfg.split_seed))
    val = full.subset(_limit(val_idx, cfg.max_items, cfg.split_seed))
    train.hflip = cfg.hflip
    return train, val


def _digits(cfg):
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap): map to [-1, 1].
    images = torch.from_numpy(digits.images).float().div(8.0).sub(1.0).unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.from_numpy(digits.target).long()
    train, val = _split_in_memory(cfg, images, labels)
    return train, val, list(DIGIT_NAMES)


def _existing_root(cfg) -> str:
    if not cfg.root:
        raise DataError(f"data.root must be set for data.name={cfg.name}")
    root = os.path.expanduser(str(cfg.root))
    if not os.path.isdir(root):
        raise DataError(f"data.root={root} is not an existing folder")
    return root


def _require_size(cfg) -> int:
    if cfg.image_size is None:
        raise DataError(f"data.image_size must be set for data.name={cfg.name} (images are resized to a square)")
    return int(cfg.image_size)


def _torchvision(cfg):
    """MNIST or CIFAR-10 from ``root``: train split for training, the official test split for val."""
    from torchvision import datasets

    if not cfg.root:
        raise DataError(f"data.root must be set for data.name={cfg.name} (the folder that holds or will hold the files)")
    root = os.path.expanduser(str(cfg.root))
    if cfg.name == "mnist":
        cls, where = datasets.MNIST, os.path.join(root, "MNIST", "raw")
        files = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
    else:
        cls, where = datasets.CIFAR10, os.path.join(root, "cifar-10-batches-py")
        files = "data_batch_1..5, test_batch, batches.meta"
    try:
        splits = [cls(root, train=train, download=cfg.download) for train in (True, False)]
    except (RuntimeError, OSError) as e:  # "Dataset not found", a failed or offline download (URLError)
        if cfg.download:
            raise DataError(f"could not download {cfg.name} into {where} ({e}); fetch {files} there by hand") from e
        raise DataError(
            f"{cfg.name} files not found in {where} (expected {files}); set data.download=true to download them"
        ) from e

    def to_tensors(ds) -> Tuple[torch.Tensor, torch.Tensor]:
        data = torch.as_tensor(np.asarray(ds.data))
        # MNIST: (N, 28, 28) uint8; CIFAR-10: (N, 32, 32, 3) uint8.
        data = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
        return data.float().div(127.5).sub(1.0), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)

    (train_x, train_y), (val_x, val_y) = (to_tensors(ds) for ds in splits)
    train_idx = _limit(np.arange(len(train_y)), cfg.max_items, cfg.split_seed)
    val_idx = _limit(np.arange(len(val_y)), cfg.max_items, cfg.split_seed)
    train = InMemoryDataset(_resize(train_x[train_idx], cfg.image_size), train_y[train_idx], hflip=cfg.hflip)
    val = InMemoryDataset(_resize(val_x[val_idx], cfg.image_size), val_y[val_idx])
    names = list(DIGIT_NAMES) if cfg.name == "mnist" else list(splits[0].classes)
    return train, val, names


def _folder_split(cfg, samples, labels, size, mode, source_mode=None):
    train_idx, val_idx = stratified_split(np.asarray(labels), cfg.val_fraction, cfg.split_seed)
    train_idx = _limit(train_idx, cfg.max_items, cfg.split_seed)
    val_idx = _limit(val_idx, cfg.max_items, cfg.split_seed)
    train = FolderDataset([samples[i] for i in train_idx], size, mode, source_mode, hflip=cfg.hflip)
    val = FolderDataset([samples[i] for i in val_idx], size, mode, source_mode)
    in_memory = cfg.in_memory
    if in_memory is None:
        channels = (1 if mode == "L" else 3) + (0 if source_mode is None else (1 if source_mode == "L" else 3))
        in_memory = (len(train) + len(val)) * channels * size * size * 4 <= AUTO_MEMORY_BYTES
    if in_memory:
        return _materialize(train), _materialize(val)
    return train, val


def _imagefolder(cfg):
    from torchvision.datasets import ImageFolder

    root, size = _existing_root(cfg), _require_size(cfg)
    try:
        # Only the file scan: ImageFolder opens no image here.
        folder = ImageFolder(root)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"data.root={root} is not an image folder (root/<class>/<image>): {e}") from e
    samples = [(path, label, None) for path, label in folder.samples]
    mode = _image_mode(samples[0][0])
    train, val = _folder_split(cfg, samples, folder.targets, size, mode)
    return train, val, list(folder.classes)


def _image_files(folder: str) -> Dict[str, str]:
    """Map file stem -> path for the image files directly inside ``folder``."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    out: Dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMG_EXTENSIONS or not os.path.isfile(os.path.join(folder, name)):
            continue
        if stem in out:
            first = os.path.basename(out[stem])
            raise DataError(f"two images named {stem}.* in {folder} ({first}, {name}): names must be unique")
        out[stem] = os.path.join(folder, name)
    return out


def _paired(cfg):
    """``root/<source_dir>`` and ``root/<target_dir>`` matched by file name (extension aside)."""
    root, size = _existing_root(cfg), _require_size(cfg)
    src_dir, tgt_dir = os.path.join(root, cfg.source_dir), os.path.join(root, cfg.target_dir)
    missing = [d for d in (src_dir, tgt_dir) if not os.path.isdir(d)]
    if missing:
        raise DataError(
            f"paired data needs the folders {src_dir} (data.source_dir) and {tgt_dir} (data.target_dir); "
            f"missing: {', '.join(missing)}"
        )
    src, tgt = _image_files(src_dir), _image_files(tgt_dir)
    only_src, only_tgt = sorted(set(src) - set(tgt)), sorted(set(tgt) - set(src))
    if only_src or only_tgt:
        parts = []
        for names, have, lack in ((only_src, src_dir, tgt_dir), (only_tgt, tgt_dir, src_dir)):
            if names:
                parts.append(f"{len(names)} image(s) in {have} without a match in {lack} (e.g. {', '.join(names[:5])})")
        raise DataError("paired data: file names must match; " + "; ".join(parts))
    if not src:
        raise DataError(f"paired data: no image files in {src_dir} and {tgt_dir}")
    # No classes in paired data: every label is 0 and num_classes is 1.
    samples = [(tgt[name], 0, src[name]) for name in sorted(src)]
    mode, source_mode = _image_mode(samples[0][0]), _image_mode(samples[0][2])
    train, val = _folder_split(cfg, samples, [0] * len(samples), size, mode, source_mode)
    return train, val, ["pair"]


def _shape(ds: AnyDataset, key: str) -> Tuple[int, int, int]:
    if len(ds) == 0:
        raise DataError("the dataset's training split is empty (check data.root, data.max_items, data.val_fraction)")
    return tuple(int(s) for s in ds[0][key].shape)  # type: ignore[return-value]


def save_extra_file(
    path: Union[str, os.PathLike],
    extras: Dict[str, Dict[str, torch.Tensor]],
    fingerprints: Optional[Dict[str, str]] = None,
) -> None:
    """Write a ``data.extra_file`` atomically: ``extras[split][key]`` (N_split, ...) as ``<split>.<key>``.

    ``fingerprints[split]`` (:meth:`InMemoryDataset.fingerprint` of the split the rows belong to)
    goes into the file's metadata; :func:`build_datasets` then refuses the file for other data.
    """
    from safetensors.torch import save_file

    tensors = {f"{split}.{key}": v.detach().cpu().contiguous() for split, d in extras.items() for key, v in d.items()}
    metadata = {f"fingerprint.{split}": fp for split, fp in (fingerprints or {}).items()}
    path = os.fspath(path)
    # A reader (another arm's evaluate) sees the old file or the new one, never half of one.
    atomic_write(path, lambda p: save_file(tensors, p, metadata=metadata or None))


def _attach_extras(cfg, train: AnyDataset, val: AnyDataset) -> Tuple[InMemoryDataset, InMemoryDataset]:
    """The splits with the tensors of ``data.extra_file`` attached (module docstring); every way the
    file can disagree with the data is a :class:`DataError` naming the file and the key."""
    from safetensors import SafetensorError, safe_open

    path = os.path.expanduser(str(cfg.extra_file))
    where = f"data.extra_file={path}"
    if not os.path.isfile(path):
        raise DataError(f"{where} does not exist")
    if not (isinstance(train, InMemoryDataset) and isinstance(val, InMemoryDataset)):
        raise DataError(f"{where}: per-item extras need the data in memory; set data.in_memory=true")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise DataError(f"{where} is not a readable safetensors file: {e}") from e

    splits: Dict[str, Dict[str, torch.Tensor]] = {"train": {}, "val": {}}
    for name, value in tensors.items():
        split, _, key = name.partition(".")
        if split not in splits or not key:
            raise DataError(f"{where}: tensor {name!r} is not named train.<key> or val.<key>")
        if key in RESERVED_KEYS:
            raise DataError(f"{where}: key {key!r} ({name}) would replace the dataset's own {key!r}")
        splits[split][key] = value
    if not tensors:
        raise DataError(f"{where} holds no tensors (expected train.<key> and val.<key>)")
    for key in sorted(set(splits["train"]) ^ set(splits["val"])):
        have, lack = ("train", "val") if key in splits["train"] else ("val", "train")
        raise DataError(f"{where}: key {key!r} is present for {have} ({have}.{key}) but not for {lack} ({lack}.{key})")

    out = []
    for split, ds in (("train", train), ("val", val)):
        for key, value in sorted(splits[split].items()):
            if value.ndim == 0 or value.shape[0] != len(ds):
                raise DataError(f"{where}: {split}.{key} has shape {tuple(value.shape)} but the {split} split has "
                                f"{len(ds)} items (after data.max_items); rows must match the split's items")
        # The row count cannot tell a reshuffled split (another split_seed, say) from the right one.
        expected = metadata.get(f"fingerprint.{split}")
        if expected is not None and expected != ds.fingerprint():
            raise DataError(f"{where}: keys {sorted(splits[split])} were written for another {split} split than "
                            f"this data.* config gives (data fingerprint differs)")
        device = ds.images.device
        extras = {**ds.extras, **{k: v.to(device) for k, v in splits[split].items()}}
        out.append(InMemoryDataset(ds.images, ds.labels, ds.sources, ds.hflip, extras))
    return out[0], out[1]


def build_datasets(cfg: DataConfig) -> Tuple[AnyDataset, AnyDataset, DataInfo]:
    """Build ``(train, val, info)`` from a :class:`DataConfig` (or its omegaconf node)."""
    validate_data_config(cfg)
    builder = {
        "digits": _digits,
        "mnist": _torchvision,
        "cifar10": _torchvision,
        "imagefolder": _imagefolder,
        "paired": _paired,
    }
    train, val, class_names = builder[str(cfg.name)](cfg)
    num_classes = len(class_names)
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise DataError(f"data.num_classes={cfg.num_classes} but the {cfg.name} data has {num_classes} classes")
    if cfg.extra_file is not None:
        train, val = _attach_extras(cfg, train, val)
    info = DataInfo(
        name=str(cfg.name),
        image_shape=_shape(train, "image"),
        num_classes=num_classes,
        class_names=class_names,
        source_shape=_shape(train, "source") if cfg.name == "paired" else None,
    )
    return train, val, info


# ----------------------------------------------------------------------------------------------
# Batches


class BatchOrder:
    """The deterministic order of :func:`infinite_batches`.

    The stream of indices is the concatenation of one seeded permutation of ``range(n)`` per epoch
    (epoch ``e`` uses seed ``(seed, 0, e)``); step ``s`` takes positions ``[s*B, (s+1)*B)`` of the
    stream. A batch is thus a pure function of ``(seed, step)``: resuming at step ``k`` gives what
    an uninterrupted run gives from step ``k``, every item is seen once per epoch, and a dataset
    smaller than a batch still works.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise DataError("cannot draw batches from an empty dataset")
        if batch_size < 1:
            raise ConfigError(f"batch size {batch_size} must be >= 1")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: Dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:  # steps move forward: keep only the recent epochs
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(seed_for(self.seed, 0, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        """(B,) int64 dataset indices of the batch at ``step``."""
        pos = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epoch, offset = pos // self.n, pos % self.n
        out = torch.empty_like(pos)
        for e in epoch.unique().tolist():
            sel = epoch == e
            out[sel] = self._perm(e)[offset[sel]]
        return out

    def flips(self, step: int) -> torch.Tensor:
        """(B,) bool: which items of the batch at ``step`` are flipped horizontally."""
        g = torch.Generator().manual_seed(seed_for(self.seed, 1, step))
        return torch.rand(self.batch_size, generator=g) < 0.5


class _StepSampler(Sampler):
    """Batch sampler that yields ``BatchOrder.indices(step)`` for step = start, start+1, ..."""

    def __init__(self, order: BatchOrder, start_step: int):
        self.order, self.start_step = order, start_step

    def __iter__(self) -> Iterator[List[int]]:
        step = self.start_step
        while True:
            yield self.order.indices(step).tolist()
            step += 1


def _apply_flips(batch: Dict[str, torch.Tensor], flip: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Flip the selected items; image and source together, as paired images stay aligned."""
    flip = flip.to(batch["image"].device)
    for key in ("image", "source"):
        if key in batch:
            x = batch[key]
            batch[key] = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return batch


def infinite_batches(
    dataset: AnyDataset, batch_size: int, seed: int, start_step: int = 0, num_workers: int = 0
) -> Iterator[Dict[str, torch.Tensor]]:
    """Yield training batches forever, batch ``i`` being the batch of step ``start_step + i``.

    The order is :class:`BatchOrder`'s; random flips (when ``dataset.hflip``) are drawn from
    ``(seed, step)`` too. In-memory data is indexed directly (on the dataset's device); folder
    data goes through a DataLoader with ``num_workers`` workers.
    """
    order = BatchOrder(len(dataset), batch_size, seed)
    hflip = getattr(dataset, "hflip", False)
    if isinstance(dataset, InMemoryDataset):
        step = start_step
        while True:
            batch = dataset.batch(order.indices(step).to(dataset.images.device))
            yield _apply_flips(batch, order.flips(step)) if hflip else batch
            step += 1
    loader = DataLoader(dataset, batch_sampler=_StepSampler(order, start_step), num_workers=num_workers)
    for step, batch in enumerate(loader, start=start_step):
        yield _apply_flips(batch, order.flips(step)) if hflip else batch


def iter_batches(dataset: AnyDataset, batch_size: int, num_workers: int = 0) -> Iterator[Dict[str, torch.Tensor]]:
    """One pass over ``dataset`` in order, no augmentation, the last batch possibly smaller (eval)."""
    if isinstance(dataset, InMemoryDataset):
        for start in range(0, len(dataset), batch_size):
            index = torch.arange(start, min(start + batch_size, len(dataset)), device=dataset.images.device)
            yield dataset.batch(index)
        return
    yield from DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
