"""Image quality per CPU-minute against the models researchers would pick instead (issue 12).

    python benchmarks/bench_quality.py --out quality.json                   # 15 min per candidate
    python benchmarks/bench_quality.py --minutes 2 --samples 200 --out q.json   # a reduced run

Class-conditional generation on Fashion-MNIST at 32x32 (the project's ``fashion_mnist`` source: the
official split, 28x28 zero-padded to 32x32). Four candidates, each trained for the same clock
budget (``--minutes``), one after the other, on ``--threads`` threads, then asked for ``--samples``
class->image samples (classes cycled: 100 per class at 1,000) with DDIM, ``--steps`` steps and
guidance ``--guidance`` (``--sampler dpm``: DPM-Solver++ 2M instead, for every candidate):

  unidiff          the joint image-label model of configs/fashion_joint_image_label.yaml (hybrid
                   backbone ``MEM*EM*E``, patch 4), trained by ``unidiff.train.train`` with the
                   config's recipe (``--set KEY=VALUE`` overrides it: the lever studies);
  unidiff_attn     the same with every Mamba sublayer replaced by attention (``*E**E**E``: equal
                   width and depth), the ablation of the hybrid stack;
  unet             diffusers' ``UNet2DModel``, class-conditional (``num_class_embeds=11``, index 10
                   the null class of classifier-free guidance, labels dropped with probability 0.1);
  dit              diffusers' ``DiTTransformer2DModel``, patch 2, class-conditional through its own
                   label embedding (dropout 0.1, null class = index 10).

The two peers are sized to about the parameter count of ``unidiff`` and trained the diffusers way:
``DDPMScheduler`` (squaredcos_cap_v2, 1000 steps, epsilon prediction), MSE on the noise, AdamW,
EMA (``diffusers.training_utils.EMAModel``), sampled with ``DDIMScheduler`` and classifier-free
guidance ``eps_u + w (eps_c - eps_u)``. unidiff's guidance is its drift guidance with the same
``w`` (1 = none for both). Recipes (``PEER_RECIPES``): DiT as its paper (lr 1e-4, constant, no
weight decay); the UNet as diffusers' ``train_unconditional`` example (AdamW, weight decay 1e-6,
warm-up), at its upper lr 2e-4 because the budget is short. Every candidate: batch ``--batch-size``
(the config's 32), EMA decay 0.999 (the config's), gradient clipping 1.0, and one precision
(``--precision``): ``auto`` is the project's rule (:func:`unidiff.launch.resolve_precision`: bf16
autocast on a CPU with AMX, fp32 elsewhere, where bf16 measured slower: ~100x without bf16
units, up to 2.6x with AVX512-BF16 alone), applied to every candidate's training, sampling and
read-out alike (unidiff through ``train.mixed_precision``, the peers under the same
``torch.autocast``).

The budget. ``--clock cpu`` (default) counts the process's CPU time, which on one thread is what an
idle core would take and is not stretched by other work on a shared machine; ``--clock wall``
counts wall time. The peers run their own loop and stop when the budget is spent; so does unidiff's
(``unidiff.train.train`` with ``train.budget_minutes`` and ``train.budget_clock``: the same clock,
checked after every optimiser step; its cosine LR schedule runs over the budget instead of a step
count, README "Training for a time budget"). A lever that fixes ``--set train.steps=N`` trains
exactly N steps instead, with no budget. Each candidate's training time (its loop's, by the
budget's clock) is reported beside the budget.

Split runs. ``--candidates`` may name any subset; ``--reuse FILE`` takes the candidates not named
from an earlier result after checking it was made with the same settings on the same kind of CPU
(so the peers, which no unidiff lever changes, are trained once and paired with each unidiff
variant). A peers-only run has no margins and ``target: null``.

Metrics, all with the project's Fashion-MNIST reference classifier (``unidiff.metrics``, trained on
the train split for ``--reference-steps`` and cached in ``--cache-dir``, as ``unidiff evaluate``
does): class->image accuracy (the classifier recovers the asked class), FID in its feature space
against the official test set, beside the floor (as many real train images vs the test set);
training images/s and steps; sampling seconds; parameters (total and active: a routed MoE expert
counts top_k / num_experts). For the unidiff models also image->label accuracy on the test set
(their own label head read at ``eval.t_read``). ``target`` says whether unidiff beats both peers
on FID and accuracy with image->label >= 0.88. The sampler lever: ``--also-sample ddim:50 dpm:20``
samples and scores every trained model again with each SAMPLER:STEPS (its ``sampler_grid``; DDIM at
``--sampler`` keeps each library's default, diffusers' x̂0 clipping to [-1, 1] for the peers and
none for unidiff, and ``ddim:20:clip`` / ``ddim:20:noclip`` set it alike for every candidate), and
``--read-at`` reads image->label at other timesteps and draw counts (``image_to_label_grid``).
Bad input: one line ``bench_quality: error: ...``,
exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from unidiff.errors import ConfigError, UnidiffError  # noqa: E402
from unidiff.launch import autocast, resolve_precision  # noqa: E402

FASHION_CONFIG = REPO / "configs" / "fashion_joint_image_label.yaml"
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the peers' unconditional label (classifier-free guidance)
LABEL_DROP = 0.1  # the peers' label dropout (DiT's class_dropout_prob; unidiff's diffusion.p_drop)
EMA_DECAY = 0.999
GRAD_CLIP = 1.0
STEP_CAP = 10_000_000  # unidiff's train.steps under a time budget: a cap no budget here reaches
PATTERNS = {"unidiff": "MEM*EM*E", "unidiff_attn": "*E**E**E"}  # the digits preset's, and all-attention
PEER_RECIPES = {
    "unet": dict(lr=2e-4, weight_decay=1e-6, lr_schedule="constant_with_warmup", warmup_steps=60,
                 source="diffusers examples/unconditional_image_generation (AdamW, wd 1e-6, warm-up), lr at its "
                        "upper 2e-4 for a short budget; constant after warm-up (the step count is not known ahead)"),
    "dit": dict(lr=1e-4, weight_decay=0.0, lr_schedule="constant", warmup_steps=0,
                source="DiT paper (Peebles & Xie 2023): AdamW lr 1e-4, no weight decay, constant"),
}
CANDIDATES = ("unidiff", "unidiff_attn", "unet", "dit")
PEERS = ("unet", "dit")


# --- model builders (the test counts their parameters itself) ------------------------------------------
def build_unet() -> torch.nn.Module:
    """diffusers' UNet2DModel, class-conditional, sized near unidiff's 0.76M parameters (0.83M):
    three resolutions (32, 16, 8), attention at the two lower ones, one ResNet block per level."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(32, 32, 64),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=16,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       class_embed_type=None, num_class_embeds=NUM_CLASSES + 1)


