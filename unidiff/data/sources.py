"""Where the data comes from: one builder per ``data.name``, registered in :data:`SOURCES`.

A builder takes the ``data:`` config (:class:`~unidiff.data.DataConfig` or its omegaconf node) and
returns ``(train, val, class_names)``: the two splits as :class:`InMemoryDataset` (or lazy
:class:`FolderDataset`) after the seeded split and ``max_items``, and the K class names. Everything
after that (the ``num_classes`` guard, ``data.extra_file``, :class:`~unidiff.data.DataInfo`) is
common and lives in :func:`unidiff.data.build_datasets`.

Sources:
- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, no download): the dataset the tests
  and the quick experiments run on. Seeded stratified train/val split.
- ``imagefolder``: torchvision ``ImageFolder`` layout ``root/<class>/<image>``; seeded stratified
  split; RGB if any image is colour, else grey (or as ``data.channels`` says), every image
  converted to it.
- ``mnist`` / ``cifar10``: torchvision; the official test split is the validation split.
- ``paired``: ``root/A/<name>`` (source) and ``root/B/<name>`` (target) with matching names; no
  classes, so every label is 0 and ``num_classes`` is 1. ``data.channels`` sets the target images'
  channels; the sources' are decided from their own files (grey sketches, colour photos).
- ``fashion_mnist``: the official idx files (gzipped or not; default ``root`` the Debian package's
  folder :data:`FASHION_ROOT`), the official 60k/10k split (val = test), zero-padded from 28x28 to
  32x32 (the DDPM / MNIST-at-32 convention: patch 2 gives 256 tokens), held as uint8.
- ``imagenet``: ILSVRC-2012 folders (:func:`~unidiff.data.readers.scan_imagenet`), lazy, ADM's
  centre crop to ``image_size`` (:class:`ImageFileDataset`); RGB (grey with ``data.channels=1``).

Every image-file source (``imagefolder``, ``paired``, ``imagenet``) decodes through
:func:`~unidiff.data.readers.read_image` and follows ``data.on_bad_file`` for unreadable files
(:mod:`unidiff.data.datasets`, "Bad files").
- ``imagenet32`` / ``imagenet64``: downsampled ImageNet's npz batches, converted once into the
  memory-mapped cache under ``data.cache_dir`` (:mod:`unidiff.data.cache`, :class:`ArrayDataset`).

A new source is one builder function here plus its entry in :data:`SOURCES`; the ``data.name``
choices (:data:`DATASET_NAMES`, the ``Literal`` of the config schema) are that registry's keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from .cache import npz_cache
from .datasets import AnyDataset, ArrayDataset, FolderDataset, ImageFileDataset, InMemoryDataset, materialize
from .readers import find_file, folder_mode, read_idx, scan_imagenet

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Folder datasets whose decoded float32 tensors fit under this are loaded into memory when
# ``data.in_memory`` is left unset (1 GiB: e.g. 20k RGB images at 128x128).
AUTO_MEMORY_BYTES = 1 << 30

# cfg -> (train, val, class_names): the contract of every entry of SOURCES (module docstring).
SourceBuilder = Callable[..., Tuple[AnyDataset, AnyDataset, List[str]]]


# ----------------------------------------------------------------------------------------------
# Splits


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: ``(train_idx, val_idx)``, each in a shuffled order.

    The validation split has exactly ``round(val_fraction * N)`` items, spread over the classes in
    proportion to their sizes (largest remainder), so every class with enough items appears in it.
    Not scikit-learn's ``train_test_split(stratify=...)``/``StratifiedShuffleSplit``: those draw
    with their own ``RandomState`` and round the per-class counts their own way, so the same seed
    would give another split and change the main job's numbers.
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


@dataclass(frozen=True)
class TorchvisionSpec:
    """One torchvision dataset with a train/test split: its class name in ``torchvision.datasets``,
    the sub-folder of ``root`` its files live in and their names (for the "not found" message), and
    the class names when the dataset's own are not the ones to use (MNIST's are "0 - zero", ...)."""

    dataset: str
    folder: str
    files: str
    class_names: Optional[Tuple[str, ...]] = None


MNIST = TorchvisionSpec("MNIST", os.path.join("MNIST", "raw"),
                        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte",
                        tuple(DIGIT_NAMES))
CIFAR10 = TorchvisionSpec("CIFAR10", "cifar-10-batches-py", "data_batch_1..5, test_batch, batches.meta")


def _torchvision(cfg, spec: TorchvisionSpec):
    """A torchvision dataset from ``root``: train split for training, the official test split for val."""
    from torchvision import datasets

    if not cfg.root:
        raise DataError(f"data.root must be set for data.name={cfg.name} (the folder that holds or will hold the files)")
    root = os.path.expanduser(str(cfg.root))
    cls, where, files = getattr(datasets, spec.dataset), os.path.join(root, spec.folder), spec.files
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
    names = list(spec.class_names) if spec.class_names is not None else list(splits[0].classes)
    return train, val, names


def _mode(cfg, paths) -> str:
    """The PIL mode every image is converted to: ``data.channels`` (1: "L", 3: "RGB") when set,
    else decided from the whole file list (:func:`~unidiff.data.readers.folder_mode`: any colour
    image makes it RGB), never from whichever file sorts first."""
    channels = getattr(cfg, "channels", None)
    if channels is not None:
        return "L" if int(channels) == 1 else "RGB"
    return folder_mode(paths)


def _folder_split(cfg, samples, labels, size, mode, source_mode=None):
    train_idx, val_idx = stratified_split(np.asarray(labels), cfg.val_fraction, cfg.split_seed)
    train_idx = _limit(train_idx, cfg.max_items, cfg.split_seed)
    val_idx = _limit(val_idx, cfg.max_items, cfg.split_seed)
    policy = str(cfg.on_bad_file)
    train = FolderDataset([samples[i] for i in train_idx], size, mode, source_mode, hflip=cfg.hflip, on_bad_file=policy)
    val = FolderDataset([samples[i] for i in val_idx], size, mode, source_mode, on_bad_file=policy)
    in_memory = cfg.in_memory
    if in_memory is None:
        channels = (1 if mode == "L" else 3) + (0 if source_mode is None else (1 if source_mode == "L" else 3))
        in_memory = (len(train) + len(val)) * channels * size * size * 4 <= AUTO_MEMORY_BYTES
    if in_memory:
        return materialize(train), materialize(val)
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
    mode = _mode(cfg, [path for path, _, _ in samples])
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
    mode, source_mode = _mode(cfg, [t for t, _, _ in samples]), folder_mode([s for _, _, s in samples])
    train, val = _folder_split(cfg, samples, [0] * len(samples), size, mode, source_mode)
    return train, val, ["pair"]


FASHION_NAMES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle boot"]
# Where Debian's dataset-fashion-mnist package puts the four idx files (gzipped).
FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_PAD = 2  # 28 + 2 + 2 = 32


def _fashion_split(root: str, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """One official split: (N, 1, 32, 32) uint8 zero-padded images, (N,) int64 labels."""
    paths = []
    for name in FASHION_FILES[split]:
        path = find_file(root, name)
        if path is None:
            raise DataError(f"Fashion-MNIST file {name}[.gz] not found in {root}: install the data with "
                            f"`sudo apt-get install dataset-fashion-mnist` or set data.root to its folder")
        paths.append(path)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataError(f"{paths[0]}: expected uint8 (N, 28, 28) images, got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],) or (labels.size and labels.max() >= len(FASHION_NAMES)):
        raise DataError(f"{paths[1]}: expected {images.shape[0]} labels in 0..9, got shape {labels.shape}")
    # Zero (black, the images' background) padding to 32x32, as DDPM and most MNIST-at-32 work do.
    padded = np.pad(images, ((0, 0), (FASHION_PAD, FASHION_PAD), (FASHION_PAD, FASHION_PAD)))
    return torch.from_numpy(padded).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))  # (N, 1, 32, 32)


def _fashion_mnist(cfg):
    root = os.path.expanduser(str(cfg.root or FASHION_ROOT))
    out = []
    for split in ("train", "val"):
        images, labels = _fashion_split(root, split)
        idx = torch.from_numpy(_limit(np.arange(len(labels)), cfg.max_items, cfg.split_seed))
        images, labels = images[idx], labels[idx]
        if cfg.image_size is not None and cfg.image_size != images.shape[-1]:
            images = _resize(images.float().div(127.5).sub(1.0), cfg.image_size)  # another size: float32
        out.append(InMemoryDataset(images, labels, hflip=cfg.hflip and split == "train"))
    return out[0], out[1], list(FASHION_NAMES)


def _imagenet(cfg):
    """ILSVRC-2012 folders: lazy, ADM-preprocessed; the official val split; ``max_items`` per split."""
    root, size = _existing_root(cfg), _require_size(cfg)
    train_samples, val_samples, _, names = scan_imagenet(root)
    out = []
    for split, samples in (("train", train_samples), ("val", val_samples)):
        if not samples:
            raise DataError(f"ImageNet layout: no images in {os.path.join(root, split)}")
        idx = _limit(np.arange(len(samples)), cfg.max_items, cfg.split_seed)
        mode = "L" if getattr(cfg, "channels", None) == 1 else "RGB"  # ImageNet is colour: no scan
        out.append(ImageFileDataset([samples[i] for i in idx], size, hflip=cfg.hflip and split == "train",
                                    on_bad_file=str(cfg.on_bad_file), mode=mode))
    return out[0], out[1], names


def _downsampled_imagenet(cfg, size: int):
    """Downsampled ImageNet (npz batches) through the memory-mapped cache; the official val split."""
    if cfg.image_size is not None and cfg.image_size != size:
        raise DataError(f"data.image_size={cfg.image_size} but data.name={cfg.name} is {size}x{size} (leave it null)")
    if not cfg.root:
        raise DataError(f"data.root must be set for data.name={cfg.name} (the folder of train_data_batch_*.npz)")
    _, splits = npz_cache(os.path.expanduser(str(cfg.root)), size, str(cfg.cache_dir))
    out = []
    for split in ("train", "val"):
        path, labels, checksum = splits[split]
        rows = _limit(np.arange(len(labels)), cfg.max_items, cfg.split_seed)
        out.append(ArrayDataset(path, labels, rows, hflip=cfg.hflip and split == "train", checksum=checksum))
    return out[0], out[1], [f"class {k}" for k in range(1000)]


# ----------------------------------------------------------------------------------------------
# Registry

# data.name -> builder. Insertion order is the order the choices are listed in (config schema,
# error messages).
SOURCES: Dict[str, SourceBuilder] = {
    "digits": _digits,
    "imagefolder": _imagefolder,
    "mnist": partial(_torchvision, spec=MNIST),
    "cifar10": partial(_torchvision, spec=CIFAR10),
    "paired": _paired,
    "fashion_mnist": _fashion_mnist,
    "imagenet": _imagenet,
    "imagenet32": partial(_downsampled_imagenet, size=32),
    "imagenet64": partial(_downsampled_imagenet, size=64),
}
DATASET_NAMES: Tuple[str, ...] = tuple(SOURCES)
