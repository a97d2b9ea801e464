"""``unidiff experiment CONFIG``: train and evaluate every arm of an experiment, write its results.

Resume is rerunning the same command: an arm whose final model (``<arm>/model``) was trained with
the same config is not retrained (an interrupted arm resumes from its checkpoints through
:func:`unidiff.train.train`); evaluation always reruns, with the *current* ``eval`` section.
The datasets are built once per distinct ``data`` section and handed to the evaluation.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

import torch
import yaml
from omegaconf import DictConfig
from tqdm.auto import tqdm

from unidiff.checkpoint import load_model
from unidiff.config import build_model, build_schedule, check_writable, load_config, resolve_with_data, to_container
from unidiff.data import build_datasets, iter_batches
from unidiff.errors import ConfigError, DataError
from unidiff.evaluate import evaluate
from unidiff.io import write_text
from unidiff.train import train

from . import report
from .figures import plot_metrics, plot_samples
from .setting import Context, Panels, arm_metrics, modality_index
from .spec import Experiment, load_experiment

_TRAINING_SECTIONS = ("data", "model", "diffusion", "modalities", "image_head", "train")


class Datasets:
    """``(train, val, info)`` per distinct ``data`` section, built on first use."""

    def __init__(self):
        self._built: Dict[str, Tuple[Any, Any, Any]] = {}

    def __call__(self, cfg: DictConfig) -> Tuple[Any, Any, Any]:
        key = json.dumps(to_container(cfg.data), sort_keys=True)
        if key not in self._built:
            self._built[key] = build_datasets(cfg.data)
        return self._built[key]


def is_trained(cfg: DictConfig, run_dir: Path, info) -> bool:
    """The arm's final model exists and was trained with this config (seed and training sections)."""
    if not (run_dir / "model" / "config.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    try:
        saved = to_container(load_config(run_dir / "config.yaml"))
    except ConfigError:
        return False
    new = to_container(resolve_with_data(cfg, info))
    return saved["run"]["seed"] == new["run"]["seed"] and all(saved[k] == new[k] for k in _TRAINING_SECTIONS)


def check_arms(exp: Experiment, datasets: Datasets) -> None:
    """What training would reject, for every arm, before anything is written: the config against
    its data (``resolve_with_data``), the model and schedule built from it, and a writable
    experiment folder. Errors name the arm (``experiment.arms.<arm>: ...``)."""
    check_writable(exp.out_dir, "experiment.out_dir")
    for arm, cfg in exp.arms.items():
        try:
            info = datasets(cfg)[2]
            resolved = resolve_with_data(cfg, info)
            build_model(resolved, info.image_shape)
            build_schedule(resolved)
        except ConfigError as err:
            raise ConfigError(f"experiment.arms.{arm}: {err}") from None


def build_context(exp: Experiment, datasets: Datasets) -> Context:
    """The shared evaluation inputs of an experiment: the first ``n_cond`` val items, then what
    the setting adds (:meth:`Setting.prepare`)."""
    spec = exp.spec
    cfg = next(iter(exp.arms.values()))
    train_set, val_set, info = datasets(cfg)
    n = min(int(spec.n_cond), len(val_set))
    if n < 1:
        raise DataError("the val split is empty: the experiment metrics need val items (data.val_fraction)")
    batch = next(iter(iter_batches(val_set, n)))
    val_images, val_labels = batch["image"][:n].cpu().float(), batch["label"][:n].cpu()
    ctx = Context(train_set, val_set, info, val_images, val_labels, grid=max(1, min(int(spec.grid), n)))
    ctx.data_panels.append(("val images", val_images[:ctx.grid]))
    owner = next(c for c in exp.arms.values() if modality_index(c, exp.setting.kind) is not None)
    exp.setting.prepare(exp, ctx, owner)
    return ctx


def run_experiment(config_path: str | os.PathLike, overrides: Sequence[str] = ()) -> Path:
    """Train and evaluate every arm of an experiment; write the results; return the experiment folder.

    Rerunning the same command resumes: trained arms are not retrained (module docstring).
    """
    exp = load_experiment(config_path, overrides)
    spec, setting = exp.spec, exp.setting
    device = torch.device(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    datasets = Datasets()
    check_arms(exp, datasets)  # rejected means nothing written: every check before the first file
    ctx = build_context(exp, datasets)
    exp.out_dir.mkdir(parents=True, exist_ok=True)
    write_text(exp.out_dir / "base.yaml", yaml.safe_dump(exp.base, sort_keys=False))
    arms = setting.arm_configs(exp)  # e.g. the representation arms read the vectors prepare() wrote

    first = next(iter(arms.values()))
    results: Dict[str, Any] = {
        "experiment": spec.name, "setting": setting.name, "config": str(exp.path), "overrides": list(overrides),
        "train_steps": int(first.train.steps), "seed": int(first.run.seed), "arms": {}, "table": [], "context": {},
    }
    arm_panels: Dict[str, Panels] = {}
    # One bar over the arms (training shows its own, with images/s; disable=None: none off a terminal).
    for arm, cfg in tqdm(arms.items(), desc=f"experiment {spec.name}", unit="arm", disable=None):
        run_dir = Path(cfg.run.dir)
        data = datasets(cfg)
        t0 = time.time()
        trained_now = not is_trained(cfg, run_dir, data[2])
        if trained_now:
            train(cfg, datasets=data)  # built once per data section, not again by train
        t1 = time.time()
        metrics = evaluate(cfg, device=str(device), seed=int(cfg.run.seed), datasets=data)
        model = load_model(run_dir, device)
        extra, panels = arm_metrics(setting, model, build_schedule(cfg), cfg, ctx, device)
        del model
        metrics.update(extra)
        arm_panels[arm] = panels
        results["arms"][arm] = {"run_dir": str(run_dir), "trained_now": trained_now, "metrics": metrics,
                                "seconds": {"train": round(t1 - t0, 1), "evaluate": round(time.time() - t1, 1)}}

    results["table"] = report.table(report.table_rows(setting, arms), {a: r["metrics"] for a, r in results["arms"].items()})
    for r in results["arms"].values():  # properties of the data and the judge, equal in every arm
        for key in ("fid_floor", "reference_accuracy"):
            if key in r["metrics"] and key not in results["context"]:
                results["context"][key] = r["metrics"][key]
    results["context"].update(ctx.reference)

    write_text(exp.out_dir / "results.json", json.dumps(results, indent=1))
    write_text(exp.out_dir / "results.md", report.results_markdown(results))
    plot_samples(ctx.data_panels, arm_panels, exp.out_dir / "samples.png")
    plot_metrics(results, exp.out_dir / "metrics.png")
    return exp.out_dir
