"""Readers of the official file formats of the real datasets, and ADM's image preprocessing.

- :func:`read_idx`: LeCun's idx format (MNIST, Fashion-MNIST), gzipped or not (torchvision's
  ``read_sn3_pascalvincent_tensor`` reads only uncompressed files; Debian ships them gzipped).
- :func:`read_npz_batch`: one file of downsampled ImageNet (Chrabaszcz et al. 2017,
  ``train_data_batch_<k>.npz`` / ``val_data.npz``): ``data`` (N, 3*S*S) uint8 in CHW order,
  ``labels`` 1-based.
- :func:`scan_imagenet`: the ILSVRC-2012 folder layout (``train/<wnid>/*.JPEG``; ``val/<wnid>/`` or
  a flat ``val/`` with ``LOC_val_solution.csv``; class names from ``LOC_synset_mapping.txt``).
- :func:`center_crop_arr`: ADM's (and DiT's) preprocessing of one image.
- :func:`read_image`: any image file as an 8-bit "L" or "RGB" PIL image: 16-bit and float pixels
  scaled, not clipped; truncated, corrupt or oversized files a :class:`BadFileError` naming them.
- :func:`folder_mode`: the channel count of a whole list of image files (any colour image: RGB).

Every malformed file is a :class:`~unidiff.errors.DataError` naming it.
"""

from __future__ import annotations

import csv
import gzip
import os
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError

