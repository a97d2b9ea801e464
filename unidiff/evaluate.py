"""``unidiff evaluate RUN_DIR``: the numbers of a trained run, written to ``RUN_DIR/metrics.json``.

:func:`evaluate` takes the run folder or the run's config object (no temporary files, no config
turned back into override strings) and, optionally, the datasets already built from it.

Metrics (each only where it applies to the run; none is faked for a run without the part it
measures):

- ``fid``: reference-classifier features of joint samples (§3) against the ``eval.reference``
  split (default val); ``fid_floor``: the same distance between as many real images of the other
  split and the reference (the best a model can reach at this sample size);
  ``reference_accuracy``: the reference classifier's own val accuracy (how much its readings can be
  trusted). Need an image head and labelled data, or ``eval.features=inception`` (the standard FID
  Inception-v3, any data). ``eval.metrics`` adds ``inception_score`` (+ ``_std``), ``kid``
  (+ ``_std``), ``precision`` and ``recall`` in the same features (README "Metrics for natural images").
- ``bits_per_dim``: the variational bound of §2 on val (Monte-Carlo over t). Needs an image head.
- per auxiliary modality ``m``: ``image_to_<m>/<metric>``, the head read from val images alone
  (§3 image→aux at ``eval.t_read``, ``eval.num_draws`` noise draws), scored by the modality's own
  ``metrics``, plus the top-level names of its ``metric_aliases`` (a label's ``label_accuracy``).
- per auxiliary modality, with an image head: its ``generation_metrics`` of joint and conditional
  samples (a label's ``joint_consistency``: the generated label equals the reference classifier's
  reading of the generated image, and ``class_conditional_accuracy``: the reference classifier
  recovers the conditioning class of class→image samples, drift guidance ``eval.guidance``).
Where two modalities give the same top-level key, the first one in the model's order wins.

A latent run (``model.vae.path`` set) is judged in pixels: its joint and conditional samples are
VAE-decoded (:func:`unidiff.latents.decode_samples`) before the reference classifier or the
Inception see them, and the real sets are the pixel data its latent cache was made from (the
reference classifier is trained on those pixels); bits/dim and the read-outs stay in the model's
latent space. The real sets' feature statistics are streamed one batch at a time, the floor's
other split capped at ``eval.floor_samples`` images (0: ``eval.n_samples``). The model runs under
``train.mixed_precision``'s rule (:func:`unidiff.launch.resolve_precision`: ``auto`` is bf16 only
on hardware with native bf16), while sampling and on real data; the judges run in fp32.

The file also holds ``provenance`` (:func:`unidiff.provenance.provenance`: the checkpoint and its
step, the sampler, steps, guidance, sample count, seed, overrides, the precision and why, the VAE
of a latent run, the package version and git commit, the command); the returned dict does not.
No result is overwritten silently, and none outlives the run that replaces it: an existing
metrics file at the target is renamed ``metrics.<its mtime>.json``
(:func:`unidiff.provenance.keep_previous`) when the evaluation starts, so an evaluation killed
half-way leaves no metrics file at the target rather than the earlier one.

Every sample stream (joint samples, each modality's conditional samples) is generated in
resumable shards (:class:`SampleStore`, :mod:`unidiff.shards`), shard ``i`` of a stream seeded by
``seed_for(seed_for(seed, stream), i)``; bits/dim and the read-outs draw from
``torch.Generator().manual_seed(seed)``. Every number is a function of the run, the settings and
the seed, whether the evaluation ran in one go, was resumed, or ran on several processes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

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


# Sub-seeds of ``seed`` for the sample streams (each shard is then seeded by its index).
JOINT_STREAM, CONDITIONAL_STREAM = 1, 2


def _digest(value: Any) -> str:
    """A content hash of a conditioning value (a tensor or a dict of tensors)."""
    h = hashlib.sha256()
    if isinstance(value, dict):
        for k in sorted(value):
            h.update(k.encode())
            h.update(_digest(value[k]).encode())
        return h.hexdigest()
    t = torch.as_tensor(value).detach().cpu().contiguous()
    h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def sample_in_batches(model, schedule, task: str, n: int, batch_size: int, *, sampler: str, steps: int,
                      generator: Optional[torch.Generator] = None,
                      known_fn: Optional[Callable[[int, int], Dict[str, Any]]] = None, guidance: float = 1.0,
                      classifier_scale: float = 0.0, classifier_modality: Optional[str] = None,
                      precision: Optional[str] = None, progress: Optional[Callable[[int], None]] = None,
                      unknown_drift: str = "predicted") -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``n`` samples of ``task`` in ``batch_size`` batches, one :func:`unidiff.diffusion.sample`
    call per batch, all drawing from ``generator`` in turn: (images (n, C, H, W) float32 on the
    CPU, {modality: (n, ...) read-outs on the CPU, floating ones float32}).

    The one sampling loop of evaluation (:class:`SampleStore`'s shards) and of the experiments
    (``experiments.setting.generate``). ``known_fn(start, b)``: the known values of rows
    ``start:start + b`` (None: nothing known, no guidance); ``guidance`` and the classifier
    guidance apply where something is known. ``precision``: the autocast choice of
    :func:`unidiff.launch.resolve_precision` the model runs under (None: the caller's autocast
    state, untouched). ``progress(b)`` is called after each batch. ``unknown_drift``: the drift of
    the modalities not known, ``predicted`` or ``null_encoding`` (DESIGN.md §3.3).
    """
    from contextlib import nullcontext

    from .diffusion import sample
    from .launch import autocast

    device_type = next(model.parameters()).device.type
    amp = (lambda: nullcontext()) if precision is None else (lambda: autocast(precision, device_type))
    images, aux = [], {}
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        known = known_fn(start, b) if known_fn is not None else None
        with amp():
            out = sample(model, schedule, task, batch_size=b, known=known, scheduler=sampler, num_steps=steps,
                         guidance_scale=guidance if known else 1.0,
                         classifier_scale=classifier_scale if known else 0.0,
                         classifier_modality=classifier_modality if known else None, generator=generator,
                         unknown_drift=unknown_drift)
        images.append(out.image.float().cpu())
        for k, v in out.aux.items():
            if torch.is_tensor(v):
                aux.setdefault(k, []).append(v.float().cpu() if v.is_floating_point() else v.cpu())
        if progress is not None:
            progress(b)
    return torch.cat(images), {k: torch.cat(v) for k, v in aux.items()}


