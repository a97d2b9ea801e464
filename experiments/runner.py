"""``unidiff experiment CONFIG``: train and evaluate every arm of an experiment, write its results.

Resume is rerunning the same command: an arm whose final model (``<arm>/model``) was trained with
the same config is not retrained (an interrupted arm resumes from its checkpoints through
:func:`unidiff.train.train`); evaluation always reruns, with the *current* ``eval`` section.
The datasets are built once per distinct ``data`` section and handed to the evaluation.
An arm with ``train.init_from=arm:<earlier arm>`` (a fine-tuned baseline) starts from that arm's
final weights; retraining the earlier arm does not retrain it (delete its folder).

With ``experiment.eval_at`` (convergence), every arm is also evaluated at those training steps:
it trains to each in turn (:func:`unidiff.train.train` with ``stop_at``: the checkpoint at that
step, one LR schedule for the whole run), the latest checkpoint's EMA is evaluated into
``<arm>/at_step/metrics_<step>.json`` (:func:`unidiff.evaluate.evaluate`, whose provenance names the
checkpoint's step) and ``<arm>/at_step/setting_<step>.json`` (the setting's own metrics), then
training goes on. A step the run had already passed when rerun is not evaluated again: its saved
files are read back (the checkpoint itself is gone); a step without them is reported as missing.
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

from unidiff.checkpoint import init_from, latest, load_model, step_of
from unidiff.config import build_model, build_schedule, check_writable, load_config, resolve_with_data, to_container
from unidiff.data import build_datasets, iter_batches
from unidiff.errors import CheckpointError, ConfigError, DataError
from unidiff.evaluate import check_evaluation, evaluate
from unidiff.io import write_json, write_text
from unidiff.seeds import CONTEXT_KEYS
from unidiff.train import train

from . import report
from .augment import MaskAugmented
from .figures import plot_metrics, plot_samples
from .setting import Context, Panels, arm_metrics, modality_index, standalone_modality
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
    experiment folder; and what evaluating it needs (:func:`unidiff.evaluate.check_evaluation`).
    Errors name the arm (``experiment.arms.<arm>: ...``)."""
    check_writable(exp.out_dir, "experiment.out_dir")
    evaluations = set()  # (features, weights) checked already: the arms usually share one eval section
    arm_dirs = {str(c.run.dir) for c in exp.arms.values()}
    for arm, cfg in exp.arms.items():
        try:
            info = datasets(cfg)[2]
            resolved = resolve_with_data(cfg, info)
            model = build_model(resolved, info.image_shape)
            if cfg.train.init_from is not None and str(cfg.train.init_from) not in arm_dirs:
                init_from(model, cfg.train.init_from)  # a run outside the experiment: it must load now
            build_schedule(resolved)
            needs = (resolved.eval.features, resolved.eval.inception_weights)
            if needs not in evaluations:
                check_evaluation(resolved)
                evaluations.add(needs)
        except (ConfigError, CheckpointError) as err:
            raise type(err)(f"experiment.arms.{arm}: {err}") from None


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


def training_data(exp: Experiment, arm: str, data: Tuple[Any, Any, Any]) -> Tuple[Any, Any, Any]:
    """What ``train`` gets for ``arm``: the masks-as-augmentation wrapper of the train split for an
    arm in ``experiment.mask_augment_arms`` (:mod:`experiments.augment`), else ``data`` itself."""
    if arm not in exp.spec.mask_augment_arms:
        return data
    owner = next(c for c in exp.arms.values() if modality_index(c, "masked_image") is not None)
    mod = standalone_modality(owner, "masked_image", data[2].image_shape)
    return MaskAugmented(data[0], mod, float(exp.spec.mask_augment_p)), data[1], data[2]


def reached_step(run_dir: Path) -> int:
    """The step of the run's latest complete checkpoint (0 without one)."""
    last = latest(run_dir / "checkpoints", report=lambda _msg: None)
    return step_of(last) if last is not None else 0