# idx element types (the format description on yann.lecun.com/exdb/mnist): code -> big-endian dtype.
IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """An idx file (``.gz`` or not) as a native-byte-order array of the shape its header gives.

    Header: two zero bytes, the element type code, the number of dimensions, then one big-endian
    uint32 per dimension; the data must be exactly ``prod(dims)`` elements (a truncated download is
    an error, not a short array).
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # EOFError: a truncated .gz
        raise DataError(f"cannot read idx file {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an idx file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise DataError(f"{path}: unknown idx element type 0x{code:02x}")
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataError(f"{path}: idx header cut short")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - offset != expected:
        raise DataError(f"{path} holds {len(data) - offset} bytes of data but its header {shape} says {expected}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def read_npz_batch(path: str, image_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """One downsampled-ImageNet batch file -> ``images`` (N, 3, S, S) uint8, ``labels`` (N,) int64 0-based.

    The rows of ``data`` are the three S x S planes one after the other (CHW), so a reshape is the
    whole decoding; the official labels are 1..1000.
    """
    try:
        with np.load(path) as f:
            if "data" not in f or "labels" not in f:
                raise DataError(f"{path}: expected the arrays 'data' and 'labels', found {sorted(f.files)}")
            data, labels = f["data"], np.asarray(f["labels"]).reshape(-1)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"cannot read npz file {path}: {e}") from e
    row = 3 * image_size * image_size
    if data.ndim != 2 or data.shape[1] != row or data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' is {data.dtype} {tuple(data.shape)}; expected uint8 (N, {row}) "
                        f"for {image_size}x{image_size} images")
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 1 or labels.max() > 1000):
        raise DataError(f"{path}: labels must be 1..1000 (1-based), found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, image_size, image_size), labels.astype(np.int64) - 1


# ----------------------------------------------------------------------------------------------
# Image files

# PIL modes read as one grey channel; every other mode ("P" included: a palette may hold colours)
# is read as RGB.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# 16-bit grey. PIL converts these to "L" by clipping at 255 (a 16-bit image comes out near-white),
# so they are scaled here: v / 257 maps 0..65535 onto 0..255 (65535 = 255 * 257).
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


class BadFileError(DataError):
    """An image file that cannot be used (unreadable, truncated, out-of-range pixels, too large).

    Raised in a DataLoader worker it reaches the main process as ``BadFileError(msg)``, ``msg``
    being torch's "Caught BadFileError in DataLoader worker process 0. Original Traceback ..."
    (``torch._utils.ExceptionWrapper.reraise``); the one-line message is then taken back from the
    traceback's last line, so the user sees what a run without workers shows.
    """

    def __init__(self, message: str):
        if message.startswith("Caught ") and "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]  # "unidiff.data.readers.BadFileError: <message>"
            name, sep, original = last.partition(": ")
            if sep and name.endswith("BadFileError"):
                message = original
        super().__init__(message)
        self.path: Optional[str] = None
        self.reason: str = message

    @classmethod
    def of(cls, path: str, reason: str) -> "BadFileError":
        """``cannot read image file <path> (<reason>)``, with both kept as attributes."""
        err = cls(f"cannot read image file {path} ({reason})")
        err.path, err.reason = path, reason
        return err


def one_line(e: BaseException) -> str:
    """``Type: message`` of an exception on one line (decoder messages may hold newlines)."""
    return " ".join(f"{type(e).__name__}: {e}".split())


def _to_8bit(im, path: str):
    """A high-bit-depth or float PIL image as 8-bit "L"; any other image unchanged.

    16-bit grey ("I;16*", and "I" holding 0..65535, as older Pillow reads 16-bit PNGs): v / 257,
    rounded. 32-bit float ("F", float TIFFs): values in [0, 1] are intensities, x * 255 rounded;
    anything else (negative, above 1, non-finite: no scale can be guessed) is refused. 16-bit RGB
    PNGs need nothing here: Pillow reads them as 8-bit RGB (the high byte of each sample).
    """
    from PIL import Image

    if im.mode in SIXTEEN_BIT_MODES or im.mode == "I":
        arr = np.asarray(im).astype(np.int64)  # (H, W)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise BadFileError.of(path, f"32-bit integer pixels {arr.min()}..{arr.max()} are outside 0..65535 "
                                        "(16-bit); save it with 8 or 16 bits per sample")
        return Image.fromarray(np.rint(arr / 257.0).astype(np.uint8), "L")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)  # (H, W)
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
            lo, hi = np.nanmin(arr), np.nanmax(arr)
            raise BadFileError.of(path, f"float pixels {lo:g}..{hi:g} ({int((~np.isfinite(arr)).sum())} non-finite) "
                                        "are not intensities in [0, 1]; rescale it to [0, 1]")
        return Image.fromarray(np.rint(arr * 255.0).astype(np.uint8), "L")
    return im


def read_image(path: str, mode: str):
    """The image file ``path`` fully decoded as an 8-bit PIL image of ``mode`` ("L" or "RGB").

    High-bit-depth and float pixels are scaled (:func:`_to_8bit`), grey is repeated into RGB and
    colour made grey by PIL's ITU-R 601 luma. A file PIL cannot decode (corrupt, truncated, empty),
    one above PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, twice of it raises)
    or one whose pixels have no intensity scale is a :class:`BadFileError` naming it.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, inside this try
            return _to_8bit(im, path).convert(mode)
    except BadFileError:
        raise
    except Image.DecompressionBombError as e:
        raise BadFileError.of(path, f"too large to decode: {e} Shrink it or remove it") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure (OSError, SyntaxError, zlib.error, ...) is the file's
        raise BadFileError.of(path, one_line(e)) from None


def folder_mode(paths: Sequence[str]) -> str:
    """"RGB" if any of the image files is colour, else "L" (grey, 16-bit and float files).

    Only the headers are read, and only up to the first colour file: a colour dataset costs one
    open, a grey one a pass over its headers (``data.channels`` skips it). Unreadable files are
    passed over; decoding them later is what ``data.on_bad_file`` rules.
    """
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as im:
                if im.mode not in GREY_MODES:
                    return "RGB"
        except Exception:  # noqa: BLE001 - a bad file is reported when it is decoded
            continue
    return "L"


# ----------------------------------------------------------------------------------------------
# ImageNet folders

IMAGENET_EXTENSIONS = (".jpeg", ".jpg", ".png")


def _images_in(folder: str) -> List[str]:
    with os.scandir(folder) as it:
        names = [e.name for e in it if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGENET_EXTENSIONS]
    return [os.path.join(folder, n) for n in sorted(names)]


