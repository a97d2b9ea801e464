"""``unidiff evaluate RUN_DIR``: the numbers of a trained run, written to ``RUN_DIR/metrics.json``.

:func:`evaluate` takes the run folder or the run's config object (no temporary files, no config
turned back into override strings) and, optionally, the datasets already built from it.

Metrics (each only where it applies to the run; none is faked for a run without the part it
measures):

- ``fid``: reference-classifier features of joint samples (§3) against the val split;
  ``fid_floor``: the same distance between as many real train images and the val split (the best
  a model can reach at this sample size); ``reference_accuracy``: the reference classifier's own
  val accuracy (how much its readings can be trusted). Need an image head and labelled data.
- ``bits_per_dim``: the variational bound of §2 on val (Monte-Carlo over t). Needs an image head.
- per auxiliary modality ``m``: ``image_to_<m>/<metric>``, the head read from val images alone
  (§3 image→aux at ``eval.t_read``, ``eval.num_draws`` noise draws), scored by the modality's own
  ``metrics``, plus the top-level names of its ``metric_aliases`` (a label's ``label_accuracy``).
- per auxiliary modality, with an image head: its ``generation_metrics`` of joint and conditional
  samples (a label's ``joint_consistency``: the generated label equals the reference classifier's
  reading of the generated image, and ``class_conditional_accuracy``: the reference classifier
  recovers the conditioning class of class→image samples, drift guidance ``eval.guidance``).
Where two modalities give the same top-level key, the first one in the model's order wins.

The file also holds ``provenance`` (:func:`unidiff.provenance.provenance`: the checkpoint, the
sampler, steps, guidance, sample count, seed, overrides, the package version and git commit, the
command); the returned dict does not. No result is overwritten silently: an existing metrics file
at the target is first renamed ``metrics.<its mtime>.json`` (:func:`unidiff.provenance.keep_previous`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig

from .errors import CheckpointError
from .io import write_json
from .modality import GenerationEval
from .provenance import keep_previous, provenance


def load_run_config(run_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved ``config.yaml`` of a run (plus overrides, e.g. ``eval.n_samples=100``)."""
    from .config import load_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {str(run_dir)!r} does not exist")
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"run folder {str(run_dir)!r} has no config.yaml (not a unidiff run?)")
    return load_config(run_dir / "config.yaml", overrides)


@torch.no_grad()
def _generate(model, schedule, task: str, n: int, batch_size: int, sampler: str, steps: int, guidance: float,
              generator: torch.Generator, known_fn=None, classifier_scale: float = 0.0,
              classifier_modality: Optional[str] = None):
    """``n`` samples of ``task`` in batches: (images (n, C, H, W), {name: (n,) readouts})."""
    from tqdm.auto import tqdm

    from .diffusion import sample

    images, aux = [], {}
    # images/s in the bar (unit="img"); disable=None: no bar when stderr is not a terminal (logs, CI)
    bar = tqdm(total=n, desc=f"evaluate: {task} samples", unit="img", leave=False, disable=None, dynamic_ncols=True)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        known = known_fn(start, b) if known_fn is not None else None
        out = sample(model, schedule, task, batch_size=b, known=known, scheduler=sampler, num_steps=steps,
                     guidance_scale=guidance if known else 1.0, classifier_scale=classifier_scale if known else 0.0,
                     classifier_modality=classifier_modality if known else None, generator=generator)
        images.append(out.image.float().cpu())
        for k, v in out.aux.items():
            if torch.is_tensor(v):
                aux.setdefault(k, []).append(v.cpu())
        bar.update(b)
    bar.close()
    return torch.cat(images), {k: torch.cat(v) for k, v in aux.items()}


