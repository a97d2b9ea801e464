"""The ``unidiff`` command line (unidiff/cli.py): bad input gives one error line, exit 2, no files;
an end-to-end smoke run (train -> sample each task -> evaluate) writes every output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from unidiff.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")


def _files(folder: Path):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(rc, err, *needles):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unidiff: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working folder (the default run folder ``runs/<name>`` would land here)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A debug run trained for a few steps through the CLI (shared by the sample/evaluate tests)."""
    root = tmp_path_factory.mktemp("cli")
    run_dir = root / "run"
    rc = main(["train", DEBUG, f"run.dir={run_dir}", f"eval.cache_dir={root / 'cache'}"])
    assert rc == 0
    return run_dir


def test_subcommand_table_is_extensible():
    assert {"train", "sample", "evaluate", "run"} <= set(COMMANDS)


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["train", "missing.yaml"], ["missing.yaml"]),
        (["train", DEBUG, "train.stepz=3"], ["train.stepz"]),
        (["train", DEBUG, "train.steps=many"], ["train.steps"]),
        (["train", DEBUG, "model.prediction=noise"], ["model.prediction"]),
        (["train", DEBUG, "model.backbone.patch_size=3"], ["patch size 3"]),
        (["train", DEBUG, "modalities.0.options.num_classes=7"], ["num_classes", "7"]),
        (["train", DEBUG, "train.batch_size=9", "train.grad_accum=2"], ["train.batch_size"]),
        (["train", DEBUG, "steps"], ["key=value"]),
        (["sample", "no_such_run", "--out", "x.npz"], ["no_such_run"]),
        (["evaluate", "no_such_run"], ["no_such_run"]),
        (["sample", "r", "-n", "0", "--out", "x.npz"], ["-n"]),
        (["sample", "r", "--task", "dream", "--out", "x.npz"], ["--task"]),
        (["sample", "r", "--out", "x.png"], [".npz"]),
        (["sample", "r", "--labels", "3,x", "--out", "x.npz"], ["--labels"]),
        (["fly"], ["fly"]),
        ([], ["required"]),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(workdir, capsys, argv, needles):
    rc, out, err = _run(capsys, *argv)
    _assert_one_line_error(rc, err, *needles)
    assert _files(workdir) == []


def test_malformed_yaml_names_file_and_line(workdir, capsys):
    (workdir / "bad.yaml").write_text("train:\n  steps: [1, 2\n")
    rc, out, err = _run(capsys, "train", "bad.yaml")
    _assert_one_line_error(rc, err, "bad.yaml", "line")
    assert _files(workdir) == ["bad.yaml"]


def test_resume_false_refuses_an_existing_run(trained_run, capsys):
    before = _files(trained_run)
    rc, out, err = _run(capsys, "train", DEBUG, f"run.dir={trained_run}", "train.resume=false")
    _assert_one_line_error(rc, err, "train.resume")
    assert _files(trained_run) == before


def test_resume_with_a_different_model_is_refused(trained_run, capsys):
    rc, out, err = _run(capsys, "train", DEBUG, f"run.dir={trained_run}", "model.backbone.hidden_size=48")
    _assert_one_line_error(rc, err, "model")


def test_run_folder_without_checkpoint(workdir, capsys):
    run = workdir / "empty_run"
    run.mkdir()
    (run / "config.yaml").write_text((Path(DEBUG)).read_text())
    rc, out, err = _run(capsys, "sample", str(run), "--out", str(workdir / "s.npz"))
    _assert_one_line_error(rc, err, "empty_run")
    assert not (workdir / "s.npz").exists()


def test_dry_run_prints_config_and_sizes_and_writes_nothing(workdir, capsys):
    rc, out, err = _run(capsys, "train", DEBUG, "--dry-run", "train.steps=5")
    assert rc == 0, err
    assert "steps: 5" in out and "num_classes: 10" in out  # resolved against the data
    assert "parameters:" in out
    assert _files(workdir) == []


def test_train_outputs(trained_run):
    files = set(_files(trained_run))
    for f in ("config.yaml", "log.jsonl", "model/config.json", "checkpoints/step_000004/DONE",
              "samples/step_000002.png", "samples/step_000002.json", "samples/step_000004.png"):
        assert f in files, f
    assert not any(f.endswith(".tmp") for f in files)
    assert any(f.startswith("tb/events") for f in files)
    caption = json.loads((trained_run / "samples/step_000004.json").read_text())
    assert len(caption["label"]) == 4 and all(0 <= c < 10 for c in caption["label"])
    log = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and "head/label" in r and "moe/router_entropy" in r for r in log)


