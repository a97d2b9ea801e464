"""The experiments of DESIGN.md §4: one folder per setting (its README: the question, the command,
the results), one config per setting in ``configs/experiments/``, one runner
(:func:`unidiff.experiment.run_experiment`, the ``unidiff experiment`` command).

    from experiments import run
    run("masked_image", ["train.steps=100"])   # == unidiff experiment configs/experiments/masked_image.yaml train.steps=100
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from unidiff.errors import ConfigError

SETTINGS = ("joint_image_label", "joint_image_representation", "masked_image", "image_transition")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "experiments"


def config_path(setting: str) -> Path:
    """``configs/experiments/<setting>.yaml``."""
    if setting not in SETTINGS:
        raise ConfigError(f"unknown experiment {setting!r}; choose one of {list(SETTINGS)}")
    return CONFIG_DIR / f"{setting}.yaml"


def run(setting: str, overrides: Sequence[str] = ()) -> Path:
    """Run (or resume) one setting with its baselines; returns ``runs/experiments/<setting>``."""
    from unidiff.experiment import run_experiment

    return run_experiment(config_path(setting), overrides)
