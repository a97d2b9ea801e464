"""The ``unidiff`` command line.

    unidiff train CONFIG [key=value ...] [--dry-run]
    unidiff sample RUN_DIR --task TASK -n N --out FILE.npz [--inputs FILE.npz] [...]
        TASK: joint, class_to_image, representation_to_image, inpaint, transition,
              image_to_label, image_to_representation, reverse_transition
    unidiff evaluate RUN_DIR [key=value ...]
    unidiff run CONFIG [key=value ...]          # train, sample, evaluate
    unidiff experiment CONFIG [key=value ...]     # multi-task vs single-task (configs/experiments/)
    unidiff encoder train CONFIG [key=value ...]  # the multi-tower representation encoder

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

from .choices import Sampler, values
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


def _add_config_args(p: argparse.ArgumentParser, what: str = "YAML run config (configs/*.yaml)") -> None:
    p.add_argument("config", help=what)
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
# task -> (what it does, the modality kind it needs). "generate" tasks produce images (conditioned
# on a known modality value when the kind is set); "read" tasks read a modality off given images.
TASKS = {
    "joint": ("generate", None),
    "class_to_image": ("generate", "label"),
    "representation_to_image": ("generate", "representation"),
    "inpaint": ("generate", "masked_image"),
    "transition": ("generate", "source_image"),
    "image_to_label": ("read", "label"),
    "image_to_representation": ("read", "representation"),
    "reverse_transition": ("read", "source_image"),
}
SAMPLERS = tuple(values(Sampler))
# npz key under which each modality kind's values are written / read.
NPZ_KEYS = {"label": "labels", "representation": "representations", "source_image": "sources", "masked_image": "masks"}


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run folder (RUN_DIR with model/ or checkpoints/)")
    p.add_argument("--task", choices=tuple(TASKS), default="joint")
    p.add_argument("-n", type=_positive_int, default=None, help="number of samples (default sample.n)")
    p.add_argument("--steps", type=_positive_int, default=None, help="sampler steps (default sample.steps)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="default sample.sampler")
    p.add_argument("--guidance", type=_nonneg_float, default=None, help="drift guidance w (conditional tasks)")
    p.add_argument("--classifier-scale", type=_nonneg_float, default=None,
                   help="class_to_image: classifier guidance from the label head (default sample.classifier_scale)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", type=_label_list, default=None, help="class_to_image: classes to cycle, e.g. 3,1,4")
    p.add_argument("--inputs", type=Path, default=None,
                   help="an .npz of inputs: 'images' (read tasks, inpaint; default: the val split), 'masks' "
                        "(inpaint, N×H×W, 1 = visible; default: random), 'sources' (transition; default: the "
                        "built-in transform of val images), 'representations' (representation_to_image, required)")
    p.add_argument("--out", type=_npz_path, required=True, help="output .npz (a PNG grid is written beside it)")


def _read_npz(path: Path) -> Dict[str, "np.ndarray"]:
    import numpy as np

    if not path.is_file():
        raise DataError(f"--inputs file {str(path)!r} does not exist")
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.keys()}
    except (OSError, ValueError) as err:
        raise DataError(f"--inputs file {str(path)!r} cannot be read: {err}") from None


def _images_from_array(arr: "np.ndarray", image_shape, what: str, path: Path) -> "torch.Tensor":
    """N×H×W×C uint8 (our own output) or float in [-1, 1] -> (N, C, H, W) float in [-1, 1]."""
    import numpy as np
    import torch

    C, H, W = image_shape
    if arr.ndim == 3 and C == 1:
        arr = arr[..., None]
    if arr.ndim != 4 or tuple(arr.shape[1:3]) != (H, W):
        raise DataError(f"--inputs {str(path)!r}: {what!r} must be N×{H}×{W}×C, got {tuple(arr.shape)}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1.0 if arr.dtype == np.uint8 else x.float().clamp(-1, 1)


def _load_inputs(path: Path, image_shape) -> "torch.Tensor":
    """``images`` of an .npz as (N, C, H, W) in [-1, 1]."""
    arrays = _read_npz(path)
    if "images" not in arrays:
        raise DataError(f"--inputs file {str(path)!r} has no 'images' array (has {sorted(arrays)})")
    x = _images_from_array(arrays["images"], image_shape, "images", path)
    if x.shape[1] != image_shape[0]:
        raise DataError(f"--inputs 'images' must have {image_shape[0]} channel(s), got {x.shape[1]}")
    return x


def to_uint8(images: "torch.Tensor") -> "np.ndarray":
    """(N, C, H, W) in [-1, 1] -> uint8 N×H×W×C."""
    import numpy as np
    import torch

    x = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())


def _to_npz_value(kind: str, value) -> "np.ndarray":
    """A modality value as written into the output .npz under ``NPZ_KEYS[kind]``."""
    import numpy as np
    import torch

    if kind == "label":
        return np.asarray(value.long().cpu().numpy(), dtype=np.int64)
    if kind == "representation":
        return np.asarray(value.float().cpu().numpy(), dtype=np.float32)
    if kind == "source_image":
        return to_uint8(value)
    if kind == "masked_image":  # the mask, N×H×W uint8 (1 = visible)
        mask = value["mask"] if isinstance(value, dict) else value
        return np.ascontiguousarray(mask[:, 0].round().to(torch.uint8).cpu().numpy())
    raise ConfigError(f"no .npz encoding for modality kind {kind!r}")


def sample_to_file(run_dir, task: str, n: Optional[int], steps: Optional[int], sampler: Optional[str],
                   guidance: Optional[float], seed: int, labels: Optional[List[int]], inputs: Optional[Path],
                   out: Path, classifier_scale: Optional[float] = None) -> Dict[str, Path]:
    """Run one sampling task of a trained run (DESIGN.md §3); write ``out`` and a PNG grid beside it.

    The .npz holds ``images`` (uint8 N×H×W×C: generated, or the inputs of a read task) and one array
    per modality involved, under ``NPZ_KEYS``: ``labels`` (int64 N; for class_to_image the
    conditioning labels, for joint/image_to_label the generated ones), ``representations``
    (float32 N×K), ``sources`` (uint8 N×H×W×C), ``masks`` (uint8 N×H×W, 1 = visible).
    """
    import torch

    from .checkpoint import load_model
    from .config import build_schedule
    from .diffusion import sample
    from .evaluate import load_run_config
    from .io import save_grid, write_npz

    if task not in TASKS:
        raise ConfigError(f"--task {task!r} is not one of {sorted(TASKS)}")
    action, kind = TASKS[task]
    cfg = load_run_config(run_dir)
    n_given, n = n, n or cfg.sample.n
    steps = steps or cfg.sample.steps
    sampler = sampler or cfg.sample.sampler.value
    guidance = cfg.sample.guidance if guidance is None else guidance
    classifier_scale = cfg.sample.classifier_scale if classifier_scale is None else classifier_scale
    if classifier_scale and task != "class_to_image":
        raise ConfigError("--classifier-scale only applies to --task class_to_image")
    if not out.parent.is_dir():
        raise ConfigError(f"--out folder {str(out.parent)!r} does not exist")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(run_dir, device)
    schedule = build_schedule(cfg)
    name = model.modality_of_kind(kind) if kind else None
    if kind and name is None:
        kinds = sorted({m.kind for m in model.modalities.values()})
        raise ConfigError(f"--task {task} needs a {kind} modality; run {str(run_dir)!r} has {kinds or 'none'}")
    if action == "generate" and model.image_head is None:
        raise ConfigError(f"--task {task} generates images; run {str(run_dir)!r} was trained with image_head=false")
    if labels is not None and task != "class_to_image":
        raise ConfigError("--labels only applies to --task class_to_image")
    if inputs is not None and task in ("joint", "class_to_image"):
        raise ConfigError(f"--inputs does not apply to --task {task}")
    arrays = _read_npz(inputs) if inputs is not None else {}
    g = torch.Generator(device=device).manual_seed(seed)

    def input_images() -> "torch.Tensor":
        if "images" in arrays:
            x = _load_inputs(inputs, model.image_shape)
        else:
            if inputs is not None:
                raise DataError(f"--inputs file {str(inputs)!r} has no 'images' array (has {sorted(arrays)})")
            from .data import build_datasets, iter_batches

            _, val_set, _ = build_datasets(cfg.data)
            x = torch.cat([b["image"] for b in iter_batches(val_set, 512)])
        return x[:n_given] if n_given else x  # default: every input

    written = {}  # npz key -> array
    if action == "read":
        images = input_images()
        read = []
        for x in images.split(cfg.eval.batch_size):
            res = sample(model, schedule, "image_to_aux", image=x.to(device), name=name, t_read=cfg.eval.t_read,
                         num_draws=cfg.eval.num_draws, generator=g)
            read.append(res.aux[name])
        value = torch.cat(read)
        result_images = images
        written[NPZ_KEYS[kind]] = _to_npz_value(kind, value)
    else:
        known = None
        if kind == "label":
            K = model.modalities[name].num_classes
            bad = [c for c in (labels or []) if not 0 <= c < K]
            if bad:
                raise ConfigError(f"--labels: class {bad[0]} is out of range [0, {K})")
            pool = torch.tensor(labels or list(range(K)), dtype=torch.long)
            known = {name: pool[torch.arange(n) % len(pool)].to(device)}
        elif kind == "representation":
            if "representations" not in arrays:
                raise DataError("--task representation_to_image needs --inputs FILE.npz with a 'representations' "
                                "array (N×K float)")
            r = torch.as_tensor(arrays["representations"], dtype=torch.float32)
            dim = model.modalities[name].dim
            if r.ndim != 2 or r.shape[1] != dim:
                raise DataError(f"--inputs 'representations' must be N×{dim}, got {tuple(r.shape)}")
            known = {name: (r[:n_given] if n_given else r).to(device)}
        elif kind == "masked_image":
            x = input_images().to(device)
            mod = model.modalities[name]
            batch = {"image": x}
            if "masks" in arrays:
                m = torch.as_tensor(arrays["masks"]).float()
                batch["mask"] = (m[:n_given] if n_given else m).to(device)
            known = {name: mod.from_batch(batch, generator=g)}
        elif kind == "source_image":
            mod = model.modalities[name]
            if "sources" in arrays:
                src = _images_from_array(arrays["sources"], model.image_shape, "sources", inputs)
                known = {name: (src[:n_given] if n_given else src).to(device)}
            else:  # the run's built-in source view of the val images
                known = {name: mod.from_batch({"image": input_images().to(device)}, generator=g)}
        if known:
            first = next(iter(known.values()))
            n = (first["image"] if isinstance(first, dict) else first).shape[0]
        res = sample(model, schedule, "conditional" if known else "joint", batch_size=n, known=known,
                     scheduler=sampler, num_steps=steps, guidance_scale=guidance if known else 1.0,
                     classifier_scale=classifier_scale if kind == "label" else 0.0,
                     classifier_modality=name if kind == "label" else None, generator=g)
        result_images = res.image
        for m_name, mod in model.modalities.items():  # the known values, and every generated modality
            if mod.kind not in NPZ_KEYS or NPZ_KEYS[mod.kind] in written:
                continue
            if known and m_name in known:
                written[NPZ_KEYS[mod.kind]] = _to_npz_value(mod.kind, known[m_name])
            elif mod.kind != "masked_image":  # a generated masked image has no mask to report
                written[NPZ_KEYS[mod.kind]] = _to_npz_value(mod.kind, res.aux[m_name])
        if "labels" not in written:  # image-only run: no labels to report (-1)
            import numpy as np

            written["labels"] = np.full((n,), -1, dtype=np.int64)
    write_npz(out, images=to_uint8(result_images), **written)
    grid = out.with_suffix(".png")
    save_grid(result_images.cpu(), grid)
    return {"npz": out, "grid": grid}


@command("sample", "sample from a trained run into an .npz (+ PNG grid)", _sample_args)
def _sample(args) -> int:
    paths = sample_to_file(args.run_dir, args.task, args.n, args.steps, args.sampler, args.guidance, args.seed,
                           args.labels, args.inputs, args.out, args.classifier_scale)
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


# --- experiment ------------------------------------------------------------------------------
def _experiment_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, "YAML experiment file (configs/experiments/*.yaml)")
    p.epilog = ("overrides: run-config keys (train.steps=100) go to every arm; experiment.* keys "
                "(experiment.n_cond=50) change the experiment itself")


@command("experiment", "train and compare the arms of a DESIGN.md §4 experiment (rerun to resume)", _experiment_args)
def _experiment(args) -> int:
    from experiments import run_experiment  # the experiments package; the core never imports it

    out = run_experiment(args.config, args.overrides)
    print((out / "results.md").read_text(), end="")
    print(f"results: {out}")
    return 0


# --- encoder ---------------------------------------------------------------------------------
def _encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("train",), help="train: fit the multi-tower encoder (cached)")
    _add_config_args(p)


def load_encoder_config(path, overrides: Sequence[str] = ()):
    """``data:`` (DataConfig) + ``encoder:`` (EncoderConfig) sections, validated like run configs."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .config import apply_overrides, config_error, read_yaml
    from .data import DataConfig
    from .encoders import EncoderConfig

    schema = OmegaConf.create({"data": OmegaConf.structured(DataConfig), "encoder": OmegaConf.structured(EncoderConfig)})
    OmegaConf.set_struct(schema, True)
    data = read_yaml(path)
    unknown = sorted(set(data) - {"data", "encoder"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section in {str(path)!r}; an encoder config has data and encoder")
    try:
        cfg = OmegaConf.merge(schema, data)
    except OmegaConfBaseException as err:
        raise config_error(err) from None
    apply_overrides(cfg, overrides)
    enc = OmegaConf.to_object(cfg.encoder)
    enc.validate()
    return OmegaConf.to_object(cfg.data), enc


@command("encoder", "train the multi-tower image-text representation encoder (unidiff encoder train CONFIG)", _encoder_args)
def _encoder(args) -> int:
    import json
    from dataclasses import replace

    from .data import build_datasets
    from .encoders import train_encoder

    data_cfg, enc_cfg = load_encoder_config(args.config, args.overrides)
    train_set, val_set, info = build_datasets(data_cfg)
    if not hasattr(train_set, "images"):
        raise DataError("unidiff encoder needs an in-memory dataset (data.in_memory=true)")
    if enc_cfg.out_dir is None:
        enc_cfg = replace(enc_cfg, out_dir=str(Path("runs") / "encoders" / Path(args.config).stem))
    _, metrics = train_encoder(enc_cfg, train_set.images, train_set.labels, info.class_names,
                               val_set.images, val_set.labels)
    keys = [k for k in metrics if k.startswith("recall@")]
    print(json.dumps({k: metrics[k] for k in keys} | ({"ablation": metrics["ablation"]} if "ablation" in metrics else {}), indent=1))
    print(f"encoder: {enc_cfg.out_dir}")
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
