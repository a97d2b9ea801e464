"""Datasets for unidiff: every item is a dict of tensors, images in ``[-1, 1]``.

An item is ``{"image": (C, H, W) float32 in [-1, 1], "label": () int64}``; paired data adds
``"source": (C_src, H, W)`` (the other domain of DESIGN.md §4, "image transition"), and
``data.extra_file`` adds per-item tensors such as ``"representation"`` (K,). Batches are the same
dicts with a leading batch dimension (docs/CONTRACTS.md, "Tensors").

The package owns everything between a ``data:`` config section and a batch on the device:

- ``config``: :class:`DataConfig` (the schema), :class:`DataInfo`, :func:`build_datasets`;
- ``sources``: one builder per ``data.name`` (embedded digits, ImageFolder, MNIST, CIFAR-10,
  paired folders, Fashion-MNIST, ImageNet folders, downsampled ImageNet 32/64) in the
  :data:`SOURCES` registry, the seeded stratified split;
- ``datasets``: the containers :class:`InMemoryDataset` (a batch is one index operation; float or
  uint8 pixels), the lazy :class:`FolderDataset`, :class:`ImageFileDataset` (ImageNet files,
  ``data.on_bad_file``) and :class:`ArrayDataset` (a memory-mapped uint8 array), and image-file
  decoding (:func:`load_image`); the one bad-file policy ``data.on_bad_file`` and its list
  (:func:`bad_files`, :func:`write_bad_files`: ``RUN_DIR/bad_files.txt``);
- ``readers``: the official file formats (idx, downsampled-ImageNet npz, the ILSVRC folder layout),
  ADM's :func:`center_crop_arr`, and :func:`read_image` (any image file as 8-bit L/RGB: 16-bit and
  float pixels scaled; corrupt, truncated or oversized files a :class:`BadFileError`);
- ``cache``: downsampled ImageNet converted once into memory-mapped arrays with a manifest
  (:func:`npz_cache`, :func:`verify_cache`);
- ``extras``: per-item extra tensors (``data.extra_file``; :func:`save_extra_file`);
- ``latents``: the ``data.latents`` source, a VAE latent cache (:class:`LatentDataset`,
  :func:`load_latent_cache`; written by :func:`unidiff.latents.build_latent_cache`);
- ``batches``: the deterministic training order (:class:`BatchOrder`, a function of
  ``(seed, step)`` only, so a resumed run sees the batches an uninterrupted one would), each
  process's share of it (:func:`infinite_batches` with ``rank``/``world_size``), and the in-order
  evaluation pass :func:`iter_batches`.

Everything public is re-exported here: import from ``unidiff.data``.
"""

from .batches import BatchOrder, infinite_batches, iter_batches, rank_rows
from .config import DataConfig, DataInfo, DatasetName, build_datasets, validate_data_config
from .cache import npz_cache, verify_cache
from .datasets import (BAD_FILES_KEY, RESERVED_KEYS, AnyDataset, ArrayDataset, FolderDataset, ImageFileDataset,
                       InMemoryDataset, bad_files, decode_pixels, load_image, report_bad_files, write_bad_files)
from .extras import save_extra_file
from .latents import LatentDataset, load_latent_cache
from .readers import BadFileError, center_crop_arr, read_idx, read_image, read_npz_batch, scan_imagenet
from .sources import (AUTO_MEMORY_BYTES, DATASET_NAMES, DIGIT_NAMES, FASHION_NAMES, FASHION_ROOT, SOURCES,
                      stratified_split)

__all__ = [
    "DataConfig", "DataInfo", "DatasetName", "build_datasets", "validate_data_config",
    "SOURCES", "DATASET_NAMES", "DIGIT_NAMES", "AUTO_MEMORY_BYTES", "stratified_split",
    "FASHION_NAMES", "FASHION_ROOT",
    "InMemoryDataset", "FolderDataset", "ArrayDataset", "ImageFileDataset", "AnyDataset", "RESERVED_KEYS",
    "BAD_FILES_KEY", "load_image", "decode_pixels", "report_bad_files", "bad_files", "write_bad_files",
    "BadFileError", "read_image", "read_idx", "read_npz_batch", "scan_imagenet", "center_crop_arr", "npz_cache", "verify_cache",
    "save_extra_file",
    "LatentDataset", "load_latent_cache",
    "BatchOrder", "infinite_batches", "iter_batches", "rank_rows",
]