def build_dit() -> torch.nn.Module:
    """diffusers' DiTTransformer2DModel, patch 2 (256 tokens, the issue's setting; unidiff's config is at
    patch 4, 64 tokens), width 64 (4 heads of 16),
    8 blocks: 0.78M parameters. ``num_embeds_ada_norm=10``: its label table has a null row 10."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=1, out_channels=1,
                                 num_layers=8, sample_size=32, patch_size=2, num_embeds_ada_norm=NUM_CLASSES)


def peer_forward(name: str, model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The peer's noise prediction (B, 1, H, W) for noisy images x, timesteps t and labels y (10 = null)."""
    if name == "unet":
        return model(x, t, class_labels=y).sample
    return model(hidden_states=x, timestep=t, class_labels=y).sample


def unidiff_overrides(args, name: str, run_dir: Path, steps: Optional[int] = None) -> list:
    """The config overrides of a unidiff candidate: the bench's data, budget, threads and precision;
    no periodic samples, trackers or intermediate checkpoints (they would spend the budget).
    ``steps``: a fixed step count (a ``--set train.steps=N`` lever), or None: the bench's time budget
    (``train.budget_minutes`` of ``--clock``, with :data:`STEP_CAP` as ``train.steps``). The loop
    counts its seconds by ``--clock`` either way (``train.budget_clock``)."""
    budget = [] if steps is not None else [f"train.budget_minutes={args.minutes}"]
    steps = STEP_CAP if steps is None else steps
    out = [f"run.dir={run_dir}", f"run.seed={args.seed}", f"run.threads={args.threads}", *budget,
           f"train.budget_clock={args.clock}",
           f"model.backbone.pattern='{PATTERNS[name]}'", f"train.steps={steps}", f"train.batch_size={args.batch_size}",
           f"train.warmup_steps={min(60, max(steps // 10, 0))}", f"train.mixed_precision={args.amp}",
           "train.sample_every=0",
           f"train.ckpt_every={steps}", "train.keep_last=1", f"train.log_every={max(1, min(50, steps))}",
           "train.report_to=[]", f"eval.cache_dir={args.cache_dir}"]
    if args.reference_steps is not None:
        out.append(f"eval.reference_steps={args.reference_steps}")
    if args.root:
        out.append(f"data.root={args.root}")
    return out + list(args.set)  # the lever under study last: it wins over the bench's own settings


