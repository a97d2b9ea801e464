"""The one training loop (STYLE.md habit 2; DiT's ``train.py`` is the model).

``train(cfg)`` reads top to bottom: build data and model (every config check happens here, before
anything is written), set up accelerate / AdamW / warm-up / EMA, resume from the latest complete
checkpoint, then one ``while`` loop whose periodic actions are visible ``if step % every == 0``
blocks. The objective is one module, :class:`unidiff.diffusion.MultiModalDiffusion` (DESIGN.md §6):
it holds the model, and accelerate wraps it whole, so encoders and heads run inside the DDP/FSDP
forward. The loop knows only ``out = objective(batch, generator=g)``, ``out.loss`` and ``out.logs``;
EMA, parameter groups, MoE balancing and the exported model work on the inner ``UnifiedModel``.

Determinism: the batch of micro-step ``k`` is a function of ``(run.seed, k)``
(:func:`unidiff.data.infinite_batches`), and every random draw of the loss (timesteps, noise,
modality dropout) comes from a generator seeded by ``(run.seed, k)``. A resumed run therefore
repeats exactly what an uninterrupted one does, whatever RNG state accelerate restores.

Multi-GPU: ``accelerate launch -m unidiff.cli train CONFIG`` gives DDP; ``train.batch_size`` is the
global batch of one optimiser step, split over processes and ``train.grad_accum`` micro-steps.

Faults (README "What survives what"), each in its own block of :func:`train`:

- *resume-config check*: a rerun may change only :data:`MUTABLE_ON_RESUME`; ``config.yaml`` keeps
  the first invocation's config and gets one appended comment line per later invocation.
- *preemption*: inside :class:`StopSignals`, SIGTERM/SIGINT set a flag; after the optimiser step
  that reads it (all ranks together) the loop checkpoints and raises :class:`TrainingInterrupted`
  (exit code 128 + signal).
- *finite check*: a step whose loss (any micro-step) or gradient norm is not finite on any rank
  is skipped: no optimiser, LR, EMA or MoE-bias update, but the step counter and the data move on
  (step k always sees the same batch). It costs one all-reduce + host sync per optimiser step (not
  measurable on the debug config on CPU: ~0.13 s/step before and after). ``train.max_bad_steps``
  in a row raise :class:`TrainingDiverged`, as do non-finite weights at a checkpoint, which is then
  not written.

Time budget (README "Training for a time budget"): with ``train.budget_minutes`` the loop also stops
at the first optimiser step after that many minutes of ``train.budget_clock`` (wall or process CPU
time, read once per step inside the step's all-reduce, so every rank stops together), and the LR
schedule is read at :func:`budget_schedule_step`, the budget's fraction spent mapped onto
``train.steps``. The seconds spent are ``TrainState.spent``, checkpointed and continued on resume.
Such a run's LR depends on the clock, so unlike a step-counted run it does not repeat step for step.

Several processes (README.md "Launching on several processes"; ``unidiff.launch`` sets up the
launch and the precision rule): ``train.batch_size`` is the global batch of one optimiser step,
split over processes and ``train.grad_accum`` micro-steps. Each process loads its rows of the
global batch and keeps the same rows of the one-process draws (:func:`rank_draws`), so N processes
follow the one-process trajectory up to the rounding of DDP's gradient all-reduce.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from diffusers.utils.torch_utils import randn_tensor
from omegaconf import DictConfig
from torch import nn

from . import checkpoint as ckpt
from .config import ConfigError, build_model, build_schedule, resolve_with_data, run_dir, to_container, to_yaml
from .errors import CheckpointError, UnidiffError
from .io import save_labelled_grid, seed_for, write_json, write_text
from .latents import decode_samples
from .data import write_bad_files
from .launch import autocast, destroy_process_group_at_exit, launch_settings, resolve_precision
from .runtime import apply_threads, last_threads


class TrainingDiverged(UnidiffError, FloatingPointError):
    """The run stopped on non-finite values (``train.max_bad_steps`` skipped steps in a row, or
    non-finite weights at a checkpoint); nothing non-finite was checkpointed."""


class TrainingInterrupted(SystemExit):
    """SIGTERM/SIGINT stopped the run after a checkpoint at ``step``; the process exits with
    ``128 + signum`` (143 / 130), the code of a process ended by that signal, so that a scheduler
    or a shell (``unidiff train ... && unidiff evaluate ...``) does not take it for a finished run."""

    def __init__(self, signum: int, step: int):
        super().__init__(128 + signum)
        self.signum, self.step = signum, step


# --- resume-config check: the keys a rerun may change ----------------------------------------------
# Everything else must equal the saved config of the run being resumed, because it changes what the
# training computes (seed, batch, LR, optimiser, data, model, ...). These only say where the run
# lives, how long it goes (train.steps, not below the step reached), how often it logs, samples and
# checkpoints, how it evaluates, and how fast it loads data or runs (train.compile). The budget's
# minutes may change like train.steps; its clock may not (the seconds spent so far are of that clock).
MUTABLE_ON_RESUME = ("run.name", "run.dir", "train.steps", "train.log_every", "train.sample_every",
                     "train.ckpt_every", "train.keep_last", "train.resume", "train.compile",
                     "train.max_bad_steps", "train.report_to", "train.budget_minutes", "run.threads",
                     "data.num_workers", "data.download", "data.on_bad_file",
                     "sample", "eval")


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: Dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def resume_changes(saved: Dict[str, Any], new: Dict[str, Any], reached: int, where: str) -> Dict[str, Tuple[Any, Any]]:
    """``{dotted key: (saved, new)}`` of the keys ``new`` changes in the saved config of a run
    that reached step ``reached``; ConfigError (naming the key) for one outside
    :data:`MUTABLE_ON_RESUME`, or a ``train.steps`` below ``reached``."""
    a, b = _flatten(saved), _flatten(new)
    changes = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    for key, (old, value) in changes.items():
        if not any(key == m or key.startswith(m + ".") for m in MUTABLE_ON_RESUME):
            raise ConfigError(f"{key}={value!r} differs from the run being resumed in {where!r} ({old!r}); "
                              "it cannot change mid-run: start a new run (run.name) or keep the old value")
    steps = int(b["train.steps"])
    if steps < reached:
        raise ConfigError(f"train.steps={steps} is below step {reached}, which the run in {where!r} already reached; "
                          f"use train.steps>={reached} or start a new run (run.name)")
    return changes


# --- preemption: SIGTERM / SIGINT set a flag the loop reads after each optimiser step --------------
class StopSignals:
    """Context manager: while inside, the first SIGTERM or SIGINT only records ``signum``; the loop
    reads it once per optimiser step, checkpoints and stops. A second signal restores the previous
    handlers and re-delivers itself (ends the process at once, as kill -9 would: checkpoints are
    published atomically). The old handlers are restored on exit. Outside the main thread (signals
    cannot be caught there) it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum:
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self.restore()


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """AdamW groups: decay matrices/convolutions/experts; no decay on norms, biases, embeddings,
    registers, null encodings and the Mamba-2 scalars (A_log, D, dt_bias): all of these are
    offsets or scales, which decay would pull toward a meaningless 0."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim < 2 or id(p) in no_decay_ids or leaf in ("registers", "null", "pos_embed") or "null" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --- time budget: the LR schedule over the budget's fraction spent ------------------------------
def budget_schedule_step(step: int, fraction: float, steps: int, warmup: int) -> float:
    """The step at which a time-budgeted run reads its (step-based) LR schedule: its own ``step``
    during warm-up, then ``warmup + fraction·(steps - warmup)``, where ``fraction`` is the budget's
    share spent, or ``step`` when the step count runs ahead of the clock (never beyond ``steps``).
    So the schedule's tail (cosine's decay to 0) arrives when the budget ends, whatever the speed."""
    if step < warmup:
        return float(step)
    return float(min(steps, max(step, warmup + min(fraction, 1.0) * (steps - warmup))))


def set_schedule_lr(lr_scheduler, at: float) -> None:
    """Set every parameter group's LR to the diffusers schedule's value at (fractional) step ``at``."""
    for group, base, fn in zip(lr_scheduler.optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas):
        group["lr"] = base * fn(at)


@torch.no_grad()
def sample_grid(model, schedule, cfg: DictConfig, path: Path, seed: int,
                class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Joint samples (§3) from ``model`` as a PNG grid at ``path`` plus ``<path>.json`` with the
    generated auxiliary read-outs (e.g. the label of every cell, row-major). Each cell is captioned
    with the first integer read-out (the generated class, named by ``class_names``)."""
    from .diffusion import sample

    g = torch.Generator(device=model.device).manual_seed(seed)
    out = sample(model, schedule, "joint", batch_size=cfg.sample.n, scheduler=cfg.sample.sampler.value,
                 num_steps=cfg.sample.steps, generator=g)
    caption = {name: v.tolist() for name, v in out.aux.items() if torch.is_tensor(v) and v.ndim == 1}
    labels = next((v.tolist() for v in out.aux.values() if torch.is_tensor(v) and v.ndim == 1
                   and not v.is_floating_point()), None)
    # latent runs: VAE decode to pixels first (unidiff.latents); pixel runs pass through
    save_labelled_grid(decode_samples(out.image, cfg), labels, path, class_names=class_names)
    write_text(path.with_suffix(".json"), json.dumps(caption))
    return caption


