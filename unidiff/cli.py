"""The ``unidiff`` command line.

    unidiff train CONFIG [key=value ...] [--dry-run]
    unidiff sample RUN_DIR --task TASK -n N --out FILE.npz [--inputs FILE.npz] [...]
        TASK: joint, or a task of the run's modality kinds (heads.modality_tasks()): class_to_image,
              image_to_label, representation_to_image, image_to_representation, inpaint,
              transition, target_to_source, ...
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
# The tasks are those of the run's modality kinds (one table, heads.modality_tasks(), DESIGN.md §3):
# a "generate" task produces images conditioned on its modality's value, a "read" task reads its
# modality off given images; "joint" generates everything. Each modality converts its own values
# to and from .npz arrays (Modality.npz_key / to_array / from_array / default_inputs).
SAMPLERS = tuple(values(Sampler))


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run folder (RUN_DIR with model/ or checkpoints/)")
    p.add_argument("--task", default="joint",
                   help="joint (default), or a task of one of the run's modality kinds, e.g. class_to_image, "
                        "image_to_label, inpaint, transition, target_to_source (README.md 'Sampling tasks'; "
                        "an unknown name lists them)")
    p.add_argument("-n", type=_positive_int, default=None, help="number of samples (default sample.n)")
    p.add_argument("--steps", type=_positive_int, default=None, help="sampler steps (default sample.steps)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="default sample.sampler")
    p.add_argument("--guidance", type=_nonneg_float, default=None, help="drift guidance w (conditional tasks)")
    p.add_argument("--classifier-scale", type=_nonneg_float, default=None,
                   help="conditional tasks: classifier guidance from the conditioning modality's head "
                        "(default sample.classifier_scale)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", type=_label_list, default=None,
                   help="class_to_image: classes to cycle, e.g. 3,1,4 (an inline 'labels' array)")
    p.add_argument("--inputs", type=Path, default=None,
                   help="an .npz of inputs: 'images' (read tasks, and tasks built from images such as inpaint; "
                        "default: the val split) and the conditioning modality's array under its key, e.g. "
                        "'labels', 'representations' (required for representation_to_image), 'masks' (N×H×W, "
                        "1 = visible; default: random), 'sources' (default: the built-in transform of the images)")
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


def _task_spec(task: str, run_dir):
    """The :class:`unidiff.modality.ModalityTask` of ``task`` (None for ``joint``).

    A name that no known kind declares may belong to one of the run's own kinds
    (``package.module:Class``): loading the run's config imports them, then the table is read again.
    """
    import heads

    from .evaluate import load_run_config

    if task == "joint":
        return None
    if task not in heads.modality_tasks():
        try:
            load_run_config(run_dir)
        except UnidiffError:
            pass  # the unknown task is the error to report
    tasks = heads.modality_tasks()
    if task not in tasks:
        raise ConfigError(f"--task {task!r} is not one of {['joint', *tasks]}")
    return tasks[task]


def _rows_of(value, start: int, stop: Optional[int]):
    """Rows ``start:stop`` of a modality value (a tensor or a dict of tensors)."""
    if isinstance(value, dict):
        return {k: _rows_of(v, start, stop) for k, v in value.items()}
    return value[start:stop]


def _to_device(value, device):
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value.to(device)


def _n_rows(value) -> int:
    while isinstance(value, dict):
        value = next(iter(value.values()))
    return int(value.shape[0])


def adm_layout(arrays: Dict[str, "np.ndarray"]) -> Dict[str, "np.ndarray"]:
    """ADM's evaluator layout of a sample file's arrays (guided-diffusion ``evaluator.py`` reads
    ``arr_0``): ``arr_0`` the uint8 N×H×W×C images and, when there are labels, ``arr_1`` them."""
    out = {"arr_0": arrays["images"]}
    if "labels" in arrays:
        out["arr_1"] = arrays["labels"]
    return out


def sample_batch(pipe, task: str, n: int, n_given: Optional[int], arrays: Dict[str, "np.ndarray"],
                 sources: Dict[str, str], rows: Callable[[], Dict[str, "torch.Tensor"]], seed: int, *,
                 steps: Optional[int] = None, sampler: Optional[str] = None, guidance: Optional[float] = None,
                 classifier_scale: Optional[float] = None, inputs: Optional[Path] = None):
    """One batch of a task's outputs for one seed, by ``pipe`` (a
    :class:`unidiff.pipeline.UnifiedDiffusionPipeline`) on these inputs: its
    :class:`~unidiff.pipeline.UnifiedPipelineOutput` with ``images`` the raw (N, C, H, W) samples in
    [-1, 1] (or the read task's input images) and ``arrays`` the sample-file arrays (``images`` + each
    modality's ``npz_key`` array, see :func:`sample_to_file`).

    The seam of sharded sampling: ``arrays`` (the ``--inputs``/``--labels`` arrays), ``rows()`` (the
    task's input rows: images and the data's own modality values) and ``n`` are this batch's;
    ``n_given`` is the ``-n`` cut of the rows (None: all). One generator seeded with ``seed`` draws
    everything in order (random masks, then the sampler). Settings left None take the pipeline's
    defaults (``sampling.json``: a conditional task's guidance is the evaluation's).
    """
    import torch

    task_spec, name = pipe.resolve_task(task)
    model, device = pipe.model, pipe.device
    mod = model.modalities[name] if name is not None else None
    g = torch.Generator(device=device).manual_seed(seed)
    if task_spec is not None and task_spec.action == "read":
        return pipe.read(task, rows()["image"], generator=g, output_type="latent")
    known = None
    if mod is not None:
        key = mod.npz_key
        if key is not None and key in arrays:
            entries = {k: _rows_of(v, 0, n_given) for k, v in mod.from_array(arrays[key], sources[key]).items()}
            batch = {**rows(), **_to_device(entries, device)} if mod.needs_image else _to_device(entries, device)
            value = mod.from_batch(batch, generator=g)
        else:
            if inputs is not None and "images" not in arrays:
                raise DataError(f"--inputs file {str(inputs)!r} has neither {key!r} nor 'images' (has {sorted(arrays)})")
            value = mod.default_inputs(n, rows, g)
            if value is None:
                raise DataError(f"--task {task} needs --inputs FILE.npz with a {key!r} array ({mod.npz_doc})")
        known = {name: _to_device(value, device)}
    return pipe.generate(task, known, batch_size=n if known is None else None, num_inference_steps=steps,
                         sampler=sampler, guidance_scale=guidance, classifier_scale=classifier_scale, generator=g,
                         output_type="latent")


def sample_to_file(run_dir, task: str, n: Optional[int], steps: Optional[int], sampler: Optional[str],
                   guidance: Optional[float], seed: int, labels: Optional[List[int]], inputs: Optional[Path],
                   out: Path, classifier_scale: Optional[float] = None) -> Dict[str, Path]:
    """Run one sampling task of a trained run (DESIGN.md §3); write ``out`` and a PNG grid beside it.

    The run's pipeline (:class:`unidiff.pipeline.UnifiedDiffusionPipeline.from_run`: ``RUN_DIR/model``
    with its schedule and sampler settings, or the run's ``config.yaml`` for older runs) does the
    sampling; ``-n``, ``--steps``, ``--sampler``, ``--guidance``, ``--classifier-scale`` left out take
    its defaults (``sample.n``, ``sample.steps``, ``sample.sampler``; a conditional task's guidance is
    the one its evaluation used, ``eval.guidance``/``eval.classifier_scale``, see unidiff/pipeline.py).

    The .npz holds ``images`` (uint8 N×H×W×C: generated, or the inputs of a read task) and, per
    modality involved, its ``Modality.to_array`` under its ``npz_key`` (first modality of a key
    wins): for a conditional task the conditioning value, for joint and read tasks the generated or
    read values (``labels`` int64 N, ``representations`` float32 N×K, ``sources`` uint8 N×H×W×C,
    ``masks`` uint8 N×H×W with 1 = visible, ...); and ADM's evaluator layout (:func:`adm_layout`:
    ``arr_0`` the images, ``arr_1`` the labels when there are labels), so FID tooling reads it.

    Inputs: ``--inputs`` arrays are read by the conditioning modality's ``from_array`` (all rows, or
    the first ``n``); without its array the modality's ``default_inputs`` gives the value from the
    task's input rows (the ``--inputs`` images or the val split, all or the first ``n``) or from the
    sample count ``n`` (a label cycles over the classes).
    """
    import numpy as np
    import torch

    from .evaluate import load_run_config
    from .io import save_grid, write_npz
    from .modality import images_from_array
    from .pipeline import UnifiedDiffusionPipeline

    spec = _task_spec(task, run_dir)
    generate = spec is None or spec.action == "generate"
    cfg = load_run_config(run_dir)  # the data of the default inputs; older runs' schedule
    if classifier_scale and (spec is None or not generate):
        raise ConfigError("--classifier-scale only applies to a conditional task (e.g. --task class_to_image)")
    if not out.parent.is_dir():
        raise ConfigError(f"--out folder {str(out.parent)!r} does not exist")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = UnifiedDiffusionPipeline.from_run(run_dir, device)  # progress bars on a terminal only
    model = pipe.model
    n_given, n = n, n or pipe.sampling.num_images
    name = model.modality_of_kind(spec.kind) if spec is not None else None
    if spec is not None and name is None:
        kinds = sorted({m.kind for m in model.modalities.values()})
        raise ConfigError(f"--task {task} needs a {spec.kind} modality; run {str(run_dir)!r} has {kinds or 'none'}")
    mod = model.modalities[name] if name is not None else None
    if generate and model.image_head is None:
        raise ConfigError(f"--task {task} generates images; run {str(run_dir)!r} was trained with image_head=false")
    if labels is not None and not (generate and mod is not None and mod.npz_key == "labels"):
        raise ConfigError("--labels only applies to a task conditioned on labels (--task class_to_image)")
    if inputs is not None and spec is None:
        raise ConfigError(f"--inputs does not apply to --task {task}")
    arrays = _read_npz(inputs) if inputs is not None else {}
    sources = {key: f"--inputs {str(inputs)!r} array {key!r}" for key in arrays}  # what errors name
    if labels is not None:
        if "labels" in arrays:
            raise ConfigError(f"--labels and the 'labels' array of --inputs {str(inputs)!r} both give the labels")
        arrays["labels"] = np.asarray([labels[i % len(labels)] for i in range(n)], dtype=np.int64)
        sources["labels"] = "--labels"

    cache: Dict[str, Dict[str, "torch.Tensor"]] = {}

    def rows() -> Dict[str, "torch.Tensor"]:
        """The task's input rows on ``device``: the --inputs images, else the val split (first -n)."""
        if "rows" not in cache:
            if "images" in arrays:
                batch = {"image": images_from_array(arrays["images"], sources["images"], model.image_shape)}
            elif inputs is not None:
                raise DataError(f"--inputs file {str(inputs)!r} has no 'images' array (has {sorted(arrays)})")
            else:
                from .data import build_datasets, iter_batches

                _, val_set, _ = build_datasets(cfg.data)
                parts = list(iter_batches(val_set, 512))
                batch = {k: torch.cat([b[k] for b in parts]) for k in parts[0]}
            cache["rows"] = {k: _to_device(_rows_of(v, 0, n_given), device) for k, v in batch.items()}
        return cache["rows"]

    result = sample_batch(pipe, task, n, n_given, arrays, sources, rows, seed, steps=steps, sampler=sampler,
                          guidance=guidance, classifier_scale=classifier_scale, inputs=inputs)
    write_npz(out, **result.arrays, **adm_layout(result.arrays))
    grid = out.with_suffix(".png")
    save_grid(result.images.cpu(), grid)
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
