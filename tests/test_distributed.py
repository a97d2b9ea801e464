"""Several processes: DDP over gloo on CPU, the launchers, and the precision rule
(unidiff/launch.py and the distributed parts of unidiff/train.py).

One 2-process launch (``torchrun --standalone --nproc_per_node 2`` of this very file, plain: no
``ACCELERATE_USE_CPU``, the launch that used to crash) serves most checks; its worker (``_worker``,
at the bottom) trains the debug config 2 steps, stops with a checkpoint, copies the run folder,
then resumes to 4 steps in the same 2 processes (every rank recording its live weights and buffers
after each optimiser step), and last trains for a 3-second time budget. Every file write a rank
makes under the runs folder is recorded too (a Python audit hook sees every ``open`` for writing,
``mkdir``, rename and removal made from Python; files written by native code, safetensors' and
``torch.save``'s zip writer, are not seen, which is why the rank-0-only writes are also checked by
the set of files in the run folder).

The one-process oracle is an ordinary ``train`` in this process. With the same global batch every
rank loads its rows of the one-process batch and keeps the same rows of the one-process noise,
timesteps and dropout (``unidiff.train.rank_draws``), so the two trajectories agree up to the
rounding of the gradient all-reduce (2 partial sums instead of one): losses to ``rtol=1e-5``,
weights to ``atol=1e-5`` (measured: ~1e-7 and ~6e-8). All runs are fp32 (``mixed_precision=no``):
the tolerance is an fp32 one, whatever ``auto`` picks on the machine running the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
BASE = ["train.sample_every=0", "train.mixed_precision=no", "train.steps=4", "train.ckpt_every=2",
        "train.log_every=1", "train.ema_decay=0.5"]
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5


def _cfg(run_dir: Path, *overrides: str):
    from unidiff.config import load_config

    return load_config(ROOT / "configs/debug.yaml", [f"run.dir={run_dir}", *BASE, *overrides])


def _env() -> dict:
    """This process's environment without any launcher's variables, plus the repo on the path."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "FSDP_")) and k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE",
                                                                        "RANK", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def _run(cmd, timeout=600, **env):
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, env={**_env(), **env}, capture_output=True, text=True,
                          timeout=timeout)


