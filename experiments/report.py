"""The results of an experiment: the table (rows = metrics, columns = arms), ``results.json`` and
``results.md``. The figures are in :mod:`experiments.figures`."""

from __future__ import annotations

import math
from typing import Any, Dict, List

from omegaconf import DictConfig

from .setting import Rows, Setting, modality_index

# Rows of every setting; each setting adds its own (Setting.rows).
COMMON_ROWS: Rows = [("fid", "FID (reference-classifier features)", "lower"),
                     ("bits_per_dim", "bits/dim (bound on -log p(image, aux) per image dim)", "lower")]


def table_rows(setting: Setting, arms: Dict[str, DictConfig]) -> Rows:
    """The rows of the results table: ``(metric key, label, better)`` with better = lower|higher."""
    names = sorted({c.modalities[i].name for c in arms.values() if (i := modality_index(c, setting.kind)) is not None})
    return COMMON_ROWS + setting.rows(names[0] if names else setting.kind)


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
             + f"; {results['train_steps']} training steps per arm, seed {results['seed']}.", "",
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
