"""The two dataset containers every source builds, and the decoding of one image file.

An item is ``{"image": (C, H, W) float32 in [-1, 1], "label": () int64}``; paired data adds
``"source": (C_src, H, W)``, and in-memory data may carry per-item extras under their own keys
(``data.extra_file``, :mod:`unidiff.data.extras`). Batches are the same dicts with a leading batch
dimension (docs/CONTRACTS.md, "Tensors").

- :class:`InMemoryDataset`: tensors; a batch is one index operation (no DataLoader per-item cost).
- :class:`FolderDataset`: a lazy list of files, decoded by :func:`load_image` on access (through a
  DataLoader, :mod:`unidiff.data.batches`).
"""

from __future__ import annotations

import hashlib
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError

# The fields every item may carry itself; an extra of that name would silently replace them.
RESERVED_KEYS = ("image", "label", "source")
# PIL modes read as one grey channel; every other mode is converted to RGB.
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


class InMemoryDataset(Dataset):
    """A dataset held as tensors; :meth:`batch` draws a whole batch with one index operation.

    images:  (N, C, H, W) float32 in [-1, 1].
    labels:  (N,) int64.
    sources: (N, C_src, H, W) float32 in [-1, 1] for paired data, else None.
    hflip:   whether :func:`~unidiff.data.infinite_batches` flips this dataset's batches at random
             (train only).
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


def image_mode(path: str) -> str:
    """"L" for a grey image, else "RGB": the first image of a folder fixes its channel count."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return "L" if im.mode in GREY_MODES else "RGB"
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"cannot read image file {path}: {e}") from e


def materialize(ds: FolderDataset) -> InMemoryDataset:
    """Decode every file of a folder dataset once into an :class:`InMemoryDataset`."""
    items = [ds[i] for i in range(len(ds))]
    if not items:
        empty = torch.zeros(0, 1, ds.image_size, ds.image_size)
        return InMemoryDataset(empty, torch.zeros(0, dtype=torch.long), hflip=ds.hflip)
    images = torch.stack([it["image"] for it in items])
    labels = torch.stack([it["label"] for it in items])
    sources = torch.stack([it["source"] for it in items]) if "source" in items[0] else None
    return InMemoryDataset(images, labels, sources, ds.hflip)