@pytest.mark.parametrize("task", ["joint", "class_to_image", "image_to_label"])
def test_sample_each_task(trained_run, tmp_path, capsys, task):
    out = tmp_path / f"{task}.npz"
    argv = ["sample", str(trained_run), "--task", task, "-n", "5", "--steps", "2", "--sampler", "ddim", "--seed", "3"]
    if task == "class_to_image":
        argv += ["--labels", "3,1", "--guidance", "2"]
    rc, stdout, err = _run(capsys, *argv, "--out", str(out))
    assert rc == 0, err
    with np.load(out) as f:
        images, labels = f["images"], f["labels"]
        adm_images, adm_labels = f["arr_0"], f["arr_1"]  # ADM's evaluator layout, for FID tooling
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 1)
    assert adm_images.dtype == np.uint8 and np.array_equal(adm_images, images)
    assert adm_labels.dtype == np.int64 and np.array_equal(adm_labels, labels)
    assert labels.dtype == np.int64 and labels.shape == (5,)
    assert ((labels >= 0) & (labels < 10)).all()
    if task == "class_to_image":
        assert labels.tolist() == [3, 1, 3, 1, 3]  # the conditioning labels, cycled
    assert out.with_suffix(".png").is_file()
    assert not list(tmp_path.glob("*.tmp*"))


def test_image_to_label_reads_given_inputs(trained_run, tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", images=images)
    rc, _, err = _run(capsys, "sample", str(trained_run), "--task", "image_to_label", "--inputs",
                      str(tmp_path / "in.npz"), "--out", str(tmp_path / "o.npz"))
    assert rc == 0, err
    with np.load(tmp_path / "o.npz") as f:
        assert (f["images"] == images).all() and f["labels"].shape == (3,)
    np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 5, 5, 1), np.uint8))
    rc, _, err = _run(capsys, "sample", str(trained_run), "--task", "image_to_label", "--inputs",
                      str(tmp_path / "wrong.npz"), "--out", str(tmp_path / "w.npz"))
    _assert_one_line_error(rc, err, "--inputs")
    assert not (tmp_path / "w.npz").exists()


def test_evaluate_writes_finite_metrics(trained_run, capsys):
    rc, out, err = _run(capsys, "evaluate", str(trained_run), f"eval.cache_dir={trained_run.parent / 'cache'}")
    assert rc == 0, err
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for key in ("fid", "fid_floor", "reference_accuracy", "label_accuracy", "joint_consistency",
                "class_conditional_accuracy", "bits_per_dim"):
        assert key in metrics and math.isfinite(metrics[key]), key
    for key in ("label_accuracy", "joint_consistency", "class_conditional_accuracy", "reference_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["bits_per_dim"] > 0 and metrics["fid"] >= 0
    assert metrics["step"] == 4


def test_run_command_image_only_omits_label_metrics(tmp_path, capsys):
    run_dir = tmp_path / "img"
    rc, out, err = _run(capsys, "run", DEBUG, "modalities=[]", f"run.dir={run_dir}", "train.steps=2",
                        f"eval.cache_dir={tmp_path / 'cache'}")
    assert rc == 0, err
    assert "grid:" in out and "metrics:" in out
    assert (run_dir / "samples" / "final.npz").is_file() and (run_dir / "samples" / "final.png").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["fid"]) and math.isfinite(metrics["bits_per_dim"])
    for key in ("label_accuracy", "joint_consistency", "class_conditional_accuracy"):
        assert key not in metrics


def test_label_only_run_has_no_image_metrics(tmp_path, capsys):
    run_dir = tmp_path / "lab"
    rc, _, err = _run(capsys, "train", DEBUG, "image_head=false", "diffusion.p_drop=1.0", f"run.dir={run_dir}",
                      "train.steps=2", "train.sample_every=0")
    assert rc == 0, err
    rc, _, err = _run(capsys, "evaluate", str(run_dir), f"eval.cache_dir={tmp_path / 'cache'}")
    assert rc == 0, err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["label_accuracy"] <= 1.0
    for key in ("fid", "bits_per_dim", "joint_consistency", "class_conditional_accuracy"):
        assert key not in metrics
    rc, _, err = _run(capsys, "sample", str(run_dir), "--task", "joint", "--out", str(tmp_path / "j.npz"))
    _assert_one_line_error(rc, err, "image_head")


# --- encoder ---------------------------------------------------------------------------------
ROOT_DIR = Path(__file__).resolve().parents[1]


def test_encoder_configs_load_and_reject_unknown_keys(tmp_path, capsys):
    from unidiff.cli import load_encoder_config

    paths = sorted((ROOT_DIR / "configs/encoders").glob("*.yaml"))
    assert paths
    for path in paths:
        data_cfg, enc = load_encoder_config(path)
        assert enc.towers in (3, 4) and data_cfg.name
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {name: digits}\nencoder: {towers: 3, tempreature: 0.1}\n")
    rc, _, err = _run(capsys, "encoder", "train", str(bad))
    _assert_one_line_error(rc, err, "tempreature")


def test_encoder_train_command_writes_recall_metrics(tmp_path, capsys):
    out = tmp_path / "enc"
    rc, _, err = _run(capsys, "encoder", "train", str(ROOT_DIR / "configs/encoders/digits.yaml"), f"encoder.out_dir={out}",
                      "encoder.steps=5", "encoder.batch_size=32", "encoder.ablation=false", "data.max_items=200")
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["recall@1"] <= 1.0 and 0.0 <= metrics["recall@5"] <= 1.0
    assert (out / "encoder.safetensors").is_file()