def unidiff_config(args, name: str, run_dir: Path, steps: Optional[int] = None):
    from unidiff.config import load_config

    return load_config(str(FASHION_CONFIG), unidiff_overrides(args, name, run_dir, steps))


def build_unidiff(args, name: str, info):
    """A fresh unidiff candidate (its UnifiedModel) and its resolved config, for a data description."""
    from unidiff.config import build_model, resolve_with_data

    cfg = resolve_with_data(unidiff_config(args, name, Path(args.work) / name, 1), info)
    return build_model(cfg, info.image_shape), cfg


def count_parameters(model) -> Tuple[int, int]:
    """(total, active) parameters; for unidiff the backbone's routed experts count top_k / num_experts."""
    total = sum(p.numel() for p in model.parameters())
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "num_parameters_active"):
        return total, total
    return total, total - sum(p.numel() for p in backbone.parameters()) + backbone.num_parameters_active()


# --- clocks -----------------------------------------------------------------------------------------
def clock_fn(kind: str) -> Callable[[], float]:
    return time.process_time if kind == "cpu" else time.perf_counter


# --- training ---------------------------------------------------------------------------------------
def train_unidiff(args, name: str, datasets) -> Tuple[Any, Any, Dict[str, Any]]:
    """Train a unidiff candidate with the project's own loop for the bench's budget (``--minutes`` of
    ``--clock``), or for the N steps of a ``--set train.steps=N`` lever; returns the EMA model, the
    config and the training figures (steps and seconds as the loop counted them)."""
    from unidiff import checkpoint as ckpt
    from unidiff.train import train

    run_dir = Path(args.work) / name
    fixed = [item.split("=", 1)[1].strip() for item in args.set if item.split("=", 1)[0].strip() == "train.steps"]
    cfg = unidiff_config(args, name, run_dir, int(fixed[-1]) if fixed else None)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # train's messages: stdout carries only the JSON
        train(cfg, datasets=datasets)
    wall = time.perf_counter() - t0
    state = json.loads((ckpt.latest(run_dir / "checkpoints") / ckpt.STATE_FILE).read_text())["train"]
    steps, seconds = int(state["step"]), float(state["spent"])  # by --clock (train.budget_clock)
    model = ckpt.load_model(run_dir, "cpu").eval()
    return model, cfg, {"steps": steps, "train_seconds": seconds, "train_wall_seconds": wall,
                        "overrides": list(args.set),
                        "images_per_s": steps * cfg.train.batch_size / max(seconds, 1e-9),  # a --set batch too
                        "recipe": unidiff_recipe(cfg)}


def unidiff_recipe(cfg) -> str:
    """The training recipe a unidiff candidate ran, read off its config (``--set`` included); the
    sampling settings are the run's ``settings``, the same for every candidate."""
    tr = cfg.train
    span = (f"{tr.steps} steps" if tr.budget_minutes is None
            else f"the {tr.budget_minutes:g}-min {getattr(tr.budget_clock, 'value', tr.budget_clock)} budget")
    return (f"{FASHION_CONFIG.relative_to(REPO)} (AdamW lr {tr.lr:g}, wd {tr.weight_decay:g}, "
            f"{getattr(tr.lr_schedule, 'value', tr.lr_schedule)} over {span}, warm-up {tr.warmup_steps}, "
            f"EMA {tr.ema_decay:g}), patch {cfg.model.backbone.patch_size}, p_drop {cfg.diffusion.p_drop:g}, "
            f"{getattr(cfg.model.prediction, 'value', cfg.model.prediction)}-prediction, drift guidance (--guidance)")


