"""``unidiff plot`` and unidiff/plots.py: the curves show what log.jsonl holds (each step once),
the metrics of several runs side by side; the sample grids are upscaled and captioned (io.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unidiff.cli import main
from unidiff.errors import UnidiffError
from unidiff.io import save_labelled_grid
from unidiff.plots import curves_figure, metrics_figure, plot_runs, read_log


def _write_run(folder: Path, records, metrics=None) -> Path:
    folder.mkdir(parents=True)
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def _records(n, scale=1.0):
    return [{"step": s, "loss": scale * 3.0 / s, "image": scale * 1.0 / s, "head/label": scale * 2.0 / s,
             "aux_loss": 0.0, "lr": 1e-3 * min(1, s / 2), "images_per_s": 100.0 + s, "moe/router_entropy": 1.38 - 0.01 * s}
            for s in range(1, n + 1)]


def _lines(fig):
    """{panel title: {legend label: (x, y)}} of a figure."""
    out = {}
    for ax in fig.axes:
        if ax.get_title():
            out[ax.get_title()] = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}
    return out


def test_read_log_keeps_each_step_once_and_skips_a_torn_last_line(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    # an old run's log: step 2 twice (a resume before truncation existed), then a torn append
    (run / "log.jsonl").write_text('{"step": 1, "loss": 3}\n{"step": 2, "loss": 2}\n{"step": 2, "loss": 1.5}\n'
                                   '{"step": 3, "loss": 1}\n{"step": 4, "lo')
    assert [(r["step"], r["loss"]) for r in read_log(run)] == [(1, 3), (2, 1.5), (3, 1)]
    with pytest.raises(UnidiffError, match="log.jsonl"):
        read_log(tmp_path)


def test_curves_show_each_logged_series_per_panel(tmp_path):
    recs = _records(5)
    fig = curves_figure([recs], ["run"])
    panels = _lines(fig)
    assert set(panels) == {"loss terms", "learning rate", "images / s", "moe/router_entropy"}
    # every loss term per modality head, not the all-zero aux_loss
    assert set(panels["loss terms"]) == {"loss", "image", "head/label"}
    steps, vals = panels["loss terms"]["head/label"]
    assert steps == [1, 2, 3, 4, 5] and vals == pytest.approx([2.0 / s for s in range(1, 6)])
    assert panels["learning rate"]["_child0"][1] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3])
    # two runs: one line per run and key, named by run
    two = _lines(curves_figure([recs, _records(3, scale=2.0)], ["a", "b"]))
    assert set(two["loss terms"]) == {f"{r} {k}" for r in "ab" for k in ("loss", "image", "head/label")}
    assert two["loss terms"]["b loss"][1] == pytest.approx([6.0, 3.0, 2.0])


def test_metrics_side_by_side(tmp_path):
    fig = metrics_figure([{"fid": 10.0, "label_accuracy": 0.5}, {"fid": 7.5}], ["a", "b"])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["fid", "label_accuracy"]
    fid_ax = fig.axes[0]
    assert [p.get_height() for p in fid_ax.patches] == [10.0, 7.5]
    assert metrics_figure([{}, {}], ["a", "b"]) is None


def test_plot_command_writes_pngs_and_rejects_a_folder_without_a_log(tmp_path, capsys):
    a = _write_run(tmp_path / "a", _records(4), {"fid": 3.0, "step": 4, "n_samples": 16, "model": "model/"})
    b = _write_run(tmp_path / "b", _records(4, 1.5), {"fid": 2.0})
    out = tmp_path / "plots"
    assert main(["plot", str(a), str(b), "--out", str(out)]) == 0
    for name in ("curves.png", "metrics.png"):
        with Image.open(out / name) as im:
            assert im.width > 300 and im.height > 200
    assert main(["plot", str(a)]) == 0 and (a / "curves.png").is_file()  # one run: into its folder
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", str(a), str(empty), "--out", str(tmp_path / "p2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "log.jsonl" in err[0] and str(empty) in err[0]
    assert not (tmp_path / "p2").exists()
    with pytest.raises(UnidiffError):
        plot_runs([tmp_path / "missing"], tmp_path / "p3")


def test_labelled_grid_is_upscaled_nearest_and_captioned(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    path = save_labelled_grid(images, [0, 1, 2, None], tmp_path / "g.png", class_names=["zero", "one", "two"], nrow=2)
    grid = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    # the first cell starts after make_grid's 2-pixel padding; 8 -> 64 pixels: factor 8, nearest
    k, pad = 8, 2
    cell = grid[pad:pad + 8 * k, pad:pad + 8 * k]
    expected = np.kron(((images[0, 0].numpy() + 1) / 2 * 255), np.ones((k, k)))
    assert np.abs(cell - expected).max() <= 1.0
    # under each cell a caption band (2 rows of cells: height = 2 (cell + band + pad) + pad); the
    # captioned cell's band has dark text pixels, the uncaptioned (None) cell's band is blank white
    cell_h = (grid.shape[0] - pad) // 2 - pad
    band_h = cell_h - 8 * k
    assert band_h >= 10 and grid.shape[1] == 2 * (8 * k + pad) + pad
    band0 = grid[pad + 8 * k: pad + cell_h, pad:pad + 8 * k]
    y1, x1 = pad + cell_h + pad, pad + 8 * k + pad  # the 4th cell: second row, second column
    band3 = grid[y1 + 8 * k: y1 + cell_h, x1:x1 + 8 * k]
    assert band0.min() < 128 and band3.min() == 255
    with pytest.raises(ValueError, match="labels"):
        save_labelled_grid(images, [0, 1], tmp_path / "bad.png")
