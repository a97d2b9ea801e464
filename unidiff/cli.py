"""The ``unidiff`` command line.

    unidiff train CONFIG [key=value ...] [--dry-run]
    unidiff sample RUN_DIR --task TASK -n N --out FILE.npz [--inputs FILE.npz] [--shard-size S] [...]
        TASK: joint, or a task of the run's modality kinds (heads.modality_tasks()): class_to_image,
              image_to_label, representation_to_image, image_to_representation, inpaint,
              transition, target_to_source, ...
    unidiff evaluate RUN_DIR [key=value ...] [--seed K] [--out FILE.json]
    unidiff run CONFIG [key=value ...] [--seeds 0,1,2] [--dry-run]  # train, sample, evaluate
    unidiff experiment CONFIG [key=value ...] [--seeds 0,1,2]  # multi-task vs single-task
    unidiff encoder train CONFIG [key=value ...]  # the multi-tower representation encoder
    unidiff plot RUN_DIR [RUN_DIR ...] [--out DIR]  # curves.png, metrics.png
    unidiff latents CONFIG [key=value ...]        # encode data.* into the VAE latent cache data.latents

Subcommands live in one table, :data:`COMMANDS` (name -> help, argument builder, handler): a new
subcommand is one :func:`command` registration. Anything the user got wrong (a config key, a
missing run folder, a bad argument) prints one line ``unidiff: error: ...`` on stderr and exits
with code 2, without a traceback; run outputs are written only after validation, atomically.
``--help`` of every command describes every argument and shows its default (:class:`HelpFormatter`).
``train`` and ``run`` first run :func:`preflight` (what ``--dry-run`` checks: the run folder,
the built model, one training step; for ``run`` also what evaluation needs), and an ``OSError``
from the file system (a full disk) is one line too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

from .choices import Sampler, UnknownDrift, values
from .errors import ConfigError, DataError, UnidiffError
from .runtime import apply_threads, last_threads

if TYPE_CHECKING:  # heavy imports stay inside the commands: `unidiff --help` is instant
    import numpy as np
    import torch


class UsageError(UnidiffError):
    """A malformed command line."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so errors stay one line."""

    def error(self, message: str):
        raise UsageError(message)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help texts that show each option's default: ``(default: X)`` is appended unless the text
    already says what the default is (e.g. "default: the run's sample.steps"); a flag shows
    ``(default: off)``; positional and required arguments have none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or action.required:
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text  # a positional argument: required, no default
        if action.nargs == 0 and action.default is False:
            return f"{text} (default: off)"
        if action.default in (None, [], ()):
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


