"""The memory-mapped cache of downsampled ImageNet: converted once from the npz batches, then read
row by row, so training never holds the 1.28M images in RAM.

A cache folder ``<data.cache_dir>/imagenet<S>_<key>/`` holds, per split, ``<split>_images.npy``
((N, 3, S, S) uint8, opened with ``mmap_mode="r"``) and ``<split>_labels.npy`` ((N,) int64,
0-based), and ``manifest.json``: the source files (name, size, sha256), each split's size and the
sha256 of its image and label bytes. ``key`` hashes the source files' names, sizes and
modification times, so new or replaced npz files make a new cache; a cache whose manifest or array
sizes disagree is rebuilt. Conversion reads one npz file at a time, builds the folder under a
temporary name and publishes it by rename (:func:`unidiff.io.atomic_dir`), under a file lock so
that the processes of a multi-process run convert it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from typing import Dict, List, Tuple

import numpy as np

from ..errors import DataError
from ..io import atomic_dir, write_json
from .readers import read_npz_batch

CACHE_VERSION = 1
TRAIN_PATTERN = re.compile(r"train_data_batch_(\d+)\.npz$")
VAL_FILE = "val_data.npz"


def npz_files(root: str) -> Dict[str, List[str]]:
    """The official files under ``root``: ``{"train": [train_data_batch_1..K.npz], "val": [val_data.npz]}``.

    The train batches must be numbered 1..K without gaps (the official release has K = 10).
    """
    if not os.path.isdir(root):
        raise DataError(f"data.root={root} is not an existing folder")
    numbered = {}
    for name in os.listdir(root):
        m = TRAIN_PATTERN.match(name)
        if m:
            numbered[int(m.group(1))] = os.path.join(root, name)
    if not numbered:
        raise DataError(f"no train_data_batch_<k>.npz files in {root} (the downsampled-ImageNet npz release)")
    missing = sorted(set(range(1, max(numbered) + 1)) - set(numbered))
    if missing:
        raise DataError(f"{root}: train_data_batch_{missing[0]}.npz is missing (found {sorted(numbered)})")
    val = os.path.join(root, VAL_FILE)
    if not os.path.isfile(val):
        raise DataError(f"{val} is missing (the validation batch of the downsampled-ImageNet npz release)")
    return {"train": [numbered[k] for k in sorted(numbered)], "val": [val]}


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _source_key(files: Dict[str, List[str]], image_size: int) -> str:
    ident = [CACHE_VERSION, image_size]
    for split in ("train", "val"):
        for p in files[split]:
            st = os.stat(p)
            ident.append([split, os.path.basename(p), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


def _convert(out: str, files: Dict[str, List[str]], image_size: int) -> None:
    """Write the arrays and the manifest of a cache into the (temporary) folder ``out``."""
    manifest = {"version": CACHE_VERSION, "image_size": image_size, "sources": [], "splits": {}}
    for split, paths in files.items():
        counts = []
        for p in paths:  # first pass: labels only (np.load reads one member of the archive)
            with np.load(p) as f:
                counts.append(int(np.asarray(f["labels"]).size) if "labels" in f else 0)
        n = sum(counts)
        images = np.lib.format.open_memmap(os.path.join(out, f"{split}_images.npy"), mode="w+", dtype=np.uint8,
                                           shape=(n, 3, image_size, image_size))
        labels = np.empty(n, dtype=np.int64)
        h, start = hashlib.sha256(), 0
        for p, count in zip(paths, counts):
            x, y = read_npz_batch(p, image_size)  # (n_k, 3, S, S) uint8, (n_k,) 0-based
            if len(y) != count:
                raise DataError(f"{p}: {len(y)} labels on reading, {count} in the first pass")
            images[start: start + count] = x
            labels[start: start + count] = y
            h.update(np.ascontiguousarray(x).tobytes())
            start += count
            manifest["sources"].append({"split": split, "name": os.path.basename(p), "size": os.path.getsize(p),
                                        "sha256": _file_sha256(p)})
        images.flush()
        del images
        np.save(os.path.join(out, f"{split}_labels.npy"), labels)
        manifest["splits"][split] = {"n": n, "images_sha256": h.hexdigest(),
                                     "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest()}
    write_json(os.path.join(out, "manifest.json"), manifest)


def _load(folder: str, image_size: int) -> Dict[str, Tuple[str, np.ndarray, str]]:
    """The cache in ``folder``: split -> (images .npy path, labels, images checksum); raises
    :class:`DataError` if anything disagrees with the manifest (the caller rebuilds)."""
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            manifest = json.load(f)
        out = {}
        for split in ("train", "val"):
            entry = manifest["splits"][split]
            path = os.path.join(folder, f"{split}_images.npy")
            images = np.load(path, mmap_mode="r")
            labels = np.load(os.path.join(folder, f"{split}_labels.npy"))
            if images.shape != (entry["n"], 3, image_size, image_size) or images.dtype != np.uint8:
                raise DataError(f"{path}: shape {images.shape}, manifest says {entry['n']} images")
            if hashlib.sha256(labels.tobytes()).hexdigest() != entry["labels_sha256"]:
                raise DataError(f"{folder}: {split} labels do not match their checksum")
            out[split] = (path, labels, entry["images_sha256"])
        return out
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"cache {folder} is unreadable: {e}") from e


def verify_cache(folder: str) -> None:
    """Recompute the image checksums of a cache folder (reads every byte); :class:`DataError` on a mismatch."""
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    for split, entry in manifest["splits"].items():
        images = np.load(os.path.join(folder, f"{split}_images.npy"), mmap_mode="r")
        h = hashlib.sha256()
        for start in range(0, len(images), 4096):
            h.update(np.ascontiguousarray(images[start: start + 4096]).tobytes())
        if h.hexdigest() != entry["images_sha256"]:
            raise DataError(f"{folder}: {split}_images.npy does not match its checksum in manifest.json")


def npz_cache(root: str, image_size: int, cache_dir: str) -> Tuple[str, Dict[str, Tuple[str, np.ndarray, str]]]:
    """The cache of the npz release in ``root`` (converted on first use): ``(folder, split -> (images
    path, labels, checksum))``."""
    files = npz_files(root)
    folder = os.path.join(os.path.expanduser(cache_dir), f"imagenet{image_size}_{_source_key(files, image_size)}")
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other processes wait for the first one's conversion
        if os.path.isdir(folder):
            try:
                return folder, _load(folder, image_size)
            except DataError:
                pass  # a damaged cache: convert again (atomic_dir replaces the folder)
        with atomic_dir(folder) as tmp:
            _convert(str(tmp), files, image_size)
        return folder, _load(folder, image_size)
