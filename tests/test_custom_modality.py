"""A modality defined outside ``heads/`` (tests/custom_modality_fixture.py: stroke thickness) goes
through the whole pipeline with no core file knowing it: registration, config validation, training
from a config that names it, ``unidiff sample`` for ``joint`` and for its own tasks (its array in the
output .npz), in this process and in a fresh one, and ``unidiff evaluate``'s per-modality metrics.

Oracles: the thickness of an image is its mean ink, computed here from the data with numpy; the
CLI's conditional samples are compared with a direct ``sample(...)`` call on the given values.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import heads
from custom_modality_fixture import ThicknessModality
from unidiff.cli import main
from unidiff.config import build_model, load_config, resolve_with_data
from unidiff.data import DataInfo, build_datasets, iter_batches
from unidiff.errors import ConfigError
from unidiff.modality import Modality, ModalityTask

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
DEBUG = str(ROOT / "configs" / "debug.yaml")
KIND_PATH = "custom_modality_fixture:ThicknessModality"
MODS = f'modalities=[{{name: label, kind: label}}, {{name: ink, kind: "{KIND_PATH}", options: {{embed_dim: 8}}}}]'


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _val_images(cfg) -> np.ndarray:
    """(N, C, H, W) float val images as the data gives them."""
    _, val_set, _ = build_datasets(cfg.data)
    return torch.cat([b["image"] for b in iter_batches(val_set, 512)]).numpy()


# --- registration --------------------------------------------------------------------------------
def test_register_modality_accepts_a_modality_and_rejects_the_rest():
    assert heads.register_modality("thickness", ThicknessModality) is ThicknessModality
    assert heads.register_modality("thickness", KIND_PATH) is ThicknessModality  # same class: a no-op
    assert "thickness" in heads.modality_kinds()
    tasks = heads.modality_tasks()
    assert (tasks["thickness_to_image"].kind, tasks["thickness_to_image"].action) == ("thickness", "generate")
    assert (tasks["image_to_thickness"].kind, tasks["image_to_thickness"].action) == ("thickness", "read")

    class Other(ThicknessModality):
        pass

    with pytest.raises(ConfigError, match=r"'thickness' is already registered"):
        heads.register_modality("thickness", Other)
    with pytest.raises(ConfigError, match=r"'label' is already registered"):
        heads.register_modality("label", type("L", (ThicknessModality,), {"kind": "label", "tasks": ()}))
    with pytest.raises(ConfigError, match="not a subclass of unidiff.modality.Modality"):
        heads.register_modality("plain", torch.nn.Linear)
    with pytest.raises(ConfigError, match=r"declares kind 'thickness'"):
        heads.register_modality("ink2", Other)
    with pytest.raises(ConfigError, match=r"'inpaint' is already a task of kind 'masked_image'"):
        heads.register_modality("ink3", type("I", (ThicknessModality,), {"kind": "ink3", "tasks": (
            ModalityTask("inpaint", "generate"),)}))
    with pytest.raises(ConfigError, match="reserved"):
        heads.register_modality("ink4", type("J", (ThicknessModality,), {"kind": "ink4", "tasks": (
            ModalityTask("joint", "generate"),)}))
    with pytest.raises(ConfigError, match=r"cannot import module 'no_such_pkg.mod'"):
        heads.register_modality("ink5", "no_such_pkg.mod:Cls")
    assert "ink2" not in heads.modality_kinds() and "ink3" not in heads.modality_kinds()


def test_config_naming_a_registered_kind_builds_and_resolves():
    heads.register_modality("thickness", ThicknessModality)
    cfg = load_config(DEBUG, ["modalities=[{name: ink, kind: thickness, options: {embed_dim: 4}}]"])
    info = DataInfo(name="digits", image_shape=(1, 8, 8), num_classes=10)
    model = build_model(resolve_with_data(cfg, info), info.image_shape)
    mod = model.modalities["ink"]
    assert isinstance(mod, ThicknessModality) and isinstance(mod, Modality) and mod.encoder[0].out_features == 4
    with pytest.raises(ConfigError, match=r"modalities\[0\]\.kind.*'thikness'"):
        load_config(DEBUG, ["modalities=[{name: ink, kind: thikness}]"])
    with pytest.raises(ConfigError, match=r"modalities\[0\]\.kind.*no_such_module"):
        load_config(DEBUG, ["modalities=[{name: ink, kind: 'no_such_module:Cls'}]"])
    with pytest.raises(ConfigError, match=r"modalities\[0\]\.options.*'colour'"):
        build_model(resolve_with_data(load_config(DEBUG, ["modalities=[{name: ink, kind: thickness, options: {colour: 1}}]"]),
                                      info), info.image_shape)


# --- the CLI, end to end -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ink_run(tmp_path_factory):
    """A debug run with a label and the custom thickness modality (named by its module path)."""
    root = tmp_path_factory.mktemp("ink")
    rc = main(["train", DEBUG, f"run.dir={root / 'run'}", f"eval.cache_dir={root / 'cache'}", "train.sample_every=0", MODS])
    assert rc == 0
    return root / "run"


def test_trained_run_saves_the_kind_and_logs_its_loss(ink_run):
    assert KIND_PATH in (ink_run / "config.yaml").read_text()
    log = [json.loads(line) for line in (ink_run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all("head/ink" in r and math.isfinite(r["head/ink"]) for r in log)


def test_joint_writes_the_custom_array(ink_run, tmp_path, capsys):
    out = tmp_path / "joint.npz"
    rc, _, err = _run(capsys, "sample", ink_run, "--task", "joint", "-n", "5", "--steps", "2", "--out", out)
    assert rc == 0, err
    with np.load(out) as f:
        assert f["images"].shape == (5, 8, 8, 1) and f["images"].dtype == np.uint8
        assert f["thickness"].shape == (5,) and f["thickness"].dtype == np.float32
        assert ((f["thickness"] >= 0) & (f["thickness"] <= 1)).all()  # the read-out is clamped
        assert f["labels"].shape == (5,) and f["labels"].dtype == np.int64


def test_conditional_task_uses_the_given_values(ink_run, tmp_path, capsys):
    from unidiff.checkpoint import load_model
    from unidiff.config import build_schedule
    from unidiff.diffusion import sample
    from unidiff.evaluate import load_run_config

    given = np.array([0.1, 0.5, 0.9], dtype=np.float32)
    np.savez(tmp_path / "in.npz", thickness=given)
    rc, _, err = _run(capsys, "sample", ink_run, "--task", "thickness_to_image", "--steps", "3", "--seed", "7",
                      "--inputs", tmp_path / "in.npz", "--out", tmp_path / "c.npz")
    assert rc == 0, err
    with np.load(tmp_path / "c.npz") as f:
        images, echoed = f["images"], f["thickness"]
    assert images.shape == (3, 8, 8, 1) and np.array_equal(echoed, given)

    # the same conditional sample, done by hand on the given values
    # (`sample` seeds shard i with seed_for(--seed, i): these 3 rows are shard 0)
    from unidiff.io import seed_for

    cfg = load_run_config(ink_run)
    model = load_model(ink_run, "cpu")
    ref = sample(model, build_schedule(cfg), "conditional", known={"ink": torch.from_numpy(given)},
                 scheduler=cfg.sample.sampler.value, num_steps=3,
                 generator=torch.Generator().manual_seed(seed_for(7, 0)))
    ref_u8 = ((ref.image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(images, ref_u8)
    other = sample(model, build_schedule(cfg), "conditional", known={"ink": torch.from_numpy(given[::-1].copy())},
                   scheduler=cfg.sample.sampler.value, num_steps=3, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(other.image, ref.image)  # the values do drive the samples


def test_conditional_default_inputs_come_from_the_validation_images(ink_run, tmp_path, capsys):
    rc, _, err = _run(capsys, "sample", ink_run, "--task", "thickness_to_image", "-n", "4", "--steps", "2",
                      "--out", tmp_path / "d.npz")
    assert rc == 0, err
    val = _val_images(load_config(ink_run / "config.yaml"))[:4]
    expected = ((val + 1) / 2).reshape(4, -1).mean(axis=1)
    with np.load(tmp_path / "d.npz") as f:
        np.testing.assert_allclose(f["thickness"], expected, rtol=1e-6)


def test_bad_custom_inputs_are_one_line_errors(ink_run, tmp_path, capsys):
    for name, arr, needle in [("shape.npz", np.zeros((3, 2), np.float32), "N"), ("range.npz", np.full(2, 1.5, np.float32), "[0, 1]")]:
        np.savez(tmp_path / name, thickness=arr)
        rc, _, err = _run(capsys, "sample", ink_run, "--task", "thickness_to_image", "--inputs", tmp_path / name,
                          "--out", tmp_path / "x.npz")
        assert rc == 2 and len(err.strip().splitlines()) == 1
        assert name in err and "'thickness'" in err and needle in err, err
    assert not (tmp_path / "x.npz").exists()


def test_read_task_in_a_fresh_process(ink_run, tmp_path):
    """``unidiff sample`` in a new interpreter finds the kind from the run's config alone."""
    images = np.zeros((2, 8, 8, 1), np.uint8)
    images[1] = 255
    np.savez(tmp_path / "in.npz", images=images)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "unidiff.cli", "sample", str(ink_run), "--task", "image_to_thickness",
                           "--inputs", str(tmp_path / "in.npz"), "--out", str(tmp_path / "r.npz")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "r.npz") as f:
        assert np.array_equal(f["images"], images)
        assert f["thickness"].shape == (2,) and f["thickness"].dtype == np.float32
        assert set(f.keys()) == {"images", "thickness", "arr_0"}  # arr_0: ADM's layout of the images (no labels)
        assert np.array_equal(f["arr_0"], images)


def test_evaluate_scores_the_custom_head(ink_run, capsys):
    rc, _, err = _run(capsys, "evaluate", ink_run, f"eval.cache_dir={ink_run.parent / 'cache'}", "eval.n_samples=8")
    assert rc == 0, err
    metrics = json.loads((ink_run / "metrics.json").read_text())
    assert 0 <= metrics["image_to_ink/mae"] <= 1 and 0 <= metrics["label_accuracy"] <= 1
