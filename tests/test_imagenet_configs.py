"""The ImageNet configs (configs/imagenet*.yaml) stay valid without ImageNet: each one, with its data
section pointed at the embedded digits (resized to 16x16) and a small preset, passes
``unidiff train CONFIG --dry-run`` (the latent configs on a cache made by a tiny random VAE); at full
size each builds its model (1000 classes, its diffusion space) with the sizes the README states; and
the compute estimate (benchmarks/compute_estimate.py) is consistent with the FLOP counts it reports."""

from __future__ import annotations

import glob
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from unidiff.cli import main
from unidiff.config import read_yaml
from unidiff.data import DATASET_NAMES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(Path(p).name for p in glob.glob(str(ROOT / "configs" / "imagenet*.yaml")))
EXPECTED = {  # config -> (preset, diffusion-space tokens, modality kinds, a single-task baseline beside it)
    "imagenet64_joint_image_label.yaml": ("L", 256, ["label"], "imagenet64_image_only.yaml"),
    "imagenet64_image_only.yaml": ("L", 256, [], None),
    "imagenet64_masked_class_conditional.yaml": ("L", 256, ["label", "masked_image"], "imagenet64_joint_image_label.yaml"),
    "imagenet256_latent_joint_image_label.yaml": ("XL", 256, ["label"], "imagenet256_latent_image_only.yaml"),
    "imagenet256_latent_image_only.yaml": ("XL", 256, [], None),
}


def test_the_expected_configs_exist_each_with_its_baseline():
    assert CONFIGS == sorted(EXPECTED)
    for name, (_, _, _, baseline) in EXPECTED.items():
        if baseline is not None:
            assert (ROOT / "configs" / baseline).is_file()
            assert baseline in (ROOT / "configs" / name).read_text()  # named in the header


@pytest.mark.skipif("imagenet" not in DATASET_NAMES, reason="the ImageNet source is not registered on this branch")
def test_configs_name_a_registered_source():
    for name in CONFIGS:
        assert read_yaml(ROOT / "configs" / name)["data"]["name"] in DATASET_NAMES


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16)
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return path


def _stand_in(name, tmp_path, tiny_vae):
    """The config with its data on the digits at 16x16 and the debug preset (its patch size kept)."""
    raw = read_yaml(ROOT / "configs" / name)
    latent = bool(raw["model"].get("vae", {}).get("path"))
    raw["data"] = {"name": "digits", "image_size": 16, "max_items": 16, "hflip": raw["data"].get("hflip", False)}
    raw["model"]["preset"] = "debug"
    raw["run"]["dir"] = str(tmp_path / "run")
    if latent:
        raw["data"]["latents"] = str(tmp_path / "cache")
        raw["model"]["vae"]["path"] = str(tiny_vae)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path, latent


@pytest.mark.parametrize("name", CONFIGS)
def test_config_dry_runs_on_a_stand_in_dataset(name, tmp_path, tiny_vae, capsys):
    path, latent = _stand_in(name, tmp_path, tiny_vae)
    if latent:
        assert main(["latents", str(path), "--shard-size", "8"]) == 0
    capsys.readouterr()
    assert main(["train", str(path), "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    shape = "(4, 8, 8)" if latent else "(1, 16, 16)"
    assert f"# data: digits {shape}, 10 classes" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", CONFIGS)
def test_full_size_model_of_each_config(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compute_estimate import load_full_size

    preset, tokens, kinds, _ = EXPECTED[name]
    with torch.device("meta"):  # shapes only: no memory for a billion parameters
        cfg, model, shape = load_full_size(str(ROOT / "configs" / name))
    assert cfg.model.preset == preset and [m.kind for m in cfg.modalities] == kinds
    p = model.backbone.config["patch_size"]
    assert (shape[1] // p) * (shape[2] // p) == tokens
    assert shape == ((4, 32, 32) if "latent" in name else (3, 64, 64))
    label = [m for m in cfg.modalities if m.kind == "label"]
    assert all(m.options.num_classes == 1000 for m in label)
    assert cfg.train.mixed_precision.value == "auto" and cfg.data.name == "digits"  # auto: bf16 on the GPUs (unidiff.launch); the stand-in source


def test_compute_estimate_is_consistent(tmp_path):
    out = tmp_path / "estimate.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compute_estimate.py"), "--preset", "debug", "--no-vae",
           "--mfu", "0.5", "--peak-tflops", "100", "--threads", "1", "--out", str(out),
           str(ROOT / "configs" / "imagenet64_joint_image_label.yaml")]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    (row,) = json.loads(out.read_text())["configs"]
    # Attention cores by hand: debug preset (width 32, one '*'), 16x16 = 256 patch tokens + 1 register.
    assert row["forward_gflops_attention_by_hand"] * 1e9 == pytest.approx(4 * 257**2 * 32 * 1)
    fwd = row["forward_gflops_per_image"] * 1e9
    assert fwd == pytest.approx(row["forward_gflops_counted"] * 1e9 + 4 * 257**2 * 32)
    assert row["forward_gflops_counted"] > 0 and row["tokens"] == 256
    ips = 0.5 * 100e12 / (3 * fwd)
    assert row["images_per_s_per_gpu"] == pytest.approx(ips)
    assert row["gpu_hours_per_100k_steps"] == pytest.approx(1e5 * 512 / ips / 3600)
    assert math.isfinite(row["gpu_hours_configured_steps"])
