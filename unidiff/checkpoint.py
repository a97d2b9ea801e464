"""Checkpoints (STYLE.md habit 10; EDM2's two kinds): full training states and the inference model.

Layout of a run folder::

    RUN_DIR/config.yaml               resolved config (written once validation passed)
    RUN_DIR/checkpoints/step_000500/  accelerate ``save_state`` + DONE marker + model_config.json
    RUN_DIR/model/                    the final EMA model, ``save_pretrained`` (what sample/evaluate load),
                                      + scheduler_config.json and sampling.json (unidiff/pipeline.py)

The prepared module is the training objective (``unidiff.diffusion.MultiModalDiffusion``), so a
checkpoint's ``model.safetensors`` holds the ``UnifiedModel`` weights under ``model.`` keys (older
checkpoints without the prefix load too); ``model/`` is the plain ``UnifiedModel`` export.

A training state is written into ``step_XXXXXX.tmp``; the ``DONE`` marker is written last and
the folder renamed to ``step_XXXXXX``, so a crash mid-save never leaves a folder that looks
complete: :func:`latest` ignores ``.tmp`` folders and folders without the marker. Resume is
"run the same command again": the loop loads :func:`latest` when there is one.

The custom objects registered with ``accelerator.register_for_checkpointing`` (EMA, LR schedule,
train state) hold tensors and plain containers only, so every file loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .errors import CheckpointError
from .io import atomic_dir

DONE = "DONE"
_STEP_RE = re.compile(r"^step_(\d{6,})$")
# Order of accelerator.register_for_checkpointing in train.py -> custom_checkpoint_{i}.pkl.
EMA_INDEX, LR_INDEX, STATE_INDEX = 0, 1, 2


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(path: str | os.PathLike) -> int:
    """The training step a complete checkpoint folder holds (from its name)."""
    m = _STEP_RE.match(Path(path).name)
    if m is None:
        raise CheckpointError(f"{str(path)!r} is not a checkpoint folder (step_XXXXXX)")
    return int(m.group(1))


def complete_checkpoints(ckpt_root: str | os.PathLike) -> List[Path]:
    """Complete checkpoint folders under ``ckpt_root``, oldest first (``.tmp`` and unmarked skipped)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name) and (p / DONE).is_file()]
    return sorted(found, key=step_of)


def latest(ckpt_root: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint folder, or None."""
    found = complete_checkpoints(ckpt_root)
    return found[-1] if found else None


class TrainState:
    """The loop's own counters, registered for checkpointing (plain ints only)."""

    def __init__(self, step: int = 0):
        self.step = int(step)

    def state_dict(self) -> Dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step = int(state["step"])


class CheckpointWriteError(CheckpointError, RuntimeError):
    """A checkpoint could not be written (a full disk): one line for the CLI, and still the
    ``RuntimeError`` torch raised for it."""


def save_checkpoint(accelerator, ckpt_root: str | os.PathLike, step: int, keep_last: int,
                    model_config: Optional[Dict[str, Any]] = None) -> Path:
    """Write the full training state for ``step`` atomically; keep the newest ``keep_last``.

    Call on every process (accelerate gathers what it needs); only the main process renames and
    prunes. ``model_config`` (the model's ``config`` dict) lets :func:`load_model` rebuild the
    network from the checkpoint alone.
    """
    root = Path(ckpt_root)
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # leftover of a crash at this very step
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(output_dir=str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if model_config is not None:
                (tmp / "model_config.json").write_text(json.dumps(model_config, indent=1, default=_jsonable))
            (tmp / DONE).write_text(f"{step}\n")
    except (OSError, RuntimeError) as err:  # a full disk: OSError, or torch's "inline_container.cc" RuntimeError
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointWriteError(f"cannot write checkpoint {str(final)!r}: {first}") from None
    if accelerator.is_main_process:
        if final.exists():  # re-saving a step (e.g. a resumed run that ends where it started)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if hasattr(obj, "value"):  # Enum
        return obj.value
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def load_checkpoint(accelerator, path: str | os.PathLike) -> None:
    """Restore model, optimiser, RNG and every registered object from a complete checkpoint."""
    path = Path(path)
    if not (path / DONE).is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete (no {DONE} marker)")
    try:
        accelerator.load_state(str(path))
    except (OSError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be loaded: {str(err).splitlines()[0]}") from None


def export_model(model: nn.Module, path: str | os.PathLike, run_config: Optional[Any] = None) -> Path:
    """``save_pretrained`` into ``path`` atomically (``path.tmp`` then rename); replaces ``path``.

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
    """The inference model of a run: ``RUN_DIR/model`` (final EMA export), else the EMA weights of
    the latest complete checkpoint. CheckpointError when neither exists."""
    from safetensors.torch import load_file

    from .diffusion.objective import model_state_dict
    from .model import UnifiedModel

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {str(run_dir)!r} does not exist")
    exported = run_dir / "model"
    if (exported / "config.json").is_file():
        try:
            model = UnifiedModel.from_pretrained(str(exported))
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"model {str(exported)!r} cannot be loaded: {str(err).splitlines()[0]}") from None
        return model.to(device).eval().requires_grad_(False)
    ckpt = latest(run_dir / "checkpoints")
    if ckpt is None or not (ckpt / "model_config.json").is_file():
        raise CheckpointError(f"run folder {str(run_dir)!r} has neither a model/ export nor a complete checkpoint")
    model = UnifiedModel.from_config(json.loads((ckpt / "model_config.json").read_text()))
    weights = ckpt / "model.safetensors"
    ema_file = ckpt / f"custom_checkpoint_{EMA_INDEX}.pkl"
    try:
        model.load_state_dict(model_state_dict(load_file(str(weights))))  # live weights + buffers
        shadow = torch.load(ema_file, map_location="cpu", weights_only=True)["shadow_params"]
    except (OSError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} cannot be loaded: {str(err).splitlines()[0]}") from None
    params = list(model.parameters())
    if len(shadow) != len(params):
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: EMA holds {len(shadow)} tensors, model has {len(params)}")
    with torch.no_grad():
        for p, s in zip(params, shadow):
            p.copy_(s)
    return model.to(device).eval().requires_grad_(False)
