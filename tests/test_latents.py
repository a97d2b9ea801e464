"""Latent space (unidiff/latents.py, unidiff/data/latents.py): a tiny randomly initialised diffusers
``AutoencoderKL`` encodes the digits (resized to 16x16) into a sharded cache, a model trains a few
steps on it, sampling decodes back to pixels; the cache's checks (tampered shard, other data, flips)
and its resume. The oracle of every latent value is diffusers' own ``AutoencoderKL`` called
directly (``latent_dist.mean``), with the normalisation ``(z - shift) * scale`` of its config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from unidiff.cli import main
from unidiff.config import load_config
from unidiff.data import BatchOrder, LatentDataset, build_datasets, infinite_batches
from unidiff.latents import build_latent_cache, decode_samples

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")
SCALE, SHIFT = 0.5, 0.1  # not 1 and 0: the test sees whether the normalisation is applied


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=SCALE, shift_factor=SHIFT)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


def _overrides(vae_dir, cache, *extra):
    return [f"model.vae.path={vae_dir}", f"data.latents={cache}", "data.image_size=16", "data.max_items=24",
            "data.hflip=true", *extra]


def _reference_latents(vae_dir, images):
    """diffusers directly: (posterior mean - shift) * scale."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        return (vae.encode(images).latent_dist.mean - SHIFT) * SCALE


@pytest.fixture(scope="module")
def cache(vae_dir, tmp_path_factory):
    """A complete fp32 cache of 24 train + 24 val digits, shards of 10 (3 + 3 shards)."""
    folder = tmp_path_factory.mktemp("latents") / "cache"
    cfg = load_config(DEBUG, _overrides(vae_dir, folder))
    build_latent_cache(cfg, shard_size=10, batch_size=7, dtype="fp32", progress=False)
    return folder


def test_cache_holds_the_vae_latents_of_the_pixel_data_and_of_its_mirror(vae_dir, cache):
    cfg = load_config(DEBUG, _overrides(vae_dir, cache, "data.latents=null"))
    pixels, _, _ = build_datasets(cfg.data)  # the same source, its own preprocessing
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["flip"]
    assert manifest["pixel_shape"] == [1, 16, 16] and manifest["latent_shape"] == [4, 8, 8]
    assert manifest["vae"]["scaling_factor"] == SCALE and manifest["vae"]["shift_factor"] == SHIFT
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [10, 10, 4]
    shards = [load_file(cache / s["file"]) for s in manifest["splits"]["train"]["shards"]]
    latents = torch.cat([s["latents"] for s in shards])
    flipped = torch.cat([s["latents_flipped"] for s in shards])
    torch.testing.assert_close(latents, _reference_latents(vae_dir, pixels.images), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flipped, _reference_latents(vae_dir, pixels.images.flip(-1)), atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.cat([s["labels"] for s in shards]), pixels.labels)
    assert "latents_flipped" not in load_file(cache / manifest["splits"]["val"]["shards"][0]["file"])


def test_latent_source_and_flipped_batches(vae_dir, cache):
    cfg = load_config(DEBUG, _overrides(vae_dir, cache))
    train, val, info = build_datasets(cfg.data)
    assert isinstance(train, LatentDataset) and len(train) == 24 and len(val) == 24
    assert info.image_shape == (4, 8, 8) and info.num_classes == 10 and info.latents["pixel_shape"] == [1, 16, 16]
    batch = next(infinite_batches(train, 24, seed=3))
    index, flips = BatchOrder(24, 24, 3).indices(0), BatchOrder(24, 24, 3).flips(0)
    assert 0 < int(flips.sum()) < 24
    expected = torch.where(flips[:, None, None, None], train.flipped[index], train.images[index])
    assert torch.equal(batch["image"], expected) and batch["image"].dtype == torch.float32
    # ... and not the mirrored latent, which is not the latent of a mirrored image.
    assert not torch.allclose(batch["image"][flips], train.images[index][flips].flip(-1), atol=1e-3)
    assert torch.equal(batch["label"], train.labels[index])


