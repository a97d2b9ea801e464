"""Tracking (unidiff/train.py's logging block): log.jsonl and TensorBoard hold every step once,
also after a run killed between two checkpoints is resumed; train.report_to is checked up front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unidiff import checkpoint as ckpt
from unidiff.config import load_config
from unidiff.errors import ConfigError
from unidiff.train import train, truncate_log

ROOT = Path(__file__).resolve().parents[1]


def _cfg(run_dir: Path, *overrides: str):
    return load_config(ROOT / "configs/debug.yaml", [f"run.dir={run_dir}", "train.sample_every=0", *overrides])


def _log_steps(run_dir: Path):
    return [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _tb_scalars(run_dir: Path, tag: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))  # the one event folder, every event file in it
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


class Killed(Exception):
    """Stands for SIGKILL: nothing after the raise runs (no checkpoint, no tracker close)."""


def test_resume_after_a_kill_between_checkpoints_logs_each_step_once(tmp_path, monkeypatch):
    run = tmp_path / "r"
    extra = ("train.steps=6", "train.ckpt_every=2", "train.log_every=1")
    real_save = ckpt.save_checkpoint

    def save_until_3(accelerator, root, step, *args, **kwargs):
        if step == 3:  # step 3 is logged (and flushed to TensorBoard), the next checkpoint is 4
            raise Killed()
        return real_save(accelerator, root, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", save_until_3)
    with pytest.raises(Killed):
        train(_cfg(run, *extra), stop_at=3)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    assert ckpt.step_of(ckpt.latest(run / "checkpoints")) == 2
    assert _log_steps(run) == [1, 2, 3]  # step 3 was logged by the killed process
    assert [s for s, _ in _tb_scalars(run, "loss")] == [1, 2, 3]

    train(_cfg(run, *extra))  # resume from step 2: step 3 runs again

    assert _log_steps(run) == [1, 2, 3, 4, 5, 6]
    tb = _tb_scalars(run, "loss")
    assert [s for s, _ in tb] == [1, 2, 3, 4, 5, 6]
    # and TensorBoard shows the resumed run's values, the ones log.jsonl holds (float32 in events)
    logged = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert [v for _, v in tb] == pytest.approx(logged, rel=1e-6)
    assert [p for p in (run / "tb").iterdir() if p.is_dir()] == []  # one event folder, no hparams subfolder
    assert (run / "curves.png").stat().st_size > 0  # the end-of-run curves


def test_truncate_log_keeps_earlier_steps_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "loss": 0.4}\n{"step": 4, "lo')
    truncate_log(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'
    truncate_log(path, 0)  # a run that starts over (no checkpoint) starts an empty log
    assert path.read_text() == ""


def test_report_to_rejects_unknown_and_uninstalled_trackers(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.report_to"):
        _cfg(tmp_path / "x", "train.report_to=[tensorbored]")
    from accelerate.tracking import get_available_trackers

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    missing = next((t for t in ("wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive") if t not in available), None)
    if missing is None:
        pytest.skip("every optional tracker is installed here")
    with pytest.raises(ConfigError, match=rf"train\.report_to: tracker '{missing}' is not installed"):
        train(_cfg(tmp_path / "y", f"train.report_to=[{missing}]"))
    assert not (tmp_path / "y").exists()  # rejected before the run folder is written


def test_report_to_empty_writes_only_the_jsonl_log(tmp_path):
    out = train(_cfg(tmp_path / "n", "train.steps=2", "train.ckpt_every=2", "train.report_to=[]"))
    assert _log_steps(out) == [1, 2]
    assert not (out / "tb").exists()