def peer_sampler(name: str, clip: Optional[bool] = None):
    """The peers' sampling scheduler, from their training scheduler's config as diffusers swaps them:
    DDIM (``clip``: its ``clip_sample``; None keeps diffusers' default, on), or DPM-Solver++ 2M
    (``algorithm_type="dpmsolver++"``, ``solver_order=2``; unidiff's ``dpm``)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(ddpm_scheduler().config, **({} if clip is None else {"clip_sample": clip}))
    return DPMSolverMultistepScheduler.from_config(ddpm_scheduler().config, algorithm_type="dpmsolver++", solver_order=2)


def ddpm_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


def train_peer(args, name: str, datasets, budget: float, clock) -> Tuple[Any, Dict[str, Any]]:
    """Train a diffusers peer until ``budget`` seconds are spent; returns its EMA copy and figures."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from unidiff.data import infinite_batches

    train_set = datasets[0]
    recipe = PEER_RECIPES[name]
    torch.manual_seed(args.seed)  # the initial weights and DiT's own label dropout draws
    model = build_unet() if name == "unet" else build_dit()
    model.train()
    noise_sched = ddpm_scheduler()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    lr_sched = get_scheduler(recipe["lr_schedule"], opt, num_warmup_steps=recipe["warmup_steps"])
    ema = EMAModel(model.parameters(), decay=EMA_DECAY, foreach=True)
    batches = infinite_batches(train_set, args.batch_size, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    T = noise_sched.config.num_train_timesteps
    steps, t0 = 0, clock()
    while clock() - t0 < budget:
        batch = next(batches)
        x0, y = batch["image"].float(), batch["label"].long()  # (B, 1, 32, 32) in [-1, 1], (B,)
        B = x0.shape[0]
        if name == "unet":  # DiT's LabelEmbedding drops labels itself in train mode
            y = torch.where(torch.rand(B, generator=g) < LABEL_DROP, torch.full_like(y, NULL_CLASS), y)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, T, (B,), generator=g)
        with autocast(args.amp, "cpu"):
            pred = peer_forward(name, model, noise_sched.add_noise(x0, noise, t), t, y)
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        lr_sched.step()
        ema.step(model.parameters())
        steps += 1
        if not math.isfinite(loss.item()):
            raise UnidiffError(f"{name}: non-finite loss at step {steps}")
    seconds = clock() - t0
    ema_model = copy.deepcopy(model)
    ema.copy_to(ema_model.parameters())
    return ema_model.eval().requires_grad_(False), {
        "steps": steps, "train_seconds": seconds, "images_per_s": steps * args.batch_size / max(seconds, 1e-9),
        "final_loss": loss.item() if steps else None,
        "recipe": f"AdamW lr {recipe['lr']:g}, wd {recipe['weight_decay']:g}, {recipe['lr_schedule']} "
                  f"(warm-up {recipe['warmup_steps']}), EMA {EMA_DECAY}, eps-prediction, CFG; {recipe['source']}"}


# --- sampling -----------------------------------------------------------------------------------------
@torch.no_grad()
def sample_peer(args, name: str, model, labels: torch.Tensor, sampler: str, steps: int,
                clip: Optional[bool] = None) -> torch.Tensor:
    """Class->image samples (N, 1, 32, 32) in [-1, 1]: ``--sampler`` (DDIM, eta 0, or DPM-Solver++ 2M)
    with classifier-free guidance; ``clip`` as :func:`peer_sampler`."""
    out = []
    for i, y in enumerate(labels.split(args.sample_batch)):
        sched = peer_sampler(sampler, clip)
        sched.set_timesteps(steps)
        g = torch.Generator().manual_seed(args.seed * 1000 + i)
        x = torch.randn((len(y), 1, 32, 32), generator=g)
        yy = torch.cat([y, torch.full_like(y, NULL_CLASS)])
        for t in sched.timesteps:
            with autocast(args.amp, "cpu"):
                eps = peer_forward(name, model, torch.cat([x, x]), t.expand(2 * len(y)), yy).float()
            eps_c, eps_u = eps.chunk(2)
            x = sched.step(eps_u + args.guidance * (eps_c - eps_u), t, x).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


