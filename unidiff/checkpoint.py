"""Checkpoints (STYLE.md habit 10; EDM2's two kinds): full training states and the inference model.

Layout of a run folder::

    RUN_DIR/config.yaml               the config of the first invocation; later ones append a comment line
    RUN_DIR/checkpoints/step_000500/  one training state (below)
    RUN_DIR/model/                    the final EMA model, ``save_pretrained`` + scheduler_config.json and
                                      sampling.json (unidiff/pipeline.py) + MANIFEST.json (what sample/evaluate load)

A training state folder holds what accelerate's ``save_state`` writes for the prepared objective
and optimiser (``model.safetensors``: the ``UnifiedModel`` weights under ``model.`` keys, older
unprefixed ones load too; ``optimizer.bin``; ``random_states_<rank>.pkl``; ``scaler.pt`` under
fp16), and our own objects as tensors and plain values, never pickles: ``ema.safetensors`` (the EMA
shadow, by parameter name) and ``train_state.json`` (EMA counters, LR schedule, the loop's
counters). ``model_config.json`` rebuilds the network; ``MANIFEST.json`` (relative path, size,
sha256 of every file) is written after all of them and the ``DONE`` marker last.

Publishing is atomic (:func:`unidiff.io.atomic_dir`): everything goes into ``step_XXXXXX.tmp``,
every file is ``fsync``ed, then the folder is renamed, so a crash (kill -9) mid-save never leaves a
folder that looks complete. Resume is "run the same command again": :func:`scan` walks the
complete folders newest first and returns the first whose manifest verifies; newer ones that fail
(bit rot, a truncated or deleted file) are reported in one line each and left on disk.

Untrusted folders: nothing here unpickles with ``weights_only=False``. accelerate loads its
``optimizer.bin`` / ``random_states_*.pkl`` / ``scaler.pt`` with ``weights_only=True``; any other
pickle-like file (``custom_checkpoint_*.pkl`` of older unidiff versions included) makes the
checkpoint refused with a one-line :class:`CheckpointError` before anything is loaded.

Cost: verification hashes every file (sha256, ~1 GB/s per core): nothing for our model sizes; for
multi-GB states :func:`complete_checkpoints` (pruning) checks sizes only, and the checksums are
read only on resume and on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError
from .io import atomic_dir, write_json, write_text

DONE = "DONE"
MANIFEST = "MANIFEST.json"
EMA_FILE = "ema.safetensors"
STATE_FILE = "train_state.json"
_STEP_RE = re.compile(r"^step_(\d{6,})$")
# Pickle files accelerate's save_state writes and load_state reads back with weights_only=True
# (the FSDP engineer adds the FSDP names here if they are pickles too).
_ALLOWED_PICKLES = re.compile(r"^(optimizer(_\d+)?\.bin|random_states_\d+\.pkl|scaler\.pt)$")
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt", ".npy")
_LOADERS = (OSError, RuntimeError, KeyError, ValueError, TypeError, pickle.UnpicklingError, SafetensorError)


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(path: str | os.PathLike) -> int:
    """The training step a complete checkpoint folder holds (from its name)."""
    m = _STEP_RE.match(Path(path).name)
    if m is None:
        raise CheckpointError(f"{str(path)!r} is not a checkpoint folder (step_XXXXXX)")
    return int(m.group(1))


# --- manifests ------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """``folder/MANIFEST.json``: relative path, size and sha256 of every file below ``folder``
    except the manifest and the ``DONE`` marker. Written after every other file."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in (MANIFEST, DONE):
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return write_json(folder / MANIFEST, {"format": 1, "files": files})


def verify_folder(folder: str | os.PathLike, checksums: bool = True) -> Optional[str]:
    """What is wrong with ``folder`` against its manifest (``"model.safetensors: checksum
    mismatch"``), or None when every listed file is there with its size (and, with ``checksums``,
    its sha256). Files not in the manifest are not looked at here (see :func:`refuse_pickles`)."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    try:
        for rel, entry in files.items():
            path = folder / rel
            if not path.is_file():
                return f"{rel}: missing"
            size = path.stat().st_size
            if size != entry["size"]:
                return f"{rel}: {size} bytes, the manifest says {entry['size']}"
        if checksums:
            for rel, entry in files.items():
                if _sha256(folder / rel) != entry["sha256"]:
                    return f"{rel}: checksum mismatch"
    except (OSError, KeyError, TypeError) as err:
        return f"{MANIFEST} or its files unreadable ({err})"
    return None


def fingerprint(folder: str | os.PathLike) -> Optional[str]:
    """sha256 of ``folder``'s manifest: names the exact files (weights, config) it lists, so two
    folders with the same fingerprint hold the same model. None without a manifest."""
    path = Path(folder) / MANIFEST
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def refuse_pickles(folder: str | os.PathLike) -> None:
    """CheckpointError (one line) when ``folder`` holds a pickle-like file that is not one of the
    files accelerate reads back with ``weights_only=True``: such a file could run code on load."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        name = path.name
        if not path.is_file():
            continue
        if name.startswith("custom_checkpoint_"):
            raise CheckpointError(f"checkpoint {str(folder)!r} holds {name}, a pickle written by an older unidiff, "
                                  "which is never loaded; start a new run (run.name or run.dir)")
        if name.lower().endswith(_PICKLE_SUFFIXES) and not (path.parent == folder and _ALLOWED_PICKLES.match(name)):
            raise CheckpointError(f"checkpoint {str(folder)!r} holds an unexpected pickle-like file {name!r}; "
                                  "refusing to load it (remove the file if you trust it, or start a new run)")