# --- sample: the tasks of the other settings ---------------------------------------------------
@pytest.fixture(scope="module")
def multimodal_run(tmp_path_factory):
    """A debug run with label, masked-image and source-image modalities, trained a few steps."""
    root = tmp_path_factory.mktemp("multi")
    mods = ("modalities=[{name: label, kind: label}, {name: masked, kind: masked_image, options: {mask_ratio: 0.5}},"
            " {name: source, kind: source_image, options: {transform: invert}}]")
    rc = main(["train", DEBUG, f"run.dir={root / 'run'}", f"eval.cache_dir={root / 'cache'}", mods])
    assert rc == 0
    return root / "run"


@pytest.fixture(scope="module")
def representation_run(tmp_path_factory):
    """An untrained run folder with a representation modality (model + resolved config)."""
    from unidiff.checkpoint import export_model
    from unidiff.config import build_model, load_config, resolve_with_data, to_yaml
    from unidiff.data import build_datasets

    run_dir = tmp_path_factory.mktemp("rep") / "run"
    cfg = load_config(DEBUG, ["modalities=[{name: representation, kind: representation, options: {dim: 4}}]"])
    _, _, info = build_datasets(cfg.data)
    cfg = resolve_with_data(cfg, info)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    export_model(build_model(cfg, info.image_shape), run_dir / "model")  # as training exports it (+ manifest)
    return run_dir


def _sample(capsys, run_dir, task, out, *extra):
    return _run(capsys, "sample", str(run_dir), "--task", task, "--steps", "2", "--sampler", "ddim", *extra,
                "--out", str(out))


def test_inpaint_with_given_masks_writes_them_back(multimodal_run, tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 8, 8, 1), dtype=np.uint8)
    masks = np.zeros((4, 8, 8), np.uint8)
    masks[:, :4] = 1  # top half visible
    np.savez(tmp_path / "in.npz", images=images, masks=masks)
    rc, _, err = _sample(capsys, multimodal_run, "inpaint", tmp_path / "o.npz", "--inputs", str(tmp_path / "in.npz"))
    assert rc == 0, err
    with np.load(tmp_path / "o.npz") as f:
        assert f["images"].shape == (4, 8, 8, 1) and f["images"].dtype == np.uint8
        assert (f["masks"] == masks).all()


def test_inpaint_default_inputs_use_random_masks_of_the_run_ratio(multimodal_run, tmp_path, capsys):
    rc, _, err = _sample(capsys, multimodal_run, "inpaint", tmp_path / "o.npz", "-n", "3")
    assert rc == 0, err
    with np.load(tmp_path / "o.npz") as f:
        masks = f["masks"]
    assert masks.shape == (3, 8, 8)
    assert np.allclose(masks.mean(axis=(1, 2)), 0.5)  # mask_ratio 0.5 of the patches hidden


def test_transition_and_target_to_source(multimodal_run, tmp_path, capsys):
    rc, _, err = _sample(capsys, multimodal_run, "transition", tmp_path / "t.npz", "-n", "3")
    assert rc == 0, err
    with np.load(tmp_path / "t.npz") as f:
        assert f["images"].shape == (3, 8, 8, 1) and f["sources"].shape == (3, 8, 8, 1)
        assert f["labels"].shape == (3,)  # the generated labels ride along
    images = np.full((2, 8, 8, 1), 255, np.uint8)  # white images: their inverted source is black
    np.savez(tmp_path / "in.npz", images=images)
    rc, _, err = _sample(capsys, multimodal_run, "target_to_source", tmp_path / "r.npz", "--inputs", str(tmp_path / "in.npz"))
    assert rc == 0, err
    with np.load(tmp_path / "r.npz") as f:
        assert (f["images"] == images).all() and f["sources"].shape == (2, 8, 8, 1)


def test_representation_tasks(representation_run, tmp_path, capsys):
    r = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    np.savez(tmp_path / "r.npz", representations=r)
    rc, _, err = _sample(capsys, representation_run, "representation_to_image", tmp_path / "o.npz",
                         "--inputs", str(tmp_path / "r.npz"))
    assert rc == 0, err
    with np.load(tmp_path / "o.npz") as f:
        assert f["images"].shape == (3, 8, 8, 1) and np.allclose(f["representations"], r)
    rc, _, err = _sample(capsys, representation_run, "image_to_representation", tmp_path / "i.npz", "-n", "5")
    assert rc == 0, err
    with np.load(tmp_path / "i.npz") as f:
        assert f["representations"].shape == (5, 4) and np.isfinite(f["representations"]).all()