# --- tracking (README "Tracking and plots") ------------------------------------------------------
def tracker_names(cfg: DictConfig) -> List[str]:
    """``train.report_to`` as accelerate's tracker names; ConfigError naming one not installed
    (only tensorboard is a dependency: wandb, mlflow, aim, ... are used when present)."""
    from accelerate.tracking import get_available_trackers

    available = {str(t.value if hasattr(t, "value") else t) for t in get_available_trackers()}
    names = list(dict.fromkeys(t.value for t in cfg.train.report_to))  # order kept, repeats dropped
    for name in names:
        if name not in available:
            raise ConfigError(f"train.report_to: tracker {name!r} is not installed here (pip install {name}); "
                              f"available: {sorted(available)}")
    return names


def truncate_log(path: Path, step: int) -> None:
    """Keep the records of ``log.jsonl`` with ``step <= step`` (atomically; a torn line goes too):
    a run resumed from the checkpoint of ``step`` then logs every later step exactly once."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # an interrupted append
    write_text(path, "".join(f"{line}\n" for line in kept))


def flat_config(cfg: DictConfig) -> Dict[str, Any]:
    """The resolved config as ``{"train.lr": 3e-4, ...}`` with str/int/float/bool values (lists and
    None as strings): what trackers' hyper-parameter tables accept."""
    out: Dict[str, Any] = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v if isinstance(v, (str, int, float, bool)) else str(v)

    walk(to_container(cfg), "")
    return out


