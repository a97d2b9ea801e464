"""Faults of days-long runs, each injected (issue 13, the training-state half).

Preemption (SIGTERM/SIGINT to a real ``unidiff train`` process), bit rot / truncation / deletion
of checkpoint files, crafted pickles in a copied run folder, non-finite losses and weights, and
reruns that try to change the run under a checkpoint. The oracle is always an uninterrupted,
undamaged run of the same config: what survives a fault must be bitwise what that run computes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from unidiff import checkpoint as ckpt
from unidiff.cli import main
from unidiff.config import load_config
from unidiff.diffusion import MultiModalDiffusion
from unidiff.errors import CheckpointError
from unidiff.train import TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs/debug.yaml"
STEPS = 12
# constant LR after one warm-up step (so train.steps does not shape the schedule), EMA decay < 1
# so that the EMA state must survive too, every step logged. One thread in every process: the
# in-process oracle and the CLI subprocesses must sum in the same order for bitwise equality (with
# the CLI's load-based choice they did only when the machine's load happened to agree).
BASE = ("train.sample_every=0", "train.log_every=1", "train.ema_decay=0.5", "train.weight_decay=0.1", "run.threads=1")


def _args(run_dir: Path, *overrides: str):
    return [f"run.dir={run_dir}", f"train.steps={STEPS}", *BASE, *overrides]


def _cfg(run_dir: Path, *overrides: str):
    return load_config(DEBUG, _args(run_dir, *overrides))


def _tensors(path: Path):
    return load_file(str(path))


def _assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _errors(capsys):
    """The ``unidiff: error:`` lines the CLI printed (stderr also carries the progress bar)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("unidiff: error:")]


