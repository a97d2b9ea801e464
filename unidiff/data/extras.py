"""Per-item extra tensors (``data.extra_file``): write them, check them, attach them to the splits.

The file is safetensors with tensors named ``train.<key>`` and ``val.<key>``, row ``i`` belonging
to item ``i`` of that split as :func:`unidiff.data.build_datasets` returns it (after the seeded
split and ``max_items``). Items and batches then also carry ``<key>``, e.g. the frozen-encoder
vectors ``"representation"`` (N, K) of DESIGN.md §4, so a modality reads them like any dataset
field. The metadata may hold ``fingerprint.<split>`` (:meth:`InMemoryDataset.fingerprint`), which
guards against a file made for another split of the same size.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple, Union

import torch

from ..errors import DataError
from ..io import atomic_write
from .datasets import RESERVED_KEYS, AnyDataset, InMemoryDataset


def save_extra_file(
    path: Union[str, os.PathLike],
    extras: Dict[str, Dict[str, torch.Tensor]],
    fingerprints: Optional[Dict[str, str]] = None,
) -> None:
    """Write a ``data.extra_file`` atomically: ``extras[split][key]`` (N_split, ...) as ``<split>.<key>``.

    ``fingerprints[split]`` (:meth:`InMemoryDataset.fingerprint` of the split the rows belong to)
    goes into the file's metadata; :func:`unidiff.data.build_datasets` then refuses the file for
    other data.
    """
    from safetensors.torch import save_file

    tensors = {f"{split}.{key}": v.detach().cpu().contiguous() for split, d in extras.items() for key, v in d.items()}
    metadata = {f"fingerprint.{split}": fp for split, fp in (fingerprints or {}).items()}
    path = os.fspath(path)
    # A reader (another arm's evaluate) sees the old file or the new one, never half of one.
    atomic_write(path, lambda p: save_file(tensors, p, metadata=metadata or None))


def attach_extras(extra_file: str, train: AnyDataset, val: AnyDataset) -> Tuple[InMemoryDataset, InMemoryDataset]:
    """The splits with the tensors of ``extra_file`` attached (module docstring); every way the
    file can disagree with the data is a :class:`DataError` naming the file and the key."""
    from safetensors import SafetensorError, safe_open

    path = os.path.expanduser(str(extra_file))
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