def read_synset_mapping(path: str) -> Dict[str, str]:
    """``LOC_synset_mapping.txt`` (``n01440764 tench, Tinca tinca`` per line) -> wnid -> first name."""
    out: Dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            wnid, _, names = line.strip().partition(" ")
            if not names:
                raise DataError(f"{path}, line {number}: expected '<wnid> <names>', got {line.strip()!r}")
            out[wnid] = names.split(",")[0].strip()
    return out


def read_val_solution(path: str) -> Dict[str, str]:
    """``LOC_val_solution.csv`` (``ImageId,PredictionString``; the string starts with the wnid) -> image id -> wnid."""
    out: Dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise DataError(f"{path}: expected the columns ImageId,PredictionString, found {reader.fieldnames}")
        for row in reader:
            boxes = (row["PredictionString"] or "").split()
            if not boxes:
                raise DataError(f"{path}: image {row['ImageId']} has no label")
            out[row["ImageId"]] = boxes[0]
    return out


def scan_imagenet(root: str) -> Tuple[List[Tuple[str, int]], List[Tuple[str, int]], List[str], List[str]]:
    """The ILSVRC-2012 layout under ``root`` -> ``(train, val, wnids, class_names)``.

    ``train``/``val`` are sorted ``(path, label)`` lists, labels the index of the wnid in the sorted
    wnids of ``train/`` (torchvision's ImageFolder convention, and the order of the official
    ``LOC_synset_mapping.txt``). ``val/`` is either ``val/<wnid>/*`` or flat, labelled by
    ``root/LOC_val_solution.csv``. Class names come from ``root/LOC_synset_mapping.txt`` when present
    (the first name of each line), else they are the wnids.
    """
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    for d in (train_dir, val_dir):
        if not os.path.isdir(d):
            raise DataError(f"ImageNet layout: {d} is missing (expected {root}/train/<wnid>/*.JPEG and {root}/val/)")
    wnids = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if not wnids:
        raise DataError(f"ImageNet layout: no class folders in {train_dir}")
    index = {w: i for i, w in enumerate(wnids)}
    train = [(p, index[w]) for w in wnids for p in _images_in(os.path.join(train_dir, w))]
    sub = sorted(e.name for e in os.scandir(val_dir) if e.is_dir())
    if sub:
        unknown = sorted(set(sub) - set(index))
        if unknown:
            raise DataError(f"ImageNet layout: {val_dir} has class folders not in train/: {', '.join(unknown[:5])}")
        val = [(p, index[w]) for w in sub for p in _images_in(os.path.join(val_dir, w))]
    else:
        solution = os.path.join(root, "LOC_val_solution.csv")
        if not os.path.isfile(solution):
            raise DataError(f"ImageNet layout: {val_dir} is flat but {solution} (its labels) is missing")
        labels = read_val_solution(solution)
        val = []
        for p in _images_in(val_dir):
            stem = os.path.splitext(os.path.basename(p))[0]
            wnid = labels.get(stem)
            if wnid is None or wnid not in index:
                what = "has no row in" if wnid is None else f"is labelled {wnid} (not a train/ class) in"
                raise DataError(f"ImageNet layout: {p} {what} {solution}")
            val.append((p, index[wnid]))
    mapping_path = os.path.join(root, "LOC_synset_mapping.txt")
    mapping = read_synset_mapping(mapping_path) if os.path.isfile(mapping_path) else {}
    names = [mapping.get(w, w) for w in wnids]
    return train, val, wnids, names


def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
    """ADM's ``center_crop_arr`` (guided-diffusion ``image_datasets.py``; DiT uses it too): halve the
    image with a box filter while its short side is at least twice ``image_size`` (cheap and
    alias-free), resize with bicubic so the short side is ``image_size``, centre-crop.
    Returns (image_size, image_size[, C]) uint8."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


def find_file(root: str, name: str, suffixes=("", ".gz")) -> Optional[str]:
    """``root/name`` with the first of ``suffixes`` that exists, else None."""
    for s in suffixes:
        path = os.path.join(root, name + s)
        if os.path.isfile(path):
            return path
    return None