class SampleStore:
    """The evaluation's sharded sample streams (:func:`unidiff.shards.generate_sharded`).

    Each stream lives in ``RUN_DIR/eval_shards/<hash>/``, the hash covering everything that decides
    its samples (the evaluated weights, the task, the conditioning values, ``n``, the shard size,
    the seed, the solver, guidance, the unknown modalities' drift and precision), so a rerun of a killed ``unidiff evaluate``
    picks up its shards and a changed setting starts a new folder. Shard ``i`` of a stream is
    seeded by ``seed_for(stream seed, i)``: the samples do not depend on the number of processes.
    The main process shows a progress bar per stream (samples done, images/s of this process).
    """

    def __init__(self, model, schedule, cfg, run_dir: Path, device, seed: int, accelerator, on_shard=None,
                 precision: str = "no"):
        from .metrics import module_fingerprint

        self.model, self.schedule, self.ev, self.device = model, schedule, cfg.eval, device
        self.seed, self.accelerator, self.on_shard = int(seed), accelerator, on_shard
        self.precision = precision
        self.root = run_dir / "eval_shards"
        self.shard_size = int(self.ev.shard_size or self.ev.batch_size)
        self.model_id = module_fingerprint(model)

    @torch.no_grad()
    def generate(self, task: str, n: int, stream: int, known: Any = None, name: Optional[str] = None
                 ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``n`` samples of ``task``: (images (n, C, H, W) float32 on the CPU, {modality: (n, ...) readouts}).

        ``known``: the conditioning value of modality ``name`` (``n`` rows), with the evaluation's
        guidance, classifier guidance and ``eval.unknown_drift``; None for joint samples (no
        guidance, every drift from its head).
        """
        from .diffusion.sampling import DEFAULT_CONVERSION, Conversion
        from .io import seed_for
        from .shards import generate_sharded

        ev, device = self.ev, self.device
        guided = known is not None
        settings = {"model": self.model_id, "task": task, "name": name, "known": _digest(known) if guided else None,
                    "sampler": ev.sampler.value, "steps": int(ev.steps),
                    "guidance": float(ev.guidance) if guided else 1.0,
                    "classifier_scale": float(ev.classifier_scale) if guided else 0.0}
        if self.precision != "no":  # fp32 streams keep the folders they always had
            settings["precision"] = self.precision
        reading = DEFAULT_CONVERSION.get(self.model.prediction, Conversion.known)
        if guided and reading is not Conversion.known:  # ε heads' conditional reading (DESIGN.md §3.3)
            settings["convert_with"] = reading.value
        drift = ev.unknown_drift.value if guided else "predicted"
        if drift != "predicted":  # streams with the heads' drift keep the folders they always had
            settings["unknown_drift"] = drift
        stream_seed = seed_for(self.seed, stream)
        plan = {"n": int(n), "shard_size": self.shard_size, "seed": stream_seed, **settings}
        folder = self.root / hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
        bar = _StreamProgress(n, f"eval {task}" + (f" ({name})" if name else ""), self.accelerator.is_main_process)

        def one_shard(shard):
            known_fn = (lambda start, b: {name: _rows(known, shard.start + start, shard.start + start + b, device)}
                        ) if guided else None
            images, aux = sample_in_batches(
                self.model, self.schedule, task, shard.count, int(ev.batch_size), sampler=ev.sampler.value,
                steps=int(ev.steps), generator=torch.Generator(device=device).manual_seed(shard.seed),
                known_fn=known_fn, guidance=settings["guidance"], classifier_scale=settings["classifier_scale"],
                classifier_modality=name, precision=self.precision, progress=bar.advance, unknown_drift=drift)
            return {"image": images, **{f"aux.{k}": v for k, v in aux.items()}}

        image_shape = tuple(int(s) for s in self.model.image_shape)
        try:
            arrays = generate_sharded(one_shard, int(n), self.shard_size, stream_seed, folder, settings=settings,
                                      spec={"image": ("float32", image_shape)}, accelerator=self.accelerator,
                                      on_shard=self.on_shard)
            bar.complete()
        finally:
            bar.bar.close()
        aux = {k[len("aux."):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("aux.")}
        return torch.from_numpy(arrays["image"]), aux


class _StreamProgress:
    """A tqdm bar over a stream's ``total`` samples on the main process (``tqdm.auto``;
    ``disable=None``: off where the output is not a terminal, so logs and notebooks are not
    flooded), with the images/s this process generates. Shards kept from an earlier run, or
    written by other processes, are counted when the stream is assembled (:meth:`complete`)."""

    def __init__(self, total: int, desc: str, main: bool):
        self.bar = tqdm(total=int(total), desc=desc, unit="img", disable=None if main else True, dynamic_ncols=True)
        self.made, self.t0 = 0, time.perf_counter()

    def advance(self, b: int) -> None:
        self.made += int(b)
        rate = self.made / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix({"images/s": f"{rate:.2f}"}, refresh=False)
        self.bar.update(int(b))

    def complete(self) -> None:
        if self.bar.n < self.bar.total:  # the shards this process did not generate
            self.bar.update(self.bar.total - self.bar.n)


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


def _feature_module(ev, clf, device):
    """The features of the generative metrics (``eval.features``); None when they are unavailable."""
    from . import metrics as M

    if ev.features == "inception":
        return M.inception_feature_module(M.inception_weights_path(ev.inception_weights)).to(device)
    return M.ClassifierFeatures(clf) if clf is not None else None


@torch.no_grad()
def _generation(model, store: SampleStore, cfg, clf, device,
                to_pixels: Callable[[torch.Tensor], torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Every sample-generating metric stream, on every process: the joint samples and each
    modality's ``generation_metrics`` (its conditional samples). Returns (joint images, metrics).

    ``to_pixels``: model outputs -> images in [-1, 1] (the VAE decode of a latent run, else the
    identity): the joint and conditional samples are judged as images, as GenerationEval says."""
    ev, bs, out = cfg.eval, cfg.eval.batch_size, {}
    fake, fake_aux = store.generate("joint", ev.n_samples, JOINT_STREAM)
    fake = to_pixels(fake)
    classify = (lambda images: _classify(clf, images, bs, device)) if clf is not None else None
    for i, (name, mod) in enumerate(model.modalities.items()):

        def generate(value, name=name, i=i):
            images, _ = store.generate("conditional", _batch_size_of(value), CONDITIONAL_STREAM + i, known=value, name=name)
            return to_pixels(images)

        values = fake_aux.get(name)
        for k, v in mod.generation_metrics(GenerationEval(fake, values, classify, generate, int(ev.n_samples))).items():
            out.setdefault(k, v)
    return fake, out


