"""The notebooks in ``notebooks/``: committed without outputs, and they execute.

``quickstart.ipynb`` runs end to end in a temporary working directory with its outputs sent to a
temporary folder (``UNIDIFF_NB_OUT``): the ``smoke`` budget in the default suite, the real one
(about two minutes) under ``-m slow``. Its reported numbers are recomputed here with numpy from the
arrays it saves, so a notebook that printed one thing and measured another would fail.
``results.ipynb`` runs against a fake experiment folder in the layout ``experiments`` writes
(``results.md`` comes from that module's own writer, so a layout change shows up here), and
against an empty root, where it must explain how to produce results instead of failing.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- helpers -------------------------------------------------------------------------------------
def execute(path: Path, cwd: Path, monkeypatch, env: dict, timeout: int = 600):
    """Run a notebook in a fresh ``python3`` kernel whose environment holds ``env``; returns it executed."""
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the machine is shared; the models are tiny
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(str(path), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: cell errors {[(e.ename, e.evalue) for e in errors]}"
    return nb


def text_outputs(nb) -> str:
    """Everything the notebook printed or displayed as text/markdown, concatenated."""
    parts = []
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        for o in c.outputs:
            if o.output_type == "stream":
                parts.append(o.text)
            elif o.output_type in ("display_data", "execute_result"):
                parts.append(o.data.get("text/markdown", ""))
                parts.append(o.data.get("text/plain", ""))
    return "\n".join(parts)


def png_size(path: Path):
    """(width, height) read from the PNG's IHDR chunk; asserts the file is a non-empty PNG."""
    data = Path(path).read_bytes()
    assert len(data) > 100 and data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_real_figure(path: Path, min_side: int = 100) -> None:
    """A PNG of a reasonable size that is not one flat colour."""
    from PIL import Image

    w, h = png_size(path)
    assert w >= min_side and h >= min_side, f"{path}: {w}x{h}"
    with Image.open(path) as im:
        extrema = im.convert("L").getextrema()
    assert extrema[0] < extrema[1], f"{path} is a single flat colour"