def help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help line ``--help`` prints for ``action`` of ``parser`` (defaults filled in)."""
    formatter = parser._get_formatter()
    return formatter._expand_help(action) if action.help else ""


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
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _seed(text: str) -> int:
    from .seeds import check_seed  # the one seed range (run.seed checks the same)

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    try:
        return check_seed(value, "seed")
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err).split(": ", 1)[1]) from None


def _label_list(text: str) -> List[int]:
    try:
        labels = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class indices like 3,1,4, got {text!r}") from None
    if not labels:
        raise argparse.ArgumentTypeError("expected at least one class index")
    return labels


def _json_path(text: str) -> Path:
    path = Path(text)
    if path.suffix != ".json":
        raise argparse.ArgumentTypeError(f"metrics file must end in .json, got {text!r}")
    return path


def _seed_list(text: str) -> List[int]:
    from .seeds import parse_seeds

    try:
        return parse_seeds(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err).split(": ", 1)[-1]) from None


def _npz_path(text: str) -> Path:
    path = Path(text)
    if path.suffix != ".npz":
        raise argparse.ArgumentTypeError(f"output file must end in .npz, got {text!r}")
    return path


def _add_config_args(p: argparse.ArgumentParser, what: str = "YAML run config (configs/*.yaml)",
                     example: str = "train.steps=2000") -> None:
    p.add_argument("config", help=what)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"config overrides, e.g. {example} (default: none; the config as written)")


# --- train -----------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="resolve and validate the config, build the model, print it and its size; write nothing")


def preflight(cfg, evaluation: bool = False):
    """Everything that can reject a run config before training writes a file: the run folder is
    writable, what training builds builds (:func:`unidiff.train.prepare_seeded`: data, resolved
    config, seeded model, schedule), and one no-grad training step on two items runs; with
    ``evaluation`` (``unidiff run``) also what evaluating it needs
    (:func:`unidiff.evaluate.check_evaluation`: the Inception weights). Returns the
    :class:`unidiff.train.Prepared` build, which ``train(cfg, prepared=...)`` trains: the data and
    the model are built once. The check leaves the model as built (its buffers, such as MoE token
    counts, are put back), and the build keeps the RNG state it left, so the numbers of a run are
    those it would have without this check."""
    import torch

    from .config import check_run_folder, check_training_step
    from .train import prepare_seeded

    check_run_folder(cfg)
    if evaluation:
        from .evaluate import check_evaluation

        check_evaluation(cfg)
    prepared = prepare_seeded(cfg)
    model = prepared.model
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    check_training_step(prepared.cfg, model, prepared.train_set)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return prepared


def _dry_run(cfg, evaluation: bool = False) -> None:
    """``train --dry-run`` (``run --dry-run``: ``evaluation``): the :func:`preflight`, then the
    config and the sizes; writes nothing."""
    from .config import to_yaml

    cfg, train_set, val_set, info, model, _ = preflight(cfg, evaluation=evaluation)
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
    out = train(cfg, prepared=preflight(cfg))  # one build of the data and the model
    if int(os.environ.get("RANK", "0")) == 0:  # once under `accelerate launch`
        print(f"run folder: {out}")
    return 0


# --- sample ----------------------------------------------------------------------------------
# The tasks are those of the run's modality kinds (one table, heads.modality_tasks(), DESIGN.md §3):
# a "generate" task produces images conditioned on its modality's value, a "read" task reads its
# modality off given images; "joint" generates everything. Each modality converts its own values
# to and from .npz arrays (Modality.npz_key / to_array / from_array / default_inputs).
SAMPLERS = tuple(values(Sampler))
UNKNOWN_DRIFTS = tuple(values(UnknownDrift))
# The PNG beside a sample file shows at most this many samples (the first ones): a 10x10 grid.
GRID_SAMPLES = 100
# Rows per shard of `unidiff sample` (--shard-size): each is sampled as one batch and written as one
# resumable file (unidiff/shards.py).
SHARD_SIZE = 256


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run folder (RUN_DIR with model/, else its latest checkpoint's EMA weights)")
    p.add_argument("--task", default="joint",
                   help="joint (default), or a task of one of the run's modality kinds, e.g. class_to_image, "
                        "image_to_label, inpaint, transition, target_to_source (README.md 'Sampling tasks'; "
                        "an unknown name lists them)")
    p.add_argument("-n", type=_positive_int, default=None,
                   help="number of samples (default: the run's sample.n, or the rows of --inputs)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="reverse-process solver steps (default: the run's sample.steps)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="reverse-process solver (default: the run's sample.sampler)")
    p.add_argument("--guidance", type=_nonneg_float, default=None,
                   help="drift guidance w of conditional tasks, 1 = none (default: the run's sample.guidance)")
    p.add_argument("--classifier-scale", type=_nonneg_float, default=None,
                   help="conditional tasks: classifier guidance from the conditioning modality's head, 0 = off "
                        "(default: the run's sample.classifier_scale)")
    p.add_argument("--unknown-drift", choices=UNKNOWN_DRIFTS, default=None,
                   help="tasks that generate images: the drift of the modalities not given, their heads' "
                        "predictions or their null encodings E(∅) (DESIGN.md §3.3; default: predicted for joint, "
                        "for a conditional task the run's sample.unknown_drift, else eval.unknown_drift)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed of every random draw (initial noise, sampler noise, random masks), in [0, 2**32)")
    p.add_argument("--labels", type=_label_list, default=None,
                   help="class_to_image: classes to cycle, e.g. 3,1,4 (an inline 'labels' array; "
                        "default: cycle over all classes)")
    p.add_argument("--inputs", type=Path, default=None,
                   help="an .npz of inputs: 'images' (read tasks, and tasks built from images such as inpaint; "
                        "default: the val split) and the conditioning modality's array under its key, e.g. "
                        "'labels', 'representations' (required for representation_to_image), 'masks' (N×H×W, "
                        "1 = visible; default: random), 'sources' (default: the built-in transform of the images). "
                        "'images' are uint8 N×H×W×C; other integer types are converted when within 0..255, "
                        "floats must lie in [-1, 1]")
    p.add_argument("--out", type=_npz_path, required=True,
                   help="output .npz (required); beside it OUT.png (a labelled grid of the first samples), OUT.json "
                        "(seed, precision, shard size) and, until OUT.npz is written, the shards in OUT.shards/")
    p.add_argument("--shard-size", type=_positive_int, default=SHARD_SIZE,
                   help="samples per shard: each shard is one batch and one resumable file in OUT.shards/, seeded "
                        "from --seed and its index, so the samples depend on it (rerun a killed sample with the "
                        "same arguments to resume)")


def _read_npz(path: Path) -> Dict[str, "np.ndarray"]:
    import numpy as np

    if not path.is_file():
        raise DataError(f"--inputs file {str(path)!r} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array, not named arrays
            raise ValueError("a single .npy array, not an .npz archive of named arrays")
        with loaded as f:
            return {k: f[k] for k in f.keys()}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"--inputs file {str(path)!r} cannot be read as .npz ({msg})") from None


def _input_images(array: "np.ndarray", where: str) -> "np.ndarray":
    """The ``images`` array of ``--inputs``, as the model reads it: uint8 as is; other integer
    types converted to uint8 when every value is in 0..255; floats (the [-1, 1] scale) kept when
    finite and inside [-1, 1]. Anything else is a DataError naming the dtype and range, so no
    value is silently clamped."""
    import numpy as np

    if array.dtype == np.uint8:
        return array
    if array.size == 0:
        raise DataError(f"{where} is empty")
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer):
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{where}: {array.dtype} values span {lo}..{hi}; images must be 0..255 (uint8)")
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise DataError(f"{where}: {array.dtype} images hold non-finite values")
        lo, hi = float(array.min()), float(array.max())
        if lo < -1 or hi > 1:
            raise DataError(f"{where}: {array.dtype} values span {lo:g}..{hi:g}; float images must lie in [-1, 1] "
                            "(or store uint8 0..255)")
        return array
    raise DataError(f"{where}: dtype {array.dtype} is not an image type (uint8 0..255, or float in [-1, 1])")


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


def known_values(pipe, task: str, n: int, n_given: Optional[int], arrays: Dict[str, "np.ndarray"],
                 sources: Dict[str, str], rows: Callable[[], Dict[str, "torch.Tensor"]], seed: int, *,
                 inputs: Optional[Path] = None):
    """The conditioning value of every row of a generate task (None for ``joint`` and read tasks):
    ``{modality name: value}`` on the pipeline's device.

    From the ``--inputs``/``--labels`` arrays (read by the modality's ``from_array``, the first
    ``n_given`` rows, or all), else the modality's ``default_inputs`` of ``n`` samples and the task's
    input rows. Anything random in them (random inpainting masks) is drawn once, from a generator
    seeded with ``seed`` itself, so that the conditioning does not depend on the shard size.
    """
    import torch

    task_spec, name = pipe.resolve_task(task)
    if name is None or task_spec.action == "read":
        return None
    mod, device = pipe.model.modalities[name], pipe.device
    g = torch.Generator(device=device).manual_seed(seed)
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
    return {name: _to_device(value, device)}


def sample_batch(pipe, task: str, n: int, known: Optional[Dict[str, "torch.Tensor"]],
                 images: Optional["torch.Tensor"], generator: "torch.Generator", *, steps: Optional[int] = None,
                 sampler: Optional[str] = None, guidance: Optional[float] = None,
                 classifier_scale: Optional[float] = None, unknown_drift: str = "predicted"):
    """One batch (one shard) of a task's outputs by ``pipe`` (a
    :class:`unidiff.pipeline.UnifiedDiffusionPipeline`): its
    :class:`~unidiff.pipeline.UnifiedPipelineOutput` with ``images`` the raw (n, C, H, W) samples in
    [-1, 1] (or the read task's input images) and ``arrays`` the sample-file arrays (``images`` + each
    modality's ``npz_key`` array, see :func:`sample_to_file`).

    ``known``: this batch's rows of :func:`known_values` (None: ``joint``, ``n`` samples);
    ``images``: a read task's input rows. ``generator`` draws the sampler's noise. Settings left None
    take the pipeline's defaults (``sampling.json``: a conditional task's guidance is the evaluation's).
    ``unknown_drift``: what a generated batch's drift holds for the modalities not known (§3.3).
    """
    task_spec, _ = pipe.resolve_task(task)
    if task_spec is not None and task_spec.action == "read":
        return pipe.read(task, images, generator=generator, output_type="latent")
    return pipe.generate(task, known, batch_size=n if known is None else None, num_inference_steps=steps,
                         sampler=sampler, guidance_scale=guidance, classifier_scale=classifier_scale,
                         generator=generator, output_type="latent", unknown_drift=unknown_drift)


def _digest(value) -> Optional[str]:
    """A content hash of a tensor, a dict of tensors or None (what decides a shard's samples)."""
    import hashlib

    import torch

    if value is None:
        return None
    h = hashlib.sha256()
    if isinstance(value, dict):
        for k in sorted(value):
            h.update(f"{k}={_digest(value[k])};".encode())
        return h.hexdigest()
    t = torch.as_tensor(value).detach().cpu().contiguous()
    h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def shard_folder(out: Path) -> Path:
    """Where ``unidiff sample --out OUT.npz`` keeps its shards until ``OUT.npz`` is published."""
    return out.with_suffix(".shards")


def sample_to_file(run_dir, task: str, n: Optional[int], steps: Optional[int], sampler: Optional[str],
                   guidance: Optional[float], seed: int, labels: Optional[List[int]], inputs: Optional[Path],
                   out: Path, classifier_scale: Optional[float] = None,
                   shard_size: int = SHARD_SIZE, unknown_drift: Optional[str] = None) -> Dict[str, Path]:
    """Run one sampling task of a trained run (DESIGN.md §3); write ``out``, a labelled PNG grid and
    a JSON record beside it.

    The run's pipeline (:class:`unidiff.pipeline.UnifiedDiffusionPipeline.from_run`: ``RUN_DIR/model``
    with its schedule and sampler settings, or the run's ``config.yaml`` for older runs) does the
    sampling; ``-n``, ``--steps``, ``--sampler``, ``--guidance``, ``--classifier-scale`` left out take
    its defaults (``sample.n``, ``sample.steps``, ``sample.sampler``; a conditional task's guidance is
    the one its evaluation used, ``eval.guidance``/``eval.classifier_scale``, see unidiff/pipeline.py).
    ``--unknown-drift`` left out is ``predicted`` for ``joint`` and, for a conditional task, the run's
    ``sample.unknown_drift`` when set away from ``predicted``, else ``eval.unknown_drift`` (the
    evaluation's, as for the guidance); it is written to ``OUT.json``.

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

    Shards (:func:`unidiff.shards.generate_sharded`): the rows are sampled ``shard_size`` at a time
    into ``OUT.shards/shard_XXXXX.npz`` (atomic files), shard ``i`` from the seed
    ``seed_for(seed, i)``; the conditioning values of all rows are fixed first (:func:`known_values`).
    ``OUT.npz`` is then written atomically and the shard folder removed. A killed run rerun with the
    same arguments keeps its finished shards; shards of other settings (the model's weights, the
    task, the solver, the conditioning, ``-n``, the seed, the shard size, the precision) are
    generated anew, with one warning line. The samples are a function of the seed *and* the shard
    size (each shard draws its own noise): the first ``k · shard_size`` rows of a longer run are
    those of a shorter one with the same seed and shard size and at least ``k · shard_size`` rows.

    Precision: the run's ``train.mixed_precision`` resolved on this machine
    (:func:`unidiff.launch.resolve_precision`: ``auto`` is bf16 on bf16-capable CUDA devices and on
    CPUs with AMX, fp32 elsewhere); the sampling runs under :func:`unidiff.launch.autocast`
    of that choice, the VAE decode of latent runs outside it. The choice and its reason are
    returned, printed and written to ``OUT.json``.
    """
    import shutil
    import warnings

    import numpy as np
    import torch

    from .config import check_writable
    from .evaluate import load_run_config
    from .io import save_labelled_grid, write_json, write_npz
    from .latents import decode_samples
    from .launch import autocast, resolve_precision
    from .metrics import module_fingerprint
    from .modality import images_from_array, images_to_uint8
    from .diffusion.sampling import DEFAULT_CONVERSION, Conversion
    from .pipeline import UnifiedDiffusionPipeline
    from .provenance import provenance
    from .shards import generate_sharded

    spec = _task_spec(task, run_dir)
    generate = spec is None or spec.action == "generate"
    cfg = load_run_config(run_dir)  # the data of the default inputs; older runs' schedule
    if classifier_scale and (spec is None or not generate):
        raise ConfigError("--classifier-scale only applies to a conditional task (e.g. --task class_to_image)")
    if unknown_drift is not None and not generate:
        raise ConfigError(f"--unknown-drift only applies to a task that generates images, not --task {task}")
    if unknown_drift is not None and unknown_drift not in UNKNOWN_DRIFTS:
        raise ConfigError(f"--unknown-drift must be one of {list(UNKNOWN_DRIFTS)}, got {unknown_drift!r}")
    if not generate:
        drift = None  # a read task: image_to_aux puts E(∅) in the drift of the rest (§3.6)
    elif unknown_drift is not None:
        drift = unknown_drift
    elif spec is None:
        drift = UnknownDrift.predicted.value  # joint: every drift from its head
    else:  # a conditional task samples as its evaluation did, unless sample.* asks otherwise
        chosen = cfg.sample.unknown_drift
        drift = (chosen if chosen is not UnknownDrift.predicted else cfg.eval.unknown_drift).value
    T = cfg.diffusion.num_train_timesteps
    if steps is not None and not 1 <= steps <= T:
        raise ConfigError(f"--steps {steps} exceeds the run's diffusion.num_train_timesteps={T}")
    if not out.parent.is_dir():
        raise ConfigError(f"--out folder {str(out.parent)!r} does not exist")
    grid_path, record_path, shards_dir = out.with_suffix(".png"), out.with_suffix(".json"), shard_folder(out)
    for path in (out, grid_path, record_path):
        if path.is_dir():
            raise ConfigError(f"--out: {str(path)!r} is a folder, not a file")
    if shards_dir.exists() and not shards_dir.is_dir():
        raise ConfigError(f"--out: {str(shards_dir)!r} (the shard folder) is a file, not a folder")
    check_writable(out.parent, "--out")
    from accelerate import Accelerator

    # Under `accelerate launch`/torchrun every process samples its share of the shards; one process
    # alone samples them all. The main process assembles and writes the files.
    from .launch import launch_settings

    acc = Accelerator(cpu=launch_settings().cpu)  # cpu: several CPU processes join one gloo group
    device = acc.device
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
    if "images" in arrays:
        arrays["images"] = _input_images(arrays["images"], sources["images"])
    if labels is not None:
        if "labels" in arrays:
            raise ConfigError(f"--labels and the 'labels' array of --inputs {str(inputs)!r} both give the labels")
        arrays["labels"] = np.asarray([labels[i % len(labels)] for i in range(n)], dtype=np.int64)
        sources["labels"] = "--labels"

    cache: Dict[str, object] = {}

    def rows() -> Dict[str, "torch.Tensor"]:
        """The task's input rows on ``device``: the --inputs images, else the val split (first -n)."""
        if "rows" not in cache:
            if "images" in arrays:
                batch = {"image": images_from_array(arrays["images"], sources["images"], model.image_shape)}
            elif inputs is not None:
                raise DataError(f"--inputs file {str(inputs)!r} has no 'images' array (has {sorted(arrays)})")
            else:
                from .data import build_datasets, iter_batches

                _, val_set, cache["info"] = build_datasets(cfg.data)
                parts = list(iter_batches(val_set, 512))
                batch = {k: torch.cat([b[k] for b in parts]) for k in parts[0]}
            cache["rows"] = {k: _to_device(_rows_of(v, 0, n_given), device) for k, v in batch.items()}
        return cache["rows"]

    # --- what every row is conditioned on (or reads), fixed before the first shard -------------------
    read = not generate
    known = known_values(pipe, task, n, n_given, arrays, sources, rows, seed, inputs=inputs)
    images = rows()["image"] if read else None
    total = _n_rows(images if read else known) if (read or known is not None) else n
    precision, reason = resolve_precision(cfg.train.mixed_precision, device.type)
    settings = {"model": module_fingerprint(model), "scheduler": json.loads(pipe.scheduler.to_json_string()),
                "sampling": dict(pipe.config.sampling), "task": task, "steps": steps, "sampler": sampler,
                "guidance": guidance, "classifier_scale": classifier_scale, "known": _digest(known),
                "images": _digest(images), "precision": precision, "vae": cfg.model.vae.path}
    if generate and (known is not None or drift == UnknownDrift.null_encoding.value):
        # The ε/v reading decides the samples where the chain's drift is not the heads' own (§3.3).
        settings["convert_with"] = DEFAULT_CONVERSION.get(model.prediction, Conversion.known).value
    if drift == UnknownDrift.null_encoding.value:  # predicted keeps the shard folders it always had
        settings["unknown_drift"] = drift

    def one_shard(shard):
        g = torch.Generator(device=device).manual_seed(shard.seed)
        stop = shard.start + shard.count
        with autocast(precision, device.type):
            result = sample_batch(pipe, task, shard.count, _rows_of(known, shard.start, stop) if known else None,
                                  images[shard.start:stop] if read else None, g, steps=steps, sampler=sampler,
                                  guidance=guidance, classifier_scale=classifier_scale,
                                  unknown_drift=drift or UnknownDrift.predicted.value)
        if cfg.model.vae.path:  # latent runs: VAE decode to pixels (unidiff.latents)
            result.arrays["images"] = images_to_uint8(decode_samples(result.images.float(), cfg))
        return result.arrays

    C, H, W = (int(s) for s in model.image_shape)
    spec_arrays = None if cfg.model.vae.path else {"images": ("uint8", (H, W, C))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        arrays_out = generate_sharded(one_shard, total, shard_size, seed, shards_dir, settings=settings,
                                      spec=spec_arrays, accelerator=acc)
    for w in caught:  # a shard of other settings or a bad shard: one line each
        print(f"unidiff: warning: {' '.join(str(w.message).split())}", file=sys.stderr)
    paths = {"npz": out, "grid": grid_path, "record": record_path, "precision": f"{precision} ({reason})",
             "main": acc.is_main_process}
    if not acc.is_main_process:
        return paths
    write_npz(out, **arrays_out, **adm_layout(arrays_out))

    # --- the grid: the first GRID_SAMPLES samples, each captioned with its label ----------------------
    shown = arrays_out["images"][:GRID_SAMPLES]
    captions = arrays_out["labels"][:GRID_SAMPLES].tolist() if "labels" in arrays_out else None
    pixels = images_from_array(shown, "samples", (shown.shape[-1], *shown.shape[1:3]))
    save_labelled_grid(pixels, captions, grid_path, class_names=_class_names(cfg, cache) if captions else None)
    write_json(record_path, provenance(seed, command=sys.argv, task=task, n=total, shard_size=shard_size,
                                       unknown_drift=drift, run_dir=str(run_dir),
                                       precision={"mixed_precision": precision, "reason": reason},
                                       device=str(device), processes=acc.num_processes))
    shutil.rmtree(shards_dir, ignore_errors=True)  # only once the sample file is published
    return paths


def _class_names(cfg, cache: Dict[str, object]) -> Optional[List[str]]:
    """The data's class names for grid captions (None, i.e. class indices, when the data cannot be
    built here: a run folder copied without its data still samples)."""
    info = cache.get("info")
    if info is None:
        from .data import build_datasets

        try:
            _, _, info = build_datasets(cfg.data)
        except (UnidiffError, OSError):
            return None
    names = list(getattr(info, "class_names", []) or [])
    return names or None


@command("sample", "sample from a trained run into an .npz (+ labelled PNG grid, JSON record)", _sample_args)
def _sample(args) -> int:
    paths = sample_to_file(args.run_dir, args.task, args.n, args.steps, args.sampler, args.guidance, args.seed,
                           args.labels, args.inputs, args.out, args.classifier_scale, shard_size=args.shard_size,
                           unknown_drift=args.unknown_drift)
    if paths["main"]:
        print(f"samples: {paths['npz']}\ngrid: {paths['grid']}\nprecision: {paths['precision']}\n{last_threads()}")
    return 0


# --- evaluate --------------------------------------------------------------------------------
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run folder (model/, else its latest checkpoint's EMA weights)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the run's config, e.g. eval.n_samples=200 (default: none)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of every random draw of the evaluation (samples, timesteps, noise)")
    p.add_argument("--out", type=_json_path, default=None, metavar="FILE.json",
                   help="metrics file to write (default: RUN_DIR/metrics.json); an existing file there "
                        "is kept as metrics.<timestamp>.json, never overwritten")


def _print_metrics(metrics: Dict) -> None:
    for k, v in metrics.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")


@command("evaluate", "compute a run's metrics into RUN_DIR/metrics.json (with their provenance)", _evaluate_args)
def _evaluate(args) -> int:
    from .evaluate import evaluate

    if args.out is not None and args.out.is_dir():
        raise ConfigError(f"--out {str(args.out)!r} is a folder; give a file name ending in .json")
    target = args.out if args.out is not None else Path(args.run_dir) / "metrics.json"
    metrics = evaluate(args.run_dir, args.overrides, seed=args.seed, out_path=target)
    _print_metrics(metrics)
    print(f"metrics: {target}\n{last_threads()}")
    return 0


# --- run -------------------------------------------------------------------------------------
_SEEDS_HELP = ("comma-separated seeds, e.g. 0,1,2: one {what} per seed named <name>_s<seed> with run.seed=<seed> "
               "(evaluated with that seed), then <name>_seeds/summary.json and summary.md with mean ± std "
               "per metric; overrides run.seed (default: none, one {what} with the config's run.seed)")


def _run_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--seeds", type=_seed_list, default=None, metavar="0,1,2", help=_SEEDS_HELP.format(what="run"))
    p.add_argument("--dry-run", action="store_true",
                   help="what train --dry-run checks, plus what evaluation needs (the Inception weights when "
                        "eval.features=inception), on the first seed, and every seed's run folder; print the first "
                        "seed's config and sizes; write nothing")


def _run_one(cfg, eval_seed: int):
    """Train, sample (joint) and evaluate one run: ``(run folder, metrics)``."""
    from .evaluate import evaluate
    from .train import train

    out = train(cfg, prepared=preflight(cfg, evaluation=True))
    paths = None
    if cfg.image_head:
        paths = sample_to_file(out, "joint", None, None, None, None, cfg.run.seed, None, None, out / "samples" / "final.npz")
    metrics = evaluate(out, seed=eval_seed)
    _print_metrics(metrics)
    if paths is not None:
        print(f"grid: {paths['grid']}")
    print(f"metrics: {out / 'metrics.json'}")
    return out, metrics


@command("run", "train, sample (joint) and evaluate in one go; --seeds: several seeds, mean ± std", _run_args)
def _run(args) -> int:
    from .config import load_config, run_dir
    from .provenance import provenance
    from .seeds import seed_dir, seed_name, write_summary

    cfg = load_config(args.config, args.overrides)
    if args.seeds is None:
        if args.dry_run:
            _dry_run(cfg, evaluation=True)
        else:
            _run_one(cfg, eval_seed=0)  # as always: the evaluation draws of seed 0
        return 0
    base_name, base_dir = cfg.run.name, cfg.run.dir
    configs = {}
    for seed in args.seeds:  # every seed's config validated before the first one trains
        extra = [f"run.seed={seed}", f"run.name={seed_name(base_name, seed)}"]
        if base_dir:
            extra.append(f"run.dir={seed_dir(base_dir, seed)}")
        configs[seed] = load_config(args.config, [*args.overrides, *extra])
    if args.dry_run:  # the seeds differ in run.seed and their folders: one build, every folder checked
        from .config import check_run_folder

        for seed_cfg in list(configs.values())[1:]:
            check_run_folder(seed_cfg)
        _dry_run(configs[args.seeds[0]], evaluation=True)
        return 0
    runs, per_seed = {}, {}
    for seed, seed_cfg in configs.items():
        print(f"--- seed {seed}")
        runs[seed], per_seed[seed] = _run_one(seed_cfg, eval_seed=seed)
    folder = Path(f"{base_dir.rstrip('/')}_seeds") if base_dir else run_dir(cfg).with_name(f"{base_name}_seeds")
    paths = write_summary(folder, f"{base_name}: {len(args.seeds)} seeds", args.seeds, runs, per_seed,
                          config=str(args.config), provenance=provenance(overrides=args.overrides))
    print(paths["md"].read_text(), end="")
    print(f"summary: {paths['json']}")
    return 0


# --- experiment ------------------------------------------------------------------------------
def _experiment_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, "YAML experiment file (configs/experiments/*.yaml)", "train.steps=100 experiment.n_cond=50")
    p.add_argument("--seeds", type=_seed_list, default=None, metavar="0,1,2",
                   help=_SEEDS_HELP.format(what="experiment").replace("<name>", "<experiment.name>"))
    p.epilog = ("overrides: run-config keys (train.steps=100) go to every arm; experiment.* keys "
                "(experiment.n_cond=50) change the experiment itself")


@command("experiment", "train and compare the arms of a DESIGN.md §4 experiment (rerun to resume)", _experiment_args)
def _experiment(args) -> int:
    from experiments import load_experiment, run_experiment  # the experiments package; the core never imports it

    from .provenance import provenance
    from .seeds import seed_dir, seed_name, write_summary

    if args.seeds is None:
        out = run_experiment(args.config, args.overrides)
        print((out / "results.md").read_text(), end="")
        print(f"results: {out}")
        return 0
    base = load_experiment(args.config, args.overrides)  # validates; writes nothing
    name, out_dir = base.spec.name, base.spec.out_dir
    per_seed_overrides = {}
    for seed in args.seeds:
        extra = [f"run.seed={seed}", f"experiment.name={seed_name(name, seed)}"]
        if out_dir:
            extra.append(f"experiment.out_dir={seed_dir(out_dir, seed)}")
        per_seed_overrides[seed] = [*args.overrides, *extra]
        load_experiment(args.config, per_seed_overrides[seed])  # every seed valid before the first trains
    runs, per_seed = {}, {}
    for seed, overrides in per_seed_overrides.items():
        print(f"--- seed {seed}")
        out = run_experiment(args.config, overrides)
        results = json.loads((out / "results.json").read_text())
        runs[seed] = str(out)
        per_seed[seed] = {f"{arm}/{k}": v for arm, r in results["arms"].items() for k, v in r["metrics"].items()}
        print((out / "results.md").read_text(), end="")
    folder = Path(f"{out_dir.rstrip('/')}_seeds") if out_dir else base.out_dir.with_name(f"{name}_seeds")
    paths = write_summary(folder, f"{name}: {len(args.seeds)} seeds (metric keys are arm/metric)", args.seeds,
                          runs, per_seed, arms=list(base.arms), config=str(args.config),
                          provenance=provenance(overrides=args.overrides))
    print(paths["md"].read_text(), end="")
    print(f"summary: {paths['json']}")
    return 0


# --- encoder ---------------------------------------------------------------------------------
def _encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("train",), help="train: fit the multi-tower encoder (cached in encoder.out_dir)")
    _add_config_args(p, "YAML encoder config with data and encoder sections (configs/encoders/*.yaml)", "encoder.steps=500")


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


# --- plot ------------------------------------------------------------------------------------
def _plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="one or more trained run folders (with log.jsonl)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="folder for curves.png and metrics.png (default: RUN_DIR for one run, runs/plots for several)")


@command("plot", "draw training curves (loss per head, lr, images/s, MoE balance) and metrics of runs as PNG", _plot_args)
def _plot(args) -> int:
    from .plots import plot_runs

    out = args.out if args.out is not None else (Path(args.run_dirs[0]) if len(args.run_dirs) == 1 else Path("runs") / "plots")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a folder")
    for name, path in plot_runs(args.run_dirs, out).items():
        print(f"{name}: {path}")


# --- latents ---------------------------------------------------------------------------------
def _latents_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, "YAML run config with model.vae.path and data.latents (e.g. configs/imagenet256_latent_*.yaml)")
    p.add_argument("--shard-size", type=_positive_int, default=10_000, help="items per shard (default 10000)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per VAE encode call (default 64)")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="storage dtype (default fp16)")
    p.add_argument("--posterior", choices=("mean", "sample"), default="mean",
                   help="cache the posterior mean (default) or one seeded draw from it")
    p.add_argument("--device", default=None, help="encode on this device (default cuda when available)")
    p.epilog = ("rerun the same command to resume: shards whose checksum verifies are kept; with data.hflip=true "
                "the train shards also hold the latents of the mirrored images")