@torch.no_grad()
def _image_metrics(fake: torch.Tensor, cfg, train_set, val_set, feats, seed: int) -> Dict[str, Any]:
    """``eval.metrics`` of the joint samples (images in [-1, 1]) against the ``eval.reference``
    split of the real images, and ``fid_floor``, in the features of ``feats``
    (:func:`_feature_module`; None: no such metrics).

    Both real sets are streamed through the features one ``eval.batch_size`` batch at a time
    (:func:`unidiff.metrics.feature_statistics`): the reference split whole, the other split's
    first ``eval.floor_samples`` images (0: ``eval.n_samples``, the floor at the samples' count,
    since FID is biased by the set size; all of the split when it is smaller)."""
    from . import metrics as M

    ev, bs = cfg.eval, cfg.eval.batch_size
    if feats is None:
        return {}
    reference, other = (train_set, val_set) if ev.reference == "train" else (val_set, train_set)
    ref = M.reference_statistics(reference, feats, ev.cache_dir, bs, keep=ev.reference_features)
    out = M.generative_metrics(ref, M.extract_features(fake, feats, bs), list(ev.metrics), seed=seed,
                               kid_subsets=ev.kid_subsets, kid_subset_size=ev.kid_subset_size, pr_k=ev.pr_k)
    if "fid" in ev.metrics:  # real images of the other split against the same reference
        floor_n = int(ev.floor_samples or ev.n_samples)
        floor = M.reference_statistics(other, feats, ev.cache_dir, bs, max_items=floor_n, keep=0)
        out["fid_floor"] = M.frechet_distance(ref, floor)
    return out