def rank_draws(objective, batch_size: int, image_shape, dtype: torch.dtype, generator: torch.Generator,
               rows: slice) -> Dict[str, Any]:
    """Rows ``rows`` of one global draw of the objective's timesteps, noise and dropout masks.

    ``generator`` (seeded by ``(run.seed, micro-step, 0)``, the one-process seed) draws, in the
    objective's own order (:meth:`MultiModalDiffusion.forward`), ``t`` (B,), ``ε`` (B, C, H, W) and
    one dropout mask (B,) per modality for the whole global batch B; a process keeps its rows. Since
    its data rows are the same rows of the same global batch (``unidiff.data.rank_rows``), N processes
    then see what one process sees, row for row (exact when no modality draws in ``from_batch``: the
    one-process objective draws those masks between ``ε`` and the dropout). Every process draws the
    whole global noise: B·C·H·W normals per micro-step, negligible beside the forward.
    """
    from .diffusion.objective import draw_timesteps, draw_uniform

    device = generator.device
    t = draw_timesteps(objective.schedule.num_train_timesteps, (batch_size,), generator, device,
                       objective.t_sampling, objective.t_loc, objective.t_scale)
    noise = randn_tensor((batch_size, *image_shape), generator=generator, device=device, dtype=dtype)
    drop = {name: draw_uniform((batch_size,), generator, device) < objective.p_drop
            for name in objective.model.modalities}
    return {"t": t[rows], "noise": noise[rows], "drop": {name: m[rows] for name, m in drop.items()}}


def build_objective(cfg: DictConfig, model: nn.Module):
    """The training objective of ``cfg`` around ``model`` (checks ``diffusion.weighting``, ``p_drop``, ``t_sampling``, ``snr_gamma``)."""
    from .diffusion import MultiModalDiffusion

    d = cfg.diffusion
    return MultiModalDiffusion(model, build_schedule(cfg), weighting=d.weighting.value, p_drop=d.p_drop,
                               t_sampling=d.t_sampling.value, t_loc=d.t_loc, t_scale=d.t_scale,
                               snr_gamma=d.snr_gamma)


