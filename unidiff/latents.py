"""Latent space (DESIGN.md §1: "one diffusion variable in a common space: pixels, or VAE latents").

A run trains in the latent space of a diffusers ``AutoencoderKL`` when its config names one
(``model.vae.path``) and reads a latent cache (``data.latents``). This module owns the VAE side:

- :func:`load_vae`: the ``AutoencoderKL`` of a local folder (``from_pretrained(..., local_files_only=True)``;
  a diffusers pipeline folder's ``vae/`` sub-folder too) or of a hub id (needs the network; offline it
  is a one-line :class:`ConfigError`);
- :class:`LatentCodec`: ``encode`` images in ``[-1, 1]`` to ``(z - shift_factor) * scaling_factor``
  (``z`` the posterior mean, or a sample of it) and ``decode`` back, the factors read from the VAE's
  own config unless the run config fixes them (diffusers' SD/SD3/Flux convention), and the VAE's
  identity (a hash of its config and one of its weights) that a cache records;
- :func:`build_latent_cache`: ``unidiff latents CONFIG``: the config's pixel data
  (``unidiff.data.build_datasets`` with ``data.latents`` unset: the source's own preprocessing)
  encoded once into ``data.latents``: ``train/shard_00000.safetensors``, ... and ``val/...``, each
  holding ``latents`` (N, C, h, w) fp16/fp32 and ``labels`` (N,) int64 (with ``data.hflip`` the
  train shards also hold ``latents_flipped``: the latents of the mirrored images, fast-DiT's
  augmentation: a mirrored latent is not the latent of a mirrored image), and ``manifest.json``
  (the data config and fingerprints, the VAE identity and factors, per-shard counts and sha256).
  Every file is written atomically (:mod:`unidiff.io`) and the manifest after every shard, so an
  interrupted run resumes: shards whose checksum verifies are kept, the rest are encoded again;
- :func:`resolve_vae`: the resolved config's ``model.vae`` from the cache's manifest, and
  :func:`decode_samples`: model outputs back to pixels for sampling (identity for pixel runs).

Reading a cache (the ``data.latents`` source, manifest checks, tampered shards) is
:mod:`unidiff.data.latents`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from .data.latents import (
    MANIFEST,
    MANIFEST_FORMAT,
    data_signature,
    read_manifest,
    sha256_file,
    shard_name,
)
from .errors import ConfigError, DataError
from .io import atomic_write, generator_for, write_json

# Storage dtypes of a cache (``unidiff latents --dtype``).
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
# Which latent of the posterior is cached (``unidiff latents --posterior``).
POSTERIORS = ("mean", "sample")


# --- the VAE --------------------------------------------------------------------------------------
def load_vae(path: str, device: str | torch.device = "cpu"):
    """The ``AutoencoderKL`` at ``path`` (a local folder, else a hub id), in eval mode on ``device``.

    A folder holds ``config.json`` + weights (``save_pretrained``), or is a diffusers pipeline whose
    ``vae/`` sub-folder does. Anything else is a one-line :class:`ConfigError` naming ``model.vae.path``.
    """
    from diffusers import AutoencoderKL

    where = f"model.vae.path={path!r}"
    local = Path(os.path.expanduser(str(path)))
    if local.is_dir():
        sub = None if (local / "config.json").is_file() else ("vae" if (local / "vae" / "config.json").is_file() else "")
        if sub == "":
            raise ConfigError(f"{where}: folder has no config.json (nor vae/config.json): not a diffusers AutoencoderKL")
        try:
            vae = AutoencoderKL.from_pretrained(str(local), subfolder=sub, local_files_only=True)
        except (OSError, ValueError, EnvironmentError) as err:
            raise ConfigError(f"{where}: cannot load the AutoencoderKL: {str(err).splitlines()[0]}") from None
    elif local.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
        raise ConfigError(f"{where} is neither a folder nor a hub id like 'stabilityai/sd-vae-ft-ema'")
    else:
        try:
            vae = AutoencoderKL.from_pretrained(str(path))
        # The hub raises a zoo of types (OSError, HTTP, connection, offline mode): all mean "not here".
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"{where}: not a local folder, and the hub id could not be loaded "
                              f"(offline? download it and give the folder): {str(err).splitlines()[0]}") from None
    return vae.to(device).eval().requires_grad_(False)


def vae_identity(vae) -> Dict[str, str]:
    """``{"config_sha256", "weights_sha256"}``: what a cache records of the VAE that made it (the
    config without diffusers' bookkeeping keys ``_*``; the weights in state-dict order)."""
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    h = hashlib.sha256()
    for name, t in vae.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return {"config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
            "weights_sha256": h.hexdigest()}


@dataclass
class LatentCodec:
    """A VAE and its latent normalisation: ``z_S = (z - shift_factor) * scaling_factor``.

    ``scaling_factor``/``shift_factor``: None reads them from the VAE's config (``shift_factor``
    absent or null there is 0). The downsampling factor is ``2 ** (len(block_out_channels) - 1)``.
    """

    vae: Any
    scaling_factor: Optional[float] = None
    shift_factor: Optional[float] = None

    def __post_init__(self):
        cfg = self.vae.config
        if self.scaling_factor is None:
            self.scaling_factor = float(cfg.get("scaling_factor", 1.0) or 1.0)
        if self.shift_factor is None:
            self.shift_factor = float(cfg.get("shift_factor", None) or 0.0)
        self.scaling_factor, self.shift_factor = float(self.scaling_factor), float(self.shift_factor)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.channels = int(cfg.latent_channels)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def latent_shape(self, image_shape) -> Tuple[int, int, int]:
        """(C, H, W) of the pixels -> (latent_channels, H / f, W / f); the VAE's input channels must match."""
        C, H, W = (int(s) for s in image_shape)
        f = self.downsample
        if C != int(self.vae.config.in_channels):
            raise ConfigError(f"model.vae.path: the VAE takes {self.vae.config.in_channels}-channel images, the data has {C}")
        if H % f or W % f:
            raise ConfigError(f"model.vae.path: image size {H}x{W} is not divisible by the VAE's downsampling factor {f}")
        return self.channels, H // f, W // f

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """images (B, C, H, W) in [-1, 1] -> latents (B, c, h, w) float32, normalised (posterior mean,
        or a draw from it with ``sample``)."""
        dist = self.vae.encode(images.to(self.device, torch.float32)).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return ((z - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, c, h, w), normalised -> images (B, C, H, W) float32 clamped to [-1, 1]."""
        z = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.float().clamp(-1.0, 1.0)


# --- the config ------------------------------------------------------------------------------------
def vae_path(cfg: DictConfig) -> Optional[str]:
    """``model.vae.path`` of a run config (None: pixel space)."""
    vae = cfg.model.get("vae") if "model" in cfg else None
    return None if vae is None or vae.get("path") is None else str(vae.path)


def resolve_vae(cfg: DictConfig, info: Any) -> None:
    """Fill ``model.vae`` of a writable ``cfg`` from the data (the latent cache's manifest, carried
    in ``info.latents``): the path when unset, the factors always. A value the cache contradicts is a
    :class:`ConfigError` naming the key; a VAE without a latent cache is one too (DESIGN.md §1: the
    diffusion runs on the cached latents, not on images encoded during training)."""
    meta = getattr(info, "latents", None)
    path = vae_path(cfg)
    if meta is None:
        if path is not None:
            raise ConfigError(f"model.vae.path={path!r} is set but data.latents is not: encode the data once with "
                              "`unidiff latents CONFIG` and train on that cache (data.latents=<folder>)")
        return
    made = meta["vae"]
    for key in ("scaling_factor", "shift_factor"):
        given = cfg.model.vae.get(key)
        if given is not None and abs(float(given) - float(made[key])) > 1e-12:
            raise ConfigError(f"model.vae.{key}={given} but the latent cache {meta['folder']!r} was encoded with {made[key]}")
    with open_dict(cfg.model):
        cfg.model.vae.path = path if path is not None else made["path"]
        cfg.model.vae.scaling_factor = float(made["scaling_factor"])
        cfg.model.vae.shift_factor = float(made["shift_factor"])


@lru_cache(maxsize=2)
def _cached_codec(path: str, scaling_factor: Optional[float], shift_factor: Optional[float], device: str) -> LatentCodec:
    return LatentCodec(load_vae(path, device), scaling_factor, shift_factor)


def codec_for(cfg: DictConfig, device: str | torch.device = "cpu") -> Optional[LatentCodec]:
    """The :class:`LatentCodec` of a run config (loaded once per process and device), None in pixel space."""
    path = vae_path(cfg)
    if path is None:
        return None
    vae = cfg.model.vae
    scale, shift = vae.get("scaling_factor"), vae.get("shift_factor")
    return _cached_codec(path, None if scale is None else float(scale), None if shift is None else float(shift),
                         str(torch.device(device)))


def decode_samples(images: torch.Tensor, cfg: DictConfig, batch_size: int = 64,
                   device: Optional[str | torch.device] = None) -> torch.Tensor:
    """Model outputs (B, C, H, W) -> images in [-1, 1] on the same device: the VAE decode for a
    latent run (``model.vae.path`` set), the input itself for a pixel run. What ``unidiff sample``,
    the training sample grids and evaluation call before writing or scoring images.

    ``batch_size`` latents are decoded at a time on ``device`` (default: the input's), so a large
    CPU-held sample set is decoded on the GPU one batch at a time."""
    codec = codec_for(cfg, images.device if device is None else device)
    if codec is None:
        return images
    return torch.cat([codec.decode(x).to(images.device) for x in images.split(batch_size)])


def pixel_datasets(cfg: DictConfig):
    """``(train, val, info)`` of the pixel data a latent run's cache was made from (``data`` with
    ``data.latents`` unset): the real images that evaluation compares decoded samples with."""
    from .data import build_datasets

    return build_datasets(_pixel_data_config(cfg))


# --- the cache writer ------------------------------------------------------------------------------
def _pixel_data_config(cfg: DictConfig) -> DictConfig:
    """The ``data:`` section with ``data.latents`` unset: the pixel source the cache is made from."""
    data = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))
    with read_write(data):
        data.latents = None
    from .data import DataConfig

    return OmegaConf.merge(OmegaConf.structured(DataConfig), data)


def _save_shard(path: Path, tensors: Dict[str, torch.Tensor]) -> str:
    from safetensors.torch import save_file

    atomic_write(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, p))
    return sha256_file(path)


def _batches(ds, start: int, stop: int, batch_size: int, num_workers: int):
    """Items ``start:stop`` of a dataset in order, ``batch_size`` at a time (in-memory data by
    index, folder data decoded by a DataLoader with ``num_workers`` workers)."""
    from torch.utils.data import DataLoader, Subset

    from .data import InMemoryDataset

    if isinstance(ds, InMemoryDataset):
        for lo in range(start, stop, batch_size):
            yield ds.batch(torch.arange(lo, min(lo + batch_size, stop), device=ds.images.device))
        return
    yield from DataLoader(Subset(ds, range(start, stop)), batch_size=batch_size, shuffle=False, num_workers=num_workers)


def build_latent_cache(
    cfg: DictConfig,
    shard_size: int = 10_000,
    batch_size: int = 64,
    dtype: str = "fp16",
    posterior: str = "mean",
    device: Optional[str] = None,
    progress: bool = True,
    on_shard: Optional[Callable[[str, int], None]] = None,
) -> Path:
    """Encode the config's data into the latent cache ``data.latents`` (module docstring); returns it.

    ``shard_size`` items per shard, encoded ``batch_size`` at a time; ``dtype`` ``fp16``/``fp32``
    storage; ``posterior`` ``mean`` or ``sample`` (a draw seeded by ``(split_seed, split, shard)``).
    A folder holding a cache of other settings (data, VAE, dtype, ...) is an error, never
    overwritten. ``on_shard(split, index)`` is called after every shard written (tests interrupt
    there). A progress bar shows images/s.
    """
    from tqdm.auto import tqdm

    from .data import build_datasets

    folder = cfg.data.get("latents")
    if folder is None:
        raise ConfigError("data.latents: set it to the folder the latent cache is written to (data.latents=<folder>)")
    if vae_path(cfg) is None:
        raise ConfigError("model.vae.path: set it to the AutoencoderKL (a folder, or a hub id) that encodes the data")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {list(DTYPES)}")
    if posterior not in POSTERIORS:
        raise ConfigError(f"--posterior {posterior!r} is not one of {list(POSTERIORS)}")
    if shard_size < 1 or batch_size < 1:
        raise ConfigError(f"--shard-size {shard_size} and --batch-size {batch_size} must be >= 1")
    folder = Path(os.path.expanduser(str(folder)))
    data_cfg = _pixel_data_config(cfg)
    train_set, val_set, info = build_datasets(data_cfg)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vae = cfg.model.vae
    codec = LatentCodec(load_vae(vae_path(cfg), device), vae.get("scaling_factor"), vae.get("shift_factor"))
    latent_shape = codec.latent_shape(info.image_shape)
    flip = bool(data_cfg.hflip)
    splits = {"train": train_set, "val": val_set}

    # What defines the cache's content: a resumed run must agree on all of it.
    settings = {
        "format": MANIFEST_FORMAT,
        "data": data_signature(data_cfg),
        "fingerprints": {split: ds.fingerprint() for split, ds in splits.items()},
        "class_names": list(info.class_names),
        "pixel_shape": list(info.image_shape),
        "latent_shape": list(latent_shape),
        "vae": {"path": vae_path(cfg), **vae_identity(codec.vae), "scaling_factor": codec.scaling_factor,
                "shift_factor": codec.shift_factor},
        "dtype": dtype,
        "posterior": posterior,
        "flip": flip,
        "shard_size": int(shard_size),
    }
    shards: Dict[str, list] = {split: [] for split in splits}
    if (folder / MANIFEST).is_file():
        old = read_manifest(folder)
        for key, value in settings.items():
            if old.get(key) != value:
                raise DataError(f"data.latents={str(folder)!r} holds a latent cache made with other settings ({key} "
                                "differs); remove it or choose another folder")
        shards = {split: list(old.get("splits", {}).get(split, {}).get("shards", [])) for split in splits}
    folder.mkdir(parents=True, exist_ok=True)

    def publish(complete: bool) -> None:
        manifest = dict(settings, complete=complete, written=time.strftime("%Y-%m-%dT%H:%M:%S"))
        manifest["splits"] = {split: {"count": len(ds), "shards": shards[split]} for split, ds in splits.items()}
        write_json(folder / MANIFEST, manifest)

    total = sum(len(ds) * (2 if flip and split == "train" else 1) for split, ds in splits.items())
    bar = tqdm(total=total, unit="img", desc=f"latents {folder.name}", disable=not progress, dynamic_ncols=True)
    kept = 0
    for split, ds in splits.items():
        (folder / split).mkdir(exist_ok=True)
        n_shards = -(-len(ds) // shard_size)
        done = {entry["file"]: entry for entry in shards[split]}
        shards[split] = []
        for k in range(n_shards):
            start, stop = k * shard_size, min((k + 1) * shard_size, len(ds))
            name = f"{split}/{shard_name(k)}"
            entry = done.get(name)
            images_per_item = 2 if flip and split == "train" else 1
            if entry is not None and entry["count"] == stop - start and (folder / name).is_file() \
                    and sha256_file(folder / name) == entry["sha256"]:
                shards[split].append(entry)  # resumed: this shard verifies
                kept += 1
                bar.update((stop - start) * images_per_item)
                continue
            g = generator_for(int(data_cfg.split_seed), k, 0 if split == "train" else 1, device=device)
            parts: Dict[str, list] = {"latents": [], "latents_flipped": [], "labels": []}
            for batch in _batches(ds, start, stop, batch_size, int(data_cfg.num_workers)):
                x = batch["image"]  # (b, C, H, W) in [-1, 1]
                parts["labels"].append(batch["label"].long().cpu())
                parts["latents"].append(codec.encode(x, posterior == "sample", g).to(DTYPES[dtype]).cpu())
                if images_per_item == 2:
                    parts["latents_flipped"].append(codec.encode(x.flip(-1), posterior == "sample", g).to(DTYPES[dtype]).cpu())
                bar.update(len(x) * images_per_item)
            tensors = {key: torch.cat(v) for key, v in parts.items() if v}
            digest = _save_shard(folder / name, tensors)
            shards[split].append({"file": name, "count": stop - start, "sha256": digest})
            publish(complete=False)
            if on_shard is not None:
                on_shard(split, k)
    bar.close()
    publish(complete=True)
    if kept and progress:
        print(f"resumed: kept {kept} verified shard(s)")
    return folder
