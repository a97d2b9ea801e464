"""``unidiff sample`` (unidiff/cli.py): sharded and resumable, a labelled grid, the precision rule.

Oracles: the pipeline called by hand with shard 0's documented seed ``seed_for(seed, 0)``, an
uninterrupted run for the resumed one, the documented label cycle of class->image, the CPU's own
``/proc/cpuinfo`` flags for ``mixed_precision: auto``, and the autocast state seen inside the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unidiff.cli as cli
import unidiff.launch
from unidiff.cli import main
from unidiff.io import seed_for
from unidiff.launch import cpu_flags
from unidiff.modality import images_to_uint8
from unidiff.model import UnifiedModel
from unidiff.pipeline import UnifiedDiffusionPipeline

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A debug run (label modality, 8x8 digits) trained two steps through the CLI."""
    root = tmp_path_factory.mktemp("sample_shards")
    rc = main(["train", DEBUG, f"run.dir={root / 'run'}", "train.steps=2", "train.sample_every=0",
               "train.report_to=[]", f"eval.cache_dir={root / 'cache'}"])
    assert rc == 0
    return root / "run"


def _load(path: Path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _same_file(a: Path, b: Path) -> None:
    x, y = _load(a), _load(b)
    assert sorted(x) == sorted(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape and x[k].tobytes() == y[k].tobytes(), k


REAL_SAMPLE_BATCH = cli.sample_batch


class Killed(Exception):
    """Stands for a kill: nothing after the raise runs."""


def _counting(monkeypatch, die_after=None):
    """Count the shard batches sample_to_file generates; raise Killed on batch ``die_after + 1``."""
    calls = []
    real = REAL_SAMPLE_BATCH  # not a wrapper an earlier call of this test left in place

    def batch(*args, **kwargs):
        if die_after is not None and len(calls) == die_after:
            raise Killed()
        calls.append(args[2])  # the shard's row count
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "sample_batch", batch)
    return calls


SAMPLE = ["--task", "class_to_image", "-n", "10", "--shard-size", "3", "--steps", "2", "--seed", "4"]


def test_a_killed_sample_resumes_from_its_shards_and_equals_the_straight_run(run, tmp_path, monkeypatch, capsys):
    straight, resumed = tmp_path / "straight.npz", tmp_path / "resumed.npz"
    calls = _counting(monkeypatch)
    assert main(["sample", str(run), *SAMPLE, "--out", str(straight)]) == 0
    assert calls == [3, 3, 3, 1]  # 10 rows in shards of 3
    assert not cli.shard_folder(straight).exists()  # removed once the sample file is published

    calls = _counting(monkeypatch, die_after=2)
    with pytest.raises(Killed):
        main(["sample", str(run), *SAMPLE, "--out", str(resumed)])
    assert not resumed.exists()
    kept = sorted(p.name for p in cli.shard_folder(resumed).glob("shard_*.npz"))
    assert kept == ["shard_00000.npz", "shard_00001.npz"]

    calls = _counting(monkeypatch)
    assert main(["sample", str(run), *SAMPLE, "--out", str(resumed)]) == 0
    assert calls == [3, 1]  # only the two missing shards
    _same_file(straight, resumed)
    assert not cli.shard_folder(resumed).exists()
    # class->image without labels cycles over the 10 classes across the shards, not within each
    assert _load(resumed)["labels"].tolist() == list(range(10))
    record = json.loads(resumed.with_suffix(".json").read_text())
    assert record["seed"] == 4 and record["shard_size"] == 3 and record["n"] == 10


def test_shards_of_other_settings_are_generated_anew_with_one_warning_line(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o.npz"
    _counting(monkeypatch, die_after=2)
    with pytest.raises(Killed):
        main(["sample", str(run), *SAMPLE, "--out", str(out)])
    capsys.readouterr()
    calls = _counting(monkeypatch)
    assert main(["sample", str(run), *SAMPLE, "--guidance", "3", "--out", str(out)]) == 0
    assert calls == [3, 3, 3, 1]  # nothing reused: the guidance decides the samples
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("unidiff: warning: ") and "another plan" in err[0], err
    straight = tmp_path / "s.npz"
    assert main(["sample", str(run), *SAMPLE, "--guidance", "3", "--out", str(straight)]) == 0
    _same_file(straight, out)


def test_samples_are_shard_seeded_as_documented(run, tmp_path):
    """Shard i is seeded by seed_for(seed, i): one shard equals the pipeline with that generator;
    a longer run with the same shard size extends a shorter one; another shard size gives others."""
    def sample(name, n, shard_size):
        out = tmp_path / name
        assert main(["sample", str(run), "--task", "joint", "-n", str(n), "--shard-size", str(shard_size),
                     "--steps", "2", "--seed", "9", "--out", str(out)]) == 0
        return _load(out)

    one = sample("one.npz", 4, 4)
    pipe = UnifiedDiffusionPipeline.from_run(run)
    by_hand = pipe.joint(4, num_inference_steps=2, generator=torch.Generator().manual_seed(seed_for(9, 0)),
                         output_type="latent")
    assert np.array_equal(one["images"], images_to_uint8(by_hand.images))
    assert np.array_equal(one["labels"], by_hand.arrays["labels"])
    long = sample("long.npz", 6, 2)
    short = sample("short.npz", 4, 2)
    assert np.array_equal(long["images"][:4], short["images"]) and np.array_equal(long["labels"][:4], short["labels"])
    assert not np.array_equal(short["images"], one["images"])  # the shard size is part of the seed


def _caption_bands(png: Path, cells: int, cell: int):
    """The caption band under each cell of a one-row labelled grid (padding 2, square cells)."""
    grid = np.asarray(Image.open(png).convert("L"))
    top = 2 + cell
    return [grid[top:grid.shape[0] - 2, 2 + i * (cell + 2): 2 + i * (cell + 2) + cell] for i in range(cells)], grid


def test_the_grid_is_upscaled_and_each_cell_shows_its_label(run, tmp_path):
    def grid(name, labels):
        out = tmp_path / name
        assert main(["sample", str(run), "--task", "class_to_image", "-n", "2", "--labels", labels, "--steps", "2",
                     "--out", str(out)]) == 0
        return out.with_suffix(".png")

    same, other = grid("same.npz", "3,3"), grid("other.npz", "3,1")
    raw = 2 * 8 + 3  # what torchvision's make_grid of two 8x8 cells (padding 1) would be wide
    width, height = Image.open(same).size
    assert width >= 2 * 64 > raw and height > 64  # cells upscaled (nearest) to >= 64 pixels
    cell = (width - 2) // 2 - 2
    assert cell % 8 == 0  # a whole nearest-neighbour factor of the 8-pixel samples
    (a, b), _ = _caption_bands(same, 2, cell)
    (c, d), _ = _caption_bands(other, 2, cell)
    assert a.size and a.min() < 128 and c.min() < 128 and d.min() < 128  # dark text on white
    assert np.array_equal(a, b)  # the same label, the same caption
    assert np.array_equal(a, c) and not np.array_equal(c, d)  # "3" vs "1"


def _autocast_seen(monkeypatch):
    seen = []
    real = UnifiedModel.forward

    def forward(self, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(UnifiedModel, "forward", forward)
    return seen


def test_sampling_runs_under_the_precision_rule(run, tmp_path, monkeypatch, capsys):
    # on this machine: auto is bf16 only with AMX (the CPU's own flags say whether)
    native = {"amx_bf16"} & cpu_flags()
    expected = "bf16" if native and not torch.cuda.is_available() else "no"
    seen = _autocast_seen(monkeypatch)
    out = tmp_path / "auto.npz"
    assert main(["sample", str(run), "-n", "2", "--steps", "2", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"precision: {expected} (auto:" in stdout
    assert json.loads(out.with_suffix(".json").read_text())["precision"]["mixed_precision"] == expected
    if expected == "no":
        assert seen and not any(enabled for enabled, _ in seen)

    # a machine where auto resolves to bf16: the sampling forwards run under bf16 autocast
    asked = []

    def pretend(requested, device_type, *args, **kwargs):
        asked.append((getattr(requested, "value", requested), device_type))
        return "bf16", "pretend: bf16 units"

    monkeypatch.setattr(unidiff.launch, "resolve_precision", pretend)
    seen.clear()
    out = tmp_path / "bf16.npz"
    assert main(["sample", str(run), "--task", "class_to_image", "-n", "2", "--steps", "2", "--out", str(out)]) == 0
    assert asked == [("auto", "cpu")]  # the run's train.mixed_precision (every config: auto), this device
    assert "precision: bf16 (pretend: bf16 units)" in capsys.readouterr().out
    assert seen and all(enabled and dtype == torch.bfloat16 for enabled, dtype in seen)
    arrays = _load(out)
    assert arrays["images"].dtype == np.uint8 and arrays["images"].shape == (2, 8, 8, 1)
    assert json.loads(out.with_suffix(".json").read_text())["precision"]["reason"] == "pretend: bf16 units"