def _log(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The oracle: STEPS uninterrupted steps, a checkpoint every 2 steps, all kept."""
    return train(_cfg(tmp_path_factory.mktemp("straight") / "run", "train.ckpt_every=2", "train.keep_last=100"))


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


class _Payload:
    """A pickle that creates a folder when unpickled: proof that a file ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


# --- preemption -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_exits_and_the_rerun_is_bitwise_the_straight_run(tmp_path, straight, sig):
    run = tmp_path / "run"
    # ckpt_every beyond the run: the only checkpoint before the end is the signal's.
    args = ["train", str(DEBUG), *_args(run, "train.ckpt_every=1000")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "unidiff.cli", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not ((run / "log.jsonl").is_file() and len((run / "log.jsonl").read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(sig)
        t0 = time.time()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err
    assert time.time() - t0 < 60  # bounded: one step and one checkpoint
    stopped = _log(run)[-1]["step"]
    assert 2 <= stopped < STEPS
    last = err.strip().splitlines()[-1]
    assert f"{signal.Signals(sig).name} at step {stopped}: checkpoint {ckpt.step_dir_name(stopped)} written" in last
    assert ckpt.step_of(ckpt.latest(run / "checkpoints")) == stopped
    assert not (run / "model").exists()

    resumed = train(load_config(DEBUG, _args(run, "train.ckpt_every=1000")))  # the same command again
    _assert_same_tensors(_tensors(straight / "model" / "diffusion_pytorch_model.safetensors"),
                         _tensors(resumed / "model" / "diffusion_pytorch_model.safetensors"))
    final = ckpt.step_dir_name(STEPS)
    _assert_same_tensors(_tensors(straight / "checkpoints" / final / "model.safetensors"),
                         _tensors(resumed / "checkpoints" / final / "model.safetensors"))
    assert [r["loss"] for r in _log(resumed)] == [r["loss"] for r in _log(straight)]


def test_signal_handlers_are_restored_after_training(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    train(load_config(DEBUG, [f"run.dir={tmp_path / 'r'}", "train.steps=1", "train.sample_every=0"]))
    assert {s: signal.getsignal(s) for s in before} == before


def test_save_fsyncs_every_file_before_the_rename_that_publishes_it(tmp_path, monkeypatch):
    from accelerate import Accelerator

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    acc = Accelerator(cpu=True)
    acc.prepare(nn.Linear(2, 2), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    final = ckpt.save_checkpoint(acc, tmp_path, 3, keep_last=2)
    publish = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final))
    tmp = events[publish][1]
    synced = {e[1] for e in events[:publish] if e[0] == "fsync"}
    files = [p.relative_to(final) for p in final.rglob("*") if p.is_file()]
    assert {"model.safetensors", ckpt.MANIFEST, ckpt.DONE} <= {str(f) for f in files}
    for f in files:
        assert str(Path(tmp) / f) in synced, f


# --- bit rot, truncation, deletion ----------------------------------------------------------------
def _damage(path: Path, how: str) -> None:
    if how == "flip":
        data = bytearray(path.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()


@pytest.mark.parametrize("how,why", [("flip", "checksum mismatch"), ("truncate", "bytes, the manifest says"),
                                     ("delete", "missing")])
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", ckpt.EMA_FILE])
def test_a_damaged_latest_checkpoint_is_reported_and_skipped(tmp_path, straight, name, how, why):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        shutil.copytree(straight / "checkpoints" / ckpt.step_dir_name(step), root / ckpt.step_dir_name(step))
    _damage(root / "step_000004" / name, how)
    good, damaged = ckpt.scan(root)
    assert good.name == "step_000002"
    assert [(p.name, w.split(":")[0]) for p, w in damaged] == [("step_000004", name)]
    assert why in damaged[0][1]
    seen = []
    assert ckpt.latest(root, report=seen.append).name == "step_000002"
    assert seen == [f"checkpoint step_000004 is damaged ({damaged[0][1]}); skipped"]
    assert (root / "step_000004").is_dir()  # reported, never deleted
    with pytest.raises(CheckpointError, match="damaged"):
        ckpt.load_checkpoint(None, root / "step_000004")


def test_resume_skips_a_damaged_checkpoint_bitwise_and_keeps_it(tmp_path, straight, capsys):
    run = _copy(straight, tmp_path / "run")
    shutil.rmtree(run / "model")
    for p in (run / "checkpoints").iterdir():
        if ckpt.step_of(p) > 4:
            shutil.rmtree(p)
    _damage(run / "checkpoints" / "step_000004" / "model.safetensors", "flip")
    capsys.readouterr()
    train(_cfg(run, "train.ckpt_every=2", "train.keep_last=2"), stop_at=6)
    out = capsys.readouterr().out
    assert ("checkpoint step_000004 is damaged (model.safetensors: checksum mismatch; kept as "
            "step_000004.damaged); resuming from step_000002") in out
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_000004", "step_000004.damaged", "step_000006"]  # pruned step_000002 only
    for f in ("model.safetensors", ckpt.EMA_FILE):
        _assert_same_tensors(_tensors(straight / "checkpoints" / "step_000006" / f),
                             _tensors(run / "checkpoints" / "step_000006" / f))


@pytest.mark.parametrize("how,why", [("flip", "checksum mismatch"), ("truncate", "bytes, the manifest says"),
                                     ("delete", "missing")])
def test_a_damaged_model_export_is_refused_by_load_model_and_the_cli(tmp_path, straight, capsys, how, why):
    run = _copy(straight, tmp_path / "run")
    _damage(run / "model" / "diffusion_pytorch_model.safetensors", how)
    with pytest.raises(CheckpointError, match=f"diffusion_pytorch_model.safetensors: .*{why}"):
        ckpt.load_model(run)
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "is damaged" in err[0] and err[0].startswith("unidiff: error: ")


def test_the_model_export_manifest_lists_every_file(straight):
    manifest = json.loads((straight / "model" / ckpt.MANIFEST).read_text())["files"]
    assert set(manifest) == {p.name for p in (straight / "model").iterdir()} - {ckpt.MANIFEST}
    import hashlib

    for rel, entry in manifest.items():
        data = (straight / "model" / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# --- untrusted run folders ------------------------------------------------------------------------
def _extend(run: Path):
    return ["train", str(DEBUG), *_args(run, f"train.steps={STEPS + 2}")]


@pytest.mark.parametrize("kind", ["custom_checkpoint", "optimizer", "random_states", "stray"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_without_running(tmp_path, straight, capsys, kind):
    run = _copy(straight, tmp_path / "run")
    marker = tmp_path / "pwned"
    last = run / "checkpoints" / ckpt.step_dir_name(STEPS)
    name = {"custom_checkpoint": "custom_checkpoint_0.pkl", "optimizer": "optimizer.bin",
            "random_states": "random_states_0.pkl", "stray": "extra.pt"}[kind]
    torch.save(_Payload(marker), last / name)
    ckpt.write_manifest(last)  # an attacker rewrites the manifest too
    capsys.readouterr()
    assert main(_extend(run)) == 2
    err = _errors(capsys)
    assert len(err) == 1 and err[0].startswith("unidiff: error: checkpoint "), err
    assert (name in err[0]) or "cannot be loaded" in err[0]
    assert not marker.exists()
    if kind == "custom_checkpoint":
        assert "start a new run" in err[0]


def test_a_crafted_pickle_in_the_model_export_is_not_loaded(tmp_path, straight):
    run = _copy(straight, tmp_path / "run")
    marker = tmp_path / "pwned"
    (run / "model" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(_Payload(marker), run / "model" / "diffusion_pytorch_model.bin")
    ckpt.write_manifest(run / "model")
    with pytest.raises(CheckpointError):
        ckpt.load_model(run)
    assert not marker.exists()


def test_a_pickle_in_a_sample_inputs_file_is_not_loaded(tmp_path, straight, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "inputs.npz"
    with open(evil, "wb") as f:
        np.savez(f, labels=np.array([_Payload(marker)], dtype=object))
    assert main(["sample", str(straight), "--task", "class_to_image", "-n", "1", "--steps", "1",
                 "--inputs", str(evil), "--out", str(tmp_path / "out.npz")]) == 2
    assert "inputs.npz" in capsys.readouterr().err
    assert not marker.exists()


# --- non-finite values ----------------------------------------------------------------------------
def _poison(monkeypatch, micro_steps):
    """Make the objective's loss NaN on the given micro-steps (0-based count of forwards)."""
    calls = []
    original = MultiModalDiffusion.forward

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if not torch.is_grad_enabled():  # the CLI's preflight step (no_grad) is not a training micro-step
            return out
        calls.append(1)
        if len(calls) - 1 in micro_steps:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MultiModalDiffusion, "forward", forward)


def test_a_non_finite_step_is_skipped_and_changes_nothing(tmp_path, monkeypatch):
    _poison(monkeypatch, {2})  # the 3rd optimiser step
    run = train(load_config(DEBUG, [f"run.dir={tmp_path / 'r'}", "train.steps=5", *BASE, "train.ckpt_every=1",
                                    "train.keep_last=10"]))
    c = lambda s: run / "checkpoints" / ckpt.step_dir_name(s)  # noqa: E731
    # Nothing moved at step 3: live weights, EMA, optimiser moments, LR schedule position.
    for f in ("model.safetensors", ckpt.EMA_FILE):
        _assert_same_tensors(_tensors(c(2) / f), _tensors(c(3) / f))
    o2, o3 = (torch.load(c(s) / "optimizer.bin", weights_only=True) for s in (2, 3))
    for k, st in o2["state"].items():
        for name, v in st.items():
            assert torch.equal(v, o3["state"][k][name]), (k, name)
    s2, s3, s4 = (json.loads((c(s) / ckpt.STATE_FILE).read_text()) for s in (2, 3, 4))
    assert s3["lr_scheduler"] == s2["lr_scheduler"] and s3["ema"] == s2["ema"]
    assert {k: s3["train"][k] for k in ("step", "bad_steps", "bad_in_a_row")} == {"step": 3, "bad_steps": 1, "bad_in_a_row": 1}
    assert {k: s4["train"][k] for k in ("step", "bad_steps", "bad_in_a_row")} == {"step": 4, "bad_steps": 1, "bad_in_a_row": 0}
    # then training goes on
    flat = lambda s: torch.cat([v.flatten().float() for v in _tensors(c(s) / "model.safetensors").values()])  # noqa: E731
    assert not torch.equal(flat(3), flat(4))
    log = {r["step"]: r for r in _log(run)}
    assert "loss" not in log[3] and log[3]["bad_steps"] == 1
    assert all(np.isfinite(r["loss"]) for s, r in log.items() if s != 3)


def test_too_many_bad_steps_in_a_row_stop_the_run_in_one_line(tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, set(range(2, 100)))
    run = tmp_path / "r"
    capsys.readouterr()
    assert main(["train", str(DEBUG), f"run.dir={run}", "train.steps=10", *BASE, "train.ckpt_every=1",
                 "train.keep_last=10", "train.max_bad_steps=3"]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "3 optimiser steps in a row" in err[0] and "stopped at step 5" in err[0], err
    steps = [ckpt.step_of(p) for p in ckpt.complete_checkpoints(run / "checkpoints")]
    assert steps == [1, 2, 3, 4]
    for s in steps:  # every checkpoint is finite
        w = _tensors(run / "checkpoints" / ckpt.step_dir_name(s) / "model.safetensors")
        assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())


def test_non_finite_weights_are_never_checkpointed_and_the_lr_cannot_be_swapped_under_them(
        tmp_path, monkeypatch, capsys):
    # A step with a finite loss and gradient whose update overflows (injected: the 3rd optimiser
    # update leaves NaN in one weight).
    calls = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run = tmp_path / "r"
    args = [f"run.dir={run}", "train.steps=6", *BASE, "train.ckpt_every=1", "train.keep_last=1"]
    with pytest.raises(TrainingDiverged, match="weights are not finite at step 3: not checkpointed; the last "
                                               "finite checkpoint is step_000002"):
        train(load_config(DEBUG, args))
    # never written, and pruning (keep_last=1) kept the last finite one
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000002"]
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    capsys.readouterr()
    assert main(["train", str(DEBUG), *args, "train.lr=1e-4"]) == 2  # a "saner" lr is a new run
    assert "train.lr" in capsys.readouterr().err


def test_a_huge_learning_rate_stops_the_run_with_finite_checkpoints(tmp_path, capsys):
    run = tmp_path / "r"
    capsys.readouterr()
    assert main(["train", str(DEBUG), f"run.dir={run}", "train.steps=20", *BASE, "train.ckpt_every=1",
                 "train.keep_last=100", "train.lr=1e30", "train.max_bad_steps=2"]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "2 optimiser steps in a row" in err[0], err
    for p in ckpt.complete_checkpoints(run / "checkpoints"):
        w = _tensors(p / "model.safetensors")
        assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())


# --- resume keeps the run honest ------------------------------------------------------------------
@pytest.mark.parametrize("override", ["train.lr=0.01", "train.batch_size=16", "run.seed=1", "train.grad_accum=2",
                                      "diffusion.num_train_timesteps=50", "train.lr_schedule=cosine"])
def test_a_rerun_cannot_change_what_the_run_computes(tmp_path, straight, capsys, override):
    run = _copy(straight, tmp_path / "run")
    before = (run / "config.yaml").read_bytes()
    listing = sorted(p.name for p in run.rglob("*"))
    capsys.readouterr()
    assert main(["train", str(DEBUG), *_args(run), override]) == 2
    err = _errors(capsys)
    key = override.split("=")[0]
    assert len(err) == 1 and err[0].startswith(f"unidiff: error: {key}=") and "start a new run" in err[0], err
    assert (run / "config.yaml").read_bytes() == before
    assert sorted(p.name for p in run.rglob("*")) == listing


def test_a_finished_run_cannot_be_shortened(tmp_path, straight, capsys):
    run = _copy(straight, tmp_path / "run")
    before = (run / "config.yaml").read_bytes()
    assert main(["train", str(DEBUG), *_args(run, "train.steps=6")]) == 2
    assert f"train.steps=6 is below step {STEPS}" in capsys.readouterr().err
    assert (run / "config.yaml").read_bytes() == before


def test_allowed_changes_are_appended_to_the_config_history(tmp_path, straight):
    run = _copy(straight, tmp_path / "run")
    before = (run / "config.yaml").read_text()
    (run / "metrics.json").write_text('{"fid": 1.0}\n')
    train(load_config(DEBUG, [*_args(run), "train.log_every=2"]))  # same steps: nothing to train
    assert (run / "metrics.json").is_file()  # the model did not change: still its metrics
    train(load_config(DEBUG, [*_args(run, f"train.steps={STEPS + 2}"), "train.log_every=2"]))
    text = (run / "config.yaml").read_text()
    assert text.startswith(before)  # only ever appended to
    added = text[len(before):].splitlines()
    assert len(added) == 2 and all(line.startswith("# ") for line in added)
    # (the copy moved run.dir, and keep_last is the debug config's again: allowed, recorded)
    assert "steps 12->12; changed run.dir: " in added[0] and "train.log_every: 1 -> 2" in added[0]
    assert f"steps 12->{STEPS + 2}; changed run.dir: " in added[1]
    assert "train.log_every: 1 -> 2" in added[1] and f"train.steps: 12 -> {STEPS + 2}" in added[1]
    assert load_config(run / "config.yaml").train.steps == STEPS  # the body is the first invocation's
    assert _log(run)[-1]["step"] == STEPS + 2
    # the model changed: the old metrics.json is set aside, never taken for this model's
    assert not (run / "metrics.json").exists()
    assert json.loads((run / "metrics.stale.json").read_text()) == {"fid": 1.0}