# --- committed state -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["quickstart.ipynb", "results.ipynb"])
def test_committed_notebook_has_no_outputs(name):
    nb = nbformat.read(str(NOTEBOOKS / name), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and any(c.cell_type == "markdown" for c in nb.cells)
    for i, c in enumerate(code):
        assert c.outputs == [], f"{name}: code cell {i} has outputs"
        assert c.execution_count is None, f"{name}: code cell {i} has an execution count"


# --- quickstart ------------------------------------------------------------------------------------
def check_quickstart(out: Path, nb) -> dict:
    """Checks shared by the smoke and the full run; returns the summary."""
    import yaml
    from sklearn.datasets import load_digits

    summary_path = out / "quickstart_summary.json"
    assert summary_path.is_file(), "the notebook wrote no quickstart_summary.json under UNIDIFF_NB_OUT"
    s = json.loads(summary_path.read_text())

    # Every number is finite; rates are rates; MSEs are non-negative.
    for key, v in s.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            assert math.isfinite(v), f"{key} = {v}"
    for key in ("label_accuracy", "class_to_image_reference_accuracy", "class_to_image_reference_accuracy_unguided",
                "reference_val_accuracy"):
        assert 0.0 <= s[key] <= 1.0, f"{key} = {s[key]}"
    assert s["inpaint_masked_mse"] >= 0 and s["inpaint_mean_fill_masked_mse"] > 0

    # The image space is the digits' own (one channel, 8x8), and the run trained what it says.
    digits = load_digits()
    assert s["image_shape"] == [1, *digits.images.shape[1:]]
    assert s["joint_sample_shape"] == [s["num_joint_samples"], *s["image_shape"]]
    run_cfg = yaml.safe_load((Path(s["run_dir"]) / "config.yaml").read_text())
    assert run_cfg["train"]["steps"] == s["train_steps"]
    assert sorted(m["kind"] for m in run_cfg["modalities"]) == ["label", "masked_image"]
    assert (Path(s["run_dir"]) / "model" / "config.json").is_file()
    assert Path(s["run_dir"]).resolve().is_relative_to(out.resolve())

    # The reported numbers, recomputed from the saved arrays.
    arr = np.load(out / "quickstart_arrays.npz")
    assert arr["joint_images"].shape == tuple(s["joint_sample_shape"])
    assert arr["joint_labels"].shape == (s["num_joint_samples"],)
    assert set(arr["joint_labels"].tolist()) <= set(range(10))
    for key in ("joint_images", "c2i_images", "inpaint_output"):
        assert np.abs(arr[key]).max() <= 1.0 + 1e-6, f"{key} leaves the data range [-1, 1]"
    assert len(arr["val_labels"]) == s["num_val"]
    assert np.mean(arr["val_pred"] == arr["val_labels"]) == pytest.approx(s["label_accuracy"], abs=1e-6)
    mask = arr["inpaint_mask"]  # (B, 1, H, W), 1 = visible
    assert set(np.unique(mask).tolist()) <= {0.0, 1.0}
    assert mask.mean() == pytest.approx(0.5)  # mask_ratio 0.5 of the 2x2 patches, exactly
    hidden = np.broadcast_to(1.0 - mask, arr["inpaint_truth"].shape)
    sq = (arr["inpaint_output"].astype(np.float64) - arr["inpaint_truth"]) ** 2
    assert (sq * hidden).sum() / hidden.sum() == pytest.approx(s["inpaint_masked_mse"], rel=1e-5)

    # Figures: the four it promises, real PNGs, shown in the notebook too.
    assert set(s["figures"]) == {"schedule", "joint", "class_to_image", "inpaint"}
    for path in s["figures"].values():
        assert Path(path).resolve().is_relative_to(out.resolve())
        assert_real_figure(Path(path))
    shown = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
                if o.output_type == "display_data" and "image/png" in o.data)
    assert shown == len(s["figures"])
    text = text_outputs(nb)
    assert "image->label" in text and "inpainting MSE" in text
    check_quiet(nb, len((Path(s["run_dir"]) / "log.jsonl").read_text().splitlines()))
    return s


def check_quiet(nb, n_log_records: int) -> None:
    """No flood of progress bars: no sampling bar at all (the pipeline's bars show on a terminal
    only, and the notebook turns them off), and the training bar draws its first and last state
    plus one update per logged record (TQDM_MININTERVAL set before tqdm is imported), not one per
    step; no ipywidgets warning."""
    stderr = "".join(o.text for c in nb.cells if c.cell_type == "code" for o in c.outputs
                     if o.output_type == "stream" and o.name == "stderr")
    assert "IProgress" not in stderr
    assert "img/s" not in stderr  # the pipeline's bar (the training bar says img_s=)
    assert stderr.count("\r") <= n_log_records + 2, stderr


def test_quickstart_smoke(tmp_path, monkeypatch):
    """The whole notebook at the smoke budget, from a working directory outside the repository."""
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    nb = execute(NOTEBOOKS / "quickstart.ipynb", cwd, monkeypatch, {"UNIDIFF_NB_OUT": out, "UNIDIFF_NB_BUDGET": "smoke"})
    s = check_quickstart(out, nb)
    assert s["budget"] == "smoke"
    assert not any(cwd.iterdir()), "the notebook wrote into its working directory instead of UNIDIFF_NB_OUT"


@pytest.mark.slow
def test_quickstart_full_budget(tmp_path, monkeypatch):
    """The notebook as a user runs it: about two minutes on two CPU cores, and it learns something."""
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    monkeypatch.delenv("UNIDIFF_NB_BUDGET", raising=False)
    nb = execute(NOTEBOOKS / "quickstart.ipynb", cwd, monkeypatch, {"UNIDIFF_NB_OUT": out})
    s = check_quickstart(out, nb)
    assert s["budget"] == "full"
    assert s["reference_val_accuracy"] > 0.9  # the judge itself works on real digits
    assert s["label_accuracy"] > 0.3  # chance is 0.1: the label head has learnt from 400 steps
    assert s["seconds"] < 240


