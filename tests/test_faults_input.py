"""Input faults (issue 13, "days-long runs lose nothing", the validation half): each fault is
injected and must give one ``unidiff: error:`` line naming the key or argument, exit code 2, no
traceback, and nothing written (README "What survives what"). Faults that need a trained run
(``sample`` inputs, a read-only run folder for ``evaluate``) are in test_cli.py beside its
``trained_run`` fixture."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import yaml

from unidiff.checkpoint import save_checkpoint
from unidiff.cli import main
from unidiff.config import load_config, run_dir, to_yaml
from unidiff.errors import CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")
EXPERIMENT = str(ROOT / "configs" / "experiments" / "joint_image_label.yaml")


def _files(folder: Path):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _one_line_error(capsys, argv, *needles, progress=False):
    """``main(argv)`` fails with exit 2 and one error line holding ``needles``; ``progress``: a
    training progress bar (tqdm, on stderr) may precede it."""
    rc = main(list(argv))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    if progress:
        lines = [line[line.index("unidiff: "):] for line in err.replace("\r", "\n").splitlines() if "unidiff: " in line]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("unidiff: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- non-finite numbers ----------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("train.lr=inf", "train.lr"),
    ("train.lr=nan", "train.lr"),
    ("diffusion.gamma=inf", "diffusion.gamma"),
    ("modalities.0.weight=inf", "modalities[0].weight"),
    ("modalities.0.loss_weight=nan", "modalities[0].loss_weight"),
    ("sample.classifier_scale=inf", "sample.classifier_scale"),
    ("sample.classifier_scale=nan", "sample.classifier_scale"),
    ("eval.guidance=inf", "eval.guidance"),
    ("train.betas=[0.9,nan]", "train.betas[1]"),
    ("model.backbone.mlp_ratio=.inf", "model.backbone.mlp_ratio"),  # untyped: YAML .inf
    ("diffusion.beta_end=.nan", "diffusion.beta_end"),
    ("modalities.0.options.temperature=-.inf", "modalities[0].options.temperature"),
])
def test_non_finite_config_values_are_rejected_at_load(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(DEBUG, [override])
    assert str(info.value).startswith(f"{key}: "), str(info.value)


@pytest.mark.parametrize("flag", ["--guidance", "--classifier-scale"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_sample_arguments_are_rejected(workdir, capsys, flag, value):
    _one_line_error(capsys, ["sample", "no_run", flag, value, "--out", "x.npz"], flag)
    assert _files(workdir) == []


# --- accepted means it runs ------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, key", [
    (["image_head=false"], "train.sample_every"),  # debug.yaml draws grids every 2 steps
    (["sample.n=100000000"], "sample.n"),
    (["train.batch_size=1000000000000"], "train.batch_size"),
    (["run.seed=-1"], "run.seed"),
    (["run.seed=4294967296"], "run.seed"),
    (["model.backbone.num_heads=0"], "model.backbone.num_heads"),
    (["model.backbone.chunk_size=0"], "model.backbone.chunk_size"),
    (["train.steps=${nope}"], "train.steps"),
    (["diffusion.num_train_timesteps=1000000000"], "diffusion.num_train_timesteps"),
    (["sample.steps=101"], "sample.steps"),  # debug.yaml: 100 training timesteps
    (["eval.steps=1000"], "eval.steps"),
    (["modalities.0.name=digit"], "modalities[0].name"),  # the data has 'label', not 'digit'
])
def test_dry_run_rejects_what_training_would_fail_on(workdir, capsys, overrides, key):
    _one_line_error(capsys, ["train", DEBUG, "--dry-run", *overrides], key)
    assert _files(workdir) == []


def test_the_limits_themselves_are_accepted():
    """Boundary values are accepted: the checks reject only what cannot run."""
    cfg = load_config(DEBUG, ["run.seed=4294967295", "sample.steps=100", "eval.steps=100", "image_head=false",
                              "train.sample_every=0", "sample.n=10000"])
    assert cfg.run.seed == 2**32 - 1 and cfg.sample.steps == 100 and cfg.sample.n == 10000
    cfg = load_config(DEBUG, ["train.warmup_steps=${train.steps}"])  # a valid interpolation resolves
    assert cfg.train.warmup_steps == cfg.train.steps == 4


# --- run names -------------------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["run.name=no", "run.name=yes", "run.name=''", "run.name=..", "run.name=.",
                                      "run.name=/abs", "run.name=a/b", "run.name=1e3", "run.name=' x'"])
def test_run_names_stay_inside_the_runs_folder(workdir, capsys, override):
    _one_line_error(capsys, ["train", DEBUG, "--dry-run", override], "run.name")
    assert _files(workdir) == []


def test_a_quoted_name_is_a_name_and_survives_the_saved_yaml(tmp_path):
    cfg = load_config(DEBUG, ["run.name='no'"])
    assert run_dir(cfg) == Path("runs") / "no"
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(saved).run.name == "no"


def test_a_yaml_bool_name_in_a_file_is_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  name: off\n")
    with pytest.raises(ConfigError, match=r"^run\.name: .*bool"):
        load_config(path)


def test_any_label_is_fine_with_an_explicit_run_dir(tmp_path):
    cfg = load_config(DEBUG, ["run.name=''", f"run.dir={tmp_path / 'r'}"])
    assert run_dir(cfg) == tmp_path / "r"


# --- file system ---------------------------------------------------------------------------------
def test_run_dir_that_is_a_file(workdir, capsys):
    (workdir / "f").write_text("x")
    for argv in (["train", DEBUG, "run.dir=f"], ["train", DEBUG, "--dry-run", "run.dir=f/sub"]):
        _one_line_error(capsys, argv, "run.dir", "'f'", "not a folder")
    assert _files(workdir) == ["f"]


def test_unwritable_run_dir(workdir, capsys, monkeypatch):
    """Permissions do not stop root (the test machine), so the denial is injected into os.access,
    what the check asks; the folder itself stays untouched."""
    locked = workdir / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked and mode & os.W_OK
                        else real(p, mode, **kw))
    _one_line_error(capsys, ["train", DEBUG, f"run.dir={locked / 'run'}"], "run.dir", "not writable")
    _one_line_error(capsys, ["run", DEBUG, f"run.dir={locked}"], "run.dir", "not writable")
    assert _files(workdir) == ["locked"]


class _FakeAccelerator:
    """The part of accelerate ``save_checkpoint`` uses; ``save_state`` writes half a file and fails."""

    is_main_process = True

    def __init__(self, error):
        self.error = error

    def wait_for_everyone(self):
        pass

    def save_state(self, output_dir):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 64)
        raise self.error


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0\nsecond line"),
])
def test_full_disk_while_checkpointing_is_one_line_and_leaves_no_tmp(tmp_path, error):
    root = tmp_path / "checkpoints"
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(_FakeAccelerator(error), root, 6, keep_last=2)
    assert "\n" not in str(info.value) and "step_000006" in str(info.value)
    assert _files(root) == []  # neither step_000006.tmp nor a half step folder


def test_full_disk_during_training_is_one_line_through_the_cli(workdir, capsys, monkeypatch):
    import accelerate

    def full(self, output_dir=None, **kwargs):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full)
    _one_line_error(capsys, ["train", DEBUG, "run.dir=r", "train.steps=2", "train.sample_every=0"],
                    "cannot write checkpoint", "inline_container", progress=True)
    assert not [f for f in _files(workdir) if ".tmp" in f]


def test_an_os_error_elsewhere_is_one_line(workdir, capsys, monkeypatch):
    import unidiff.train

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "r/config.yaml")

    monkeypatch.setattr(unidiff.train, "write_text", full)
    _one_line_error(capsys, ["train", DEBUG, "run.dir=r"], "No space left on device", "r/config.yaml")


# --- rejected means nothing written ---------------------------------------------------------------
def test_rejected_experiment_writes_nothing(workdir, capsys):
    """num_classes=7 contradicts the data (10 classes): only the data can tell, yet the experiment
    folder (base.yaml, the arms' run folders) must not appear."""
    out = workdir / "exp"
    line = _one_line_error(capsys, ["experiment", EXPERIMENT, f"experiment.out_dir={out}", "train.steps=2",
                                    "modalities.0.options.num_classes=7"], "experiment.arms.", "num_classes")
    assert "7" in line
    assert _files(workdir) == []


def test_experiment_out_dir_that_is_a_file(workdir, capsys):
    (workdir / "exp").write_text("x")
    _one_line_error(capsys, ["experiment", EXPERIMENT, "experiment.out_dir=exp", "train.steps=2"],
                    "experiment.out_dir", "not a folder")
    assert _files(workdir) == ["exp"]


def test_rejected_train_override_leaves_no_run_folder(workdir, capsys):
    for override in ("modalities.0.options.num_classes=7", "image_head=false", "modalities.0.name=digit",
                     "train.batch_size=1000000000000"):
        rc = main(["train", DEBUG, override])
        capsys.readouterr()
        assert rc == 2, override
        assert _files(workdir) == [], override


def test_setup_cfg_dev_extra_lists_hypothesis():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    dev = [line.split("#")[0].strip() for line in cfg["options.extras_require"]["dev"].splitlines()]
    assert any(d.startswith("hypothesis") for d in dev)
    assert yaml  # the module is imported for YAML round trips above


# --- `unidiff run`: what evaluation needs is checked before training ----------------------------
def test_run_dry_run_checks_every_seeds_folder_and_writes_nothing(workdir, capsys):
    rc = main(["run", DEBUG, "--dry-run", "--seeds", "3,4", "train.steps=5"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "seed: 3" in out and "steps: 5" in out and "parameters:" in out  # the first seed's config
    assert _files(workdir) == []
    (workdir / "r_s4").write_text("a file where seed 4's run folder would go")
    _one_line_error(capsys, ["run", DEBUG, "--dry-run", "--seeds", "3,4", f"run.dir={workdir / 'r'}"], "run.dir", "r_s4")
    assert _files(workdir) == ["r_s4"]


@pytest.mark.parametrize("dry", [True, False])
def test_run_without_the_inception_weights_fails_before_training(workdir, capsys, monkeypatch, dry):
    # eval.features=inception needs a local weights file; `unidiff run` used to train for the
    # whole budget and only then fail in the evaluation
    monkeypatch.delenv("UNIDIFF_INCEPTION_WEIGHTS", raising=False)
    argv = ["run", DEBUG, "eval.features=inception", "train.steps=2", *(["--dry-run"] if dry else [])]
    _one_line_error(capsys, argv, "eval.inception_weights")
    missing = workdir / "nowhere.pth"
    _one_line_error(capsys, [*argv, f"eval.inception_weights={missing}"], str(missing))
    garbage = workdir / "garbage.pth"
    garbage.write_bytes(b"not a state dict")
    _one_line_error(capsys, [*argv, f"eval.inception_weights={garbage}"], str(garbage))
    assert _files(workdir) == ["garbage.pth"]  # no run folder, no checkpoint
