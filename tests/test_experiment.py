"""The experiments package (experiments/): every setting of DESIGN.md §4 end to end on the
debug preset, resume, the replacement inpainting baseline, and config errors.

The four experiments run once per module (a shared tmp folder and reference-classifier cache);
the tests then read what they wrote.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image

from experiments import load_experiment, results_markdown, run_experiment
from experiments.joint_image_representation import with_representation_file
from unidiff.config import load_config
from unidiff.diffusion import replacement_inpaint
from unidiff.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("joint_image_label", "joint_image_representation", "masked_image", "image_transition")
ARMS = {
    "joint_image_label": ["multitask", "image_only", "label_only", "label_finetuned"],
    "joint_image_representation": ["multitask", "image_only"],
    "masked_image": ["multitask", "image_only"],
    "image_transition": ["multitask", "image_only", "conditional"],
}


def _overrides(tmp: Path, name: str):
    return [
        "model.preset=debug", "data.max_items=48", "train.steps=2", "train.batch_size=8", "train.warmup_steps=1",
        "train.ckpt_every=2", "train.log_every=1", "train.mixed_precision='no'", "diffusion.num_train_timesteps=50",
        "eval.n_samples=8", "eval.steps=2", "eval.batch_size=8", "eval.t_read=2", "eval.num_draws=1",
        "eval.bpd_num_t=1", "eval.reference_steps=5", f"eval.cache_dir={tmp / 'cache'}",
        f"experiment.out_dir={tmp / name}", "experiment.n_cond=8", "experiment.n_joint=4", "experiment.grid=4",
        "experiment.representation.encoder.steps=2", "experiment.representation.encoder.batch_size=8",
        "experiment.representation.pca_dim=4",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("experiments")
    out = {}
    for name in SETTINGS:
        out[name] = run_experiment(ROOT / "configs/experiments" / f"{name}.yaml", _overrides(tmp, name))
    return SimpleNamespace(tmp=tmp, dirs=out)


def _results(runs, name):
    return json.loads((runs.dirs[name] / "results.json").read_text())


def _row(results, key):
    return next(r for r in results["table"] if r["key"] == key)["values"]


@pytest.mark.parametrize("name", SETTINGS)
def test_every_experiment_writes_results_table_and_figures(runs, name):
    out = runs.dirs[name]
    results = _results(runs, name)
    assert list(results["arms"]) == ARMS[name]
    for arm in ARMS[name]:
        assert (out / arm / "model" / "config.json").is_file()  # each arm is a complete run folder
        assert (out / arm / "metrics.json").is_file()
    md = (out / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| metric |"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == ARMS[name]
    for row in results["table"]:
        assert row["label"] in md
        # every table row has a number for at least one arm (no row of dashes only)
        assert any(isinstance(v, float) and math.isfinite(v) for v in row["values"].values()), row
    for fig in ("samples.png", "metrics.png"):
        with Image.open(out / fig) as im:
            im.verify()
            assert im.size[0] > 100 and im.size[1] > 100


def test_label_setting_fills_each_arm_where_it_applies(runs):
    r = _results(runs, "joint_image_label")
    fid, acc = _row(r, "fid"), _row(r, "label_accuracy")
    assert fid["multitask"] is not None and fid["image_only"] is not None and fid["label_only"] is None
    assert acc["multitask"] is not None and acc["label_only"] is not None and acc["image_only"] is None
    for key in ("joint_consistency", "class_conditional_accuracy"):
        v = _row(r, key)
        assert 0.0 <= v["multitask"] <= 1.0 and v["image_only"] is None and v["label_only"] is None
    # the evaluate() metrics of an arm are exactly its metrics.json
    own = json.loads((runs.dirs["joint_image_label"] / "multitask" / "metrics.json").read_text())
    assert r["arms"]["multitask"]["metrics"]["fid"] == own["fid"]
    # the fine-tuned classifier: a label-only arm that started from image_only's final weights
    out = runs.dirs["joint_image_label"]
    assert acc["label_finetuned"] is not None and fid["label_finetuned"] is None
    assert load_config(out / "label_finetuned" / "config.yaml").train.init_from == str(out / "image_only")
    assert load_config(out / "label_only" / "config.yaml").train.init_from is None


def test_representation_setting(runs):
    r = _results(runs, "joint_image_representation")
    out = runs.dirs["joint_image_representation"]
    # r is the PCA-whitened encoder embedding, fitted on train: unit variance, zero mean on train
    from safetensors.torch import load_file

    vec = load_file(str(out / "representation" / "vectors.safetensors"))
    assert sorted(vec) == ["train.representation", "val.representation"]
    train_r = vec["train.representation"]
    assert train_r.shape[1] == 4 == r["context"]["representation_dim"]
    torch.testing.assert_close(train_r.mean(0), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(train_r.var(0), torch.ones(4), atol=1e-3, rtol=0)
    assert (out / "representation" / "pca.safetensors").is_file()
    assert any(p.name.startswith("encoder_") for p in (runs.tmp / "cache").iterdir())  # cached encoder
    # the model was built with dim filled from the spec
    cfg = yaml.safe_load((out / "multitask" / "config.yaml").read_text())
    assert cfg["modalities"][0]["options"]["dim"] == 4
    for key in ("joint_representation_cosine", "representation_to_image/cosine", "image_to_representation/cosine"):
        v = _row(r, key)
        assert -1.0 <= v["multitask"] <= 1.0 and v["image_only"] is None
    for k in (1, 5):
        assert 0.0 <= _row(r, f"representation_to_image/recall@{k}")["multitask"] <= 1.0
    assert r["context"]["real_val_recall@1"] <= r["context"]["real_val_recall@5"]


def test_representation_arm_evaluates_on_its_own(runs, tmp_path, monkeypatch):
    """The multitask arm's config names the vectors (absolute path): ``evaluate(arm_dir)`` from
    another working directory sees the same data the runner trained and evaluated on."""
    from safetensors.torch import load_file

    from unidiff.config import load_config
    from unidiff.data import build_datasets
    from unidiff.evaluate import evaluate

    out = runs.dirs["joint_image_representation"]
    vectors = out / "representation" / "vectors.safetensors"
    cfg = load_config(out / "multitask" / "config.yaml")
    assert cfg.data.extra_file == str(vectors.absolute())
    assert load_config(out / "image_only" / "config.yaml").data.extra_file is None  # it reads no r
    # the arm's batches carry exactly the file's rows, in the split's order
    train, _, _ = build_datasets(cfg.data)
    batch = train.batch(torch.tensor([2, 0, 5]))
    torch.testing.assert_close(batch["representation"], load_file(str(vectors))["train.representation"][[2, 0, 5]])

    runner = _results(runs, "joint_image_representation")["arms"]["multitask"]["metrics"]
    monkeypatch.chdir(tmp_path)
    alone = evaluate(out / "multitask", seed=int(cfg.run.seed))  # the runner's default device too
    for key in ("image_to_representation/cosine", "image_to_representation/mse", "bits_per_dim", "fid"):
        # same config, data, seed and device as the runner's call: the same numbers
        assert alone[key] == pytest.approx(runner[key], rel=1e-4, abs=1e-6), key


def test_masked_setting_psnr_agrees_with_mse(runs):
    r = _results(runs, "masked_image")
    mse, psnr = _row(r, "inpaint/masked_mse"), _row(r, "inpaint/masked_psnr")
    assert r["arms"]["multitask"]["metrics"]["inpaint/method"] == "drift"
    assert r["arms"]["image_only"]["metrics"]["inpaint/method"] == "replacement"
    for arm in ("multitask", "image_only"):
        # every image has the same number of masked pixels, so by Jensen the mean per-image PSNR
        # is at least the PSNR of the pooled MSE (range 2 for [-1, 1] images).
        assert psnr[arm] >= 10 * math.log10(4.0 / mse[arm]) - 1e-6
    assert _row(r, "image_to_masked/masked_mse")["image_only"] is None


def test_transition_setting(runs):
    r = _results(runs, "image_transition")
    mse, psnr = _row(r, "transition/mse"), _row(r, "transition/psnr")
    assert mse["image_only"] is None and psnr["image_only"] is None
    for arm in ("multitask", "conditional"):
        assert psnr[arm] >= 10 * math.log10(4.0 / mse[arm]) - 1e-6  # Jensen, as above
        assert _row(r, "pair_consistency_mse")[arm] >= 0
    cfg = yaml.safe_load((runs.dirs["image_transition"] / "conditional" / "config.yaml").read_text())
    assert cfg["diffusion"]["p_drop"] == 0.0 and cfg["modalities"][0]["loss_weight"] == 0.0


def test_rerun_resumes_without_retraining(runs):
    name = "masked_image"
    weights = runs.dirs[name] / "multitask" / "model" / "diffusion_pytorch_model.safetensors"
    before = os.stat(weights).st_mtime_ns
    run_experiment(ROOT / "configs/experiments" / f"{name}.yaml", _overrides(runs.tmp, name))
    r = _results(runs, name)
    assert all(not a["trained_now"] for a in r["arms"].values())
    assert os.stat(weights).st_mtime_ns == before


# --- pieces --------------------------------------------------------------------------------------
class _MixtureOracle(torch.nn.Module):
    """The exact ε-predictor of data that is one of two images x_a, x_b with probability 1/2 each:
    x̂0 = Σ_i w_i x_i, w = softmax_i(-‖y - a_t x_i‖² / 2σ_t²), ε̂ = (y - a_t x̂0) / σ_t."""

    def __init__(self, schedule, images):
        super().__init__()
        self.schedule, self.images = schedule, images  # (2, C, H, W)
        self.modalities, self.prediction = {}, "epsilon"

    def forward(self, y, t):
        a, s = self.schedule.at("a", t, y), self.schedule.at("sigma", t, y)  # (B, 1, 1, 1)
        d2 = (y[:, None] - a[:, None] * self.images[None]).pow(2).flatten(2).sum(-1)  # (B, 2)
        w = torch.softmax(-d2 / (2 * s.flatten()[:, None] ** 2), dim=1)
        x0 = torch.einsum("bk,kchw->bchw", w, self.images)
        return SimpleNamespace(image=(y - a * x0) / s)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("which", [0, 1])
def test_replacement_inpainting_completes_the_image_the_visible_pixels_pick(sampler, which):
    from unidiff.diffusion import DriftSchedule

    schedule = DriftSchedule.from_config("squaredcos_cap_v2", 100, 1e-4, 0.02, 1.0)
    g = torch.Generator().manual_seed(0)
    images = torch.stack([torch.full((1, 8, 8), -0.6), torch.full((1, 8, 8), 0.6)])
    images[0, 0, :, :4] = 0.8  # the two images differ everywhere, the visible half included
    mask = torch.zeros(8, 1, 8, 8)
    mask[..., 4:] = 1.0  # right half visible
    x_true = images[which].expand(8, -1, -1, -1)
    known = x_true * mask + 0.3 * (1 - mask)  # garbage in the masked region: must be ignored
    out = replacement_inpaint(_MixtureOracle(schedule, images), schedule, known, mask, sampler, 20, g)
    torch.testing.assert_close(out * mask, x_true * mask)  # visible pixels pasted back exactly
    # Unconditionally half the samples would be the other image: the visible pixels must pick it.
    torch.testing.assert_close(out, x_true, atol=2e-2, rtol=0)


def test_results_markdown_marks_direction_and_missing_values():
    results = {"experiment": "e", "setting": "masked_image", "config": "c.yaml", "overrides": [], "train_steps": 3,
               "seed": 0, "context": {}, "arms": {"a": {"metrics": {}}, "b": {"metrics": {}}},
               "table": [{"key": "fid", "label": "FID", "better": "lower", "values": {"a": 1.5, "b": None}},
                         {"key": "acc", "label": "acc", "better": "higher", "values": {"a": None, "b": 0.25}}]}
    lines = results_markdown(results).splitlines()
    assert "| FID ↓ | 1.5 | — |" in lines and "| acc ↑ | — | 0.25 |" in lines


# --- config errors -------------------------------------------------------------------------------
def _write(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


BASE = f"base: {ROOT / 'configs/joint_image_label.yaml'}\n  setting: joint_image_label"


@pytest.mark.parametrize("text, overrides, needle", [
    pytest.param(f"experiment:\n  {BASE}\n  armz: {{a: []}}\n", [], "experiment.armz", id="unknown-key"),
    pytest.param("experiment:\n  base: no/such/run.yaml\n  setting: masked_image\n  arms: {a: []}\n", [],
                 "no/such/run.yaml", id="missing-base"),
    pytest.param(f"experiment:\n  {BASE}\n  arms: {{a: []}}\ntrainn: {{}}\n", [], "trainn", id="unknown-section"),
    pytest.param(f"experiment:\n  {BASE}\n  arms: {{a: []}}\n", ["experiment.n_cond=0"], "experiment.n_cond", id="bad-value"),
    pytest.param(f"experiment:\n  {BASE}\n  arms: {{a: [train.stepz=3]}}\n", [], "train.stepz", id="bad-arm-override"),
    pytest.param(f"experiment:\n  {BASE}\n  arms: {{a: [], b: [model.preset=debug]}}\n", [], "experiment.arms.b",
                 id="arm-changes-backbone"),
    pytest.param(f"experiment:\n  {BASE}\n  arms: {{a: []}}\n", ["experiment.setting=masked_image"], "masked_image",
                 id="setting-without-its-modality"),
    pytest.param("experiment:\n  arms: {a: []}\n", [], "experiment.setting", id="setting-required"),
    pytest.param(f"experiment:\n  {BASE}\n  arms: {{a: []}}\n  representation: {{encoder: {{stepz: 1}}}}\n", [],
                 "experiment.representation.encoder.stepz", id="bad-encoder-option"),
    pytest.param(f"experiment:\n  {BASE}\n  arms: {{a: []}}\nmodalities:\n"
                 "  - {name: representation, kind: representation, options: {dim: 5}}\n",
                 ["experiment.setting=joint_image_representation"], "options.dim",
                 id="representation-dim-mismatch"),
    pytest.param(f"experiment:\n  {BASE}\n  arms: {{a: [], b: [\"modalities=[]\", data.max_items=5]}}\nmodalities:\n"
                 "  - {name: representation, kind: representation}\n",
                 ["experiment.setting=joint_image_representation"], "experiment.arms.b",
                 id="representation-arm-changes-data"),
    pytest.param(f"experiment:\n  {BASE}\n  arms: {{a: [train.init_from=arm:b], b: []}}\n", [], "train.init_from",
                 id="fine-tuned-from-a-later-arm"),
    pytest.param(f"experiment:\n  {BASE}\n  arms: {{a: [], b: [train.init_from=arm:c]}}\n", [], "experiment.arms.b",
                 id="fine-tuned-from-no-arm"),
])
def test_bad_experiment_configs_name_the_problem(tmp_path, text, overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_experiment(_write(tmp_path, text), overrides)


def test_representation_arms_get_the_vectors_as_an_absolute_extra_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = ROOT / "configs/experiments/joint_image_representation.yaml"
    exp = load_experiment(path, ["experiment.out_dir=rel/exp"])
    assert all(c.data.extra_file is None for c in exp.arms.values())  # the plan names no file yet
    arms, vectors = with_representation_file(exp), str(tmp_path / "rel/exp/representation/vectors.safetensors")
    assert arms["multitask"].data.extra_file == vectors
    assert arms["image_only"].data.extra_file is None  # it reads no r
    assert arms["multitask"].train.steps == exp.arms["multitask"].train.steps
    # a CLI override cannot point the multitask arm elsewhere: the runner's file comes last
    exp = load_experiment(path, ["experiment.out_dir=rel/exp", "data.extra_file=/elsewhere.safetensors"])
    assert with_representation_file(exp)["multitask"].data.extra_file == vectors


def test_missing_experiment_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_experiment(tmp_path / "nope.yaml")


def test_the_core_does_not_import_the_experiments_package():
    import subprocess
    import sys

    code = ("import sys, unidiff.cli, unidiff.config, unidiff.evaluate, unidiff.train, unidiff.metrics, unidiff.diffusion; "
            "unidiff.cli.build_parser(); assert 'experiments' not in sys.modules, 'the core imported experiments'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