def test_train_sample_decode_end_to_end(vae_dir, cache, tmp_path, capsys):
    run = tmp_path / "run"
    args = _overrides(vae_dir, cache, f"run.dir={run}", "train.steps=3", "train.sample_every=3", "train.ckpt_every=3",
                      "model.vae.path=null")  # the path comes from the cache's manifest
    assert main(["train", DEBUG, *args]) == 0
    resolved = load_config(run / "config.yaml")
    assert resolved.model.vae.path == str(vae_dir) and resolved.model.vae.scaling_factor == SCALE

    # The training grid is written from decoded samples (decode_samples is checked against diffusers
    # below; the grid's cells are upscaled to a minimum size, so its size cannot tell 8x8 latents
    # from 16x16 pixels).
    assert (run / "samples" / "step_000003.png").is_file()
    out = tmp_path / "s.npz"
    assert main(["sample", str(run), "--task", "class_to_image", "-n", "3", "--steps", "2", "--out", str(out)]) == 0
    with np.load(out) as f:
        assert f["images"].shape == (3, 16, 16, 1) and f["images"].dtype == np.uint8
    # decode_samples is the VAE decode: compare with diffusers' decode of the un-normalised latents.
    from diffusers import AutoencoderKL

    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = AutoencoderKL.from_pretrained(vae_dir).decode(z / SCALE + SHIFT).sample.clamp(-1, 1)
    torch.testing.assert_close(decode_samples(z, resolved), ref, atol=1e-5, rtol=1e-5)
    pixel_cfg = load_config(DEBUG)
    assert decode_samples(z, pixel_cfg) is z  # pixel runs: untouched


def _one_line_error(capsys, argv, *needles):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("unidiff: error:"), err
    for needle in needles:
        assert needle in err, (needle, err)


def test_tampered_shard_is_a_one_line_error_naming_it(vae_dir, cache, tmp_path, capsys):
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    shard = copy / "train" / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # one byte of the tensor data
    shard.write_bytes(bytes(data))
    _one_line_error(capsys, ["train", DEBUG, *_overrides(vae_dir, copy, f"run.dir={tmp_path / 'r'}"), "--dry-run"],
                    "train/shard_00001.safetensors", "checksum")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("override, needles", [
    ("data.max_items=20", ["data.max_items=20", "24"]),          # other data than the cache was made of
    ("model.vae.scaling_factor=0.25", ["model.vae.scaling_factor"]),
    ("data.latents=/nonexistent/cache", ["/nonexistent/cache", "unidiff latents"]),
])
def test_cache_config_mismatch_is_one_line(vae_dir, cache, capsys, override, needles):
    _one_line_error(capsys, ["train", DEBUG, *_overrides(vae_dir, cache, override), "--dry-run"], *needles)


def test_vae_without_cache_and_bad_vae_path(vae_dir, tmp_path, capsys):
    _one_line_error(capsys, ["train", DEBUG, f"model.vae.path={vae_dir}", "--dry-run"], "model.vae.path", "data.latents")
    _one_line_error(capsys, ["latents", DEBUG, f"model.vae.path={tmp_path}", f"data.latents={tmp_path / 'c'}"],
                    "model.vae.path", "config.json")
    _one_line_error(capsys, ["latents", DEBUG, f"data.latents={tmp_path / 'c'}"], "model.vae.path")


def test_interrupted_cache_resumes_keeping_verified_shards(vae_dir, tmp_path, capsys):
    folder = tmp_path / "cache"
    argv = ["latents", DEBUG, *_overrides(vae_dir, folder, "data.hflip=false"), "--shard-size", "10"]
    cfg = load_config(DEBUG, argv[2:-2])
    written = []

    def interrupt(split, k):
        written.append((split, k))
        if len(written) == 2:
            raise KeyboardInterrupt  # killed after 2 shards

    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(cfg, shard_size=10, progress=False, on_shard=interrupt)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["splits"]["train"]["shards"]) == 2
    # An incomplete cache is refused for training.
    _one_line_error(capsys, ["train", DEBUG, *argv[2:-2], "--dry-run"], "incomplete")
    kept = {p: p.stat().st_mtime_ns for p in sorted((folder / "train").glob("shard_*.safetensors"))}
    assert len(kept) == 2
    # Tamper with the second kept shard: the resume re-encodes it and keeps only the first.
    second = folder / "train" / "shard_00001.safetensors"
    second.write_bytes(second.read_bytes()[:-8])
    os.utime(second, ns=(kept[second], kept[second]))
    written.clear()
    build_latent_cache(cfg, shard_size=10, progress=False, on_shard=lambda split, k: written.append((split, k)))
    assert written == [("train", 1), ("train", 2), ("val", 0), ("val", 1), ("val", 2)]
    first = folder / "train" / "shard_00000.safetensors"
    assert first.stat().st_mtime_ns == kept[first]
    assert main(["train", DEBUG, *argv[2:-2], "--dry-run"]) == 0  # complete and verified now
    capsys.readouterr()
    # A cache folder of other settings is never overwritten.
    _one_line_error(capsys, ["latents", DEBUG, *_overrides(vae_dir, folder, "data.hflip=false"), "--shard-size", "5"],
                    "shard_size", "other settings")