def test_sample_task_input_errors(representation_run, multimodal_run, tmp_path, capsys):
    rc, _, err = _sample(capsys, representation_run, "representation_to_image", tmp_path / "a.npz")
    _assert_one_line_error(rc, err, "representations")
    np.savez(tmp_path / "bad.npz", representations=np.zeros((2, 7), np.float32))
    rc, _, err = _sample(capsys, representation_run, "representation_to_image", tmp_path / "b.npz",
                         "--inputs", str(tmp_path / "bad.npz"))
    _assert_one_line_error(rc, err, "N×4")
    rc, _, err = _sample(capsys, representation_run, "inpaint", tmp_path / "c.npz")
    _assert_one_line_error(rc, err, "masked_image")
    rc, _, err = _sample(capsys, multimodal_run, "joint", tmp_path / "d.npz", "--inputs", str(tmp_path / "bad.npz"))
    _assert_one_line_error(rc, err, "--inputs")
    assert not list(tmp_path.glob("?.npz"))


def test_class_to_image_with_classifier_guidance(trained_run, tmp_path, capsys):
    rc, _, err = _sample(capsys, trained_run, "class_to_image", tmp_path / "c.npz", "-n", "3", "--labels", "2",
                         "--classifier-scale", "1.5")
    assert rc == 0, err
    with np.load(tmp_path / "c.npz") as f:
        assert f["labels"].tolist() == [2, 2, 2] and f["images"].shape == (3, 8, 8, 1)
    rc, _, err = _sample(capsys, trained_run, "joint", tmp_path / "j.npz", "--classifier-scale", "1")
    _assert_one_line_error(rc, err, "--classifier-scale")


