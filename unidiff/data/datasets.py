"""The two dataset containers every source builds, and the decoding of one image file.

An item is ``{"image": (C, H, W) float32 in [-1, 1], "label": () int64}``; paired data adds
``"source": (C_src, H, W)``, and in-memory data may carry per-item extras under their own keys
(``data.extra_file``, :mod:`unidiff.data.extras`). Batches are the same dicts with a leading batch
dimension (docs/CONTRACTS.md, "Tensors").

- :class:`InMemoryDataset`: tensors; a batch is one index operation (no DataLoader per-item cost).
- :class:`FolderDataset`: a lazy list of files, decoded by :func:`load_image` on access (through a
  DataLoader, :mod:`unidiff.data.batches`), its unreadable files skipped or reported by
  ``data.on_bad_file``.
- :class:`ArrayDataset`: uint8 images in a memory-mapped ``.npy`` file (the downsampled-ImageNet
  cache, :mod:`unidiff.data.cache`): only the rows a batch asks for are read.
- :class:`ImageFileDataset`: a lazy list of ImageNet files, ADM-preprocessed on access, under
  ``data.on_bad_file`` too.

Bad files, one policy for every image-file source (``data.on_bad_file``): a file that
:func:`~unidiff.data.readers.read_image` refuses (corrupt, truncated, above PIL's
decompression-bomb limit, pixels without an intensity scale) is either a one-line
:class:`~unidiff.data.readers.BadFileError` naming it (``error``; raised in a DataLoader worker it
still reaches the user as that one line), or skipped (``skip``): a lazy dataset gives the next
readable item in its place, an in-memory one drops it; either way it is counted in the dataset's
``skipped``, warned about at 1, 2, 4, 8, ... files, and listed by :func:`bad_files` /
:func:`write_bad_files` (``RUN_DIR/bad_files.txt``).

:class:`ArrayDataset` implements ``__getitems__`` (a whole batch at once, already collated: the
DataLoader's fetcher calls it for a batch sampler); the image-file datasets are read item by item.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from ..io import write_text
from .readers import GREY_MODES, BadFileError, one_line, read_image  # noqa: F401 - GREY_MODES re-exported

# The fields every item may carry itself; an extra of that name would silently replace them.
RESERVED_KEYS = ("image", "label", "source")
# The hint every bad-file error ends with.
SKIP_HINT = "set data.on_bad_file=skip to skip such files"
# A lazy item's (and batch's) record of the files skipped in a DataLoader worker, popped by the
# batch iterators (:func:`report_bad_files`).
BAD_FILES_KEY = "bad_files"


class InMemoryDataset(Dataset):
    """A dataset held as tensors; :meth:`batch` draws a whole batch with one index operation.

    images:  (N, C, H, W) float32 in [-1, 1], or uint8 pixels 0..255 (a quarter of the memory:
             Fashion-MNIST's 60k images are 61 MB), decoded to float32 ``x / 127.5 - 1`` in every
             item and batch. ``images`` itself is the stored tensor.
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
        # Files dropped when a folder was loaded into memory (data.on_bad_file=skip): path -> reason.
        self.skipped: Dict[str, str] = {}

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        item = {"image": decode_pixels(self.images[i]), "label": self.labels[i]}
        if self.sources is not None:
            item["source"] = self.sources[i]
        item.update({k: v[i] for k, v in self.extras.items()})
        return item

    def batch(self, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        """index: (B,) int64 on the dataset's device -> a batch dict."""
        out = {"image": decode_pixels(self.images[index]), "label": self.labels[index]}
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


class _BadFilePolicy(Dataset):
    """``data.on_bad_file`` for a lazy list of image files (module docstring, "Bad files").

    A subclass has ``samples`` (the first field of each a path), ``on_bad_file``, ``skipped`` and
    :meth:`read_item`, item ``i`` exactly or a :class:`BadFileError`. ``__getitem__`` is item
    ``i``, or under ``skip`` the next readable one (``i+1, i+2, ...``), so batches keep their size
    and stay a function of ``(seed, step)``. Items are fetched one by one (no ``__getitems__``),
    so any DataLoader and collate function can read these datasets.
    """

    samples: list
    on_bad_file: str
    skipped: Dict[str, str]

    def read_item(self, i: int) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        bad: List[Tuple[str, str]] = []
        n = len(self.samples)
        for k in range(n):
            j = (i + k) % n
            try:
                item = self.read_item(j)
                break
            except BadFileError as e:
                if self.on_bad_file != "skip":
                    raise BadFileError(f"{e}; {SKIP_HINT}") from None
                bad.append((e.path or self.samples[j][0], e.reason))
        else:
            raise BadFileError(f"none of the {n} image files is readable (first: {self.samples[0][0]})")
        if get_worker_info() is None:
            for path, reason in bad:
                _note_skipped(self, path, reason)
        else:
            # A worker's count dies with it: the item carries its skipped files ("path\0reason"
            # lines, a string so that default_collate keeps it) to report_bad_files in the main
            # process. Every item of a worker has the key, so a batch's items agree.
            item[BAD_FILES_KEY] = "\n".join(f"{p}\0{r}" for p, r in bad)
        return item


class FolderDataset(_BadFilePolicy):
    """A lazy dataset of image files, decoded and resized on access.

    samples: list of ``(target_path, label, source_path_or_None)``.
    mode / source_mode: PIL modes ("L" or "RGB") every target / source image is converted to.
    on_bad_file: ``"error"``: an unreadable file is a :class:`BadFileError` naming it;
                 ``"skip"``: item ``i``'s place is taken by the next readable item
                 (``i+1, i+2, ...``), so batches keep their size and stay a function of
                 ``(seed, step)``, and the file is counted (module docstring).
    skipped:     path -> reason of every file skipped so far (main process).
    """

    def __init__(
        self,
        samples: Sequence[Tuple[str, int, Optional[str]]],
        image_size: int,
        mode: str,
        source_mode: Optional[str] = None,
        hflip: bool = False,
        on_bad_file: str = "error",
    ):
        self.samples, self.image_size, self.mode, self.source_mode = list(samples), image_size, mode, source_mode
        self.hflip, self.on_bad_file = hflip, on_bad_file
        self.skipped: Dict[str, str] = {}

    def read_item(self, i: int) -> Dict[str, torch.Tensor]:
        """Item ``i`` exactly, whatever the policy: a bad file raises :class:`BadFileError`."""
        path, label, source = self.samples[i]
        item = {"image": load_image(path, self.mode, self.image_size), "label": torch.tensor(label, dtype=torch.long)}
        if source is not None:
            item["source"] = load_image(source, self.source_mode or self.mode, self.image_size)
        return item

    def fingerprint(self) -> str:
        """A hash of the file list and labels (the files themselves are not read)."""
        h = hashlib.sha256(repr((self.samples, self.image_size, self.mode, self.source_mode)).encode())
        return h.hexdigest()


class ArrayDataset(Dataset):
    """uint8 images in a ``.npy`` file opened memory-mapped (never read whole), labels in memory.

    images_path: ``.npy`` file of (M, C, H, W) uint8.
    labels:      (M,) int64, one per row of the file.
    rows:        (N,) int64 rows of the file this dataset is (a subset: ``data.max_items``); all by default.
    checksum:    the file's content checksum (from the cache manifest): part of the fingerprint.
    The memory map is opened lazily in each process (a DataLoader worker opens its own; pickling the
    dataset sends the path, not the pixels).
    """

    def __init__(self, images_path: str, labels: np.ndarray, rows: Optional[np.ndarray] = None,
                 hflip: bool = False, checksum: str = ""):
        self.images_path, self.checksum, self.hflip = str(images_path), checksum, hflip
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.rows = np.arange(len(self.labels), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self._array: Optional[np.ndarray] = None

    def array(self) -> np.ndarray:
        """The (M, C, H, W) uint8 memory map (opened on first use in this process)."""
        if self._array is None:
            self._array = np.load(self.images_path, mmap_mode="r")
        return self._array

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        row = int(self.rows[i])
        return {"image": decode_pixels(torch.from_numpy(np.array(self.array()[row]))), "label": self.labels[row]}

    def __getitems__(self, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        # Read the rows in file order (sequential pages), then put them back in batch order.
        order = np.argsort(rows, kind="stable")
        block = np.empty((len(rows),) + self.array().shape[1:], dtype=np.uint8)
        block[order] = self.array()[rows[order]]
        rows_t = torch.from_numpy(rows)
        return {"image": decode_pixels(torch.from_numpy(block)), "label": self.labels[rows_t]}

    def subset(self, index: Union[np.ndarray, Sequence[int]]) -> "ArrayDataset":
        return ArrayDataset(self.images_path, self.labels.numpy(), self.rows[np.asarray(index, dtype=np.int64)],
                            self.hflip, self.checksum)

    def fingerprint(self) -> str:
        """A hash of the file's checksum and the rows (the pixels are not read)."""
        h = hashlib.sha256(repr((self.checksum, self.array().shape)).encode())
        h.update(self.rows.tobytes())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()


class ImageFileDataset(_BadFilePolicy):
    """A lazy list of RGB image files (ImageNet), ADM-preprocessed on access
    (:func:`~unidiff.data.readers.center_crop_arr`), as (3, S, S) float32 in [-1, 1]
    ((1, S, S) with ``mode="L"``, ``data.channels=1``).

    samples:     ``(path, label)`` pairs.
    on_bad_file: as :class:`FolderDataset`'s (module docstring, "Bad files").
    skipped:     path -> reason of every file skipped so far (main process).
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], image_size: int, hflip: bool = False,
                 on_bad_file: str = "error", mode: str = "RGB"):
        self.samples, self.image_size, self.hflip, self.on_bad_file = list(samples), int(image_size), hflip, on_bad_file
        self.mode = mode  # "RGB", or "L" with data.channels=1
        self.skipped: Dict[str, str] = {}

    def read_item(self, i: int) -> Dict[str, torch.Tensor]:
        """Item ``i`` exactly: a bad file raises :class:`BadFileError`."""
        from .readers import center_crop_arr

        path, label = self.samples[i]
        image = read_image(path, self.mode)
        try:
            arr = center_crop_arr(image, self.image_size)  # (S, S[, 3]) uint8
        except Exception as e:  # noqa: BLE001 - e.g. a 1-pixel-wide image cannot be resized: the file's
            raise BadFileError.of(path, one_line(e)) from None
        arr = arr[..., None] if arr.ndim == 2 else arr  # (S, S, C)
        image = decode_pixels(torch.from_numpy(np.array(arr)).permute(2, 0, 1))  # (C, S, S)
        return {"image": image, "label": torch.tensor(label, dtype=torch.long)}

    def subset(self, index: Union[np.ndarray, Sequence[int]]) -> "ImageFileDataset":
        return ImageFileDataset([self.samples[int(i)] for i in index], self.image_size, self.hflip, self.on_bad_file,
                                self.mode)

    def fingerprint(self) -> str:
        """A hash of the file list, labels and size (the files themselves are not read)."""
        key = (self.samples, self.image_size) if self.mode == "RGB" else (self.samples, self.image_size, self.mode)
        return hashlib.sha256(repr(key).encode()).hexdigest()


def report_bad_files(dataset, batch: Dict[str, object]) -> Dict[str, object]:
    """Pop a lazy batch's unreadable files and act on them in this (the main) process: raise
    :class:`BadFileError` naming the first (``on_bad_file="error"``), or count and warn (``"skip"``).

    The record, collated from a worker's items, is a list of ``"path\0reason"`` lines (one string
    per item; ``(path, reason)`` pairs are taken too)."""
    entries: List[Tuple[str, str]] = []
    for entry in batch.pop(BAD_FILES_KEY, None) or []:
        if isinstance(entry, str):
            entries += [tuple(line.split("\0", 1)) for line in entry.split("\n") if line]  # type: ignore[misc]
        else:
            entries.append(tuple(entry))  # type: ignore[arg-type]
    for path, reason in entries:
        if getattr(dataset, "on_bad_file", "error") != "skip":
            raise BadFileError(f"cannot read image file {path} ({reason}); {SKIP_HINT}")
        _note_skipped(dataset, path, reason)
    return batch


def _note_skipped(dataset, path: str, reason: str) -> None:
    """Count a skipped file once; warn at 1, 2, 4, 8, ... files (a handful of lines however many)."""
    if path in dataset.skipped:
        return
    dataset.skipped[path] = reason
    n = len(dataset.skipped)
    if n & (n - 1) == 0:
        warnings.warn(f"skipped unreadable image file {path} ({reason}); {n} skipped so far "
                      f"(data.on_bad_file=skip; next warning at {2 * n}; the run folder's bad_files.txt lists them)")


def bad_files(*datasets) -> List[Tuple[str, str]]:
    """The ``(path, reason)`` of every file the datasets skipped so far, sorted by path."""
    out: Dict[str, str] = {}
    for ds in datasets:
        out.update(getattr(ds, "skipped", None) or {})
    return sorted(out.items())


def write_bad_files(run_dir: Union[str, os.PathLike], *datasets) -> Optional[Path]:
    """Write ``run_dir/bad_files.txt`` (atomically; one ``path<TAB>reason`` line per skipped file)
    when the datasets skipped any, and return its path; None (and nothing written) otherwise.
    Skips are found as batches are decoded: call it again (each checkpoint, the end of a run)."""
    found = bad_files(*datasets)
    if not found:
        return None
    return write_text(Path(run_dir) / "bad_files.txt", "".join(f"{p}\t{r}\n" for p, r in found))


AnyDataset = Union[InMemoryDataset, FolderDataset, ArrayDataset, ImageFileDataset]


def decode_pixels(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 -> float32 in [-1, 1]; a float tensor (already in [-1, 1]) unchanged."""
    if x.dtype == torch.uint8:
        return x.float().div_(127.5).sub_(1.0)
    return x


def load_image(path: str, mode: str, size: int) -> torch.Tensor:
    """Read an image file as (C, size, size) float32 in [-1, 1]: shorter side to ``size``, centre crop.

    ``mode`` is the PIL mode ("L": C=1, "RGB": C=3). The file is decoded by
    :func:`~unidiff.data.readers.read_image` (16-bit and float pixels scaled); an unusable file
    raises :class:`BadFileError` naming it.
    """
    from torchvision.transforms import v2

    im = read_image(path, mode)
    transform = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    return transform(im) * 2.0 - 1.0  # [0, 1] -> [-1, 1]


def materialize(ds: FolderDataset) -> InMemoryDataset:
    """Decode every file of a folder dataset once into an :class:`InMemoryDataset`; a bad file is
    an error naming it, or (``on_bad_file="skip"``) dropped and counted in ``skipped``."""
    items = []
    for i in range(len(ds)):
        try:
            items.append(ds.read_item(i))
        except BadFileError as e:
            if ds.on_bad_file != "skip":
                raise BadFileError(f"{e}; {SKIP_HINT}") from None
            _note_skipped(ds, e.path or ds.samples[i][0], e.reason)
    if not items:
        empty = torch.zeros(0, 1 if ds.mode == "L" else 3, ds.image_size, ds.image_size)
        out = InMemoryDataset(empty, torch.zeros(0, dtype=torch.long), hflip=ds.hflip)
    else:
        images = torch.stack([it["image"] for it in items])
        labels = torch.stack([it["label"] for it in items])
        sources = torch.stack([it["source"] for it in items]) if "source" in items[0] else None
        out = InMemoryDataset(images, labels, sources, ds.hflip)
    out.skipped = dict(ds.skipped)
    return out
