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

Several processes (README.md "Launching on several processes"; ``unidiff.runtime`` sets up the
launch and the precision rule): ``train.batch_size`` is the global batch of one optimiser step,
split over processes and ``train.grad_accum`` micro-steps. Each process loads its rows of the
global batch and keeps the same rows of the one-process draws (:func:`rank_draws`), so N processes
follow the one-process trajectory up to the rounding of DDP's gradient all-reduce.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from diffusers.utils.torch_utils import randn_tensor
from omegaconf import DictConfig
from torch import nn

from . import checkpoint as ckpt
from .config import ConfigError, build_model, build_schedule, resolve_with_data, run_dir, to_container, to_yaml
from .errors import CheckpointError
from .io import save_grid, seed_for, write_json, write_text
from .runtime import autocast, destroy_process_group_at_exit, launch_settings, resolve_precision

# Config sections a resumed run must share with the run that wrote the checkpoint (the rest,
# e.g. train.steps or the logging periods, may change between invocations).
_FIXED_ON_RESUME = ("data", "model", "diffusion", "modalities", "image_head")


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


@torch.no_grad()
def sample_grid(model, schedule, cfg: DictConfig, path: Path, seed: int) -> Dict[str, Any]:
    """Joint samples (§3) from ``model`` as a PNG grid at ``path`` plus ``<path>.json`` with the
    generated auxiliary read-outs (e.g. the label of every cell, row-major)."""
    from .diffusion import sample

    g = torch.Generator(device=model.device).manual_seed(seed)
    out = sample(model, schedule, "joint", batch_size=cfg.sample.n, scheduler=cfg.sample.sampler.value,
                 num_steps=cfg.sample.steps, generator=g)
    save_grid(out.image, path)
    caption = {name: v.tolist() for name, v in out.aux.items() if torch.is_tensor(v) and v.ndim == 1}
    write_text(path.with_suffix(".json"), json.dumps(caption))
    return caption


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
    from .diffusion.objective import draw_randint, draw_uniform

    device = generator.device
    t = draw_randint(0, objective.schedule.num_train_timesteps, (batch_size,), generator, device)
    noise = randn_tensor((batch_size, *image_shape), generator=generator, device=device, dtype=dtype)
    drop = {name: draw_uniform((batch_size,), generator, device) < objective.p_drop
            for name in objective.model.modalities}
    return {"t": t[rows], "noise": noise[rows], "drop": {name: m[rows] for name, m in drop.items()}}


def build_objective(cfg: DictConfig, model: nn.Module):
    """The training objective of ``cfg`` around ``model`` (checks ``diffusion.weighting``/``p_drop``)."""
    from .diffusion import MultiModalDiffusion

    return MultiModalDiffusion(model, build_schedule(cfg), weighting=cfg.diffusion.weighting.value,
                               p_drop=cfg.diffusion.p_drop)


def prepare_run(cfg: DictConfig):
    """Everything that can reject a config, before anything is written: ``(cfg, train, val, info, model)``
    with ``cfg`` resolved against the data. Also the ``--dry-run`` of the CLI."""
    from .data import build_datasets

    train_set, val_set, info = build_datasets(cfg.data)
    cfg = resolve_with_data(cfg, info)
    model = build_model(cfg, info.image_shape)
    build_objective(cfg, model)
    return cfg, train_set, val_set, info, model


