"""The start-up thread count (unidiff/runtime.py): the rule on injected cores, loads and
environments; the explicit request and OMP_NUM_THREADS win; never below 1; apply_threads sets
torch's count only when it decided it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unidiff import runtime
from unidiff.errors import ConfigError
from unidiff.runtime import apply_threads, choose_threads, omp_num_threads

NO_ENV = {}


@pytest.mark.parametrize(
    "cores,load,want",
    [
        (2, 0.0, 2),  # idle: every core
        (2, 0.05, 2),  # an idle machine's background load is not a neighbour
        (2, 0.1, 2),
        (2, 0.15, 1),  # someone holds part of a core: leave it
        (2, 0.4, 1),
        (2, 1.0, 1),
        (2, 1.9, 1),
        (2, 7.5, 1),  # overloaded: never below one
        (16, 0.0, 16),
        (16, 3.2, 12),  # 16 - 4 busy cores
        (16, 4.0, 12),
        (16, 4.05, 12),
        (16, 4.2, 11),
        (1, 0.0, 1),
        (4, 50.0, 1),
    ],
)
def test_rule_leaves_the_busy_cores(cores, load, want):
    n, reason = choose_threads(environ=NO_ENV, cores=cores, load=load)
    assert n == want
    assert reason == f"{cores} cores, load {load:.2f}"


def test_negative_or_unknown_load():
    assert choose_threads(environ=NO_ENV, cores=4, load=-1.0)[0] == 4  # a bogus reading is no load
    n, reason = choose_threads(environ=NO_ENV, cores=3, load=float("nan"))
    assert (n, reason) == (3, "3 cores, load unknown")


def test_explicit_request_wins_over_everything():
    env = {"OMP_NUM_THREADS": "5"}
    assert choose_threads(3, environ=env, cores=2, load=9.0) == (3, "requested")
    assert choose_threads(8, environ=NO_ENV, cores=2, load=0.0) == (8, "requested")  # may exceed the cores


def test_omp_num_threads_wins_over_the_load():
    assert choose_threads(environ={"OMP_NUM_THREADS": "2"}, cores=2, load=1.9) == (2, "OMP_NUM_THREADS=2")
    assert choose_threads(environ={"OMP_NUM_THREADS": " 4,2 "}, cores=2, load=0.0) == (4, "OMP_NUM_THREADS=4")


@pytest.mark.parametrize("raw", ["", "  ", "zero", "0", "-2", "1.5"])
def test_unusable_omp_num_threads_is_ignored(raw):
    assert omp_num_threads({"OMP_NUM_THREADS": raw}) is None
    assert choose_threads(environ={"OMP_NUM_THREADS": raw}, cores=2, load=1.5) == (1, "2 cores, load 1.50")


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_request_is_a_config_error_naming_the_key(bad):
    with pytest.raises(ConfigError, match=r"run\.threads"):
        choose_threads(bad, key="run.threads")


def test_machine_readings_are_injected_when_not_given(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert choose_threads() == (1, "3 cores, load 1.20")
    assert runtime.available_cores() == 3


def test_load_falls_back_to_proc_loadavg(monkeypatch, tmp_path):
    def no_loadavg():
        raise OSError("unavailable")

    monkeypatch.setattr(os, "getloadavg", no_loadavg)
    fake = tmp_path / "loadavg"
    fake.write_text("0.75 0.50 0.25 2/100 1234\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(fake if path == "/proc/loadavg" else path, *a, **k))
    assert runtime.load_average() == 0.75


def test_no_affinity_call_uses_cpu_count(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert runtime.available_cores() == 1  # unknown: one core, never zero


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_apply_sets_torch_and_says_why(restore_threads, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    assert apply_threads(environ=NO_ENV, cores=2, load=1.9) == "threads: 1 (2 cores, load 1.90)"
    assert apply_threads(2, environ={"OMP_NUM_THREADS": "1"}) == "threads: 2 (requested)"
    assert calls == [1, 2]


def test_apply_leaves_torch_alone_under_omp_num_threads(restore_threads, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    assert apply_threads(environ={"OMP_NUM_THREADS": "3"}, cores=2, load=0.0) == "threads: 3 (OMP_NUM_THREADS=3)"
    assert calls == []


def test_apply_really_sets_the_count(restore_threads):
    apply_threads(1, environ=NO_ENV)
    assert torch.get_num_threads() == 1


def test_importing_the_module_does_not_import_torch():
    # The CLI imports it at start-up, before it knows whether the command needs torch.
    code = "import sys, unidiff.runtime; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == "False"


def test_cli_applies_its_thread_choice_and_rejects_a_bad_run_threads(capsys, monkeypatch):
    """The CLI decides before any torch work (stderr stays the one-line error channel); a bad
    run.threads is a config error at load."""
    from unidiff.cli import main

    cfg = str(Path(__file__).resolve().parents[1] / "configs" / "debug.yaml")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["train", cfg, "--dry-run"]) == 0
    assert runtime.last_threads() == "threads: 1 (OMP_NUM_THREADS=1)"
    assert capsys.readouterr().err == ""
    assert main(["train", cfg, "run.threads=0", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["unidiff: error: run.threads: must be a positive integer or null, got 0"]
