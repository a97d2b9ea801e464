"""The ``unidiff`` command line.

    unidiff train CONFIG [key=value ...] [--dry-run]
    unidiff sample RUN_DIR --task joint|class_to_image|image_to_label -n N --out FILE.npz [...]
    unidiff evaluate RUN_DIR [key=value ...]
    unidiff run CONFIG [key=value ...]          # train, sample, evaluate

Subcommands live in one table, :data:`COMMANDS` (name -> help, argument builder, handler): a new
subcommand is one :func:`command` registration. Anything the user got wrong (a config key, a
missing run folder, a bad argument) prints one line ``unidiff: error: ...`` on stderr and exits
with code 2, without a traceback; run outputs are written only after validation, atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

from .errors import ConfigError, DataError, UnidiffError

if TYPE_CHECKING:  # heavy imports stay inside the commands: `unidiff --help` is instant
    import numpy as np
    import torch


class UsageError(UnidiffError):
    """A malformed command line."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so errors stay one line."""

    def error(self, message: str):
        raise UsageError(message)


@dataclass
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Optional[int]]


COMMANDS: Dict[str, Command] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register ``run(args) -> exit code | None`` as the subcommand ``name``."""

    def deco(run):
        COMMANDS[name] = Command(help, add_arguments, run)
        return run

    return deco


# --- argument types --------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _label_list(text: str) -> List[int]:
    try:
        labels = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class indices like 3,1,4, got {text!r}") from None
    if not labels:
        raise argparse.ArgumentTypeError("expected at least one class index")
    return labels


def _npz_path(text: str) -> Path:
    path = Path(text)
    if path.suffix != ".npz":
        raise argparse.ArgumentTypeError(f"output file must end in .npz, got {text!r}")
    return path


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=2000")


# --- train -----------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="resolve and validate the config, build the model, print it and its size; write nothing")


def _dry_run(cfg) -> None:
    from .config import to_yaml
    from .train import prepare_run

    cfg, train_set, val_set, info, model = prepare_run(cfg)
    print(to_yaml(cfg), end="")
    total = sum(p.numel() for p in model.parameters())
    backbone = sum(p.numel() for p in model.backbone.parameters())
    active = model.backbone.num_parameters_active() if hasattr(model.backbone, "num_parameters_active") else backbone
    print(f"# data: {info.name} {tuple(info.image_shape)}, {info.num_classes} classes, "
          f"{len(train_set)} train / {len(val_set)} val")
    print(f"# parameters: {total:,} total, backbone {backbone:,} ({active:,} active per token), "
          f"heads {total - backbone:,}")


@command("train", "train a model from a YAML config (rerun the same command to resume)", _train_args)
def _train(args) -> int:
    from .config import load_config
    from .train import train

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        _dry_run(cfg)
        return 0
    out = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # once under `accelerate launch`
        print(f"run folder: {out}")
    return 0


# --- sample ----------------------------------------------------------------------------------
TASKS = ("joint", "class_to_image", "image_to_label")
SAMPLERS = ("ddpm", "ddim", "dpm")


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run folder (RUN_DIR with model/ or checkpoints/)")
    p.add_argument("--task", choices=TASKS, default="joint")
    p.add_argument("-n", type=_positive_int, default=None, help="number of samples (default sample.n)")
    p.add_argument("--steps", type=_positive_int, default=None, help="sampler steps (default sample.steps)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="default sample.sampler")
    p.add_argument("--guidance", type=_nonneg_float, default=None, help="drift guidance w (class_to_image)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", type=_label_list, default=None, help="class_to_image: classes to cycle, e.g. 3,1,4")
    p.add_argument("--inputs", type=Path, default=None, help="image_to_label: .npz with 'images' (default: val split)")
    p.add_argument("--out", type=_npz_path, required=True, help="output .npz (a PNG grid is written beside it)")


def _load_inputs(path: Path, image_shape) -> "torch.Tensor":
    """``images`` of an .npz as (N, C, H, W) in [-1, 1]: uint8 N×H×W×C (our own output) or float."""
    import numpy as np
    import torch

    if not path.is_file():
        raise DataError(f"--inputs file {str(path)!r} does not exist")
    try:
        with np.load(path) as f:
            if "images" not in f:
                raise DataError(f"--inputs file {str(path)!r} has no 'images' array (has {list(f.keys())})")
            arr = f["images"]
    except (OSError, ValueError) as err:
        raise DataError(f"--inputs file {str(path)!r} cannot be read: {err}") from None
    C, H, W = image_shape
    if arr.ndim == 3 and C == 1:
        arr = arr[..., None]
    if arr.ndim != 4 or tuple(arr.shape[1:]) != (H, W, C):
        raise DataError(f"--inputs 'images' must be N×{H}×{W}×{C}, got {tuple(arr.shape)}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
    if arr.dtype == np.uint8:
        return x.float() / 127.5 - 1.0
    return x.float().clamp(-1, 1)


def to_uint8(images: "torch.Tensor") -> "np.ndarray":
    """(N, C, H, W) in [-1, 1] -> uint8 N×H×W×C."""
    import numpy as np
    import torch

    x = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())


def write_npz(path: Path, **arrays) -> None:
    """np.savez to ``path`` atomically (tmp file + rename)."""
    import numpy as np

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def sample_to_file(run_dir, task: str, n: Optional[int], steps: Optional[int], sampler: Optional[str],
                   guidance: Optional[float], seed: int, labels: Optional[List[int]], inputs: Optional[Path],
                   out: Path) -> Dict[str, Path]:
    """Run one sampling task of a trained run; write ``out`` (.npz: images uint8 N×H×W×C, labels
    int64 N) and a PNG grid beside it. Returns the written paths."""
    import numpy as np
    import torch

    from .checkpoint import load_model
    from .config import build_schedule
    from .diffusion import sample
    from .evaluate import _label_modality, load_run_config
    from .train import save_grid

    cfg = load_run_config(run_dir)
    n_given, n = n, n or cfg.sample.n
    steps = steps or cfg.sample.steps
    sampler = sampler or cfg.sample.sampler.value
    guidance = cfg.sample.guidance if guidance is None else guidance
    if not out.parent.is_dir():
        raise ConfigError(f"--out folder {str(out.parent)!r} does not exist")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(run_dir, device)
    schedule = build_schedule(cfg)
    label = _label_modality(model)
    if task != "joint" and label is None:
        raise ConfigError(f"--task {task} needs a label modality; run {str(run_dir)!r} has {list(model.modalities)}")
    if task != "image_to_label" and model.image_head is None:
        raise ConfigError(f"--task {task} generates images; run {str(run_dir)!r} was trained with image_head=false")
    if labels is not None and task != "class_to_image":
        raise ConfigError("--labels only applies to --task class_to_image")
    if inputs is not None and task != "image_to_label":
        raise ConfigError("--inputs only applies to --task image_to_label")
    g = torch.Generator(device=device).manual_seed(seed)

    if task == "image_to_label":
        if inputs is not None:
            images = _load_inputs(inputs, model.image_shape)
        else:
            from .data import build_datasets, iter_batches

            _, val_set, _ = build_datasets(cfg.data)
            images = torch.cat([b["image"] for b in iter_batches(val_set, 512)])
        images = images[:n_given] if n_given else images  # default: every input
        read = []
        for x in images.split(cfg.eval.batch_size):
            out_ = sample(model, schedule, "image_to_label", image=x.to(device), t_read=cfg.eval.t_read,
                          num_draws=cfg.eval.num_draws, generator=g)
            read.append(out_.aux[label].cpu())
        result_images, result_labels = images, torch.cat(read)
    else:
        known = None
        if task == "class_to_image":
            K = model.modalities[label].num_classes
            bad = [c for c in (labels or []) if not 0 <= c < K]
            if bad:
                raise ConfigError(f"--labels: class {bad[0]} is out of range [0, {K})")
            pool = torch.tensor(labels or list(range(K)), dtype=torch.long)
            cond = pool[torch.arange(n) % len(pool)]
            known = {label: cond.to(device)}
        res = sample(model, schedule, task, batch_size=n, known=known, scheduler=sampler, num_steps=steps,
                     guidance_scale=guidance if known else 1.0, generator=g)
        result_images = res.image.cpu()
        if task == "class_to_image":
            result_labels = cond
        elif label is not None:
            result_labels = res.aux[label].cpu()
        else:  # image-only run: no labels to report
            result_labels = torch.full((n,), -1, dtype=torch.long)
    write_npz(out, images=to_uint8(result_images), labels=np.asarray(result_labels.long().numpy(), dtype=np.int64))
    grid = out.with_suffix(".png")
    save_grid(result_images, grid)
    return {"npz": out, "grid": grid}


@command("sample", "sample from a trained run into an .npz (+ PNG grid)", _sample_args)
def _sample(args) -> int:
    paths = sample_to_file(args.run_dir, args.task, args.n, args.steps, args.sampler, args.guidance, args.seed,
                           args.labels, args.inputs, args.out)
    print(f"samples: {paths['npz']}\ngrid: {paths['grid']}")
    return 0


# --- evaluate --------------------------------------------------------------------------------
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run folder")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. eval.n_samples=200")


def _print_metrics(metrics: Dict) -> None:
    for k, v in metrics.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")


@command("evaluate", "compute a run's metrics into RUN_DIR/metrics.json", _evaluate_args)
def _evaluate(args) -> int:
    from .evaluate import evaluate

    metrics = evaluate(args.run_dir, args.overrides)
    _print_metrics(metrics)
    print(f"metrics: {Path(args.run_dir) / 'metrics.json'}")
    return 0


# --- run -------------------------------------------------------------------------------------
@command("run", "train, sample (joint) and evaluate in one go", _add_config_args)
def _run(args) -> int:
    from .config import load_config
    from .evaluate import evaluate
    from .train import train

    cfg = load_config(args.config, args.overrides)
    out = train(cfg)
    paths = None
    if cfg.image_head:
        paths = sample_to_file(out, "joint", None, None, None, None, cfg.run.seed, None, None, out / "samples" / "final.npz")
    metrics = evaluate(out)
    _print_metrics(metrics)
    if paths is not None:
        print(f"grid: {paths['grid']}")
    print(f"metrics: {out / 'metrics.json'}")
    return 0


# --- entry point -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="unidiff", description="Unified multi-modal diffusion (see README.md).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point; returns the exit code (0 ok, 2 bad input)."""
    try:
        parser = build_parser()
        # Overrides may follow options (`train CFG --dry-run a=1`): argparse leaves those over.
        args, extra = parser.parse_known_args(argv)
        if extra:
            if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
                args.overrides = list(args.overrides) + extra
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return int(args._run(args) or 0)
    except UnidiffError as err:
        msg = " ".join(str(err).split("\n")).strip()
        print(f"unidiff: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unidiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
