"""Sharded, resumable, multi-process generation of many samples (``unidiff evaluate``, large samples).

``n`` items are generated in fixed-size shards. Shard ``i`` holds items ``[i·s, min((i+1)·s, n))``
and is generated from its own seed ``seed_for(seed, i)`` (:func:`unidiff.io.seed_for`), so the
result is a function of ``(n, shard_size, seed)`` only: neither the number of processes nor a
restart changes a single number. Each process of an ``accelerate launch`` takes the shards
``i ≡ rank (mod world)`` and publishes each one atomically as ``folder/shard_XXXXX.npz``
(:func:`unidiff.io.write_npz`). A rerun after a crash keeps every valid shard (readable, the right
index and row count, the arrays of ``spec``) and regenerates the missing or bad ones (a bad shard
with a warning). When every process is done, the shards are assembled in index order.

``folder/shards.json`` records the plan (``n``, ``shard_size``, ``seed`` and the caller's
``settings``); a folder holding the shards of another plan is emptied with a warning rather than
mixed in. Put the settings that decide the samples (the model, the task, the solver) either in the
folder's name or in ``settings``.

The public API is :func:`generate_sharded` (and :func:`plan_shards`, :class:`Shard`).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import UnidiffError
from .io import seed_for, write_json, write_npz

# The per-shard record stored beside the arrays: [index, start, count, seed].
SHARD_KEY = "__shard__"
MANIFEST = "shards.json"

# dtype name and trailing shape (everything after the row axis) of one array of a shard.
ArraySpec = Tuple[str, Tuple[int, ...]]


@dataclass(frozen=True)
class Shard:
    """One shard of a plan: rows ``start:start + count`` of the result, generated from ``seed``."""

    index: int
    start: int
    count: int
    seed: int


def plan_shards(n: int, shard_size: int, seed: int) -> List[Shard]:
    """The shards of ``n`` items of ``shard_size`` (the last one may be shorter)."""
    if n < 1 or shard_size < 1:
        raise ValueError(f"plan_shards needs n >= 1 and shard_size >= 1, got n={n}, shard_size={shard_size}")
    return [Shard(i, start, min(shard_size, n - start), seed_for(seed, i))
            for i, start in enumerate(range(0, n, shard_size))]


def shard_path(folder: str | os.PathLike, index: int) -> Path:
    return Path(folder) / f"shard_{index:05d}.npz"


def _to_numpy(value: Any) -> np.ndarray:
    if torch.is_tensor(value):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _problem(path: Path, shard: Shard, spec: Optional[Mapping[str, ArraySpec]]) -> Optional[str]:
    """Why the shard file at ``path`` cannot be used for ``shard`` (None when it is good)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # truncated, not a zip, not an npz
        return f"unreadable ({type(e).__name__}: {e})"
    record = arrays.pop(SHARD_KEY, None)
    want = [shard.index, shard.start, shard.count, shard.seed]
    if record is None or record.shape != (4,) or [int(v) for v in record] != want:
        return f"its record {None if record is None else record.tolist()} is not {want}"
    if not arrays:
        return "it holds no arrays"
    for key, a in arrays.items():
        if a.ndim == 0 or a.shape[0] != shard.count:
            return f"array {key!r} has shape {a.shape}, not {shard.count} rows"
    for key, (dtype, trailing) in (spec or {}).items():
        if key not in arrays:
            return f"array {key!r} is missing"
        a = arrays[key]
        if str(a.dtype) != dtype or tuple(a.shape[1:]) != tuple(trailing):
            return f"array {key!r} is {a.dtype} {a.shape[1:]}, not {dtype} {tuple(trailing)}"
    return None


def _load(path: Path) -> Dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files if k != SHARD_KEY}


def _default_accelerator():
    from accelerate import Accelerator

    return Accelerator()


