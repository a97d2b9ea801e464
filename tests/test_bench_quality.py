"""benchmarks/bench_quality.py end to end on a tiny Fashion-MNIST-format fixture (seconds budget)."""

import gzip
import importlib.util
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_quality.py"


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file as the format describes it (magic 0,0,0x08,ndim; big-endian int32 dims; uint8 data), gzipped."""
    head = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(f"{path}.gz", "wb") as f:
        f.write(head + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def _fixture(root: Path, n_train: int = 60, n_test: int = 40) -> None:
    """Tiny Fashion-MNIST: 28x28 uint8 images whose class is a bright band at a class-dependent row."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, y in enumerate(labels):
            images[i, 2 * y + 4: 2 * y + 7, 4:24] = 230
        _write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)


def test_bench_quality_end_to_end_schema_and_matched_sizes(tmp_path):
    _fixture(tmp_path / "fm")
    out = tmp_path / "q.json"
    proc = _run(["--minutes", "0.02", "--samples", "20", "--steps", "2", "--batch-size", "8",
                 "--reference-steps", "5", "--read-n", "20", "--sample-batch", "20", "--root", str(tmp_path / "fm"),
                 "--read-at", "0x1", "5x3", "--also-sample", "dpm:2", "ddim:3", "ddim:3:clip", "ddim:3:noclip",
                 "--cache-dir", str(tmp_path / "cache"), "--work", str(tmp_path / "work"), "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert json.loads(proc.stdout) == res  # stdout and the file carry the same JSON
    assert set(res) >= {"machine", "settings", "reference", "candidates", "margins_vs_unidiff", "target"}
    assert res["settings"]["samples"] == 20 and res["settings"]["test_items"] == 40 and res["machine"]["threads"] == 1
    assert set(res["candidates"]) == {"unidiff", "unidiff_attn", "unet", "dit"}
    for name, c in res["candidates"].items():
        assert c["steps"] >= 1 and c["train_seconds"] > 0 and c["sampling_seconds"] > 0, name
        assert math.isclose(c["images_per_s"], c["steps"] * 8 / c["train_seconds"], rel_tol=1e-6), name
        assert 0.0 <= c["class_to_image_accuracy"] <= 1.0 and math.isfinite(c["fid"]) and c["fid"] >= 0, name
        assert 0 < c["params_active"] <= c["params_total"], name
        assert set(c["sampler_grid"]) == {"dpm:2", "ddim:3", "ddim:3:clip", "ddim:3:noclip"}, name  # every candidate
        for g in c["sampler_grid"].values():
            assert 0.0 <= g["class_to_image_accuracy"] <= 1.0 and math.isfinite(g["fid"]) and g["sampling_seconds"] > 0
        # DDIM's defaults: diffusers' scheduler clips x̂0 for the peers, unidiff's make_scheduler does not
        default = "ddim:3:noclip" if name.startswith("unidiff") else "ddim:3:clip"
        same = {k: c["sampler_grid"][default][k] for k in ("fid", "class_to_image_accuracy")}
        assert same == {k: c["sampler_grid"]["ddim:3"][k] for k in same}, name
    for name in ("unet", "dit"):  # an eps-model's x̂0 at high noise is far outside [-1, 1]: clipping changes it
        grid = res["candidates"][name]["sampler_grid"]
        assert grid["ddim:3:clip"]["fid"] != grid["ddim:3:noclip"]["fid"], name
    for name in ("unidiff", "unidiff_attn"):  # MoE: fewer active than total parameters; the read-out is there
        c = res["candidates"][name]
        assert c["params_active"] < c["params_total"] and c["image_to_label_n"] == 20
        assert 0.0 <= c["image_to_label_accuracy"] <= 1.0
        assert set(c["image_to_label_grid"]) == {"0x1", "5x3"}
        assert all(0.0 <= a <= 1.0 and a * 20 == round(a * 20) for a in c["image_to_label_grid"].values())  # of 20
    for name in ("unet", "dit"):
        assert res["candidates"][name]["params_active"] == res["candidates"][name]["params_total"]
        assert "image_to_label_accuracy" not in res["candidates"][name]
    # margins and target follow from the candidates' own figures
    ours = res["candidates"]["unidiff"]
    for peer, m in res["margins_vs_unidiff"].items():
        assert math.isclose(m["fid_difference"], res["candidates"][peer]["fid"] - ours["fid"], rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(m["accuracy_difference"], ours["class_to_image_accuracy"]
                            - res["candidates"][peer]["class_to_image_accuracy"], abs_tol=1e-12)
    t = res["target"]
    fid_ok = all(res["candidates"][p]["fid"] > ours["fid"] for p in ("unet", "dit"))
    acc_ok = all(res["candidates"][p]["class_to_image_accuracy"] < ours["class_to_image_accuracy"] for p in ("unet", "dit"))
    assert t["fid_lower_than_peers"] == fid_ok and t["accuracy_higher_than_peers"] == acc_ok
    assert t["met"] == (fid_ok and acc_ok and ours["image_to_label_accuracy"] >= 0.88)
    assert 0.0 <= res["reference"]["classifier_test_accuracy"] <= 1.0 and res["reference"]["fid_floor"] >= 0

    # The parameter counts, recounted here on freshly built models (p.numel()), not read from the JSON.
    import torch
    from unidiff.config import build_model, load_config, resolve_with_data
    from unidiff.data import build_datasets

    bench = _bench_module()
    cfg = load_config(str(REPO / "configs" / "fashion_joint_image_label.yaml"), [f"data.root={tmp_path / 'fm'}"])
    _, _, info = build_datasets(cfg.data)
    ours_n = sum(p.numel() for p in build_model(resolve_with_data(cfg, info), (1, 32, 32)).parameters())
    counts = {"unet": bench.build_unet(), "dit": bench.build_dit()}
    for name, model in counts.items():
        n = sum(p.numel() for p in model.parameters())
        assert n == res["candidates"][name]["params_total"], name
        assert 0.65 * ours_n <= n <= 1.35 * ours_n, (name, n, ours_n)
    assert res["candidates"]["unidiff"]["params_total"] == ours_n
    attn = load_config(str(REPO / "configs" / "fashion_joint_image_label.yaml"),
                       [f"data.root={tmp_path / 'fm'}", "model.backbone.pattern='*E**E**E'"])
    attn_model = build_model(resolve_with_data(attn, info), (1, 32, 32))
    assert sum(p.numel() for p in attn_model.parameters()) == res["candidates"]["unidiff_attn"]["params_total"]
    assert "M" not in attn_model.backbone.pattern and len(attn_model.backbone.pattern) == 8
    # The peers are the class-conditional models asked for: 11 label rows (10 classes + the null class).
    assert counts["unet"].class_embedding.num_embeddings == 11
    assert counts["dit"].transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 11
    assert isinstance(counts["dit"](torch.zeros(1, 1, 32, 32), timestep=torch.tensor([3]),
                                    class_labels=torch.tensor([10])).sample, torch.Tensor)


@pytest.mark.parametrize("args, needle", [
    (["--minutes", "0"], "--minutes"),
    (["--samples", "1"], "--samples"),
    (["--candidates", "unet", "unet"], "--candidates"),
    (["--candidates", "vae"], "--candidates"),
    (["--set", "model.backbone.no_such_key=1"], "no_such_key"),
    (["--reuse", "MISSING.json"], "MISSING.json"),
    (["--root", "MISSING"], "MISSING"),
    (["--read-at", "50x4", "fifty"], "'fifty'"),
    (["--read-at", "50x0"], "'50x0'"),
    (["--read-at", "1000x1"], "1000x1"),  # past the schedule's T: refused before any training
    (["--also-sample", "euler:20"], "'euler:20'"),
    (["--also-sample", "dpm:0"], "'dpm:0'"),
    (["--also-sample", "dpm:20:clip"], "'dpm:20:clip'"),  # DPM-Solver++ has no clip_sample
    (["--also-sample", "ddim:20:clamp"], "'ddim:20:clamp'"),
    (["--also-sample", "ddim:20:"], "'ddim:20:'"),
])
def test_bench_quality_bad_input_is_one_line_and_writes_nothing(tmp_path, args, needle):
    out = tmp_path / "q.json"
    proc = _run([*args, "--out", str(out), "--cache-dir", str(tmp_path / "cache")], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench_quality: error: ") and needle in lines[0]
    assert not out.exists() and not (tmp_path / "cache").exists()


TINY = ["--minutes", "0.01", "--samples", "10", "--steps", "2", "--batch-size", "8",
        "--reference-steps", "5", "--read-n", "10", "--sample-batch", "10"]


def test_bench_quality_reuses_an_earlier_runs_peers_under_the_same_settings(tmp_path):
    """A peers-only run, then unidiff alone with --reuse: the result pairs the two, the margins are
    computed from the reused peer's own figures, and the unidiff override is applied and recorded."""
    _fixture(tmp_path / "fm")
    common = [*TINY, "--root", str(tmp_path / "fm"), "--cache-dir", str(tmp_path / "cache"),
              "--sampler", "dpm", "--precision", "bf16"]
    peers = tmp_path / "peers.json"
    proc = _run([*common, "--candidates", "unet", "--out", str(peers)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads(peers.read_text())
    assert set(first["candidates"]) == {"unet"} and first["target"] is None and first["margins_vs_unidiff"] == {}

    out = tmp_path / "q.json"
    proc = _run([*common, "--candidates", "unidiff", "--set", "model.backbone.patch_size=4", "--set", "train.batch_size=4",
                 "--reuse", str(peers),
                 "--work", str(tmp_path / "work"), "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["candidates"]) == {"unidiff", "unet"}
    unet, ours = res["candidates"]["unet"], res["candidates"]["unidiff"]
    assert unet["reused_from"] == str(peers.resolve())
    assert {k: v for k, v in unet.items() if k != "reused_from"} == first["candidates"]["unet"]
    assert math.isclose(res["margins_vs_unidiff"]["unet"]["fid_difference"], first["candidates"]["unet"]["fid"] - ours["fid"],
                        rel_tol=1e-9, abs_tol=1e-9)
    assert res["target"]["peers"] == ["unet"]
    assert res["settings"]["unidiff_overrides"] == ["model.backbone.patch_size=4", "train.batch_size=4"]
    # A batch lever: images/s counts the 4 images of each step it trained, not the bench's --batch-size 8.
    assert ours["steps"] > 0 and math.isclose(ours["images_per_s"], ours["steps"] * 4 / ours["train_seconds"], rel_tol=1e-6)
    # The override reached the model: the run folder's config has patch 4 (1x32x32 -> 64 tokens).
    from unidiff.checkpoint import load_model
    assert load_model(tmp_path / "work" / "unidiff", "cpu").backbone.patch_size == 4
    # The sampler and the precision asked of every candidate: recorded, and the unidiff run trained at it.
    assert res["settings"]["sampler"] == first["settings"]["sampler"] == "dpm"
    assert res["machine"]["precision"] == first["machine"]["precision"] == "bf16"
    assert json.loads((tmp_path / "work" / "unidiff" / "precision.json").read_text())["mixed_precision"] == "bf16"


def test_bench_quality_refuses_to_reuse_a_run_made_under_other_settings(tmp_path):
    _fixture(tmp_path / "fm")
    common = [*TINY, "--root", str(tmp_path / "fm"), "--cache-dir", str(tmp_path / "cache")]
    peers = tmp_path / "peers.json"
    assert _run([*common, "--candidates", "unet", "--precision", "fp32", "--out", str(peers)], tmp_path).returncode == 0
    out = tmp_path / "q.json"
    other = {"settings.steps": [a if a != "2" else "3" for a in common] + ["--precision", "fp32"],  # --steps 3, not 2
             "settings.sampler": [*common, "--sampler", "dpm", "--precision", "fp32"],
             "machine.precision": [*common, "--precision", "bf16"]}
    for key, args in other.items():
        proc = _run([*args, "--candidates", "unidiff", "--reuse", str(peers), "--out", str(out)], tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and key in lines[0] and str(peers) in lines[0], (key, lines)
        assert not out.exists()


def test_unidiff_recipe_is_read_off_the_config_it_trained_with(tmp_path):
    # the recipe string in the JSON used to be a fixed text whatever --set changed
    bench = _bench_module()
    args = bench.parse_args(["--set", "train.lr=0.0025", "--set", "diffusion.p_drop=0.2", "--set",
                             "model.backbone.patch_size=2", "--root", str(tmp_path)])
    cfg = bench.unidiff_config(args, "unidiff", tmp_path / "run", 400)
    recipe = bench.unidiff_recipe(cfg)
    for part in ("lr 0.0025", "p_drop 0.2", "patch 2", "over 400 steps", "warm-up 40"):
        assert part in recipe, (part, recipe)
    plain = bench.unidiff_recipe(bench.unidiff_config(bench.parse_args(["--root", str(tmp_path)]), "unidiff",
                                                      tmp_path / "run", 400))
    assert "lr 0.0025" not in plain and "p_drop 0.5" in plain and "patch 4" in plain  # the config's own values


def test_bench_quality_a_fixed_step_lever_trains_that_count_without_a_budget(tmp_path):
    """--set train.steps=N: the run trains exactly N steps (read back from the run folder's log),
    with no time budget in its config, its seconds still counted by the bench's clock."""
    _fixture(tmp_path / "fm")
    out = tmp_path / "q.json"
    proc = _run([*TINY, "--root", str(tmp_path / "fm"), "--cache-dir", str(tmp_path / "cache"), "--candidates", "unidiff",
                 "--set", "train.steps=3", "--work", str(tmp_path / "work"), "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = json.loads(out.read_text())["candidates"]["unidiff"]
    assert ours["steps"] == 3 and 0 < ours["train_seconds"] <= ours["train_wall_seconds"] * 2 + 1
    assert "steps 0->3" in proc.stderr and "time budget" not in proc.stderr
    assert "over 3 steps" in ours["recipe"]


def test_bench_quality_trains_unidiff_and_a_peer_for_the_same_budget_by_the_same_clock(tmp_path):
    """unidiff's own loop stops on the bench's budget (train.budget_minutes of --clock), as the peers'
    loop does: both spend at least the budget and overrun it by at most about one step."""
    _fixture(tmp_path / "fm")
    out = tmp_path / "q.json"
    budget = 0.05 * 60
    proc = _run([*TINY[:1], "0.05", *TINY[2:], "--root", str(tmp_path / "fm"), "--cache-dir", str(tmp_path / "cache"),
                 "--candidates", "unidiff", "unet", "--work", str(tmp_path / "work"), "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["candidates"]
    for name in ("unidiff", "unet"):
        c = res[name]
        per_step = c["train_seconds"] / c["steps"]
        assert budget <= c["train_seconds"] <= budget + 3 * per_step + 0.5, (name, c["train_seconds"], c["steps"])
    assert "time budget: 0.05 min of cpu time" in proc.stderr
    assert "over the 0.05-min cpu budget" in res["unidiff"]["recipe"]
    state = json.loads(next((tmp_path / "work" / "unidiff" / "checkpoints").glob("step_*/train_state.json")).read_text())
    assert state["train"]["step"] == res["unidiff"]["steps"] and state["train"]["spent"] >= budget


def test_bench_clip_switch_clips_unidiffs_x0_and_none_keeps_its_default_off(tmp_path):
    """sample_unidiff's clip: True clips DDIM's x̂0 to [-1, 1] (diffusers' clip_sample), so a model
    whose x̂0 leaves [-1, 1] samples otherwise; False is unidiff's default (None)."""
    import torch
    from unidiff.config import build_model, load_config, resolve_with_data
    from unidiff.data import build_datasets

    _fixture(tmp_path / "fm")
    bench = _bench_module()
    args = bench.parse_args(["--root", str(tmp_path / "fm"), "--sample-batch", "4", "--precision", "fp32"])
    cfg = load_config(str(REPO / "configs" / "fashion_joint_image_label.yaml"), [f"data.root={tmp_path / 'fm'}"])
    _, _, info = build_datasets(cfg.data)
    cfg = resolve_with_data(cfg, info)
    torch.manual_seed(0)
    model = build_model(cfg, (1, 32, 32)).eval()
    with torch.no_grad():  # weights far from an x̂0 model's: outputs well outside [-1, 1]
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    labels = torch.arange(4)
    runs = {clip: bench.sample_unidiff(args, model, cfg, labels, "ddim", 3, clip) for clip in (None, False, True)}
    assert torch.equal(runs[None], runs[False])
    assert (runs[True] - runs[None]).abs().max() > 1e-3