def test_readme_sampling_table_is_the_task_table():
    """README.md's sampling-task rows are exactly ``joint`` + the built-in kinds' tasks, each with its kind."""
    import re

    import heads

    text = (ROOT / "README.md").read_text()
    table = text[text.index("| task | needs (modality kind) |"):].split("\n\n")[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([\w–]+) \|", table, flags=re.M))
    builtin = {name: t.kind for name, t in heads.modality_tasks().items() if t.kind in heads.MODALITY_KINDS}
    assert rows == {"joint": "–", **builtin}
    assert "reverse_transition" not in text


def test_class_to_image_labels_from_inputs_and_their_errors(trained_run, tmp_path, capsys):
    np.savez(tmp_path / "l.npz", labels=np.array([4, 4, 7]))
    rc, _, err = _sample(capsys, trained_run, "class_to_image", tmp_path / "o.npz", "--inputs", str(tmp_path / "l.npz"))
    assert rc == 0, err
    with np.load(tmp_path / "o.npz") as f:
        assert f["labels"].tolist() == [4, 4, 7] and f["images"].shape == (3, 8, 8, 1)
    rc, _, err = _sample(capsys, trained_run, "class_to_image", tmp_path / "a.npz", "--labels", "3,12")
    _assert_one_line_error(rc, err, "--labels", "12", "[0, 10)")
    np.savez(tmp_path / "f.npz", labels=np.array([0.5, 1.0]))
    rc, _, err = _sample(capsys, trained_run, "class_to_image", tmp_path / "b.npz", "--inputs", str(tmp_path / "f.npz"))
    _assert_one_line_error(rc, err, "f.npz", "'labels'", "integer")
    rc, _, err = _sample(capsys, trained_run, "class_to_image", tmp_path / "c.npz", "--inputs", str(tmp_path / "l.npz"),
                         "--labels", "1")
    _assert_one_line_error(rc, err, "--labels")
    rc, _, err = _sample(capsys, trained_run, "image_to_label", tmp_path / "d.npz", "--labels", "1")
    _assert_one_line_error(rc, err, "--labels")
    assert not list(tmp_path.glob("[a-d].npz"))


def test_inpaint_rejects_masks_that_are_not_binary(multimodal_run, tmp_path, capsys):
    images = np.zeros((2, 8, 8, 1), np.uint8)
    np.savez(tmp_path / "in.npz", images=images, masks=np.full((2, 8, 8), 2, np.uint8))
    rc, _, err = _sample(capsys, multimodal_run, "inpaint", tmp_path / "o.npz", "--inputs", str(tmp_path / "in.npz"))
    _assert_one_line_error(rc, err, "in.npz", "'masks'", "0 (masked) and 1 (visible)")
    np.savez(tmp_path / "in2.npz", images=images, masks=np.ones((2, 4, 4), np.uint8))
    rc, _, err = _sample(capsys, multimodal_run, "inpaint", tmp_path / "o.npz", "--inputs", str(tmp_path / "in2.npz"))
    _assert_one_line_error(rc, err, "in2.npz", "'masks'", "N×8×8")
    assert not (tmp_path / "o.npz").exists()


# --- help texts, evaluation provenance, multi-seed runs (tracking task) ---------------------------
def _subparsers():
    import argparse

    from unidiff.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_every_argument_has_a_help_text_that_shows_its_default():
    import argparse

    from unidiff.cli import help_text

    parser, commands = _subparsers()
    assert {"train", "sample", "evaluate", "run", "experiment", "encoder", "plot"} <= set(commands)
    for name, p in commands.items():
        shown = " ".join(p.format_help().split())  # what `unidiff NAME --help` prints
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            what = f"unidiff {name} {action.option_strings or action.dest}"
            text = " ".join(help_text(p, action).split())
            assert text, f"{what} has no help text"
            assert text in shown, what
            optional = action.option_strings and not action.required
            if optional or action.nargs in ("?", "*"):
                assert "default" in text, f"{what}: the help does not say its default: {text!r}"
    # the two that had none: sample's and evaluate's --seed state their default
    for name in ("sample", "evaluate"):
        seed = next(a for a in commands[name]._actions if "--seed" in a.option_strings)
        assert "(default: 0)" in help_text(commands[name], seed)


def test_readme_preset_table_is_what_the_presets_module_prints():
    import subprocess
    import sys

    printed = subprocess.run([sys.executable, "-m", "unidiff.models.presets"], capture_output=True, text=True,
                             check=True, cwd=ROOT).stdout.strip()
    assert printed.startswith("| preset |") and printed.count("\n") >= 9
    assert printed in (ROOT / "README.md").read_text()


def _git_head():
    import subprocess

    try:
        res = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def test_evaluate_seed_out_provenance_and_no_silent_overwrite(trained_run, tmp_path, capsys):
    import unidiff

    cache = f"eval.cache_dir={trained_run.parent / 'cache'}"
    target = tmp_path / "m.json"
    argv = ["evaluate", str(trained_run), cache, "eval.n_samples=8", "--seed", "5", "--out", str(target)]
    rc, out, err = _run(capsys, *argv)
    assert rc == 0, err
    assert f"metrics: {target}" in out
    first = json.loads(target.read_text())
    prov = first["provenance"]
    assert prov["seed"] == 5 and prov["overrides"] == [cache, "eval.n_samples=8"]
    assert prov["checkpoint"] == str(trained_run / "model") and prov["step"] == 4
    assert (prov["sampler"], prov["steps"], prov["guidance"], prov["n_samples"]) == ("ddim", 3, 1.0, 8)
    assert prov["unidiff_version"] == unidiff.__version__
    assert prov["git_commit"] == _git_head()  # null exactly when the tests do not run in a git checkout
    assert prov["previous"] is None
    # the same command again: the same numbers (the seed fixes every draw), the first file kept
    rc, _, err = _run(capsys, *argv)
    assert rc == 0, err
    second = json.loads(target.read_text())
    kept = sorted(tmp_path.glob("m.*.json"))
    assert len(kept) == 1 and second["provenance"]["previous"] == str(kept[0])
    assert json.loads(kept[0].read_text()) == first
    numbers = {k: v for k, v in first.items() if k != "provenance"}
    assert {k: v for k, v in second.items() if k != "provenance"} == numbers
    # another seed, other draws: the Monte-Carlo bound moves
    rc, _, err = _run(capsys, *argv[:-4], "--seed", "6", "--out", str(tmp_path / "m6.json"))
    assert rc == 0, err
    assert json.loads((tmp_path / "m6.json").read_text())["bits_per_dim"] != first["bits_per_dim"]
    rc, _, err = _run(capsys, "evaluate", str(trained_run), "--out", str(tmp_path / "m.txt"))
    _assert_one_line_error(rc, err, "--out", ".json")


def test_seed_summary_is_mean_and_sample_std():
    import statistics

    from unidiff.seeds import summarize

    per_seed = {0: {"fid": 10.0, "acc": 0.5, "step": 4, "flag": True}, 1: {"fid": 12.0, "acc": 0.7}, 2: {"fid": 17.0}}
    s = summarize(per_seed)
    assert set(s) == {"fid", "acc"}  # step is bookkeeping, booleans are not numbers
    fid = s["fid"]
    assert fid["values"] == [10.0, 12.0, 17.0] and fid["seeds"] == [0, 1, 2] and fid["n"] == 3
    assert fid["mean"] == pytest.approx(13.0)
    assert fid["std"] == pytest.approx(math.sqrt(((10 - 13) ** 2 + (12 - 13) ** 2 + (17 - 13) ** 2) / 2))
    assert s["acc"]["n"] == 2 and s["acc"]["std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    one = summarize({3: {"fid": 1.0}})["fid"]
    assert one["mean"] == 1.0 and one["std"] is None
    assert math.isnan(summarize({0: {"fid": 1.0}, 1: {"fid": float("nan")}})["fid"]["mean"])


def test_paired_differences_are_within_seed_and_count_the_positive_ones():
    from unidiff.seeds import paired_differences

    per_seed = {0: {"a/fid": 30.0, "b/fid": 26.0, "c/fid": 31.0, "a/acc": 0.9, "b/acc": 0.95, "a/step": 9, "b/step": 9,
                    "a/fid_floor": 7.0, "b/fid_floor": 7.0},
                1: {"a/fid": 20.0, "b/fid": 19.0, "c/fid": 18.0, "a/acc": 0.8},  # b/acc missing in seed 1
                2: {"a/fid": 40.0, "b/fid": 33.0, "c/fid": 41.0, "a/acc": 0.7, "b/acc": 0.6}}
    p = paired_differences(per_seed, ["a", "b", "c"])
    assert set(p) == {"b - a/fid", "c - a/fid", "b - a/acc"}  # step: bookkeeping; the floor: the data's; c: no acc
    assert p["b - a/fid"]["values"] == [-4.0, -1.0, -7.0] and p["b - a/fid"]["positive"] == 0
    assert p["b - a/fid"]["mean"] == pytest.approx(-4.0) and p["b - a/fid"]["std"] == pytest.approx(3.0)
    assert p["c - a/fid"]["values"] == [1.0, -2.0, 1.0] and p["c - a/fid"]["positive"] == 2
    acc = p["b - a/acc"]
    assert acc["seeds"] == [0, 2] and acc["values"] == pytest.approx([0.05, -0.1]) and acc["positive"] == 1
    assert paired_differences(per_seed, ["a"]) == {}


@pytest.mark.parametrize("bad", ["0,x", "1,1", "-1", ","])
def test_bad_seeds_are_one_line_errors(workdir, capsys, bad):
    rc, _, err = _run(capsys, "run", DEBUG, "--seeds", bad)
    _assert_one_line_error(rc, err, "--seeds")
    assert _files(workdir) == []


def test_run_with_seeds_trains_one_run_per_seed_and_summarises(tmp_path, capsys):
    base = tmp_path / "ms"
    rc, out, err = _run(capsys, "run", DEBUG, f"run.dir={base}", "train.steps=2", "train.sample_every=0",
                        f"eval.cache_dir={tmp_path / 'cache'}", "eval.n_samples=8", "--seeds", "0,1")
    assert rc == 0, err
    metrics = {}
    for seed in (0, 1):
        folder = tmp_path / f"ms_s{seed}"
        cfg = (folder / "config.yaml").read_text()
        assert f"seed: {seed}" in cfg and f"name: debug_s{seed}" in cfg
        metrics[seed] = json.loads((folder / "metrics.json").read_text())
        assert metrics[seed]["provenance"]["seed"] == seed
    assert metrics[0]["bits_per_dim"] != metrics[1]["bits_per_dim"]
    summary = json.loads((tmp_path / "ms_seeds" / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["runs"] == {"0": str(tmp_path / "ms_s0"), "1": str(tmp_path / "ms_s1")}
    for key in ("bits_per_dim", "fid", "label_accuracy"):
        a, b = metrics[0][key], metrics[1][key]
        e = summary["metrics"][key]
        assert e["mean"] == pytest.approx((a + b) / 2) and e["std"] == pytest.approx(abs(a - b) / math.sqrt(2))
    md = (tmp_path / "ms_seeds" / "summary.md").read_text()
    assert "| bits_per_dim |" in md and "±" in md and "summary:" in out


def test_experiment_with_seeds_names_each_seed_and_summarises_per_arm(tmp_path, capsys, monkeypatch):
    import experiments

    calls = []

    def fake_run_experiment(config, overrides):  # stands for the arms' training and evaluation
        exp = experiments.load_experiment(config, overrides)
        seed = int(next(iter(exp.arms.values())).run.seed)
        calls.append((exp.spec.name, seed, str(exp.out_dir)))
        exp.out_dir.mkdir(parents=True)
        arms = {arm: {"metrics": {"fid": 10.0 + seed + k * (1 + seed), "step": 2}} for k, arm in enumerate(exp.arms)}
        (exp.out_dir / "results.json").write_text(json.dumps({"arms": arms}))
        (exp.out_dir / "results.md").write_text(f"seed {seed}\n")
        return exp.out_dir

    monkeypatch.setattr(experiments, "run_experiment", fake_run_experiment)
    config = ROOT / "configs" / "experiments" / "joint_image_label.yaml"
    out_dir = tmp_path / "exp"
    rc, out, err = _run(capsys, "experiment", str(config), f"experiment.out_dir={out_dir}", "--seeds", "2,5")
    assert rc == 0, err
    name = experiments.load_experiment(config, [f"experiment.out_dir={out_dir}"]).spec.name
    assert calls == [(f"{name}_s2", 2, f"{out_dir}_s2"), (f"{name}_s5", 5, f"{out_dir}_s5")]
    summary = json.loads(Path(f"{out_dir}_seeds/summary.json").read_text())
    arms = list(experiments.load_experiment(config, [f"experiment.out_dir={out_dir}"]).arms)
    assert set(summary["metrics"]) == {f"{arm}/fid" for arm in arms}
    e = summary["metrics"][f"{arms[0]}/fid"]
    assert e["values"] == [12.0, 15.0] and e["mean"] == 13.5 and e["std"] == pytest.approx(math.sqrt(4.5))
    # arm k minus the first arm, within each seed: k * (1 + seed), i.e. k*3 and k*6
    assert summary["arms"] == arms and len(arms) >= 2
    for k, arm in enumerate(arms[1:], start=1):
        d = summary["paired"][f"{arm} - {arms[0]}/fid"]
        assert d["values"] == [3.0 * k, 6.0 * k] and d["seeds"] == [2, 5] and d["positive"] == 2
        assert d["mean"] == pytest.approx(4.5 * k) and d["std"] == pytest.approx(math.sqrt(4.5) * k)
    md = Path(f"{out_dir}_seeds/summary.md").read_text()
    assert "## Paired differences" in md and f"| {arms[1]} - {arms[0]}/fid | 4.5 ± 2.1 | 2/2 | 2 | 3, 6 |" in md


# --- issue 13: faults in the inputs of sample / evaluate (README "What survives what") -------------
def test_sample_input_dtypes_convert_exactly_or_fail_in_one_line(trained_run, tmp_path, capsys):
    """uint16/int32 images within 0..255 are the uint8 images (same read labels, same stored
    images); out-of-range integers and floats outside [-1, 1] are an error naming the dtype."""
    images = np.random.default_rng(1).integers(0, 256, size=(3, 8, 8, 1), dtype=np.uint8)
    read = {}
    for dtype in ("uint8", "uint16", "int32"):
        np.savez(tmp_path / f"{dtype}.npz", images=images.astype(dtype))
        rc, _, err = _run(capsys, "sample", str(trained_run), "--task", "image_to_label", "--seed", "5",
                          "--inputs", str(tmp_path / f"{dtype}.npz"), "--out", str(tmp_path / f"o_{dtype}.npz"))
        assert rc == 0, err
        with np.load(tmp_path / f"o_{dtype}.npz") as f:
            assert (f["images"] == images).all()
            read[dtype] = f["labels"].tolist()
    assert read["uint16"] == read["uint8"] == read["int32"]
    bad = {"int32": images.astype(np.int32) + 300, "float64": images.astype(np.float64),
           "uint16": np.full((2, 8, 8, 1), 65535, np.uint16), "complex64": images.astype(np.complex64)}
    for name, array in bad.items():
        np.savez(tmp_path / f"bad_{name}.npz", images=array)
        rc, _, err = _run(capsys, "sample", str(trained_run), "--task", "image_to_label",
                          "--inputs", str(tmp_path / f"bad_{name}.npz"), "--out", str(tmp_path / "b.npz"))
        _assert_one_line_error(rc, err, "--inputs", "'images'", name)
    assert not (tmp_path / "b.npz").exists()


def test_truncated_or_empty_inputs_are_one_line(trained_run, tmp_path, capsys):
    np.savez(tmp_path / "full.npz", images=np.zeros((4, 8, 8, 1), np.uint8))
    data = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.npz").write_bytes(b"")
    np.save(tmp_path / "bare.npy", np.zeros(3))
    (tmp_path / "bare.npz").write_bytes((tmp_path / "bare.npy").read_bytes())
    for name in ("cut.npz", "empty.npz", "bare.npz"):
        rc, _, err = _run(capsys, "sample", str(trained_run), "--task", "image_to_label",
                          "--inputs", str(tmp_path / name), "--out", str(tmp_path / "o.npz"))
        _assert_one_line_error(rc, err, "--inputs", name)
    assert not (tmp_path / "o.npz").exists()


def test_sample_steps_above_the_training_timesteps(trained_run, tmp_path, capsys):
    rc, _, err = _run(capsys, "sample", str(trained_run), "--steps", "101", "--out", str(tmp_path / "o.npz"))
    _assert_one_line_error(rc, err, "--steps", "101", "num_train_timesteps=100")
    rc, _, err = _run(capsys, "sample", str(trained_run), "--steps", "100", "-n", "2", "--out", str(tmp_path / "o.npz"))
    assert rc == 0, err  # the limit itself runs


def test_sample_out_naming_a_folder_leaves_no_tmp(trained_run, tmp_path, capsys):
    (tmp_path / "d.npz").mkdir()
    rc, _, err = _run(capsys, "sample", str(trained_run), "-n", "2", "--out", str(tmp_path / "d.npz"))
    _assert_one_line_error(rc, err, "--out", "folder")
    (tmp_path / "g.png").mkdir()  # the grid beside the .npz
    rc, _, err = _run(capsys, "sample", str(trained_run), "-n", "2", "--out", str(tmp_path / "g.npz"))
    _assert_one_line_error(rc, err, "--out", "g.png")
    assert _files(tmp_path) == ["d.npz", "g.png"]


@pytest.mark.parametrize("argv, needle", [
    (["--seed", "-1"], "--seed"), (["--seed", "4294967296"], "--seed"), (["--guidance", "inf"], "--guidance"),
    (["--classifier-scale", "nan"], "--classifier-scale"), (["--steps", "0"], "--steps"),
])
def test_sample_argument_ranges(trained_run, tmp_path, capsys, argv, needle):
    rc, _, err = _run(capsys, "sample", str(trained_run), *argv, "--out", str(tmp_path / "o.npz"))
    _assert_one_line_error(rc, err, needle)
    assert _files(tmp_path) == []


def test_evaluate_read_only_run_folder_fails_before_any_metric(trained_run, capsys, monkeypatch):
    """Permissions do not stop root, so the read-only folder is injected into os.access (what the
    check asks); the metrics must not even start (the reference classifier would train first)."""
    import os

    import unidiff.metrics

    def never(*args, **kwargs):
        raise AssertionError("evaluate computed metrics for a folder it cannot write")

    real = os.access
    monkeypatch.setattr(unidiff.metrics, "get_reference_classifier", never)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == trained_run and mode & os.W_OK
                        else real(p, mode, **kw))
    before = _files(trained_run)
    rc, _, err = _run(capsys, "evaluate", str(trained_run))
    _assert_one_line_error(rc, err, "run folder", "not writable")
    assert _files(trained_run) == before


# --- one seed range; one build of the data and the model per `train` ---------------------------
def test_every_seed_argument_shares_one_range_and_message(workdir, capsys):
    """run.seed, sample --seed and run --seeds: the same bounds (2**32 - 1 in, 2**32 and -1 out) and
    the same words, from one function (unidiff.seeds.check_seed)."""
    from unidiff.config import load_config
    from unidiff.errors import ConfigError
    from unidiff.seeds import check_seed

    assert load_config(DEBUG, [f"run.seed={2**32 - 1}"]).run.seed == 2**32 - 1
    for bad in (2**32, -1):
        with pytest.raises(ConfigError) as err:
            load_config(DEBUG, [f"run.seed={bad}"])
        assert str(err.value) == f"run.seed: must be a seed in [0, 2**32), got {bad}"
        rc, _, err_text = _run(capsys, "sample", "r", "--seed", str(bad), "--out", "x.npz")
        _assert_one_line_error(rc, err_text, "--seed", f"must be a seed in [0, 2**32), got {bad}")
        rc, _, err_text = _run(capsys, "run", DEBUG, "--seeds", f"0,{bad}")
        _assert_one_line_error(rc, err_text, "--seeds", f"must be a seed in [0, 2**32), got {bad}")
    assert check_seed(0, "k") == 0 and check_seed(2**32 - 1, "k") == 2**32 - 1
    with pytest.raises(ConfigError, match=r"^k: "):
        check_seed(True, "k")  # a YAML `yes` is not a seed
    assert _files(workdir) == []


def test_train_builds_data_and_model_once_and_the_preflight_changes_no_number(tmp_path, monkeypatch):
    """`unidiff train` checks its config (preflight: one no-grad step) on the build it then trains:
    build_datasets and build_model run once each, and the checkpoint is bitwise the one of
    train(cfg) called without any check (the debug preset has MoE buffers the check moves)."""
    from safetensors.torch import load_file

    import unidiff.data
    import unidiff.train
    from unidiff.config import load_config
    from unidiff.train import train

    calls = {"data": 0, "model": 0}
    real_data, real_model = unidiff.data.build_datasets, unidiff.train.build_model

    def count(key, fn):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    overrides = ["train.steps=2", "train.ckpt_every=2", "train.sample_every=0", "train.report_to=[]"]
    monkeypatch.setattr(unidiff.data, "build_datasets", count("data", real_data))
    monkeypatch.setattr(unidiff.train, "build_model", count("model", real_model))
    assert main(["train", DEBUG, f"run.dir={tmp_path / 'cli'}", *overrides]) == 0
    assert calls == {"data": 1, "model": 1}
    monkeypatch.undo()
    # What train() receives from the preflight is the seeded build as it was, buffers included.
    from unidiff.cli import preflight
    from unidiff.train import prepare_seeded

    cfg = load_config(DEBUG, [f"run.dir={tmp_path / 'p'}", *overrides])
    checked, fresh = preflight(cfg), prepare_seeded(cfg)
    for kind in ("named_parameters", "named_buffers"):
        a, b = dict(getattr(checked.model, kind)()), dict(getattr(fresh.model, kind)())
        assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a), kind
    assert torch_equal(checked.rng["torch"], fresh.rng["torch"])
    direct = train(load_config(DEBUG, [f"run.dir={tmp_path / 'direct'}", *overrides]))
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "cli" / "checkpoints" / "step_000002" / name))
        b = load_file(str(direct / "checkpoints" / "step_000002" / name))
        assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a), name


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


@pytest.mark.parametrize("terminal", [False, True])
def test_the_training_bar_redraws_live_only_on_a_terminal(tmp_path, capsys, monkeypatch, terminal):
    """Off a terminal (a log, an executed notebook keeps every redraw) the bar draws a few times per
    run, not once per step or logged record; on a terminal it stays live (a redraw per step here)."""
    steps = 12
    monkeypatch.setattr(type(__import__("sys").stderr), "isatty", lambda self: terminal, raising=False)
    rc = main(["train", DEBUG, f"run.dir={tmp_path / 'r'}", f"train.steps={steps}", "train.log_every=1",
               f"train.ckpt_every={steps}", "train.sample_every=0", "train.report_to=[]"])
    err = capsys.readouterr().err
    assert rc == 0, err
    redraws = err.count("\r")
    if terminal:
        assert redraws >= steps, err
    else:
        assert 1 <= redraws <= 4, err  # the first state, the last, and at most one timed or ~10% redraw
