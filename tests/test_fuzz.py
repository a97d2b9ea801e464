"""Bounded property tests (hypothesis, derandomized) of config overrides and CLI arguments: any
rejection is one ``unidiff: error:`` line naming the key or argument, exit code 2, no traceback,
and nothing written (issue 13; README "What survives what"). Accepted overrides go through
``train --dry-run``, which writes nothing either. Few examples, so the suite stays fast."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from unidiff.cli import main
from unidiff.config import Config

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")


def _leaf_keys(node, prefix=""):
    for key in node:
        value = node[key] if not OmegaConf.is_missing(node, key) else None
        if OmegaConf.is_dict(value) and len(value):
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


KEYS = sorted(_leaf_keys(OmegaConf.structured(Config))) + [
    "modalities.0.weight", "modalities.0.name", "modalities.0.kind", "modalities.0.options.num_classes",
    "model.backbone.num_heads", "model.backbone.hidden_size", "train.stepz", "nope.key"]
VALUES = ["inf", "-inf", "nan", ".inf", "-1", "0", "1", "3", "1e9", "1000000000000", "4294967296", "0.5", "''", "..",
          "/", "no", "yes", "null", "${nope}", "[1,2]", "{a: 1}", "x", "true", "-0.0", "[", "'a/b'"]
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _named(line: str, keys) -> bool:
    """The error line names one of the overridden keys (``modalities.0.x`` is ``modalities[0].x``),
    or at least the section it sits in."""
    for key in keys:
        parts = key.split(".")
        bracketed = ".".join(parts).replace(".0.", "[0].").replace(".0", "[0]")
        if key in line or bracketed in line or parts[0] in line:
            return True
    return False


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(VALUES)), min_size=1, max_size=3))
def test_config_overrides_are_accepted_or_one_line(workdir, capsys, pairs):
    overrides = [f"{k}={v}" for k, v in pairs]
    rc = main(["train", DEBUG, "--dry-run", *overrides])
    out, err = capsys.readouterr()
    assert rc in (0, 2), (overrides, err)
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("unidiff: error: "), (overrides, err)
        assert _named(lines[0], [k for k, _ in pairs]), (overrides, lines[0])
    assert "Traceback" not in err
    assert os.listdir(workdir) == [], overrides  # dry-run or rejected: nothing written


# Values bad on their own (a too-large --steps needs the run: test_cli.py checks it against it).
FLAGS = {"--steps": ["0", "-3", "x", "1e3"], "--guidance": ["inf", "nan", "-1", "x", "1e309"],
         "--classifier-scale": ["inf", "-0.5", "nan"], "--seed": ["-1", "4294967296", "1.5", "x"],
         "-n": ["0", "-1", "x"], "--sampler": ["euler", ""], "--labels": ["", "a", "1,,x"], "--out": ["x.png", "x"]}


@settings(SETTINGS, max_examples=30)
@given(st.sampled_from(sorted(FLAGS)).flatmap(lambda f: st.tuples(st.just(f), st.sampled_from(FLAGS[f]))))
def test_bad_sample_arguments_are_one_line_naming_the_argument(workdir, capsys, flag_value):
    flag, value = flag_value
    argv = ["sample", "no_such_run", f"{flag}={value}"] + ([] if flag == "--out" else ["--out", "o.npz"])
    rc = main(argv)
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("unidiff: error: "), (argv, err)
    assert flag.lstrip("-") in lines[0] or ".npz" in lines[0], (argv, lines[0])
    assert os.listdir(workdir) == []