@torch.no_grad()
def sample_unidiff(args, model, cfg, labels: torch.Tensor, sampler: str, steps: int,
                   clip: Optional[bool] = None) -> torch.Tensor:
    """Class->image samples of a unidiff model: its ``--sampler`` with drift guidance ``--guidance``;
    ``clip``: DDIM's ``clip_sample`` (None: unidiff's default, off)."""
    from unidiff.config import build_schedule
    from unidiff.diffusion import sample

    schedule = build_schedule(cfg)
    out = []
    for i, y in enumerate(labels.split(args.sample_batch)):
        g = torch.Generator().manual_seed(args.seed * 1000 + i)
        with autocast(args.amp, "cpu"):  # as `unidiff sample` does, with the run's precision
            res = sample(model, schedule, "class_to_image", known={"label": y}, scheduler=sampler,
                         num_steps=steps, guidance_scale=args.guidance, generator=g,
                         scheduler_kwargs=None if clip is None else {"clip_sample": clip})
        out.append(res.image.float())
    return torch.cat(out)


@torch.no_grad()
def image_to_label_accuracy(args, model, cfg, val_set, t_read: Optional[int] = None,
                            num_draws: Optional[int] = None) -> Tuple[float, int]:
    """The model's own label read-out on the test images (the first ``--read-n``; 0 = all), at the
    config's ``eval.t_read`` / ``eval.num_draws`` unless given."""
    from unidiff.config import build_schedule
    from unidiff.data import iter_batches
    from unidiff.diffusion import image_to_aux

    schedule = build_schedule(cfg)
    g = torch.Generator().manual_seed(args.seed)
    right = seen = 0
    limit = args.read_n or len(val_set)
    for batch in iter_batches(val_set, 250):
        x, y = batch["image"][: limit - seen].float(), batch["label"][: limit - seen]
        if len(x) == 0:
            break
        with autocast(args.amp, "cpu"):
            pred, _ = image_to_aux(model, schedule, x, "label", int(cfg.eval.t_read if t_read is None else t_read),
                                   int(cfg.eval.num_draws if num_draws is None else num_draws), g)
        right += int((pred.long() == y.long()).sum())
        seen += len(x)
    return right / max(seen, 1), seen