def train(cfg: DictConfig, stop_at: Optional[int] = None) -> Path:
    """Train the run described by ``cfg``; returns the run folder.

    Rerunning with the same config resumes from the latest complete checkpoint (``train.resume``).
    ``stop_at`` ends the loop early at that step with a checkpoint, as an interruption would (the
    resume test uses it); the final EMA model is exported only when ``train.steps`` is reached.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from .data import infinite_batches, rank_rows
    from .model import UnifiedModel
    from .models.moe import update_moe_biases

    tc = cfg.train
    # --- accelerate, seed, data, model: every check before the first file is written ----------
    # The launch (several processes on CPU need cpu=True: unidiff.runtime) and the precision rule.
    launch = launch_settings()
    # Several runs in one process (experiments, tests, `unidiff run`) may differ in mixed precision:
    # forget the previous run's accelerator settings. The process group is kept for the process's
    # life (destroyed at exit: unidiff.runtime.destroy_process_group_at_exit).
    AcceleratorState._reset_state()
    precision, precision_reason = resolve_precision(tc.mixed_precision, launch.device_type)
    try:
        # broadcast_buffers=False: DDP would otherwise copy rank 0's MoE token counts over every rank's
        # before update_moe_biases all-reduces them (the biases stay identical anyway: same update).
        ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
        accelerator = Accelerator(mixed_precision=precision, cpu=launch.cpu, gradient_accumulation_steps=tc.grad_accum,
                                  log_with=None, kwargs_handlers=[ddp])
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"train.mixed_precision={precision!r} is not usable here: {err}") from None
    set_seed(cfg.run.seed)  # identical initial weights on every process
    cfg, train_set, _, info, model = prepare_run(cfg)
    objective = build_objective(cfg, model)
    schedule = objective.schedule
    world, rank = accelerator.num_processes, accelerator.process_index
    micro_global = tc.batch_size // tc.grad_accum  # one micro-step's batch, summed over processes
    if micro_global % world:
        raise ConfigError(f"train.batch_size={tc.batch_size} / train.grad_accum={tc.grad_accum} = {micro_global} "
                          f"is not divisible by the {world} processes")

    out_dir = run_dir(cfg)
    ckpt_root = out_dir / "checkpoints"
    resume_from = ckpt.latest(ckpt_root)
    if resume_from is not None and not tc.resume:
        raise ConfigError(f"run folder {str(out_dir)!r} already holds checkpoints and train.resume=false; "
                          "choose another run.name/run.dir or set train.resume=true")
    if resume_from is not None and (out_dir / "config.yaml").is_file():
        from .config import load_config  # the saved config validates against the same schema

        old = to_container(load_config(out_dir / "config.yaml"))
        new = to_container(cfg)
        for key in _FIXED_ON_RESUME:
            if old.get(key) != new.get(key):
                raise ConfigError(f"{key}: differs from the config of the run being resumed in {str(out_dir)!r}; "
                                  "start a new run (run.name) to change it")

    if accelerator.is_main_process:  # validated: now the run folder may be written
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "config.yaml", to_yaml(cfg))
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
    # optimiser steps, and is checkpointed as a registered object.
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
    for obj in (ema, lr_scheduler, state):  # order fixes custom_checkpoint_{i}: see checkpoint.py
        accelerator.register_for_checkpointing(obj)
    if resume_from is not None:
        ckpt.load_checkpoint(accelerator, resume_from)
        ema.to(device)
        if state.step != ckpt.step_of(resume_from):
            raise CheckpointError(f"checkpoint {str(resume_from)!r} holds step {state.step}, its name says otherwise")
        accelerator.print(f"resumed from {resume_from} (step {state.step})")
    step = state.step

    train_data = train_set.to(device) if hasattr(train_set, "to") else train_set
    batches = infinite_batches(train_data, micro_global, cfg.run.seed, start_step=step * tc.grad_accum,
                               num_workers=cfg.data.num_workers, rank=rank, world_size=world)  # this rank's rows
    micro = step * tc.grad_accum

    log_path, writer = out_dir / "log.jsonl", None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tb"))
    end = tc.steps if stop_at is None else min(tc.steps, int(stop_at))
    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}
    n_micro, t_last = 0, time.time()
    accelerator.print(f"training {cfg.run.name}: steps {step}->{end}, global batch {tc.batch_size}, "
                      f"{world} process(es), {sum(p.numel() for p in net.parameters()):,} parameters")
    bar = tqdm(total=tc.steps, initial=step, disable=not accelerator.is_local_main_process, desc=cfg.run.name,
               dynamic_ncols=True)

    ddp_objective.train()
    while step < end:
        # --- one micro-step (an optimiser step every grad_accum of them) -------------------------
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
            if accelerator.sync_gradients and tc.grad_clip > 0:
                grad_norm = accelerator.clip_grad_norm_(ddp_objective.parameters(), tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        micro += 1
        # Running sums for the log: device tensors, no host sync per step.
        logs = dict(out.logs)
        if grad_norm is not None:
            logs["grad_norm"] = torch.as_tensor(grad_norm, device=device).float()
        for k, v in logs.items():
            sums[k], counts[k] = sums.get(k, 0) + v, counts.get(k, 0) + 1
        n_micro += 1
        if not accelerator.sync_gradients:
            continue

        # --- after a real optimiser step ---------------------------------------------------------
        lr_scheduler.step()
        ema.step(net.parameters())
        update_moe_biases(net)  # aux-loss-free balancing (§5), counts summed over ranks
        step += 1
        state.step = step
        bar.update(1)

        if step % tc.log_every == 0 or step == end:
            keys = sorted(sums)
            avg = accelerator.reduce(torch.stack([sums[k] / counts[k] for k in keys]), reduction="mean").tolist()
            record = {"step": step, **dict(zip(keys, avg)), "lr": lr_scheduler.get_last_lr()[0]}
            elapsed, t_last = time.time() - t_last, time.time()
            record["images_per_s"] = n_micro * micro_global / max(elapsed, 1e-9)
            if not all(math.isfinite(v) for v in avg):
                raise FloatingPointError(f"non-finite training loss at step {step}: {record}")
            if accelerator.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                for k, v in record.items():
                    if k != "step":
                        writer.add_scalar(k, v, step)
            bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
            sums, counts, n_micro = {}, {}, 0

        if tc.sample_every and step % tc.sample_every == 0:
            if accelerator.is_main_process:
                ema_net = ckpt.ema_model_from(net, ema)
                with autocast(accelerator.mixed_precision, device.type):  # sampling: the training precision
                    sample_grid(ema_net, schedule, cfg, out_dir / "samples" / f"step_{step:06d}.png",
                                seed_for(cfg.run.seed, step, 7))
                del ema_net
            accelerator.wait_for_everyone()

        if step % tc.ckpt_every == 0 or step == end:
            ckpt.save_checkpoint(accelerator, ckpt_root, step, tc.keep_last, model_config=dict(net.config))

    bar.close()
    if step == tc.steps and accelerator.is_main_process:
        # The inference snapshot (EDM2's second checkpoint kind): what `sample`/`evaluate` load.
        ckpt.export_model(ckpt.ema_model_from(net, ema), out_dir / "model")
    if writer is not None:
        writer.close()
    accelerator.wait_for_everyone()
    # Not accelerator.end_training(): it destroys the process group, and a later run in this process
    # (experiment arms, evaluation after `unidiff run`) would hang setting it up again.
    for tracker in accelerator.trackers:
        tracker.finish()
    destroy_process_group_at_exit()
    return out_dir
