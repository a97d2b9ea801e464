"""The ``data.latents`` source: a VAE latent cache written by ``unidiff latents CONFIG``.

A cache folder holds ``manifest.json`` and ``train/shard_00000.safetensors``, ...,
``val/shard_00000.safetensors``, ... (the writer, :func:`unidiff.latents.build_latent_cache`, owns
the format). Each shard has ``latents`` (N, C, h, w) fp16 or fp32, ``labels`` (N,) int64 and, for
train shards of a cache made with ``data.hflip``, ``latents_flipped``: the latents of the mirrored
images. The manifest records what made it (the pixel data's config and fingerprints, the VAE's
identity, ``scaling_factor``/``shift_factor``) and each shard's item count and sha256.

:func:`load_latent_cache` checks all of it before returning data: the cache is complete, it was made
from the data config given (every ``data.*`` key that defines the pixels; ``root`` and the runtime
keys aside, so a moved dataset keeps its cache), every shard's checksum verifies (a tampered or
truncated shard is a one-line :class:`DataError` naming it), ``data.hflip`` has flipped copies to
use. The splits are :class:`LatentDataset` (in memory, in the storage dtype; batches are float32).

Flips: a batch's flipped items take the stored latents of the mirrored images
(:meth:`LatentDataset.flipped_batch`, called by :func:`unidiff.data.infinite_batches`), never a
mirrored latent.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..errors import ConfigError, DataError
from .datasets import InMemoryDataset

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# data.* keys that do not change the pixels a cache is made of (where the files are, how they are
# loaded, augmentation, the guard, the cache itself): left out of the data signature.
RUNTIME_KEYS = ("root", "download", "in_memory", "num_workers", "hflip", "num_classes", "extra_file", "latents")


def shard_name(index: int) -> str:
    """The file name of shard ``index``: ``shard_00000.safetensors``."""
    return f"shard_{index:05d}.safetensors"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file's bytes (read in 16 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def data_signature(data_cfg) -> Dict[str, Any]:
    """The ``data.*`` values that define a cache's pixels (all keys but :data:`RUNTIME_KEYS`)."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(data_cfg, resolve=True) if not isinstance(data_cfg, dict) else dict(data_cfg)
    return {k: v for k, v in sorted(values.items()) if k not in RUNTIME_KEYS}


def read_manifest(folder: str | os.PathLike) -> Dict[str, Any]:
    """The parsed ``manifest.json`` of a cache folder (a :class:`DataError` naming it when unreadable)."""
    path = Path(folder) / MANIFEST
    where = f"data.latents={str(folder)!r}"
    if not Path(folder).is_dir():
        raise DataError(f"{where} is not a folder; build the cache with `unidiff latents CONFIG`")
    if not path.is_file():
        raise DataError(f"{where} has no {MANIFEST}; build the cache with `unidiff latents CONFIG`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{where}: {MANIFEST} cannot be read: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{where}: {MANIFEST} is not a unidiff latent cache manifest (format {MANIFEST_FORMAT})")
    return manifest


class LatentDataset(InMemoryDataset):
    """Cached latents as an :class:`InMemoryDataset` whose ``images`` are latents in the storage dtype.

    images:  (N, C, h, w) fp16 or fp32 latents (normalised: ``(z - shift) * scale``).
    labels:  (N,) int64.
    flipped: (N, C, h, w) latents of the horizontally mirrored images, or None.
    Items and batches carry ``"image"`` as float32.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, flipped: Optional[torch.Tensor] = None,
                 hflip: bool = False):
        super().__init__(images, labels, hflip=hflip)
        if flipped is not None and flipped.shape != images.shape:
            raise ValueError(f"flipped latents {tuple(flipped.shape)} and latents {tuple(images.shape)} differ in shape")
        if hflip and flipped is None:
            raise ValueError("hflip on a latent dataset needs the latents of the flipped images")
        self.flipped = flipped

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"image": self.images[i].float(), "label": self.labels[i]}

    def batch(self, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        """index: (B,) int64 on the dataset's device -> ``{"image": (B, C, h, w) float32, "label": (B,)}``."""
        return {"image": self.images[index].float(), "label": self.labels[index]}

    def flipped_batch(self, index: torch.Tensor, flip: torch.Tensor) -> Dict[str, torch.Tensor]:
        """:meth:`batch` with items ``flip`` ((B,) bool) taken from the mirrored images' latents."""
        out = self.batch(index)
        flip = flip.to(self.images.device)
        out["image"] = torch.where(flip[:, None, None, None], self.flipped[index].float(), out["image"])
        return out

    def subset(self, index) -> "LatentDataset":
        index = torch.as_tensor(index, dtype=torch.long, device=self.images.device)
        flipped = None if self.flipped is None else self.flipped[index]
        return LatentDataset(self.images[index], self.labels[index], flipped, self.hflip)

    def to(self, device) -> "LatentDataset":
        flipped = None if self.flipped is None else self.flipped.to(device)
        return LatentDataset(self.images.to(device), self.labels.to(device), flipped, self.hflip)