def _log(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _export(run_dir: Path):
    return load_file(str(run_dir / "model" / "diffusion_pytorch_model.safetensors"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The oracle: 4 uninterrupted steps in this process."""
    from unidiff.train import train

    return train(_cfg(tmp_path_factory.mktemp("one") / "run"))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 Path(__file__), root])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return root, ranks, proc.stdout


def _assert_logs_close(got, want, steps):
    got, want = {r["step"]: r for r in got}, {r["step"]: r for r in want}
    for step in steps:
        for key in ("loss", "image", "head/label", "grad_norm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=LOSS_RTOL), (step, key)


def _assert_weights_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=WEIGHT_ATOL, rtol=0, msg=k)


# --- DDP: trajectory, ranks in step, resume, writes, batch errors --------------------------------
def test_two_processes_follow_the_one_process_trajectory(one_process, two_processes):
    root, ranks, _ = two_processes
    two = root / "runs" / "p"
    assert [r["step"] for r in _log(two)] == [1, 2, 3, 4]
    _assert_logs_close(_log(two), _log(one_process), steps=(1, 2))  # before the stop: no resume involved
    # Rank 0's live weights and buffers after step 2 against the oracle's step-2 checkpoint.
    live = load_file(str(one_process / "checkpoints" / "step_000002" / "model.safetensors"))
    _assert_weights_close({f"model.{k}": v for k, v in ranks[0]["states"][1].items()}, live)


def test_ranks_hold_identical_weights_and_moe_biases(two_processes):
    _, ranks, _ = two_processes
    a, b = ranks[0]["states"], ranks[1]["states"]
    assert len(a) == len(b) == 4  # one record per optimiser step (2 + 2 after the resume)
    for step, (sa, sb) in enumerate(zip(a, b), start=1):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (step, k)  # bit-identical, buffers included
    biases = [k for k in a[-1] if k.endswith("e_score_correction_bias")]
    assert biases, "the debug preset has an MoE"
    # Not vacuous: the balancing moved the biases away from their zero start.
    assert any(a[-1][k].abs().sum() > 0 for k in biases)


def test_checkpoint_of_two_processes_resumed_by_two(one_process, two_processes):
    root, _, _ = two_processes
    two = root / "runs" / "p"
    _assert_logs_close(_log(two), _log(one_process), steps=(3, 4))
    _assert_weights_close(_export(two), _export(one_process))


def test_checkpoint_of_two_processes_resumed_by_one(one_process, two_processes):
    from unidiff import checkpoint as ckpt
    from unidiff.train import train

    root, _, _ = two_processes
    copy = root / "runs" / "q"  # the step-2 checkpoint written by the 2 processes
    assert ckpt.step_of(ckpt.latest(copy / "checkpoints")) == 2
    resumed = train(_cfg(copy))
    assert [r["step"] for r in _log(resumed)] == [1, 2, 3, 4]
    _assert_logs_close(_log(resumed), _log(one_process), steps=(3, 4))
    _assert_weights_close(_export(resumed), _export(one_process))


def test_only_rank_zero_writes(one_process, two_processes):
    root, ranks, stdout = two_processes
    rank0 = {Path(p).name for _, p in ranks[0]["writes"]}
    assert {"log.jsonl", "config.yaml", "precision.json"} <= rank0  # the hook sees rank 0's writes
    # Rank 1 writes its own RNG state into the checkpoint being assembled (accelerate's save_state:
    # one random_states_<rank>.pkl per process) and may create that folder; nothing else.
    for event, path in ranks[1]["writes"]:
        p = Path(path)
        assert p.name == "random_states_1.pkl" or (event == "os.mkdir" and p.name.endswith(".tmp")), (event, path)
        assert p.parent.name.endswith(".tmp") or p.name.endswith(".tmp"), path
    # The run folder holds what a one-process run holds, plus that RNG file.
    files = lambda d: {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and "tb" not in p.parts}  # noqa: E731
    extra = files(root / "runs" / "p") - files(one_process)
    assert extra == {f"checkpoints/step_00000{s}/random_states_1.pkl" for s in (2, 4)}
    assert stdout.count("training debug:") == 3  # printed once per invocation (2 + the budget's), by rank 0 only
    assert "2 process(es)" in stdout


def test_a_time_budget_stops_both_ranks_after_the_same_step(two_processes):
    from unidiff import checkpoint as ckpt

    root, ranks, _ = two_processes
    run = root / "runs" / "budget"
    state = json.loads((ckpt.latest(run / "checkpoints") / ckpt.STATE_FILE).read_text())["train"]
    assert ranks[0]["budget_steps"] == ranks[1]["budget_steps"] == state["step"] == _log(run)[-1]["step"] > 1
    assert state["spent"] >= 3.0 and (run / "model").is_dir()


def test_batch_the_processes_do_not_divide_is_a_clear_error(two_processes):
    root, ranks, _ = two_processes
    for rank in ranks:
        assert "train.batch_size=7" in rank["odd"] and "2 processes" in rank["odd"], rank["odd"]
    assert not (root / "runs" / "odd").exists()  # nothing half-written


@pytest.mark.parametrize("t_sampling", ["uniform", "logit_normal"])
def test_rank_draws_are_rows_of_the_objectives_own_draws(t_sampling):
    # Oracle: the objective's own draws from the same generator (its forward with nothing given).
    from unidiff.data import rank_rows
    from unidiff.train import build_objective, prepare_run, rank_draws

    cfg, train_set, _, _, model = prepare_run(_cfg(Path("/nonexistent")))
    objective = build_objective(cfg, model).eval()
    objective.p_drop = 0.5  # both outcomes of the dropout in 8 rows
    objective.t_sampling = t_sampling  # a multi-process run draws t as the objective does
    batch = train_set.batch(torch.arange(8))
    own = objective(batch, generator=torch.Generator().manual_seed(3))
    halves = [objective({k: v[rows] for k, v in batch.items()},
                        **rank_draws(objective, 8, batch["image"].shape[1:], batch["image"].dtype,
                                     torch.Generator().manual_seed(3), rows))
              for rows in (rank_rows(8, 0, 2), rank_rows(8, 1, 2))]
    assert torch.equal(torch.cat([h.t for h in halves]), own.t)
    for name in own.drop:
        assert torch.equal(torch.cat([h.drop[name] for h in halves]), own.drop[name])
    torch.testing.assert_close(torch.cat([h.per_sample for h in halves]), own.per_sample)


# --- launchers -----------------------------------------------------------------------------------
def test_launch_settings_of_each_launcher():
    from unidiff.errors import UnidiffError
    from unidiff.launch import launch_settings

    torchrun = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"}
    assert launch_settings({}, cuda=False) == (1, True, "cpu")
    assert launch_settings({}, cuda=True) == (1, False, "cuda")
    assert launch_settings(torchrun, cuda=False) == (2, True, "cpu")  # plain torchrun on CPU: gloo
    assert launch_settings(torchrun, cuda=True) == (2, False, "cuda")
    assert launch_settings({**torchrun, "ACCELERATE_USE_CPU": "true"}, cuda=True) == (2, True, "cpu")
    assert launch_settings({"OMPI_COMM_WORLD_SIZE": "4", "ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "h"},
                           cuda=False) == (4, True, "cpu")  # accelerate --cpu through mpirun
    # `accelerate launch --cpu --num_processes 2`: one process, MASTER_ADDR exported for the 2.
    with pytest.raises(UnidiffError, match="started 1 process.*torchrun --standalone --nproc_per_node N"):
        launch_settings({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
                        cuda=False)
    assert launch_settings({"ACCELERATE_USE_CPU": "True"}, cuda=False).world_size == 1  # --cpu alone is fine
    with pytest.raises(UnidiffError, match="FSDP.*only on GPUs"):
        launch_settings({**torchrun, "ACCELERATE_USE_FSDP": "true"}, cuda=False)
    assert launch_settings({**torchrun, "ACCELERATE_USE_FSDP": "true"}, cuda=True).world_size == 2


def test_accelerate_configs_load_with_accelerates_own_reader():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    from unidiff.models.backbone import Sublayer  # the wrap unit the FSDP config names

    ddp = load_config_from_file(str(ROOT / "configs/accelerate/ddp.yaml"))
    # MULTI_GPU is what makes `accelerate launch` start N processes (torchrun); use_cpu would start one.
    assert ddp.distributed_type == DistributedType.MULTI_GPU and not ddp.use_cpu and ddp.num_processes == 2
    fsdp = load_config_from_file(str(ROOT / "configs/accelerate/fsdp.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == Sublayer.__name__


@pytest.mark.slow  # two interpreter start-ups (~1 min on a loaded 2-core machine); the rule itself is tested above
def test_accelerate_launch_cpu_with_two_processes_is_refused(tmp_path):
    # accelerate 1.15's `--cpu` path (simple_launcher) starts ONE process whatever --num_processes says.
    run = tmp_path / "run"
    proc = _run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                 "--num_machines", "1", "-m", "unidiff.cli", "train", "configs/debug.yaml", f"run.dir={run}"])
    assert proc.returncode != 0
    assert "unidiff: error: `accelerate launch --cpu` started 1 process" in proc.stderr, proc.stderr[-2000:]
    assert not run.exists()


@pytest.mark.slow
def test_accelerate_launch_with_the_ddp_config_runs_two_processes_on_cpu(tmp_path, one_process):
    run = tmp_path / "run"
    proc = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/ddp.yaml",
                 "-m", "unidiff.cli", "train", "configs/debug.yaml", f"run.dir={run}", *BASE])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    _assert_logs_close(_log(run), _log(one_process), steps=(1, 2, 3, 4))


@pytest.mark.slow
def test_fsdp_config_on_cpu_is_refused_with_the_reason(tmp_path):
    # accelerate 1.15 (state.py) makes FSDP only of GPU-like distributed types; on CPU the launch is
    # MULTI_CPU and `prepare` returns a DistributedDataParallel: unidiff says so instead of running DDP.
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour; on GPUs see test_fsdp_on_gpus")
    run = tmp_path / "run"
    proc = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/fsdp.yaml",
                 "-m", "unidiff.cli", "train", "configs/debug.yaml", f"run.dir={run}", *BASE])
    assert proc.returncode != 0
    assert "unidiff: error: FSDP was requested" in proc.stderr, proc.stderr[-2000:]
    assert not run.exists()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP needs 2 CUDA devices: accelerate 1.15 runs FSDP "
                    "only on GPU-like devices (on CPU it silently falls back to DDP, which unidiff refuses)")
def test_fsdp_on_gpus(tmp_path):
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    for config, run in (("ddp", ddp), ("fsdp", fsdp)):
        proc = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                     f"configs/accelerate/{config}.yaml", "-m", "unidiff.cli", "train", "configs/debug.yaml",
                     f"run.dir={run}", *BASE, "train.steps=2", "train.mixed_precision=no"])
        assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_logs_close(_log(fsdp), _log(ddp), steps=(1, 2))
    _assert_weights_close(_export(fsdp), _export(ddp))


@pytest.mark.slow
def test_two_machines_on_this_host_train_resume_and_evaluate(tmp_path, one_process):
    # `accelerate launch --num_machines 2`: one launcher per "machine", here both on 127.0.0.1.
    run = tmp_path / "run"

    def both_machines(*overrides):
        port = _free_port()
        procs = [subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
             "--num_processes", "2", "--machine_rank", str(r), "--main_process_ip", "127.0.0.1",
             "--main_process_port", str(port), "--same_network", "-m", "unidiff.cli", "train",
             "configs/debug.yaml", f"run.dir={run}", *BASE, *overrides],
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
        outs = [p.communicate(timeout=600) for p in procs]
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]
        return outs

    both_machines("train.steps=4")
    _assert_logs_close(_log(run), _log(one_process), steps=(1, 2, 3, 4))
    both_machines("train.steps=6")  # the same command with more steps: resumes at step 4
    assert [r["step"] for r in _log(run)] == [1, 2, 3, 4, 5, 6]
    proc = _run([sys.executable, "-m", "unidiff.cli", "evaluate", run])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())


# --- precision -----------------------------------------------------------------------------------
def test_resolve_precision_rule(tmp_path):
    from unidiff.launch import cpu_flags, resolve_precision

    assert resolve_precision("auto", "cpu", flags={"avx2", "fma"})[0] == "no"
    assert resolve_precision("auto", "cpu", flags={"avx2", "amx_bf16", "amx_tile"})[0] == "bf16"
    # AVX512-BF16 without AMX: measured slower than fp32 end to end (BENCHMARKS.md), so fp32, and it says why
    choice, reason = resolve_precision("auto", "cpu", flags={"avx512f", "avx512_bf16"})
    assert choice == "no" and "avx512_bf16" in reason and "amx_bf16" in reason
    assert resolve_precision("auto", "cpu", flags={"avx512f"})[0] == "no"  # AVX-512 alone has no bf16 dot
    assert resolve_precision("auto", "cuda", cuda_bf16=True)[0] == "bf16"
    assert resolve_precision("auto", "cuda", cuda_bf16=False)[0] == "no"
    assert resolve_precision("auto", "mps")[0] == "no"
    for explicit in ("no", "bf16", "fp16"):  # an explicit choice is the user's, on any machine
        assert resolve_precision(explicit, "cpu", flags=set()) == (explicit, f"train.mixed_precision={explicit} in the config")
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "sse2", "avx2", "amx_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_auto_precision_is_recorded_and_printed(tmp_path, monkeypatch, capsys):
    # A CPU said to have AMX trains in bf16 under `auto` (the default of every config), and
    # the choice, with its reason, lands in the run folder and on stdout.
    from unidiff import launch as runtime
    from unidiff.config import load_config
    from unidiff.train import train

    if torch.cuda.is_available():
        pytest.skip("checks the CPU branch of the rule")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "avx512_bf16", "amx_bf16", "amx_tile"})
    cfg = load_config(ROOT / "configs/debug.yaml", [f"run.dir={tmp_path}", "train.steps=1", "train.sample_every=0"])
    assert cfg.train.mixed_precision.value == "auto"
    train(cfg)
    info = json.loads((tmp_path / "precision.json").read_text())
    assert info["requested"] == "auto" and info["mixed_precision"] == "bf16" and "amx_bf16" in info["reason"]
    assert "precision: bf16 (auto: the CPU has native bf16 matrix units (amx_bf16))" in capsys.readouterr().out


def test_every_config_asks_for_auto():
    from unidiff.config import load_config

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert load_config(path).train.mixed_precision.value == "auto", path.name


def test_the_main_job_trains_in_fp32_on_a_cpu_without_bf16_units():
    from unidiff.config import load_config
    from unidiff.launch import resolve_precision

    cfg = load_config(ROOT / "configs/joint_image_label.yaml")
    assert resolve_precision(cfg.train.mixed_precision, "cpu", flags={"avx2", "fma", "f16c"})[0] == "no"


# --- the 2-process worker ------------------------------------------------------------------------
def _worker(root: Path) -> None:
    """One rank of :func:`two_processes` (run by torchrun, see the module docstring)."""
    import unidiff.models.moe as moe
    from unidiff.errors import ConfigError
    from unidiff.train import train

    rank, runs = int(os.environ["RANK"]), root / "runs"
    writes = []

    def audit(event, args):
        path = None
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and args[2] & (os.O_WRONLY | os.O_RDWR):
            path = args[0]
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            path = args[0]
        elif event in ("os.rename", "shutil.copyfile", "shutil.copytree"):
            path = args[1]
        if path is not None and os.fsdecode(os.fspath(path)).startswith(str(runs)):
            writes.append((event, os.fsdecode(os.fspath(path))))

    sys.addaudithook(audit)
    try:
        train(_cfg(runs / "odd", "train.batch_size=7"))
        odd = "no error"
    except ConfigError as err:
        odd = str(err)

    states = []
    update = moe.update_moe_biases

    def recording(net):  # train.py calls it once per optimiser step, with the live UnifiedModel
        n = update(net)
        states.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        return n

    moe.update_moe_biases = recording
    train(_cfg(runs / "p"), stop_at=2)
    if rank == 0:
        shutil.copytree(runs / "p", runs / "q")  # the step-2 checkpoint, for the 1-process resume
    # (no barrier needed: train's end destroyed the process group, and the next train's set-up of
    # a new one waits for rank 0)
    train(_cfg(runs / "p"))  # the same command again, 2 processes: resumes at step 2
    # A 3-second wall-clock budget: the ranks' clocks differ, their mean (in the per-step
    # all-reduce) decides, so both stop after the same step (one stopping alone would hang DDP).
    steps_done = []

    def counting(net):
        steps_done.append(1)
        return update(net)

    moe.update_moe_biases = counting
    train(_cfg(runs / "budget", "train.steps=100000", "train.ckpt_every=100000", "train.budget_minutes=0.05",
               "train.budget_clock=wall"))
    moe.update_moe_biases = update
    torch.save({"states": states, "writes": writes, "odd": odd, "budget_steps": len(steps_done)},
               root / f"rank{rank}.pt")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


def test_sample_on_two_processes_writes_the_one_process_file(tmp_path, one_process):
    # Each process samples its share of the shards (shard i seeded seed_for(--seed, i)), the main
    # process assembles: the file equals the one-process one, and no shard folder is left behind.
    import numpy as np

    run = tmp_path / "run"
    shutil.copytree(one_process, run)
    args = ["sample", run, "--task", "class_to_image", "-n", "6", "--shard-size", "2", "--steps", "2", "--seed", "3"]
    one = _run([sys.executable, "-m", "unidiff.cli", *args, "--out", tmp_path / "one.npz"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/ddp.yaml",
                "-m", "unidiff.cli", *args, "--out", tmp_path / "two.npz"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("grid:") == 1, two.stdout  # printed by the main process only
    assert json.loads((tmp_path / "two.json").read_text())["processes"] == 2
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            assert np.array_equal(a[k], b[k]), k
    assert not (tmp_path / "two.shards").exists()


def test_evaluate_on_two_processes_gives_the_one_process_metrics(tmp_path, one_process):
    # Each process generates its share of every sample stream's shards; the metrics are the same.
    run = tmp_path / "run"
    shutil.copytree(one_process, run)
    args = ["evaluate", run, "--seed", "5"]
    one = _run([sys.executable, "-m", "unidiff.cli", *args, "--out", tmp_path / "one.json"])
    assert one.returncode == 0, one.stderr[-3000:]
    shutil.rmtree(run / "eval_shards")  # the second evaluation must generate its own samples
    two = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/ddp.yaml",
                "-m", "unidiff.cli", *args, "--out", tmp_path / "two.json"])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    numbers = [k for k, v in a.items() if isinstance(v, (int, float))]
    assert "fid" in numbers and "class_conditional_accuracy" in numbers
    for k in numbers:
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