def evaluate_at_step(setting, cfg: DictConfig, ctx: Context, device: torch.device, data, at: int) -> Dict[str, Any]:
    """One convergence point of an arm: ``{"step", "metrics", "files"}``.

    When the run stands at step ``at``, the latest checkpoint's EMA is evaluated and the two files
    written (``evaluate``'s ``metrics_<at>.json`` with its provenance, ``setting_<at>.json``); when
    the run is past ``at`` (a rerun), those files are read back; ``metrics`` is None without them.
    """
    run_dir = Path(cfg.run.dir)
    folder = run_dir / "at_step"
    files = {"metrics": folder / f"metrics_{at}.json", "setting": folder / f"setting_{at}.json"}
    if reached_step(run_dir) == at and not (run_dir / "model" / "config.json").is_file():
        metrics = evaluate(cfg, device=str(device), seed=int(cfg.run.seed), datasets=data, out_path=files["metrics"])
        if metrics.get("step") != at:  # evaluate reads the latest checkpoint: it must be this one
            raise RuntimeError(f"{run_dir}: evaluated step {metrics.get('step')} instead of {at}")
        model = load_model(run_dir, device)
        extra, _ = arm_metrics(setting, model, build_schedule(cfg), cfg, ctx, device)
        del model
        write_json(files["setting"], extra)
        return {"step": at, "metrics": {**metrics, **extra}, "files": {k: str(v) for k, v in files.items()}}
    if all(f.is_file() for f in files.values()):
        saved = json.loads(files["metrics"].read_text())
        if saved.get("provenance", {}).get("step") == at:
            saved.pop("provenance", None)
            return {"step": at, "metrics": {**saved, **json.loads(files["setting"].read_text())},
                    "files": {k: str(v) for k, v in files.items()}}
    return {"step": at, "metrics": None, "files": None}


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
    steps = int(first.train.steps)
    # One bar over the arms (training shows its own, with images/s; disable=None: none off a terminal).
    for arm, cfg in tqdm(arms.items(), desc=f"experiment {spec.name}", unit="arm", disable=None):
        run_dir = Path(cfg.run.dir)
        data = datasets(cfg)
        train_data = training_data(exp, arm, data)
        t0 = time.time()
        trained_now = not is_trained(cfg, run_dir, data[2])
        by_step: Dict[str, Any] = {}
        points = 0.0  # seconds of the eval_at evaluations, kept apart from training's
        for at in spec.eval_at:  # convergence: evaluate on the way (module docstring)
            if trained_now and reached_step(run_dir) < at:
                train(cfg, stop_at=at, datasets=train_data)
            tp = time.time()
            by_step[str(at)] = evaluate_at_step(setting, cfg, ctx, device, data, at)
            points += time.time() - tp
        if trained_now:
            train(cfg, datasets=train_data)  # built once per data section, not again by train
        t1 = time.time()
        metrics = evaluate(cfg, device=str(device), seed=int(cfg.run.seed), datasets=data)
        model = load_model(run_dir, device)
        extra, panels = arm_metrics(setting, model, build_schedule(cfg), cfg, ctx, device)
        del model
        metrics.update(extra)
        arm_panels[arm] = panels
        entry = {"run_dir": str(run_dir), "trained_now": trained_now, "metrics": metrics,
                 "seconds": {"train": round(t1 - t0 - points, 1), "evaluate": round(time.time() - t1 + points, 1)}}
        if spec.eval_at:
            by_step[str(steps)] = {"step": metrics.get("step"), "metrics": dict(metrics)}
            entry["by_step"] = by_step
            rows = setting.convergence_rows(report.row_modality(setting, arms))
            for at, point in by_step.items():  # <metric>@<step>: the table's and the seed summary's keys
                for key, _, _ in rows:
                    value = (point.get("metrics") or {}).get(key)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        metrics[f"{key}@{at}"] = value
        results["arms"][arm] = entry

    if spec.eval_at:
        results["eval_at"] = [*map(int, spec.eval_at), steps]
    rows = report.table_rows(setting, arms, list(spec.eval_at) + [steps] if spec.eval_at else None)
    results["table"] = report.table(rows, {a: r["metrics"] for a, r in results["arms"].items()})
    for r in results["arms"].values():  # properties of the data and the judge, equal in every arm
        for key in CONTEXT_KEYS:
            if key in r["metrics"] and key not in results["context"]:
                results["context"][key] = r["metrics"][key]
    results["context"].update(ctx.reference)

    write_text(exp.out_dir / "results.json", json.dumps(results, indent=1))
    write_text(exp.out_dir / "results.md", report.results_markdown(results))
    plot_samples(ctx.data_panels, arm_panels, exp.out_dir / "samples.png")
    plot_metrics(results, exp.out_dir / "metrics.png")
    return exp.out_dir