# --- the run ------------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def check_args(args) -> None:
    if not (args.minutes > 0 and math.isfinite(args.minutes)):
        raise ConfigError(f"--minutes must be a positive number, got {args.minutes}")
    for key in ("samples", "steps", "batch_size", "threads", "reference_steps", "sample_batch"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.samples < 2:
        raise ConfigError(f"--samples must be >= 2 (FID needs two samples), got {args.samples}")
    if args.read_n < 0:
        raise ConfigError(f"--read-n must be >= 0 (0 = the whole test set), got {args.read_n}")
    if not (args.guidance >= 1.0 and math.isfinite(args.guidance)):
        raise ConfigError(f"--guidance must be >= 1 (1 = no guidance), got {args.guidance}")
    unknown = [c for c in args.candidates if c not in CANDIDATES]
    if unknown or not args.candidates or len(set(args.candidates)) != len(args.candidates):
        raise ConfigError(f"--candidates must be distinct names among {list(CANDIDATES)}, got {args.candidates}")
    if args.reuse is not None and not os.path.isfile(args.reuse):
        raise ConfigError(f"--reuse {args.reuse}: no such file")
    args.read_at = [read_at_pair(text) for text in args.read_at]
    args.also_sample = {text: sampler_pair(text) for text in args.also_sample}  # keyed as given: the grid's keys


# The settings two runs must share for one to reuse the other's candidates (--reuse).
REUSE_KEYS = ("minutes_per_candidate", "clock", "samples", "sampler", "steps", "guidance", "batch_size", "seed",
              "reference_steps", "train_items", "test_items")


def load_reused(path: str, settings: Dict[str, Any], machine: Dict[str, Any], wanted) -> Dict[str, Dict[str, Any]]:
    """The candidates of an earlier run's JSON that this run does not train itself, after checking
    that it was made under the same settings on the same kind of CPU and thread count."""
    import json

    try:
        with open(path) as f:
            old = json.load(f)
        old_settings, old_machine, old_candidates = old["settings"], old["machine"], old["candidates"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--reuse {path}: not a bench_quality result ({type(err).__name__}: {err})") from None
    for key in REUSE_KEYS:
        if old_settings.get(key) != settings[key]:
            raise ConfigError(f"--reuse {path}: settings.{key} is {old_settings.get(key)!r} there, "
                              f"{settings[key]!r} here")
    for key in ("cpu", "threads", "precision"):
        if old_machine.get(key) != machine[key]:
            raise ConfigError(f"--reuse {path}: machine.{key} is {old_machine.get(key)!r} there, {machine[key]!r} here")
    out = {}
    for name, fig in old_candidates.items():
        if name in CANDIDATES and name not in wanted:
            out[name] = dict(fig, reused_from=os.path.abspath(path))
    return out


def run(args) -> Dict[str, Any]:
    from unidiff import metrics as M
    from unidiff.config import resolve_with_data
    from unidiff.data import build_datasets

    torch.set_num_threads(args.threads)
    clock = clock_fn(args.clock)
    budget = args.minutes * 60.0
    # The data once, shared by every candidate (the config's data section, --root applied).
    cfg0 = unidiff_config(args, "unidiff", Path(args.work) / "unidiff", 1)
    train_set, val_set, info = build_datasets(cfg0.data)
    resolve_with_data(cfg0, info)  # a fixture with other classes fails here, in one line
    if info.num_classes != NUM_CLASSES or tuple(info.image_shape) != (1, 32, 32):
        raise ConfigError(f"the data must be 10-class 1x32x32 Fashion-MNIST, got {info.num_classes} classes "
                          f"of {tuple(info.image_shape)}")
    datasets = (train_set, val_set, info)
    T = int(cfg0.diffusion.num_train_timesteps)
    late = [f"{t}x{d}" for t, d in args.read_at if t >= T]
    if late:  # before any training: image_to_aux would refuse them only after it
        raise ConfigError(f"--read-at {' '.join(late)}: the read-out timestep must be < {T} (diffusion.num_train_timesteps)")

    settings = {"minutes_per_candidate": args.minutes, "clock": args.clock, "samples": args.samples,
                "sampler": args.sampler, "steps": args.steps, "guidance": args.guidance, "batch_size": args.batch_size,
                "seed": args.seed, "reference_steps": int(cfg0.eval.reference_steps), "read_n": args.read_n,
                "unidiff_overrides": list(args.set), "train_items": len(train_set), "test_items": len(val_set),
                "command": " ".join(sys.argv)}
    machine = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
               "python": platform.python_version(), "precision": "fp32" if args.amp == "no" else args.amp,
               "precision_reason": args.amp_reason}
    # Checked before any training, so a mismatch costs nothing.
    reused = load_reused(args.reuse, settings, machine, args.candidates) if args.reuse else {}

    # The judge and the FID features (unidiff evaluate's reference classifier, cached).
    clf, ref_acc = M.get_reference_classifier(train_set, val_set, info, args.cache_dir,
                                                 steps=int(cfg0.eval.reference_steps))
    feats = M.ClassifierFeatures(clf)
    test_stats = M.reference_statistics(val_set, feats, args.cache_dir, keep=0)
    floor_stats = M.reference_statistics(train_set, feats, args.cache_dir, max_items=args.samples, keep=0)
    labels = torch.arange(args.samples) % NUM_CLASSES  # classes cycled: balanced
    results: Dict[str, Dict[str, Any]] = {}
    for name in args.candidates:
        if name in PEERS:
            model, fig = train_peer(args, name, datasets, budget, clock)
            cfg = None
        else:
            model, cfg, fig = train_unidiff(args, name, datasets)
        total, active = count_parameters(model)

        def score(sampler: str, steps: int, clip: Optional[bool] = None) -> Dict[str, float]:
            """class->image samples of this model with ``sampler`` at ``steps`` (``clip``: sampler_pair), judged."""
            t0 = clock()
            fake = (sample_peer(args, name, model, labels, sampler, steps, clip) if name in PEERS
                    else sample_unidiff(args, model, cfg, labels, sampler, steps, clip))
            seconds = clock() - t0
            pred = torch.cat([clf(x).argmax(-1) for x in fake.split(250)])
            return {"sampling_seconds": seconds, "class_to_image_accuracy": float((pred == labels).float().mean()),
                    "fid": M.frechet_distance(test_stats, M.FeatureStats.from_features(
                        M.extract_features(fake, feats)["features"], keep=0))}

        fig.update(params_total=total, params_active=active, **score(args.sampler, args.steps))
        # the sampler lever: the same model sampled otherwise, keyed as given ("SAMPLER:STEPS[:clip|:noclip]")
        fig["sampler_grid"] = {text: score(*pair) for text, pair in args.also_sample.items()}
        if cfg is not None:
            fig["image_to_label_accuracy"], fig["image_to_label_n"] = image_to_label_accuracy(args, model, cfg, val_set)
            # the read-out lever: other (t_read, draws) on the same model, keyed "TxD"
            fig["image_to_label_grid"] = {f"{t}x{d}": image_to_label_accuracy(args, model, cfg, val_set, t, d)[0]
                                          for t, d in args.read_at}
        results[name] = fig
        print(f"{name}: {fig['steps']} steps, FID {fig['fid']:.2f}, class->image accuracy "
              f"{fig['class_to_image_accuracy']:.3f}", file=sys.stderr, flush=True)
    results.update(reused)

    out = {"benchmark": "bench_quality (issue 12)", "machine": machine, "settings": settings,
           "reference": {"classifier_test_accuracy": float(ref_acc),
                         "fid_floor": M.frechet_distance(test_stats, floor_stats),
                         "fid_floor_note": f"{min(args.samples, len(train_set))} real train images vs the test set"},
           "candidates": results}
    return dict(out, **verdict(results))


def verdict(results: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """unidiff's margins over every other candidate and whether the issue's target is met (None
    without unidiff: a peers-only run, made to be reused)."""
    if "unidiff" not in results:
        return {"margins_vs_unidiff": {}, "target": None}
    ours = results["unidiff"]
    margins = {peer: {"fid_ratio": results[peer]["fid"] / max(ours["fid"], 1e-12),  # > 1: unidiff lower
                      "fid_difference": results[peer]["fid"] - ours["fid"],  # > 0: unidiff lower
                      "accuracy_difference": ours["class_to_image_accuracy"] - results[peer]["class_to_image_accuracy"],
                      "images_per_s_ratio": ours["images_per_s"] / max(results[peer]["images_per_s"], 1e-12)}
               for peer in results if peer != "unidiff"}
    peers = [p for p in PEERS if p in results]
    fid_ok = bool(peers) and all(margins[p]["fid_difference"] > 0 for p in peers)
    acc_ok = bool(peers) and all(margins[p]["accuracy_difference"] > 0 for p in peers)
    read_ok = ours["image_to_label_accuracy"] >= 0.88
    return {"margins_vs_unidiff": margins,
            "target": {"fid_lower_than_peers": fid_ok, "accuracy_higher_than_peers": acc_ok,
                       "image_to_label_at_least_0.88": read_ok, "met": fid_ok and acc_ok and read_ok, "peers": peers}}


def sampler_pair(text: str) -> Tuple[str, int, Optional[bool]]:
    """``"SAMPLER:STEPS[:clip|:noclip]"`` -> (sampler, steps, clip) with a sampler of ``--sampler``,
    steps >= 1, and clip None (each candidate's default: DDIM clips x̂0 to [-1, 1] for the peers,
    as diffusers' ``DDIMScheduler`` does by default, and not for unidiff, whose
    ``make_scheduler`` leaves it off for latent spaces), True or False (that, for every candidate).
    DPM-Solver++ has no ``clip_sample``, so a clip suffix is DDIM's only."""
    name, _, rest = text.partition(":")
    steps, colon, suffix = rest.partition(":")
    clip = {"clip": True, "noclip": False}.get(suffix, "bad") if colon else None
    if name not in ("ddim", "dpm") or not steps.isdigit() or int(steps) < 1 or clip == "bad" \
            or (name == "dpm" and clip is not None):
        raise ConfigError(f"--also-sample: {text!r} is not SAMPLER:STEPS[:clip|:noclip] (ddim or dpm, steps >= 1, "
                          "the clip suffix for ddim only; e.g. dpm:20, ddim:20:noclip)")
    return name, int(steps), clip


def read_at_pair(text: str) -> Tuple[int, int]:
    """``"TxD"`` -> (t_read, num_draws) with T >= 0 and D >= 1, else a ConfigError naming it."""
    try:
        t, d = (int(v) for v in text.split("x"))
    except ValueError:
        raise ConfigError(f"--read-at: {text!r} is not TxD (a timestep x a number of draws, e.g. 50x4)") from None
    if t < 0 or d < 1:
        raise ConfigError(f"--read-at: {text!r} needs T >= 0 and D >= 1")
    return t, d


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--minutes", type=float, default=15.0, help="training budget of each candidate")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="what the budget counts (module docstring)")
    ap.add_argument("--samples", type=int, default=1000, help="class->image samples per candidate (classes cycled)")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps")
    ap.add_argument("--sampler", choices=("ddim", "dpm"), default="ddim",
                    help="every candidate's sampler: DDIM (eta 0) or DPM-Solver++ 2M")
    ap.add_argument("--also-sample", nargs="*", default=[], metavar="SAMPLER:STEPS[:clip|:noclip]",
                    help="also sample and score each model so (e.g. ddim:50 dpm:20 ddim:20:noclip), in its "
                         "sampler_grid; :clip / :noclip set DDIM's x̂0 clipping for every candidate alike")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="every candidate's precision (auto: bf16 on CPUs with AMX, else fp32)")
    ap.add_argument("--guidance", type=float, default=2.0, help="guidance scale w (CFG for peers, drift for unidiff)")
    ap.add_argument("--batch-size", type=int, default=32, help="training batch of every candidate")
    ap.add_argument("--sample-batch", type=int, default=100, help="samples per sampling batch")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference-steps", type=int, default=None,
                    help="reference classifier steps (default: the config's eval.reference_steps)")
    ap.add_argument("--read-n", type=int, default=0, help="test images for image->label (0 = all 10,000)")
    ap.add_argument("--read-at", nargs="*", default=[], metavar="TxD",
                    help="also read image->label at timestep T averaged over D noise draws (e.g. 0x1 50x4)")
    ap.add_argument("--root", default=None, help="Fashion-MNIST idx folder (default: the config's data.root)")
    ap.add_argument("--cache-dir", default="runs/.cache", help="reference classifier and statistics cache")
    ap.add_argument("--work", default=None, help="folder for unidiff's run folders (default: a temporary one, removed)")
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), help="which candidates to run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override of the unidiff candidates (repeatable), e.g. model.backbone.patch_size=4")
    ap.add_argument("--reuse", default=None, metavar="FILE",
                    help="take the candidates not named in --candidates from this earlier result (same settings)")
    ap.add_argument("--out", default=None, help="also write the JSON here (atomically)")
    args = ap.parse_args(argv)
    # The precision every candidate runs at: "no" (fp32) or "bf16", and why.
    args.amp, args.amp_reason = resolve_precision({"fp32": "no"}.get(args.precision, args.precision), "cpu")
    if args.precision != "auto":
        args.amp_reason = f"--precision {args.precision}"
    return args


def main(argv=None) -> int:
    import json

    from unidiff.io import write_json

    args = parse_args(argv)
    temp = None
    try:
        check_args(args)
        if args.work is None:
            temp = args.work = tempfile.mkdtemp(prefix="bench_quality_")
        result = run(args)
    except UnidiffError as err:
        print(f"bench_quality: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