def generate_sharded(
    fn: Callable[[Shard], Mapping[str, Any]],
    n: int,
    shard_size: int,
    seed: int,
    folder: str | os.PathLike,
    *,
    settings: Optional[Mapping[str, Any]] = None,
    spec: Optional[Mapping[str, ArraySpec]] = None,
    accelerator: Any = None,
    on_shard: Optional[Callable[[Shard], None]] = None,
) -> Dict[str, np.ndarray]:
    """Generate ``n`` rows with ``fn`` in resumable shards; returns ``{key: (n, ...) array}``.

    ``fn(shard)`` returns ``{key: (shard.count, ...) array or tensor}`` and must draw its noise
    only from ``shard.seed`` (e.g. ``torch.Generator(device).manual_seed(shard.seed)``).
    ``spec``: ``{key: (dtype name, trailing shape)}`` a kept shard must match (checked beside the
    shard record and the row counts). ``accelerator``: anything with accelerate's
    ``num_processes``, ``process_index``, ``is_main_process``, ``wait_for_everyone`` and
    ``gather_for_metrics`` (default: ``accelerate.Accelerator()``; one process outside
    ``accelerate launch``). ``on_shard(shard)`` is called after each shard this process writes
    (progress; a test's kill switch). Every process returns the assembled arrays.
    """
    acc = accelerator if accelerator is not None else _default_accelerator()
    shards = plan_shards(n, shard_size, seed)
    folder = Path(folder)
    manifest = {"version": 1, "n": int(n), "shard_size": int(shard_size), "seed": int(seed),
                "settings": json.loads(json.dumps(dict(settings or {}), sort_keys=True, default=str))}
    if acc.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        old = None
        if (folder / MANIFEST).is_file():
            try:
                old = json.loads((folder / MANIFEST).read_text())
            except (OSError, ValueError):
                old = None
        if old != manifest:
            stale = sorted(folder.glob("shard_*.npz"))
            if stale:
                warnings.warn(f"{folder} holds {len(stale)} shards of another plan; generating them anew")
                for p in stale:
                    p.unlink()
            write_json(folder / MANIFEST, manifest)
    acc.wait_for_everyone()

    done: List[int] = []
    for shard in shards[acc.process_index::acc.num_processes]:
        path = shard_path(folder, shard.index)
        if path.is_file():
            problem = _problem(path, shard, spec)
            if problem is None:
                done.append(shard.index)
                continue
            warnings.warn(f"shard {path} is bad ({problem}); generating it again")
        arrays = {k: _to_numpy(v) for k, v in fn(shard).items()}
        bad = [k for k, a in arrays.items() if a.ndim == 0 or a.shape[0] != shard.count]
        if bad or SHARD_KEY in arrays:
            raise UnidiffError(f"shard function returned arrays {bad or [SHARD_KEY]} without {shard.count} rows "
                               f"(or with the reserved key {SHARD_KEY!r})")
        record = np.array([shard.index, shard.start, shard.count, shard.seed], dtype=np.int64)
        write_npz(path, **arrays, **{SHARD_KEY: record})
        done.append(shard.index)
        if on_shard is not None:
            on_shard(shard)
    # Every process says which shards it holds: a missing one is an error, never a silent hole.
    finished = acc.gather_for_metrics(done, use_gather_object=True)
    acc.wait_for_everyone()
    missing = sorted(set(range(len(shards))) - {int(i) for i in finished})
    if missing:
        raise UnidiffError(f"shards {missing[:5]} of {folder} were not generated")
    return assemble(folder, shards)


def assemble(folder: str | os.PathLike, shards: Sequence[Shard]) -> Dict[str, np.ndarray]:
    """The arrays of the shard files of ``shards`` in ``folder``, concatenated in index order."""
    parts = [_load(shard_path(folder, s.index)) for s in shards]
    keys = list(parts[0])
    for s, part in zip(shards, parts):
        if list(part) != keys:
            raise UnidiffError(f"shard {shard_path(folder, s.index)} holds {list(part)}, shard 0 holds {keys}")
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}
