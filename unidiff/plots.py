"""``unidiff plot RUN_DIR [RUN_DIR ...]``: training curves and metrics of runs, as PNG.

- ``curves.png``: over optimiser steps, from each run's ``log.jsonl``: the total loss and every
  loss term (``image``, ``head/<modality>``, ``aux_loss`` when not all 0), the learning rate,
  images/s, the gradient norm and each MoE balance statistic (``moe/*``); several runs overlay,
  one colour per run.
- ``metrics.png``: the numbers of each run's ``metrics.json`` side by side, one bar chart per
  metric (only metrics that at least one run has).

Figures are built on :class:`matplotlib.figure.Figure` without pyplot, so drawing chooses no
process-wide backend (a notebook keeps its own), and written with :func:`unidiff.io.save_figure`
(atomic). ``train`` writes ``curves.png`` into the run folder at the end of every invocation.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .errors import UnidiffError
from .io import save_figure

# Keys of a log record that are plotted in panels of their own, in this order (loss terms first,
# gathered into one panel). Anything else numeric (a future statistic) gets a panel too.
_LOSS_KEYS = ("loss", "image", "aux_loss")
_OWN_PANELS = ("lr", "images_per_s", "grad_norm")
_TITLES = {"loss": "loss terms", "lr": "learning rate", "images_per_s": "images / s", "grad_norm": "gradient norm"}


def read_log(run_dir: str | os.PathLike) -> List[Dict[str, Any]]:
    """The records of ``RUN_DIR/log.jsonl``, one per step, in step order.

    A torn last line (a process killed while appending) is skipped; where an older run's log holds
    a step twice (before resumes truncated the log) the later record wins, as in TensorBoard.
    """
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise UnidiffError(f"run folder {str(run_dir)!r} has no log.jsonl (not a trained unidiff run?)")
    by_step: Dict[int, Dict[str, Any]] = {}
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue  # torn final write
            raise UnidiffError(f"{str(path)!r} line {i + 1} is not JSON") from None
        by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def _panels(logs: Sequence[List[Dict[str, Any]]]) -> List[tuple]:
    """``(title, [keys])`` of every panel the logs have data for."""
    keys = set()
    for records in logs:
        for r in records:
            keys.update(k for k, v in r.items() if k != "step" and isinstance(v, (int, float)))

    def nonzero(k):
        return any(r.get(k) for records in logs for r in records)

    losses = [k for k in _LOSS_KEYS if k in keys and (k != "aux_loss" or nonzero(k))]
    losses += sorted(k for k in keys if k.startswith("head/"))
    panels = [("loss terms", losses)] if losses else []
    panels += [(_TITLES[k], [k]) for k in _OWN_PANELS if k in keys]
    rest = sorted(keys - set(_LOSS_KEYS) - set(_OWN_PANELS) - {k for k in keys if k.startswith("head/")})
    panels += [(k, [k]) for k in rest]
    return panels


def _grid(n: int, ncols: int = 3, size=(4.4, 3.0)):
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).flat
    return fig, list(axes)


def curves_figure(logs: Sequence[List[Dict[str, Any]]], names: Sequence[str]):
    """The figure of ``curves.png``: one panel per quantity (module docstring), one line per run
    and key; ``logs`` are :func:`read_log` results, ``names`` the runs' legend names."""
    names = list(names)
    panels = _panels(logs) or [("loss terms", [])]
    fig, axes = _grid(len(panels))
    styles = ("-", "--", ":", "-.")
    for ax, (title, keys) in zip(axes, panels):
        for r, (name, records) in enumerate(zip(names, logs)):
            colour = f"C{r % 10}"
            for j, key in enumerate(keys):
                pts = [(rec["step"], rec[key]) for rec in records if isinstance(rec.get(key), (int, float))]
                if not pts:
                    continue
                steps, vals = zip(*pts)
                label = " ".join(x for x in (name if len(logs) > 1 else "", key if len(keys) > 1 else "") if x)
                ax.plot(steps, vals, styles[j % len(styles)] if len(logs) > 1 else "-",
                        color=colour if len(logs) > 1 else f"C{j % 10}", label=label or None, lw=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        if title == "loss terms" and all(v > 0 for ln in ax.get_lines() for v in ln.get_ydata()) and ax.get_lines():
            ax.set_yscale("log")
        if any(ln.get_label() and not ln.get_label().startswith("_") for ln in ax.get_lines()):
            ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.axis("off")
    if len(logs) == 1:
        fig.suptitle(names[0], fontsize=11)
    fig.tight_layout()
    return fig


def plot_curves(run_dirs: Sequence[str | os.PathLike], path: str | os.PathLike,
                names: Optional[Sequence[str]] = None) -> Path:
    """``curves.png`` of one or several runs (module docstring) at ``path``; returns it."""
    logs = [read_log(d) for d in run_dirs]
    return save_figure(curves_figure(logs, names or [Path(d).name for d in run_dirs]), path)


def read_metrics(run_dir: str | os.PathLike) -> Dict[str, float]:
    """The finite numbers of ``RUN_DIR/metrics.json`` (bookkeeping such as ``step`` and
    ``n_samples`` left out), or {} when the run has not been evaluated."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UnidiffError(f"{str(path)!r} is not valid JSON: {err}") from None
    return {k: float(v) for k, v in data.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "n_samples")
            and math.isfinite(v)}


def metrics_figure(metrics: Sequence[Dict[str, float]], names: Sequence[str]):
    """The figure of ``metrics.png``: one bar chart per metric (sorted by name), one bar per run;
    None when there is no metric at all."""
    names = list(names)
    keys = sorted({k for m in metrics for k in m})
    if not keys:
        return None
    fig, axes = _grid(len(keys), ncols=4, size=(3.4, 2.8))
    for ax, key in zip(axes, keys):
        vals = [m.get(key) for m in metrics]
        ax.bar(range(len(names)), [v if v is not None else 0.0 for v in vals],
               color=[f"C{i % 10}" for i in range(len(names))])
        for i, v in enumerate(vals):
            ax.text(i, v if v is not None else 0.0, "—" if v is None else f"{v:.4g}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), names, fontsize=7, rotation=20 if len(names) > 2 else 0)
        ax.set_title(key, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_metrics(run_dirs: Sequence[str | os.PathLike], path: str | os.PathLike,
                 names: Optional[Sequence[str]] = None) -> Optional[Path]:
    """``metrics.png``: one bar chart per metric, one bar per run; None (nothing written) when no
    run has a ``metrics.json``."""
    fig = metrics_figure([read_metrics(d) for d in run_dirs], names or [Path(d).name for d in run_dirs])
    return save_figure(fig, path) if fig is not None else None


def plot_runs(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> Dict[str, Path]:
    """Both figures of ``run_dirs`` into ``out_dir`` (created): ``{"curves": ..., "metrics": ...}``
    (``metrics`` only when a run has been evaluated). Checks every folder before drawing."""
    for d in run_dirs:
        if not Path(d).is_dir():
            raise UnidiffError(f"run folder {str(d)!r} does not exist")
        read_log(d)  # a folder without a log fails here, before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"curves": plot_curves(run_dirs, out_dir / "curves.png")}
    metrics = plot_metrics(run_dirs, out_dir / "metrics.png")
    if metrics is not None:
        written["metrics"] = metrics
    return written