@torch.no_grad()
def _classify(clf, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    return torch.cat([clf(x.to(device)).argmax(-1).cpu() for x in images.split(batch_size)])


def _batch_size_of(value: Any) -> int:
    while isinstance(value, dict):
        value = next(iter(value.values()))
    return int(value.shape[0])


def _rows(value: Any, start: int, stop: int, device) -> Any:
    """Rows ``start:stop`` of a modality value (a tensor or a dict of tensors) on ``device``."""
    if isinstance(value, dict):
        return {k: _rows(v, start, stop, device) for k, v in value.items()}
    return value[start:stop].to(device)


@torch.no_grad()
def _model_metrics(model, schedule, cfg, train_set, val_set, clf, g, device) -> Dict[str, Any]:
    """The metrics that run the model (no gradients); see the module docstring."""
    from . import metrics as M
    from .data import iter_batches
    from .diffusion import bits_per_dim, image_to_aux

    ev, bs, out = cfg.eval, cfg.eval.batch_size, {}
    has_image = model.image_head is not None

    # --- image quality and the bound ------------------------------------------------------------
    if has_image:
        fake, fake_aux = _generate(model, schedule, "joint", ev.n_samples, bs, ev.sampler.value, ev.steps, 1.0, g)
        if clf is not None:
            feats = M.ClassifierFeatures(clf)
            real_train = torch.cat([b["image"] for b in iter_batches(train_set, bs)])[: ev.n_samples]
            out["fid"] = M.compute_fid(val_set, fake, feats, batch_size=bs)
            out["fid_floor"] = M.fid_floor(real_train, val_set, feats, batch_size=bs)
        bpd = []
        seen = 0
        for batch in iter_batches(val_set, bs):
            batch = {k: v[: ev.n_samples - seen].to(device) for k, v in batch.items()}
            if len(batch["image"]) == 0:
                break
            seen += len(batch["image"])
            bpd.append(bits_per_dim(model, schedule, batch, num_t=ev.bpd_num_t, generator=g).cpu())
        out["bits_per_dim"] = float(torch.cat(bpd).mean())

    # --- every auxiliary head read from the image alone (§3) -------------------------------------
    for name, mod in model.modalities.items():
        scores: Dict[str, list] = {}
        for batch in iter_batches(val_set, bs):
            batch = {k: v.to(device) for k, v in batch.items()}
            truth = mod.from_batch(batch, generator=g)
            readout, _ = image_to_aux(model, schedule, batch["image"], name, ev.t_read, ev.num_draws, g)
            n = batch["image"].shape[0]
            for k, v in mod.metrics(readout, truth).items():
                scores.setdefault(k, []).append((float(v), n))
        for k, vals in scores.items():  # batch means -> dataset mean
            out[f"image_to_{name}/{k}"] = sum(v * n for v, n in vals) / sum(n for _, n in vals)
            if k in mod.metric_aliases:
                out.setdefault(mod.metric_aliases[k], out[f"image_to_{name}/{k}"])

    # --- generated samples, scored by each modality (e.g. class -> image read back) ---------------
    if has_image:
        classify = (lambda images: _classify(clf, images, bs, device)) if clf is not None else None
        for name, mod in model.modalities.items():

            def generate(value, name=name):
                n = _batch_size_of(value)
                images, _ = _generate(model, schedule, "conditional", n, bs, ev.sampler.value, ev.steps, ev.guidance, g,
                                      lambda start, b: {name: _rows(value, start, start + b, device)},
                                      classifier_scale=ev.classifier_scale, classifier_modality=name)
                return images

            values = fake_aux.get(name)
            for k, v in mod.generation_metrics(GenerationEval(fake, values, classify, generate, int(ev.n_samples))).items():
                out.setdefault(k, v)

    return out


def evaluate(run: str | os.PathLike | DictConfig, overrides: Sequence[str] = (), device: Optional[str] = None,
             seed: int = 0, datasets: Optional[Tuple[Any, Any, Any]] = None,
             out_path: Optional[str | os.PathLike] = None) -> Dict[str, Any]:
    """Compute the metrics of a run, write ``RUN_DIR/metrics.json`` (or ``out_path``) atomically
    and return them. ``seed`` seeds every random draw of the evaluation (samples, t, noise).
    An existing file at the target is kept as ``metrics.<timestamp>.json`` (module docstring).

    ``run``: the run folder (its ``config.yaml`` is read), or the run's config itself (a
    :func:`unidiff.config.load_config` result; the folder is its ``run.dir``), as a caller that
    holds the config passes it (the experiment runner: its ``eval`` section wins over the saved one).
    ``overrides``: ``key=value`` items on top (``eval.n_samples=100``). ``datasets``: the
    ``(train, val, info)`` of the config's ``data`` section when the caller has built them already.
    """
    from . import metrics as M
    from .checkpoint import latest, load_model, step_of
    from .config import build_schedule, check_writable, load_config
    from .config import run_dir as folder_of
    from .data import build_datasets

    if isinstance(run, DictConfig):
        cfg = load_config(run, overrides) if overrides else run
        run_dir = folder_of(cfg)
    else:
        run_dir = Path(run)
        cfg = load_run_config(run_dir, overrides)
    check_writable(run_dir, "run folder")  # metrics.json goes there: say so before computing anything
    ev = cfg.eval
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(run_dir, device)
    schedule = build_schedule(cfg)
    train_set, val_set, info = datasets if datasets is not None else build_datasets(cfg.data)
    g = torch.Generator(device=device).manual_seed(seed)
    out: Dict[str, Any] = {"step": None, "n_samples": int(ev.n_samples)}
    meta = run_dir / "model" / "config.json"
    out["model"] = "model/" if meta.is_file() else "latest checkpoint (EMA)"

    clf = None
    if info.num_classes >= 2:  # trains (with gradients) on first use, then cached
        clf, ref_acc = M.get_reference_classifier(train_set, val_set, info, ev.cache_dir, device=device,
                                                  steps=ev.reference_steps)
        out["reference_accuracy"] = float(ref_acc)
    out.update(_model_metrics(model, schedule, cfg, train_set, val_set, clf, g, device))
    last = latest(run_dir / "checkpoints")
    out["step"] = step_of(last) if last is not None else None
    bad = [k for k, v in out.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        out["non_finite"] = bad
    # --- the metrics file: the numbers and what produced them; an earlier result is kept -----------
    target = Path(out_path) if out_path is not None else run_dir / "metrics.json"
    source = run_dir / "model" if meta.is_file() else last
    record = provenance(seed=int(seed), overrides=overrides, run_dir=str(run_dir),
                        checkpoint=str(source) if source is not None else None, step=out["step"],
                        sampler=ev.sampler.value, steps=int(ev.steps), guidance=float(ev.guidance),
                        classifier_scale=float(ev.classifier_scale), n_samples=int(ev.n_samples),
                        t_read=int(ev.t_read), num_draws=int(ev.num_draws), device=str(device))
    target.parent.mkdir(parents=True, exist_ok=True)
    previous = keep_previous(target)
    write_json(target, {**out, "provenance": {**record, "previous": str(previous) if previous else None}})
    return out