# --- results -------------------------------------------------------------------------------------
def fake_results() -> dict:
    """A results.json in the layout of ``experiments.run_experiment``."""
    arms = {
        "multitask": {"fid": 12.5, "bits_per_dim": 3.1, "label_accuracy": 0.91, "class_conditional_accuracy": 0.8},
        "image_only": {"fid": 14.0, "bits_per_dim": 3.3},
        "label_only": {"label_accuracy": 0.95},
    }
    rows = [("fid", "FID (val)", "lower"), ("bits_per_dim", "bits/dim (val)", "lower"),
            ("label_accuracy", "image→label accuracy (val)", "higher"),
            ("class_conditional_accuracy", "class→image accuracy", "higher"), ("joint_consistency", "joint", "higher")]
    return {
        "experiment": "joint_image_label", "setting": "joint_image_label",
        "config": "configs/experiments/joint_image_label.yaml", "overrides": ["train.steps=10"],
        "train_steps": 10, "seed": 0,
        "arms": {a: {"run_dir": f"runs/experiments/joint_image_label/{a}", "trained_now": True, "metrics": m,
                     "seconds": {"train": 1.0, "evaluate": 2.0}} for a, m in arms.items()},
        "table": [{"key": k, "label": lab, "better": b, "values": {a: arms[a].get(k) for a in arms}}
                  for k, lab, b in rows],
        "context": {"fid_floor": 1.5, "reference_accuracy": 0.98},
    }


def test_results_notebook_on_a_fake_experiment(tmp_path, monkeypatch):
    from experiments import results_markdown

    root, out, cwd = tmp_path / "experiments", tmp_path / "plots", tmp_path / "cwd"
    cwd.mkdir()
    exp = root / "joint_image_label"
    exp.mkdir(parents=True)
    res = fake_results()
    (exp / "results.json").write_text(json.dumps(res, indent=1))
    (exp / "results.md").write_text(results_markdown(res))
    (root / "broken").mkdir()
    (root / "broken" / "results.json").write_text("{not json")
    (root / "unrelated").mkdir()  # a folder without results.json is not an experiment

    nb = execute(NOTEBOOKS / "results.ipynb", cwd, monkeypatch, {"UNIDIFF_RESULTS_ROOT": root, "UNIDIFF_NB_OUT": out})
    summary = json.loads((out / "results_summary.json").read_text())
    assert summary["experiments"] == ["joint_image_label"]
    assert len(summary["skipped"]) == 1 and "broken" in summary["skipped"][0]
    plot = Path(summary["plots"]["joint_image_label"])
    assert plot == out / "results_joint_image_label.png"
    # Four metrics have values (joint_consistency has none): at least a 3-wide grid of panels.
    w, h = png_size(plot)
    assert w > h > 200
    assert_real_figure(plot)
    text = text_outputs(nb)
    assert "| metric | multitask | image_only | label_only |" in text  # the results.md table, displayed
    assert "FID (val): best multitask" in text and "image→label accuracy (val): best label_only" in text
    assert "skipped (unreadable)" in text


def test_results_notebook_without_results_explains(tmp_path, monkeypatch):
    root, out, cwd = tmp_path / "nothing_here", tmp_path / "plots", tmp_path / "cwd"
    cwd.mkdir()
    nb = execute(NOTEBOOKS / "results.ipynb", cwd, monkeypatch, {"UNIDIFF_RESULTS_ROOT": root, "UNIDIFF_NB_OUT": out})
    text = text_outputs(nb)
    assert "No experiment results" in text
    for setting in sorted(p.stem for p in (REPO / "configs" / "experiments").glob("*.yaml")):
        assert f"unidiff experiment configs/experiments/{setting}.yaml" in text
    assert not out.exists() or not any(out.iterdir())