def prepare_run(cfg: DictConfig, datasets: Optional[Tuple[Any, Any, Any]] = None):
    """Everything that can reject a config, before anything is written: ``(cfg, train, val, info, model)``
    with ``cfg`` resolved against the data. Also the ``--dry-run`` of the CLI. ``datasets``: the
    ``(train, val, info)`` of ``cfg.data`` when the caller has built them (the experiment runner)."""
    from .data import build_datasets

    train_set, val_set, info = datasets if datasets is not None else build_datasets(cfg.data)
    cfg = resolve_with_data(cfg, info)
    model = build_model(cfg, info.image_shape)
    # Fine-tuning: the source must load and share the backbone (dry-run too). A run that resumes
    # takes its weights from its own checkpoint and does not need the source any more.
    if cfg.train.init_from is not None and not ckpt.complete_checkpoints(run_dir(cfg) / "checkpoints"):
        ckpt.init_from(model, cfg.train.init_from)
    build_objective(cfg, model)
    return cfg, train_set, val_set, info, model


class Prepared(NamedTuple):
    """:func:`prepare_run`'s build with the global RNG state right after it (:func:`prepare_seeded`)."""

    cfg: DictConfig
    train_set: Any
    val_set: Any
    info: Any
    model: nn.Module
    rng: Dict[str, Any]


def _rng_state() -> Dict[str, Any]:
    """The global RNG states accelerate's ``set_seed`` seeds (Python, numpy, torch CPU and CUDA)."""
    import random

    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: Dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_seeded(cfg: DictConfig, datasets: Optional[Tuple[Any, Any, Any]] = None) -> Prepared:
    """What :func:`train` builds first (``set_seed(run.seed)``, then :func:`prepare_run`), with the
    RNG state it leaves, so that ``train(cfg, prepared=...)`` continues from it instead of building
    the data and the model again (the CLI's preflight builds once for the check and the run)."""
    from accelerate.utils import set_seed

    set_seed(cfg.run.seed)
    return Prepared(*prepare_run(cfg, datasets), rng=_rng_state())


