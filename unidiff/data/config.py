"""The ``data:`` config section, what a built dataset tells the rest of the code, and the one
function that turns the first into ``(train, val, info)``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple

from ..errors import ConfigError, DataError
from .datasets import AnyDataset
from .extras import attach_extras
from .latents import load_latent_cache
from .sources import DATASET_NAMES, SOURCES

# The choices of data.name are the registry's keys (omegaconf validates a Literal at load).
DatasetName = Literal[DATASET_NAMES]  # type: ignore[valid-type]
OnBadFile = Literal["skip", "error"]
# The sources that decode image files: data.channels and data.on_bad_file are theirs.
IMAGE_FILE_SOURCES = ("imagefolder", "paired", "imagenet")


@dataclass
class DataConfig:
    """The ``data:`` section of a run config (an omegaconf structured schema: plain types only).

    name:         which dataset (a key of :data:`unidiff.data.sources.SOURCES`; see that module).
    root:         dataset folder; required for every dataset except ``digits`` and
                  ``fashion_mnist`` (default: the Debian package's ``/usr/share/datasets/fashion-mnist``).
    image_size:   side of the square images after resizing (bilinear, antialiased; ImageNet folders:
                  ADM's centre crop); None keeps the native size (digits 8, mnist 28, cifar10 32,
                  fashion_mnist 32 after zero padding, imagenet32/64 32/64). Required for the
                  folder datasets.
    val_fraction: share of the data held out for validation (ignored by the datasets with an
                  official test/val split: mnist, cifar10, fashion_mnist, the three ImageNets).
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
                  the splits (:mod:`unidiff.data.extras`); in-memory data only.
    on_bad_file:  image-file datasets (``imagefolder``, ``paired``, ``imagenet``): a corrupt,
                  truncated or oversized image, or one whose pixels have no intensity scale, is a
                  one-line error naming the file (``error``) or skipped (``skip``: lazy data gives
                  its batch slot to the next readable item, in-memory data drops it; counted,
                  warned at 1, 2, 4, ... files, listed by :func:`unidiff.data.bad_files`).
    channels:     image-file datasets: 1 (grey) or 3 (RGB) channels every image is converted to;
                  None decides from the files (any colour image: 3; ``imagenet``: 3). ``paired``:
                  the target images only.
    cache_dir:    where ``imagenet32``/``imagenet64`` are converted once into memory-mapped arrays.
    latents:      a VAE latent cache folder (``unidiff latents CONFIG`` writes it from the other keys;
                  :mod:`unidiff.data.latents`): when set, the splits are its latents.
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
    on_bad_file: OnBadFile = "error"
    channels: Optional[int] = None
    cache_dir: str = "runs/.cache/data"
    latents: Optional[str] = None


@dataclass
class DataInfo:
    """What the rest of the code needs to know about a dataset.

    image_shape:  (C, H, W) of ``"image"``: the diffusion space S.
    source_shape: (C, H, W) of ``"source"`` for paired data, else None.
    latents:      for a latent cache (``data.latents``): its folder, VAE and pixel shape, else None.
    """

    name: str
    image_shape: Tuple[int, int, int]
    num_classes: int
    class_names: List[str] = field(default_factory=list)
    source_shape: Optional[Tuple[int, int, int]] = None
    latents: Optional[Dict[str, Any]] = None


def validate_data_config(cfg) -> None:
    """Raise :class:`ConfigError` naming the ``data.*`` key of any out-of-range value."""
    if cfg.name not in SOURCES:
        raise ConfigError(f"data.name={cfg.name!r} is not one of {', '.join(DATASET_NAMES)}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.val_fraction} must be in [0, 1)")
    for key in ("image_size", "max_items", "num_classes"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"data.{key}={value} must be a positive integer (or null)")
    if cfg.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.num_workers} must be >= 0")
    if cfg.on_bad_file not in ("skip", "error"):
        raise ConfigError(f"data.on_bad_file={cfg.on_bad_file!r} must be 'skip' or 'error'")
    channels = getattr(cfg, "channels", None)
    if channels is not None:
        if channels not in (1, 3):
            raise ConfigError(f"data.channels={channels} must be 1 (grey), 3 (RGB) or null (decided from the files)")
        if cfg.name not in IMAGE_FILE_SOURCES:
            raise ConfigError(f"data.channels={channels} applies to the image-file datasets "
                              f"({', '.join(IMAGE_FILE_SOURCES)}), not data.name={cfg.name} (leave it null)")
    if not str(cfg.cache_dir).strip():
        raise ConfigError("data.cache_dir='' must be a folder path")
    if cfg.extra_file is not None and not str(cfg.extra_file).strip():
        raise ConfigError("data.extra_file='' must be a file path (or null)")


def _shape(ds: AnyDataset, key: str) -> Tuple[int, int, int]:
    if len(ds) == 0:
        raise DataError("the dataset's training split is empty (check data.root, data.max_items, data.val_fraction)")
    return tuple(int(s) for s in ds[0][key].shape)  # type: ignore[return-value]


def build_datasets(cfg: DataConfig) -> Tuple[AnyDataset, AnyDataset, DataInfo]:
    """Build ``(train, val, info)`` from a :class:`DataConfig` (or its omegaconf node): the source's
    builder (:data:`~unidiff.data.sources.SOURCES`), the ``num_classes`` guard, then the extras."""
    validate_data_config(cfg)
    latents = None
    if getattr(cfg, "latents", None) is not None:  # a VAE latent cache made from this data config (unidiff latents)
        train, val, class_names, latents = load_latent_cache(cfg)
    else:
        train, val, class_names = SOURCES[str(cfg.name)](cfg)
    num_classes = len(class_names)
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise DataError(f"data.num_classes={cfg.num_classes} but the {cfg.name} data has {num_classes} classes")
    if cfg.extra_file is not None:
        train, val = attach_extras(cfg.extra_file, train, val)
    image_shape = _shape(train, "image")  # first: an empty split is named before anything else
    info = DataInfo(
        name=str(cfg.name),
        image_shape=image_shape,
        num_classes=num_classes,
        class_names=class_names,
        # Any source whose items carry a "source" image (today: paired) has a source shape.
        source_shape=_shape(train, "source") if "source" in train[0] else None,
        latents=latents,
    )
    return train, val, info