@torch.no_grad()
def _model_metrics(model, schedule, cfg, val_set, g, device) -> Dict[str, Any]:
    """The metrics that run the model on real data (no gradients): bits/dim, image->aux."""
    from .data import iter_batches
    from .diffusion import bits_per_dim, image_to_aux

    ev, bs, out = cfg.eval, cfg.eval.batch_size, {}
    if model.image_head is not None:
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
    return out


def check_evaluation(cfg: DictConfig) -> None:
    """What :func:`evaluate` needs beyond the trained run, checked before a ``unidiff run`` trains
    (and by its ``--dry-run``): the Inception-v3 weights when ``eval.features=inception`` are
    loaded once (a missing, unreadable or wrong file, or a missing torch-fidelity, is the one-line
    error evaluation would give after training). Everything else evaluation reads is the run's own
    (its config, checkpoint and data), which the training preflight has built already."""
    from . import metrics as M

    if cfg.eval.features == "inception":
        M.inception_feature_module(M.inception_weights_path(cfg.eval.inception_weights))


def evaluate(run: str | os.PathLike | DictConfig, overrides: Sequence[str] = (), device: Optional[str] = None,
             seed: int = 0, datasets: Optional[Tuple[Any, Any, Any]] = None,
             out_path: Optional[str | os.PathLike] = None, accelerator: Any = None,
             on_shard: Optional[Callable[[Any], None]] = None) -> Dict[str, Any]:
    """Compute the metrics of a run, write ``RUN_DIR/metrics.json`` (or ``out_path``) atomically
    and return them. ``seed`` seeds every random draw of the evaluation (samples, t, noise).
    An existing file at the target is moved aside as ``metrics.<timestamp>.json`` before anything
    is computed (module docstring), so a killed evaluation never leaves an older result there.

    ``run``: the run folder (its ``config.yaml`` is read), or the run's config itself (a
    :func:`unidiff.config.load_config` result; the folder is its ``run.dir``), as a caller that
    holds the config passes it (the experiment runner: its ``eval`` section wins over the saved one).
    ``overrides``: ``key=value`` items on top (``eval.n_samples=100``). ``datasets``: the
    ``(train, val, info)`` of the config's ``data`` section when the caller has built them already
    (a latent run's latent cache; its pixel data is built here for the image metrics).

    Samples are generated in resumable shards under ``RUN_DIR/eval_shards/`` (:class:`SampleStore`):
    rerunning a killed evaluation reuses them and ends with the same numbers. Under
    ``accelerate launch`` every process generates its share of the shards (``accelerator``:
    default ``accelerate.Accelerator()``; ``device``: default its device); the main process then
    computes the metrics and writes the file, the others return ``{}``. ``on_shard(shard)`` is
    called after each shard written (progress; the resume test's kill switch). The model runs
    under ``train.mixed_precision``'s rule (:func:`unidiff.launch.resolve_precision`).
    """
    from accelerate import Accelerator

    from . import metrics as M
    from .checkpoint import latest, load_model, step_of
    from .config import build_schedule, check_writable, load_config
    from .config import run_dir as folder_of
    from .data import build_datasets
    from .latents import decode_samples, pixel_datasets, vae_path
    from .launch import autocast, resolve_precision

    if isinstance(run, DictConfig):
        cfg = load_config(run, overrides) if overrides else run
        run_dir = folder_of(cfg)
    else:
        run_dir = Path(run)
        cfg = load_run_config(run_dir, overrides)
    check_writable(run_dir, "run folder")  # metrics.json goes there: say so before computing anything
    ev = cfg.eval
    from .launch import launch_settings

    acc = accelerator if accelerator is not None else Accelerator(cpu=launch_settings().cpu)
    device = torch.device(device) if device else acc.device
    target = Path(out_path) if out_path is not None else run_dir / "metrics.json"
    previous = None
    if acc.is_main_process:  # an earlier result is moved aside now: never mistaken for this run's
        target.parent.mkdir(parents=True, exist_ok=True)
        previous = keep_previous(target)
    model = load_model(run_dir, device)
    schedule = build_schedule(cfg)
    precision, precision_reason = resolve_precision(cfg.train.mixed_precision, device.type)
    train_set, val_set, info = datasets if datasets is not None else build_datasets(cfg.data)
    latent = vae_path(cfg) is not None
    # The image metrics judge images: a latent run's samples are decoded and compared with the
    # pixel data its latent cache was made from (the reference classifier is a pixel classifier).
    pixel_train, pixel_val, pixel_info = pixel_datasets(cfg) if latent else (train_set, val_set, info)
    bs = int(ev.batch_size)

    def to_pixels(x: torch.Tensor) -> torch.Tensor:
        return decode_samples(x, cfg, bs, device=device) if latent else x

    out: Dict[str, Any] = {"step": None, "n_samples": int(ev.n_samples)}
    meta = run_dir / "model" / "config.json"
    out["model"] = "model/" if meta.is_file() else "latest checkpoint (EMA)"

    clf = None
    if pixel_info.num_classes >= 2:  # trains (with gradients) on first use, then cached: the main process first
        for turn in (True, False):
            if acc.is_main_process == turn:
                clf, ref_acc = M.get_reference_classifier(pixel_train, pixel_val, pixel_info, ev.cache_dir,
                                                          device=device, steps=ev.reference_steps)
            acc.wait_for_everyone()
        out["reference_accuracy"] = float(ref_acc)

    feats = None
    if model.image_head is not None and acc.is_main_process:  # a missing Inception file fails before sampling
        feats = _feature_module(ev, clf, device)
    generated: Dict[str, Any] = {}
    if model.image_head is not None:  # every process takes its share of the sample shards
        store = SampleStore(model, schedule, cfg, run_dir, device, seed, acc, on_shard, precision=precision)
        fake, generated = _generation(model, store, cfg, clf, device, to_pixels)
    if not acc.is_main_process:
        return {}
    if model.image_head is not None:
        out.update(_image_metrics(fake, cfg, pixel_train, pixel_val, feats, seed))
    g = torch.Generator(device=device).manual_seed(seed)
    with autocast(precision, device.type):
        out.update(_model_metrics(model, schedule, cfg, val_set, g, device))
    for k, v in generated.items():  # after the read-out aliases, which win a tie (as they always did)
        out.setdefault(k, v)
    last = latest(run_dir / "checkpoints")
    out["step"] = step_of(last) if last is not None else None
    bad = [k for k, v in out.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        out["non_finite"] = bad
    # --- the metrics file: the numbers and what produced them ----------------------------------------
    source = run_dir / "model" if meta.is_file() else last
    record = provenance(seed=int(seed), overrides=overrides, run_dir=str(run_dir),
                        checkpoint=str(source) if source is not None else None, step=out["step"],
                        sampler=ev.sampler.value, steps=int(ev.steps), guidance=float(ev.guidance),
                        classifier_scale=float(ev.classifier_scale), unknown_drift=ev.unknown_drift.value,
                        n_samples=int(ev.n_samples),
                        t_read=int(ev.t_read), num_draws=int(ev.num_draws), device=str(device),
                        precision=precision, precision_reason=precision_reason, vae=vae_path(cfg))
    write_json(target, {**out, "provenance": {**record, "previous": str(previous) if previous else None}})
    return out
