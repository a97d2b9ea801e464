"""The figures of an experiment: ``samples.png`` (a data row, then one row per arm) and
``metrics.png`` (one bar chart per table row)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict

from unidiff.io import image_grid, save_figure

from .report import fmt
from .setting import Panels


def _pyplot():
    # Imported when a figure is drawn, not with the package: choosing the Agg backend is a
    # process-wide side effect (a notebook importing experiments keeps its own backend).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_samples(data_panels: Panels, arm_panels: Dict[str, Panels], path: Path) -> None:
    """``samples.png``: one row for the data, then one row per arm, one column per panel."""
    plt = _pyplot()
    rows = [("data", data_panels)] + list(arm_panels.items())
    ncols = max(1, max(len(p) for _, p in rows))
    fig, axes = plt.subplots(len(rows), ncols, figsize=(3.2 * ncols, 3.4 * len(rows)), squeeze=False)
    for r, (row_name, panels) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(panels):
                ax.axis("off")
                if c == 0:
                    ax.text(0.5, 0.5, f"{row_name}: no images", ha="center", va="center", transform=ax.transAxes)
                continue
            title, images = panels[c]
            grid = image_grid(images).permute(1, 2, 0).numpy()
            ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(row_name, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_metrics(results: Dict[str, Any], path: Path) -> None:
    """``metrics.png``: one bar chart per table row with at least one value."""
    plt = _pyplot()
    arms = list(results["arms"])
    rows = [r for r in results["table"] if any(isinstance(r["values"].get(a), (int, float)) for a in arms)]
    n = max(1, len(rows))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ax in enumerate(axes.flat):
        if i >= len(rows):
            ax.axis("off")
            continue
        row = rows[i]
        vals = [row["values"].get(a) for a in arms]
        heights = [v if isinstance(v, (int, float)) and math.isfinite(v) else 0.0 for v in vals]
        ax.bar(range(len(arms)), heights, color=[colours[j % len(colours)] for j in range(len(arms))])
        for j, v in enumerate(vals):
            ax.text(j, heights[j], fmt(v), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(arms)), arms, fontsize=8)
        ax.set_title(f"{row['label']} {'↓' if row['better'] == 'lower' else '↑'}", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
