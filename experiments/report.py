"""The results of an experiment: the table (rows = metrics, columns = arms), ``results.json`` and
``results.md``. The figures are in :mod:`experiments.figures`."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig

from .setting import Rows, Setting, modality_index

# Rows of every setting; each setting adds its own (Setting.rows).
COMMON_ROWS: Rows = [("fid", "FID (reference-classifier features)", "lower"),
                     ("bits_per_dim", "bits/dim (bound on -log p(image, aux) per image dim)", "lower")]


def row_modality(setting: Setting, arms: Dict[str, DictConfig]) -> str:
    """The name of the arms' modality of the setting's kind (the ``m`` of :meth:`Setting.rows`)."""
    names = sorted({c.modalities[i].name for c in arms.values() if (i := modality_index(c, setting.kind)) is not None})
    return names[0] if names else setting.kind


def sample_counts(arms: Dict[str, DictConfig]) -> str:
    """``n=500`` (the ``eval.n_samples`` behind each arm's FID), or ``n=a:100, b:200`` when they differ."""
    counts = {a: int(c.eval.n_samples) for a, c in arms.items()}
    if len(set(counts.values())) == 1:
        return f"n={next(iter(counts.values()))}"
    return "n=" + ", ".join(f"{a}:{n}" for a, n in counts.items())


def table_rows(setting: Setting, arms: Dict[str, DictConfig], steps: Optional[Sequence[int]] = None) -> Rows:
    """The rows of the results table: ``(metric key, label, better)`` with better = lower|higher.

    The FID rows name the number of samples behind them. ``steps`` (``experiment.eval_at`` and the
    final step): the setting's convergence rows once per step, keyed ``<key>@<step>``.
    """
    m = row_modality(setting, arms)
    n = sample_counts(arms)
    rows = [(k, f"{label}, {n}" if k == "fid" else label, b) for k, label, b in COMMON_ROWS] + setting.rows(m)
    for key, label, better in setting.convergence_rows(m) if steps else []:
        label = f"{label}, {n}" if key == "fid" else label
        rows += [(f"{key}@{s}", f"{label} @ step {s}", better) for s in steps]
    return rows


def table(rows: Rows, arm_metrics: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """``results.json``'s table: per row its key, label, direction and every arm's value (None where
    the arm has no such output)."""
    out = []
    for key, label, better in rows:
        values = {}
        for arm, metrics in arm_metrics.items():
            v = metrics.get(key)
            values[arm] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
        out.append({"key": key, "label": label, "better": better, "values": values})
    return out


def fmt(v: Any) -> str:
    """A table cell: 4 significant digits, "—" for a missing or NaN value."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def results_markdown(results: Dict[str, Any]) -> str:
    """``results.md``: the table (rows = metrics with ↓/↑, columns = arms) and the context numbers."""
    arms = list(results["arms"])
    lines = [f"# {results['experiment']} ({results['setting']})", "",
             f"Config `{results['config']}`" + (f", overrides `{' '.join(results['overrides'])}`" if results["overrides"] else "")
             + f"; {results['train_steps']} training steps per arm, seed {results['seed']}"
             + (f"; evaluated at steps {', '.join(map(str, results['eval_at']))}" if results.get("eval_at") else "") + ".", "",
             "| metric | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for row in results["table"]:
        arrow = "↓" if row["better"] == "lower" else "↑"
        lines.append(f"| {row['label']} {arrow} | " + " | ".join(fmt(row["values"].get(a)) for a in arms) + " |")
    lines += ["", "↓ lower is better, ↑ higher is better; — : the arm has no such output."]
    if results.get("context"):
        lines += ["", "Context:", ""]
        lines += [f"- {k}: {fmt(v)}" for k, v in results["context"].items()]
    notes = {a: r["metrics"].get("inpaint/method") for a, r in results["arms"].items() if r["metrics"].get("inpaint/method")}
    if notes:
        lines += ["", "Inpainting method per arm: " + ", ".join(f"{a}: {m}" for a, m in notes.items()) + "."]
    return "\n".join(lines) + "\n"