@command("latents", "encode a config's data once into its VAE latent cache (data.latents; rerun to resume)", _latents_args)
def _latents(args) -> int:
    from .config import load_config
    from .latents import build_latent_cache

    cfg = load_config(args.config, args.overrides)
    folder = build_latent_cache(cfg, shard_size=args.shard_size, batch_size=args.batch_size, dtype=args.dtype,
                                posterior=args.posterior, device=args.device)
    print(f"latent cache: {folder}")
    return 0


# --- entry point -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="unidiff", description="Unified multi-modal diffusion (see README.md).",
                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser,
                                help="one of the commands below; `unidiff COMMAND --help` describes its arguments")
    sub.required = True
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, formatter_class=HelpFormatter)
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
        # Before any torch work: PyTorch's default (every core) was measured 8-12x slower than one
        # thread on a busy 2-core machine. train() re-applies run.threads when a config sets it and
        # prints the choice in its header; sample/evaluate print it with their results (stdout:
        # stderr stays the one-line error channel).
        apply_threads(None)
        return int(args._run(args) or 0)
    except UnidiffError as err:
        msg = " ".join(str(err).split("\n")).strip()
        print(f"unidiff: error: {msg}", file=sys.stderr)
        return 2
    except OSError as err:  # the file system said no (full disk, read-only, permissions): one line too
        if err.errno is None:
            raise
        where = f": {err.filename!r}" if err.filename else ""
        print(f"unidiff: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unidiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