def _load_split(folder: Path, manifest: Dict[str, Any], split: str, hflip: bool) -> LatentDataset:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = manifest["splits"][split]
    parts: Dict[str, List[torch.Tensor]] = {"latents": [], "latents_flipped": [], "labels": []}
    for entry in info["shards"]:
        path = folder / entry["file"]
        name = f"data.latents={str(folder)!r}: shard {entry['file']}"
        if not path.is_file():
            raise DataError(f"{name} is missing; rerun `unidiff latents CONFIG` to rebuild it")
        if sha256_file(path) != entry["sha256"]:
            raise DataError(f"{name} does not match its checksum in {MANIFEST} (tampered or truncated); "
                            "rerun `unidiff latents CONFIG` to rebuild it")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise DataError(f"{name} cannot be read: {err}") from None
        if tensors["latents"].shape[0] != entry["count"] or tensors["labels"].shape[0] != entry["count"]:
            raise DataError(f"{name} holds {tensors['latents'].shape[0]} items, the manifest says {entry['count']}")
        for key in parts:
            if key in tensors:
                parts[key].append(tensors[key])
    if sum(e["count"] for e in info["shards"]) != info["count"]:
        raise DataError(f"data.latents={str(folder)!r}: the {split} shards do not add up to {info['count']} items")
    C, h, w = manifest["latent_shape"]
    latents = torch.cat(parts["latents"]) if parts["latents"] else torch.zeros(0, C, h, w)
    labels = torch.cat(parts["labels"]).long() if parts["labels"] else torch.zeros(0, dtype=torch.long)
    flipped = torch.cat(parts["latents_flipped"]) if hflip else None
    return LatentDataset(latents, labels, flipped, hflip=hflip)


def load_latent_cache(cfg) -> Tuple[LatentDataset, LatentDataset, List[str], Dict[str, Any]]:
    """``(train, val, class_names, meta)`` of the cache ``data.latents`` after every check of the
    module docstring; ``meta`` is what :class:`~unidiff.data.DataInfo` carries as ``latents``:
    ``{"folder", "vae": {path, config_sha256, weights_sha256, scaling_factor, shift_factor},
    "pixel_shape", "latent_shape"}``."""
    folder = Path(os.path.expanduser(str(cfg.latents)))
    where = f"data.latents={str(folder)!r}"
    if cfg.extra_file is not None:
        raise ConfigError("data.extra_file: per-item extras are not supported with data.latents")
    manifest = read_manifest(folder)
    if not manifest.get("complete"):
        raise DataError(f"{where} is incomplete (interrupted?); rerun `unidiff latents CONFIG` to finish it")
    made, given = manifest["data"], data_signature(cfg)
    for key in sorted(set(made) | set(given)):
        if key in made and key in given and made[key] != given[key]:
            raise DataError(f"data.{key}={given[key]!r} but the latent cache {str(folder)!r} was made with "
                            f"data.{key}={made[key]!r}")
    hflip = bool(cfg.hflip)
    if hflip and not manifest.get("flip"):
        raise DataError(f"data.hflip=true but {where} holds no flipped copies; rebuild it with data.hflip=true "
                        "(a mirrored latent is not the latent of a mirrored image)")
    train = _load_split(folder, manifest, "train", hflip)
    val = _load_split(folder, manifest, "val", False)
    meta = {"folder": str(folder), "vae": dict(manifest["vae"]), "pixel_shape": list(manifest["pixel_shape"]),
            "latent_shape": list(manifest["latent_shape"])}
    return train, val, list(manifest["class_names"]), meta