def train(cfg: DictConfig, stop_at: Optional[int] = None, datasets: Optional[Tuple[Any, Any, Any]] = None,
          prepared: Optional[Prepared] = None) -> Path:
    """Train the run described by ``cfg``; returns the run folder.

    Rerunning with the same config resumes from the latest complete checkpoint (``train.resume``).
    ``stop_at`` ends the loop early at that step with a checkpoint, as an interruption would (the
    resume test uses it); the final EMA model is exported only when ``train.steps`` is reached.
    ``datasets``: the ``(train, val, info)`` of ``cfg.data`` when the caller built them already;
    ``prepared``: :func:`prepare_seeded` of ``cfg`` (its model untrained, e.g. the CLI's preflight
    build), used instead of building the data and the model (the run's numbers do not change).
    Raises :class:`TrainingInterrupted` after a signal's checkpoint, :class:`TrainingDiverged` on
    non-finite values, ConfigError for a rerun that changes a fixed key.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from .data import infinite_batches, rank_rows
    from .model import UnifiedModel
    from .models.moe import update_moe_biases

    tc = cfg.train
    # --- accelerate, seed, data, model: every check before the first file is written ----------
    # The launch (several processes on CPU need cpu=True: unidiff.launch) and the precision rule.
    launch = launch_settings()
    # Several runs in one process (experiments, tests, `unidiff run`) may differ in mixed precision:
    # forget the previous run's accelerator settings. The process group is kept for the process's
    # life (destroyed at exit: unidiff.launch.destroy_process_group_at_exit).
    AcceleratorState._reset_state()
    if cfg.run.threads is not None:  # an explicit count beats the CLI's start-up choice (unidiff/runtime.py)
        apply_threads(cfg.run.threads, key="run.threads")
    precision, precision_reason = resolve_precision(tc.mixed_precision, launch.device_type)
    trackers = tracker_names(cfg) or None  # train.report_to (its own error, not mixed precision's)
    try:
        # broadcast_buffers=False: DDP would otherwise copy rank 0's MoE token counts over every rank's
        # before update_moe_biases all-reduces them (the biases stay identical anyway: same update).
        ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
        accelerator = Accelerator(mixed_precision=precision, cpu=launch.cpu, gradient_accumulation_steps=tc.grad_accum,
                                  log_with=trackers, project_dir=str(run_dir(cfg)), kwargs_handlers=[ddp])
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"train.mixed_precision={precision!r} is not usable here: {err}") from None
    if prepared is None:
        prepared = prepare_seeded(cfg, datasets)  # set_seed: identical initial weights on every process
    else:  # built already (the CLI's preflight): the RNG continues from where that build left it
        _set_rng_state(prepared.rng)
    cfg, train_set, _, info, model, _ = prepared
    objective = build_objective(cfg, model)
    schedule = objective.schedule
    world, rank = accelerator.num_processes, accelerator.process_index
    micro_global = tc.batch_size // tc.grad_accum  # one micro-step's batch, summed over processes
    if micro_global % world:
        raise ConfigError(f"train.batch_size={tc.batch_size} / train.grad_accum={tc.grad_accum} = {micro_global} "
                          f"is not divisible by the {world} processes")

    out_dir = run_dir(cfg)
    ckpt_root = out_dir / "checkpoints"
    main = accelerator.is_main_process
    # --- resume: the newest verified checkpoint, and may this config continue it? ---------------
    # The main process hashes (checkpoint.scan) and tells the others, so every rank resumes the same one.
    found = [None, []]
    if main:
        good, damaged = ckpt.scan(ckpt_root)
        found = [None if good is None else good.name, [(p.name, why) for p, why in damaged]]
    found = _broadcast(accelerator, found)
    resume_from = None if found[0] is None else ckpt_root / found[0]
    damaged = found[1]
    if (resume_from is not None or damaged) and not tc.resume:
        raise ConfigError(f"run folder {str(out_dir)!r} already holds checkpoints and train.resume=false; "
                          "choose another run.name/run.dir or set train.resume=true")
    config_path = out_dir / "config.yaml"
    continuing = (resume_from is not None or bool(damaged)) and config_path.is_file()
    changes: Dict[str, Tuple[Any, Any]] = {}
    if resume_from is not None or continuing:
        from .config import load_config  # the saved config validates against the same schema

        new = to_container(cfg)
        saved = to_container(load_config(config_path)) if continuing else new
        reached = ckpt.step_of(resume_from) if resume_from is not None else 0
        changes = resume_changes(saved, new, reached, str(out_dir))

    if main:  # validated: now the run folder may be written
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        start = 0 if resume_from is None else ckpt.step_of(resume_from)
        for name, why in damaged:  # newer than the one resumed from: reported, set aside, never deleted
            moved = ckpt.set_aside(ckpt_root / name)
            accelerator.print(f"checkpoint {name} is damaged ({why}; kept as {moved.name}); resuming from "
                              f"{resume_from.name if resume_from is not None else 'the start'}")
        # config.yaml: the config of the invocation that started the run, then one appended comment
        # line per later invocation saying what it did and which allowed keys it changed.
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        line = f"# {stamp}: steps {start}->{tc.steps}"
        if continuing:
            changed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
            write_text(config_path, config_path.read_text() + line + (f"; changed {changed}" if changed else "") + "\n")
        else:
            write_text(config_path, to_yaml(cfg) + line + ("" if resume_from is not None else " (new run)") + "\n")
        # Precision chosen by the machine (train.mixed_precision: auto): this invocation's choice.
        write_json(out_dir / "precision.json", {"requested": tc.mixed_precision.value, "mixed_precision": accelerator.mixed_precision,
                                                "reason": precision_reason, "device": str(accelerator.device),
                                                "processes": accelerator.num_processes})
    accelerator.print(f"precision: {accelerator.mixed_precision} ({precision_reason})")
    accelerator.wait_for_everyone()

    # --- optimisation state ---------------------------------------------------------------------
    device = accelerator.device
    if tc.compile:
        model.backbone.compile()  # in place: state-dict keys stay those of the plain module
    objective.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas))
    # Not prepared: accelerate would step a prepared scheduler once per process; this one counts
    # applied optimiser steps, and is checkpointed by us (train_state.json).
    lr_scheduler = get_scheduler(tc.lr_schedule.value, optimizer, num_warmup_steps=tc.warmup_steps,
                                 num_training_steps=tc.steps)
    # EMA (habit 9): an exact copy at start (diffusers' decay warm-up is 0 at the first update),
    # outside prepare, on the unwrapped parameters, stepped only on real optimiser steps.
    ema = EMAModel(model.parameters(), decay=tc.ema_decay, model_cls=UnifiedModel, model_config=model.config,
                   foreach=True)
    state = ckpt.TrainState(step=0)
    # The objective, not the bare model, is what DDP/FSDP wrap: one forward is one whole step.
    ddp_objective, optimizer = accelerator.prepare(objective, optimizer)
    net = accelerator.unwrap_model(ddp_objective).model  # the live UnifiedModel (parameters shared)
    # Our own objects go to safetensors/JSON files of the checkpoint, not accelerate's pickles.
    saved_objects = dict(ema=ema, param_names=[n for n, _ in net.named_parameters()], lr_scheduler=lr_scheduler,
                         state=state)
    if resume_from is not None:
        ckpt.load_checkpoint(accelerator, resume_from, **saved_objects)
        ema.to(device)
        if state.step != ckpt.step_of(resume_from):
            raise CheckpointError(f"checkpoint {str(resume_from)!r} holds step {state.step}, its name says otherwise")
        accelerator.print(f"resumed from {resume_from} (step {state.step})")
    elif tc.init_from is not None:
        accelerator.print(f"weights from {tc.init_from} (train.init_from: those whose name and shape match)")
    step = state.step

    train_data = train_set.to(device) if hasattr(train_set, "to") else train_set
    batches = infinite_batches(train_data, micro_global, cfg.run.seed, start_step=step * tc.grad_accum,
                               num_workers=cfg.data.num_workers, rank=rank, world_size=world)  # this rank's rows
    micro = step * tc.grad_accum

    # --- logging: log.jsonl + accelerate's trackers, each step once across resumes -------------
    log_path = out_dir / "log.jsonl"
    if accelerator.is_main_process:
        truncate_log(log_path, step)  # drop what a kill after the last checkpoint had logged
    # TensorBoard logs into RUN_DIR/tb; purge_step = the first step this invocation logs makes it
    # discard a previous invocation's events from there on (SummaryWriter(purge_step=...)), so
    # TensorBoard, too, shows each step once. Only non-TensorBoard trackers get the config
    # (TensorBoard's add_hparams would start a second event folder; config.yaml is beside it).
    accelerator.init_trackers("tb", init_kwargs={"tensorboard": {"purge_step": step + 1}})
    for tracker in accelerator.trackers:
        if tracker.name != "tensorboard":
            tracker.store_init_configuration(flat_config(cfg))
    end = tc.steps if stop_at is None else min(tc.steps, int(stop_at))
    # --- time budget (train.budget_minutes): seconds of one clock, summed over invocations ------
    budget = None if tc.budget_minutes is None else 60.0 * float(tc.budget_minutes)
    clock = time.process_time if tc.budget_clock.value == "cpu" else time.perf_counter
    spent_before, clock0 = state.spent, clock()
    budget_spent = budget is not None and state.spent >= budget
    if budget_spent:  # a rerun of a budget already spent (train.budget_minutes may be raised)
        end = step
    elif budget is not None and step:  # resumed: the LR at the budget's position, not the step's
        set_schedule_lr(lr_scheduler, budget_schedule_step(step, state.spent / budget, tc.steps, tc.warmup_steps))
    # A metrics.json was computed from an earlier model: once this invocation trains, it is stale.
    # Decided here, by the loop's own end (train.steps, stop_at, a budget already spent), after the
    # checkpoint has loaded: a resume that fails leaves the metrics where they were.
    if accelerator.is_main_process and step < end and (out_dir / "metrics.json").is_file():
        (out_dir / "metrics.json").replace(out_dir / "metrics.stale.json")
        accelerator.print(f"{out_dir / 'metrics.json'} moved to metrics.stale.json (the model changes now)")
    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}
    n_micro, t_last = 0, time.time()
    if budget is not None:
        accelerator.print(f"time budget: {tc.budget_minutes:g} min of {tc.budget_clock.value} time "
                          f"({state.spent / 60:.1f} spent); train.steps={tc.steps} is the cap")
    accelerator.print(f"training {cfg.run.name}: steps {step}->{end}, global batch {tc.batch_size}, "
                      f"{world} process(es), {sum(p.numel() for p in net.parameters()):,} parameters, {last_threads()}")
    # The bar redraws live on a terminal; elsewhere (a log file, an executed notebook, where every
    # redraw is kept) at most about ten times a run and once a minute, postfix changes included.
    live = sys.stderr.isatty()
    # Under a time budget the step count is not known ahead: no total, at most once a minute.
    quiet = {} if live else {"mininterval": 60.0,
                             "miniters": 1 if budget is not None else max(1, (tc.steps - step) // 10)}
    bar = tqdm(total=None if budget is not None else tc.steps, initial=step,
               disable=not accelerator.is_local_main_process, desc=cfg.run.name, dynamic_ncols=True, **quiet)

    def save(at: int) -> None:
        # --- never checkpoint non-finite weights (the loop stops instead) ------------------------
        if not _all_finite(accelerator, list(net.parameters()) + list(ema.shadow_params)):
            last = ckpt.latest(ckpt_root, report=accelerator.print)
            raise TrainingDiverged(f"the weights are not finite at step {at}: not checkpointed; the last finite "
                                   f"checkpoint is {last.name if last is not None else 'none'} (lower train.lr?)")
        ckpt.save_checkpoint(accelerator, ckpt_root, at, tc.keep_last, model_config=dict(net.config), **saved_objects)
        if accelerator.is_main_process:  # data.on_bad_file=skip: the files skipped so far
            write_bad_files(out_dir, train_set)

    # --- finite check state: this optimiser step's micro-steps, kept apart until it is applied ----
    finite = torch.ones((), dtype=torch.bool, device=device)  # every loss of this step is finite
    pending: List[Dict[str, torch.Tensor]] = []  # their log values
    bad = stop = False
    signals = StopSignals()
    # --- preemption: inside, SIGTERM/SIGINT only set a flag (old handlers back on leaving); the bar
    # is closed on any exit, so that a message below starts on its own line.
    with signals, contextlib.closing(bar):
        ddp_objective.train()
        while step < end:
            # --- one micro-step (an optimiser step every grad_accum of them) ---------------------
            batch = {k: v.to(device) for k, v in next(batches).items()}  # (micro_local, ...) each
            g = torch.Generator(device=device).manual_seed(seed_for(cfg.run.seed, micro, rank))
            draws = {}
            if world > 1:  # this rank's rows of the one-process draws (rank_draws); g: from_batch's own draws
                draws = rank_draws(objective, micro_global, batch["image"].shape[1:], batch["image"].dtype,
                                   torch.Generator(device=device).manual_seed(seed_for(cfg.run.seed, micro, 0)),
                                   rank_rows(micro_global, rank, world))
                g.manual_seed(seed_for(cfg.run.seed, micro, rank, 1))
            with accelerator.accumulate(ddp_objective):
                out = ddp_objective(batch, generator=g, **draws)
                accelerator.backward(out.loss)
                grad_norm = None
                finite = finite & torch.isfinite(out.loss.detach())
                if accelerator.sync_gradients:
                    if tc.grad_clip > 0:
                        grad_norm = accelerator.clip_grad_norm_(ddp_objective.parameters(), tc.grad_clip)
                        norm = grad_norm
                    else:
                        norm = torch.nn.utils.get_total_norm([p.grad for p in ddp_objective.parameters()
                                                              if p.grad is not None])
                    # One all-reduce and one host sync per optimiser step decide together, on every
                    # rank: skip this step (a non-finite loss or gradient anywhere) and stop after it
                    # (a signal on any rank).
                    # The budget's clock goes into the same reduce: every rank takes the mean
                    # (float32 there; one process keeps its own float64 seconds).
                    spent = spent_before + clock() - clock0
                    flags = torch.stack([(~(finite & torch.isfinite(torch.as_tensor(norm, device=device)))).float(),
                                         torch.tensor(float(signals.signum > 0), device=device),
                                         torch.tensor(spent, device=device)])
                    reduced = accelerator.reduce(flags, reduction="sum").tolist()
                    bad, stop = reduced[0] > 0, reduced[1] > 0
                    state.spent = spent if world == 1 else reduced[2] / world
                    if not bad:
                        optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            # Log values wait for the step's verdict: device tensors, no host sync per micro-step.
            logs = dict(out.logs)
            if grad_norm is not None:
                logs["grad_norm"] = torch.as_tensor(grad_norm, device=device).float()
            pending.append(logs)
            n_micro += 1
            if not accelerator.sync_gradients:
                continue

            # --- after an optimiser step: applied, or skipped (no LR, EMA, MoE-bias update) ------
            if bad:
                state.bad_steps += 1
                state.bad_in_a_row += 1
                _forget_moe_counts(net)  # the skipped step's routing counts must not steer the next update
                if accelerator.is_main_process:  # above the progress bar
                    tqdm.write(f"step {step + 1}: non-finite loss or gradient, optimiser step skipped "
                               f"({state.bad_in_a_row} in a row, {state.bad_steps} in all)")
            else:
                state.bad_in_a_row = 0
                lr_scheduler.step()
                if budget is not None:  # the schedule over the budget's fraction, not the step count
                    set_schedule_lr(lr_scheduler, budget_schedule_step(step + 1, state.spent / budget, tc.steps,
                                                                       tc.warmup_steps))
                ema.step(net.parameters())
                update_moe_biases(net)  # aux-loss-free balancing (§5), counts summed over ranks
                for logs in pending:
                    for k, v in logs.items():
                        sums[k], counts[k] = sums.get(k, 0) + v, counts.get(k, 0) + 1
            pending, finite = [], torch.ones_like(finite)
            step += 1
            state.step = step
            bar.update(1)
            if budget is not None and state.spent >= budget:  # spent: this step is the last (log, checkpoint)
                budget_spent, end = True, step

            if step % tc.log_every == 0 or step == end:
                keys = sorted(sums)
                avg = (accelerator.reduce(torch.stack([sums[k] / counts[k] for k in keys]), reduction="mean").tolist()
                       if keys else [])  # every step of the period skipped: no averages
                record = {"step": step, **dict(zip(keys, avg)), "lr": optimizer.param_groups[0]["lr"],
                          "bad_steps": state.bad_steps}
                elapsed, t_last = time.time() - t_last, time.time()
                record["images_per_s"] = n_micro * micro_global / max(elapsed, 1e-9)
                if not all(math.isfinite(v) for v in avg):
                    raise TrainingDiverged(f"non-finite training statistics at step {step}: {record}")
                if accelerator.is_main_process:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)  # main process only
                if "loss" in record:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}", refresh=live)
                sums, counts, n_micro = {}, {}, 0

            if state.bad_in_a_row >= tc.max_bad_steps:
                last = ckpt.latest(ckpt_root, report=accelerator.print)
                raise TrainingDiverged(f"{state.bad_in_a_row} optimiser steps in a row had a non-finite loss or "
                                       f"gradient (train.max_bad_steps={tc.max_bad_steps}), stopped at step {step}; "
                                       f"the last checkpoint is {last.name if last is not None else 'none'} "
                                       "(lower train.lr, or check the data)")

            if tc.sample_every and step % tc.sample_every == 0:
                if accelerator.is_main_process:
                    ema_net = ckpt.ema_model_from(net, ema)
                    with autocast(accelerator.mixed_precision, device.type):  # sampling: the training precision
                        sample_grid(ema_net, schedule, cfg, out_dir / "samples" / f"step_{step:06d}.png",
                                    seed_for(cfg.run.seed, step, 7), class_names=list(info.class_names))
                    del ema_net
                accelerator.wait_for_everyone()

            if step % tc.ckpt_every == 0 or step == end or stop:
                save(step)
            if stop:
                break

    if accelerator.is_main_process:
        write_bad_files(out_dir, train_set)
    if (step == tc.steps or budget_spent) and accelerator.is_main_process:
        # The inference snapshot (EDM2's second checkpoint kind): what `sample`/`evaluate` load.
        ckpt.export_model(ckpt.ema_model_from(net, ema), out_dir / "model", run_config=cfg)
    accelerator.wait_for_everyone()
    # Not accelerator.end_training(): it destroys the process group, and a later run in this process
    # (experiment arms, evaluation after `unidiff run`) would hang setting it up again.
    for tracker in accelerator.trackers:
        tracker.finish()
    destroy_process_group_at_exit()
    if accelerator.is_main_process:  # the run's curves so far (unidiff plot draws the same figure)
        from .plots import plot_curves

        plot_curves([out_dir], out_dir / "curves.png")
    if stop and step < tc.steps and not budget_spent:
        # --- preemption: checkpointed above, now a clean exit with the signal's code ------------
        signum = signals.signum or signal.SIGTERM  # another rank got it first
        if main:
            print(f"unidiff: {signal.Signals(signum).name} at step {step}: checkpoint "
                  f"{ckpt.step_dir_name(step)} written; rerun the same command to resume (exit code {128 + signum})",
                  file=sys.stderr, flush=True)
        raise TrainingInterrupted(signum, step)
    return out_dir


def _broadcast(accelerator, obj: Any) -> Any:
    """``obj`` of the main process, on every process."""
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj])[0]


def _all_finite(accelerator, tensors: List[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` is finite on every process (one reduce, one sync)."""
    bad = torch.stack([~torch.isfinite(t).all() for t in tensors]).any().float()
    return float(accelerator.reduce(bad, reduction="sum")) == 0


def _forget_moe_counts(model: nn.Module) -> None:
    """Drop the MoE token counts of a skipped step (:meth:`MoE.update_bias` would use them next)."""
    from .models.moe import MoE

    for module in model.modules():
        if isinstance(module, MoE):
            module.tokens_per_expert.zero_()
