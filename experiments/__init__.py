"""The experiments of DESIGN.md §4: each setting against its single-task baseline(s).

``unidiff experiment configs/experiments/<setting>.yaml [key=value ...]`` (or :func:`run`) trains
every *arm* of an experiment (the multi-task model and its single-task baselines, same backbone,
steps and seed), evaluates each, and writes into ``runs/experiments/<name>/``:

- ``<arm>/``: an ordinary run folder (``unidiff evaluate``/``sample`` work on it);
- ``results.json``: every metric of every arm, the comparison table, context numbers, timings;
- ``results.md``: the table (rows = metrics with the better direction, columns = arms);
- ``samples.png``: sample grids of each arm side by side (plus the data they were conditioned on);
- ``metrics.png``: one bar chart per metric;
- ``base.yaml``: the run config every arm starts from (base file + the experiment's own sections);
- ``representation/`` (``joint_image_representation``): the encoder summary, the PCA, and
  ``vectors.safetensors``, the ``data.extra_file`` of the arms with a representation modality.

The package owns all of it; the core (``unidiff/``) knows nothing of experiments, and only the
CLI's ``experiment`` command imports this package (lazily):

- :mod:`experiments.spec`: the ``experiment:`` schema and :func:`load_experiment` (the arms' configs);
- :mod:`experiments.setting`: the :class:`Setting` contract, the registry :data:`SETTINGS`, the
  evaluation context and the per-arm driver :func:`arm_metrics`;
- one module per setting, registered by name, in the setting's folder beside its README:
  ``joint_image_label``, ``joint_image_representation``, ``masked_image``, ``image_transition``,
  and the paper's claim ``masked_class_conditional`` (their docstrings say what each measures);
- :mod:`experiments.augment`: masks as plain augmentation (``experiment.mask_augment_arms``);
- :mod:`experiments.runner`: :func:`run_experiment` (train, evaluate, resume by rerunning;
  ``experiment.eval_at``: evaluations at checkpoints over training);
- :mod:`experiments.report`: the table, ``results.json``/``results.md``; :mod:`experiments.figures`:
  ``samples.png``/``metrics.png``.

Every metric is only reported where the arm has the part it measures ("—" in the table otherwise);
none is faked. From Python::

    from experiments import run
    run("masked_image", ["train.steps=100"])   # == unidiff experiment configs/experiments/masked_image.yaml train.steps=100
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from unidiff.errors import ConfigError

from .report import results_markdown
from .runner import run_experiment
from .setting import SETTINGS, Setting, register
from .spec import Experiment, ExperimentSpec, load_experiment

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "experiments"

__all__ = ["SETTINGS", "Setting", "register", "Experiment", "ExperimentSpec", "load_experiment", "run_experiment",
           "results_markdown", "config_path", "run", "CONFIG_DIR"]


def config_path(setting: str) -> Path:
    """``configs/experiments/<setting>.yaml``."""
    if setting not in SETTINGS:
        raise ConfigError(f"unknown experiment {setting!r}; choose one of {list(SETTINGS)}")
    return CONFIG_DIR / f"{setting}.yaml"


def run(setting: str, overrides: Sequence[str] = ()) -> Path:
    """Run (or resume) one setting with its baselines; returns ``runs/experiments/<setting>``."""
    return run_experiment(config_path(setting), overrides)