# --- finding checkpoints --------------------------------------------------------------------------
def _marked(root: Path) -> List[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name) and (p / DONE).is_file()]
    return sorted(found, key=step_of)


def complete_checkpoints(ckpt_root: str | os.PathLike) -> List[Path]:
    """Complete checkpoint folders under ``ckpt_root``, oldest first: the ``DONE`` marker and a
    manifest whose files are all there with their sizes (``.tmp``, unmarked and damaged skipped).
    Sizes only (cheap): :func:`scan` also checks the checksums."""
    return [p for p in _marked(Path(ckpt_root)) if verify_folder(p, checksums=False) is None]


def scan(ckpt_root: str | os.PathLike) -> Tuple[Optional[Path], List[Tuple[Path, str]]]:
    """``(newest fully verified checkpoint or None, [(newer damaged folder, why), ...])``.

    Walks the ``DONE``-marked folders newest first and stops at the first whose manifest verifies
    with checksums; a folder with an unexpected pickle raises (:func:`refuse_pickles`)."""
    damaged = []
    for path in reversed(_marked(Path(ckpt_root))):
        refuse_pickles(path)
        problem = verify_folder(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def _warn(msg: str) -> None:
    print(f"unidiff: warning: {msg}", file=sys.stderr)


def latest(ckpt_root: str | os.PathLike, report: Callable[[str], None] = _warn) -> Optional[Path]:
    """The newest complete, verified checkpoint folder, or None; each newer damaged one is
    reported through ``report`` in one line and skipped (never deleted)."""
    good, damaged = scan(ckpt_root)
    for path, why in damaged:
        report(f"checkpoint {path.name} is damaged ({why}); skipped")
    return good


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint folder to ``step_XXXXXX.damaged`` (``.damaged-2``, ...) so that
    neither pruning nor a new save at its step removes it; returns the new path."""
    target, n = path.with_name(path.name + ".damaged"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{n}")
    os.replace(path, target)
    return target


# --- the loop's own state -------------------------------------------------------------------------
class TrainState:
    """The loop's own counters (saved in ``train_state.json``): ``step`` (optimiser steps taken,
    skipped ones included), ``bad_steps`` (skipped for a non-finite loss or gradient, in all),
    ``bad_in_a_row`` (the current streak, checked against ``train.max_bad_steps``) and ``spent``
    (seconds of ``train.budget_clock`` the loop has run, over every invocation: a time budget's
    progress)."""

    def __init__(self, step: int = 0, bad_steps: int = 0, bad_in_a_row: int = 0, spent: float = 0.0):
        self.step, self.bad_steps, self.bad_in_a_row = int(step), int(bad_steps), int(bad_in_a_row)
        self.spent = float(spent)

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "bad_steps": self.bad_steps, "bad_in_a_row": self.bad_in_a_row, "spent": self.spent}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.bad_steps = int(state.get("bad_steps", 0))
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))
        self.spent = float(state.get("spent", 0.0))  # checkpoints from before time budgets: 0


class CheckpointWriteError(CheckpointError, RuntimeError):
    """A checkpoint could not be written (a full disk): one line for the CLI, and still the
    ``RuntimeError`` torch raised for it."""


def _write_objects(folder: Path, ema, param_names: Optional[Sequence[str]], lr_scheduler, state) -> None:
    """``ema.safetensors`` + ``train_state.json`` for whichever of the objects are given."""
    plain: Dict[str, Any] = {}
    if ema is not None:
        sd = ema.state_dict()
        shadow = sd.pop("shadow_params")
        if param_names is None or len(param_names) != len(shadow):
            raise ValueError("save_checkpoint: param_names must name every EMA shadow tensor")
        save_file({n: s.detach().contiguous().cpu() for n, s in zip(param_names, shadow)}, str(folder / EMA_FILE))
        plain["ema"] = sd
    if lr_scheduler is not None:
        plain["lr_scheduler"] = lr_scheduler.state_dict()
    if state is not None:
        plain["train"] = state.state_dict()
    if plain:
        write_text(folder / STATE_FILE, json.dumps(plain, indent=1, allow_nan=False) + "\n")


def _read_objects(folder: Path, ema, param_names: Optional[Sequence[str]], lr_scheduler, state) -> None:
    needed = ema is not None or lr_scheduler is not None or state is not None
    if not needed:
        return
    plain = json.loads((folder / STATE_FILE).read_text())
    if ema is not None:
        tensors = load_file(str(folder / EMA_FILE))
        if set(tensors) != set(param_names):
            raise KeyError(f"{EMA_FILE} names other parameters than the model's")
        ema.load_state_dict({**plain["ema"], "shadow_params": [tensors[n] for n in param_names]})
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(plain["lr_scheduler"])
    if state is not None:
        state.load_state_dict(plain["train"])


# --- save / load ----------------------------------------------------------------------------------
def save_checkpoint(accelerator, ckpt_root: str | os.PathLike, step: int, keep_last: int,
                    model_config: Optional[Dict[str, Any]] = None, *, ema=None,
                    param_names: Optional[Sequence[str]] = None, lr_scheduler=None, state=None) -> Path:
    """Write the full training state for ``step`` atomically; keep the newest ``keep_last``.

    Call on every process (accelerate gathers what it needs); only the main process writes our own
    objects (``ema`` with the ``param_names`` of its shadow tensors, ``lr_scheduler``, ``state``),
    the manifest and the marker, publishes and prunes. ``model_config`` (the model's ``config``
    dict) lets :func:`load_model` rebuild the network from the checkpoint alone. Pruning deletes
    only older checkpoints that pass the size check: damaged ones stay, the new one always stays.
    The caller checks that the weights are finite first (the loop never writes non-finite ones).
    """
    root = Path(ckpt_root)
    final = root / step_dir_name(step)
    main = accelerator.is_main_process
    # The main process owns the temporary folder (atomic_dir: a leftover .tmp of a crash at this
    # very step is removed; on leaving, every file is fsynced, then tmp is renamed to final and the
    # parent fsynced); the others write their part into the same path.
    publish = atomic_dir(final) if main else contextlib.nullcontext(final.with_name(final.name + ".tmp"))
    try:
        with publish as tmp:
            accelerator.wait_for_everyone()
            accelerator.save_state(output_dir=str(tmp))
            accelerator.wait_for_everyone()
            if main:
                if model_config is not None:
                    write_text(tmp / "model_config.json", json.dumps(model_config, indent=1, default=_jsonable))
                _write_objects(tmp, ema, param_names, lr_scheduler, state)
                write_manifest(tmp)
                write_text(tmp / DONE, f"{step}\n")
    except (OSError, RuntimeError) as err:  # a full disk: OSError, or torch's "inline_container.cc" RuntimeError
        # atomic_dir has removed the main process's temporary folder: nothing half-written stays
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointWriteError(f"cannot write checkpoint {str(final)!r}: {first}") from None
    if main:
        others = [p for p in complete_checkpoints(root) if p != final]
        for old in others[:max(len(others) - (keep_last - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if hasattr(obj, "value"):  # Enum
        return obj.value
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def load_checkpoint(accelerator, path: str | os.PathLike, *, ema=None, param_names: Optional[Sequence[str]] = None,
                    lr_scheduler=None, state=None) -> None:
    """Restore model, optimiser, RNG and the given objects from a complete checkpoint.

    Refuses (one-line CheckpointError) a folder without the marker, with a pickle-like file
    accelerate would not read with ``weights_only=True``, or whose manifest does not verify."""
    from accelerate.utils import load as weights_only_load  # torch.load(weights_only=True) + numpy arrays

    path = Path(path)
    if not (path / DONE).is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete (no {DONE} marker)")
    refuse_pickles(path)
    problem = verify_folder(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged ({problem})")
    try:
        # accelerate swallows any error of its RNG file ("Could not load random states"): read it
        # here first so that a crafted one is refused, not silently skipped.
        for rng in sorted(path.glob("random_states_*.pkl")):
            weights_only_load(rng)
        accelerator.load_state(str(path))
        _read_objects(path, ema, param_names, lr_scheduler, state)
    except _LOADERS as err:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be loaded: {str(err).strip().splitlines()[0]}") from None


def export_model(model: nn.Module, path: str | os.PathLike, run_config: Optional[Any] = None) -> Path:
    """``save_pretrained`` into ``path`` atomically (``path.tmp`` then rename); replaces ``path``;
    a ``MANIFEST.json`` of everything written goes in last.

    ``run_config`` (the run's resolved config): also write what sampling needs besides the weights,
    ``scheduler_config.json`` (betas, prediction, default solver) and ``sampling.json`` (γ, the
    default sampler settings), so the folder samples on its own (:mod:`unidiff.pipeline`).
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(str(tmp))
        if run_config is not None:
            from .pipeline import write_sampling_files  # diffusers' pipeline machinery: only when exporting

            write_sampling_files(tmp, run_config, model)
        write_manifest(tmp)  # last: it lists everything above
    return path


def ema_model_from(model: nn.Module, ema) -> nn.Module:
    """A copy of ``model`` (the unwrapped ``UnifiedModel`` the EMA was built on, not the objective
    around it) carrying the EMA weights; buffers (MoE router biases, which are a control state and
    not averaged) are the live model's."""
    import copy

    out = copy.deepcopy(model)
    ema.copy_to(out.parameters())
    return out.eval().requires_grad_(False)


def load_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The inference model of a run: ``RUN_DIR/model`` (final EMA export, verified against its
    manifest), else the EMA weights of the latest verified checkpoint. CheckpointError when neither
    exists or the export is damaged. An export without a manifest (older unidiff) loads with a warning."""
    from .diffusion.objective import model_state_dict
    from .model import UnifiedModel

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {str(run_dir)!r} does not exist")
    exported = run_dir / "model"
    if (exported / "config.json").is_file():
        problem = verify_folder(exported)
        if problem == f"no {MANIFEST}":
            _warn(f"model {str(exported)!r} has no {MANIFEST} (exported by an older unidiff): not verified")
        elif problem is not None:
            raise CheckpointError(f"model {str(exported)!r} is damaged ({problem}); rerun `unidiff train` "
                                  "with the run's config to export it again from the last checkpoint")
        try:  # safetensors only: never torch.load a .bin that someone put there
            model = UnifiedModel.from_pretrained(str(exported), use_safetensors=True)
        except (OSError, ValueError, RuntimeError, SafetensorError) as err:
            raise CheckpointError(f"model {str(exported)!r} cannot be loaded: {str(err).splitlines()[0]}") from None
        return model.to(device).eval().requires_grad_(False)
    ckpt = latest(run_dir / "checkpoints")
    if ckpt is None or not (ckpt / "model_config.json").is_file():
        raise CheckpointError(f"run folder {str(run_dir)!r} has neither a model/ export nor a complete checkpoint")
    try:
        model = UnifiedModel.from_config(json.loads((ckpt / "model_config.json").read_text()))
        model.load_state_dict(model_state_dict(load_file(str(ckpt / "model.safetensors"))))  # live weights + buffers
        shadow = load_file(str(ckpt / EMA_FILE))
        names = [n for n, _ in model.named_parameters()]
        if set(shadow) != set(names):
            raise KeyError(f"{EMA_FILE} names other parameters than the model's")
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(shadow[n])
    except _LOADERS as err:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} cannot be loaded: {str(err).splitlines()[0]}") from None
    return model.to(device).eval().requires_grad_(False)


def init_from(model: nn.Module, source: str | os.PathLike) -> Dict[str, Any]:
    """Fine-tuning's start (``train.init_from``): copy into ``model`` the weights and buffers of the
    run at ``source`` (its model export, else its latest checkpoint's EMA: :func:`load_model`) whose
    name and shape match. The backbone must match whole (the same ``model`` section); a head the
    source lacks (or has in another shape) keeps its fresh initialisation.

    Returns ``{"source", "copied", "fresh", "dropped"}``: how many tensors were copied, the names
    left fresh and the source's names not used (e.g. its image head). CheckpointError when the
    source does not load or its backbone differs.
    """
    src = load_model(source, "cpu").state_dict()
    dst = model.state_dict()
    same = [k for k, v in src.items() if k in dst and tuple(dst[k].shape) == tuple(v.shape)]
    taken = set(same)
    backbone = [k for k in dst if k.startswith("backbone.")]
    missing = [k for k in backbone if k not in taken]
    if missing:
        k = missing[0]
        theirs = tuple(src[k].shape) if k in src else "absent"
        raise CheckpointError(f"train.init_from={str(source)!r}: its backbone differs from this one ({len(missing)} of "
                              f"{len(backbone)} tensors, e.g. {k!r}: {tuple(dst[k].shape)} here, {theirs} there); "
                              "fine-tuning needs the same model section")
    with torch.no_grad():
        for k in same:
            dst[k].copy_(src[k].to(dst[k].dtype))
    return {"source": str(source), "copied": len(same), "fresh": sorted(k for k in dst if k not in taken),
            "dropped": sorted(k for k in src if k not in taken)}
