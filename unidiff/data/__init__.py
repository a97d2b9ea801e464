"""Datasets for unidiff: every item is a dict of tensors, images in ``[-1, 1]``.

An item is ``{"image": (C, H, W) float32 in [-1, 1], "label": () int64}``; paired data adds
``"source": (C_src, H, W)`` (the other domain of DESIGN.md §4, "image transition"), and
``data.extra_file`` adds per-item tensors such as ``"representation"`` (K,). Batches are the same
dicts with a leading batch dimension (docs/CONTRACTS.md, "Tensors").

The package owns everything between a ``data:`` config section and a batch on the device:

- ``config``: :class:`DataConfig` (the schema), :class:`DataInfo`, :func:`build_datasets`;
- ``sources``: one builder per ``data.name`` (embedded digits, ImageFolder, MNIST, CIFAR-10,
  paired folders) in the :data:`SOURCES` registry, the seeded stratified split;
- ``datasets``: the containers :class:`InMemoryDataset` (a batch is one index operation) and the
  lazy :class:`FolderDataset`, and image-file decoding (:func:`load_image`);
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
from .datasets import RESERVED_KEYS, AnyDataset, FolderDataset, InMemoryDataset, load_image
from .extras import save_extra_file
from .latents import LatentDataset, load_latent_cache
from .sources import AUTO_MEMORY_BYTES, DATASET_NAMES, DIGIT_NAMES, SOURCES, stratified_split

__all__ = [
    "DataConfig", "DataInfo", "DatasetName", "build_datasets", "validate_data_config",
    "SOURCES", "DATASET_NAMES", "DIGIT_NAMES", "AUTO_MEMORY_BYTES", "stratified_split",
    "InMemoryDataset", "FolderDataset", "AnyDataset", "RESERVED_KEYS", "load_image",
    "save_extra_file", "LatentDataset", "load_latent_cache",
    "BatchOrder", "infinite_batches", "iter_batches", "rank_rows",
]
