"""Where a run executes: the launch (how many processes, CPU or GPU) and the precision rule.

Two questions every entry point (training, evaluation, sampling) asks before it computes anything:

* **Launch.** ``torchrun`` and ``accelerate launch --multi_gpu`` start one process per rank and set
  ``WORLD_SIZE``/``LOCAL_RANK``. accelerate 1.15 (``state.py``, ``PartialState._prepare_backend``)
  sets up a process group for such a process only on an accelerator, or on CPU when it is told
  ``cpu=True`` (``ACCELERATE_USE_CPU``); on a machine without CUDA it otherwise builds a
  single-process state in every rank, so the ranks each think they are alone, all write the run
  folder and hang in the first all-reduce. :func:`launch_settings` therefore turns ``cpu`` on
  whenever several processes run without CUDA (gloo backend). ``accelerate launch --cpu`` on the
  other hand starts exactly one process whatever ``--num_processes`` says (its ``simple_launcher``;
  several CPU processes go through ``mpirun`` only), which :func:`launch_settings` refuses with
  the commands that work. FSDP asked of accelerate on CPU is silently dropped (only GPU-like
  distributed types become FSDP), so it is refused too.
* **Precision.** ``train.mixed_precision: auto`` (:func:`resolve_precision`): bf16 where the
  hardware multiplies bf16 fast (CUDA devices that support it, CPUs with AMX), fp32 elsewhere: on
  a CPU without bf16 units its matmuls are emulated and ~100x slower than fp32, and on one with
  AVX512-BF16 but no AMX a bf16-autocast training step was measured up to 2.6x slower
  (BENCHMARKS.md). :func:`autocast` is the matching context for evaluation and sampling.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path
from typing import Mapping, NamedTuple, Optional, Set, Tuple

import torch

from .choices import MixedPrecision
from .errors import UnidiffError

# /proc/cpuinfo flags under which `auto` trains a CPU run in bf16: Intel AMX's bf16 tiles. AVX512-BF16
# alone (AMD Zen 4+, some Intel) has bf16 dot products too, but on the project's AMD EPYC with it a
# bf16-autocast training step was 1.3-2.6x *slower* than fp32 for four of five models and no faster
# for the fifth (BENCHMARKS.md, "Precision on a CPU with AVX512-BF16"), so it stays fp32 unless asked.
BF16_CPU_FLAGS = ("amx_bf16",)
_MPI_SIZE_KEYS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

CPU_LAUNCH_HINT = ("on CPU start N processes with `torchrun --standalone --nproc_per_node N -m unidiff.cli train "
                   "CONFIG` or `accelerate launch --multi_gpu --num_processes N -m unidiff.cli train CONFIG` "
                   "(README.md 'Launching on several processes')")


def _flag(env: Mapping[str, str], key: str) -> bool:
    return env.get(key, "").strip().lower() in ("1", "true", "yes", "on")


class Launch(NamedTuple):
    """What :func:`launch_settings` found: ``world_size`` processes, ``cpu`` for accelerate."""

    world_size: int
    cpu: bool
    device_type: str  # "cuda" or "cpu": where the process computes


def launch_settings(env: Optional[Mapping[str, str]] = None, cuda: Optional[bool] = None) -> Launch:
    """The accelerate settings of this process's launch, or a one-line UnidiffError for a launch
    that would silently do the wrong thing (see the module docstring).

    ``env`` defaults to ``os.environ`` and ``cuda`` to ``torch.cuda.is_available()`` (tests pass both).
    """
    env = os.environ if env is None else env
    cuda = torch.cuda.is_available() if cuda is None else cuda
    world = int(env.get("WORLD_SIZE") or next((env[k] for k in _MPI_SIZE_KEYS if env.get(k)), "1"))
    cpu = _flag(env, "ACCELERATE_USE_CPU") or not cuda
    if world == 1 and _flag(env, "ACCELERATE_USE_CPU") and env.get("MASTER_ADDR") and "LOCAL_RANK" not in env:
        # accelerate's simple launcher exports MASTER_ADDR only for --num_processes > 1 or
        # --num_machines > 1, and then starts this single process anyway.
        raise UnidiffError("`accelerate launch --cpu` started 1 process although --num_processes/--num_machines "
                           f"asked for more (accelerate runs several CPU processes only through mpirun); "
                           f"{CPU_LAUNCH_HINT}; unset MASTER_ADDR to train in one process")
    if cpu and _flag(env, "ACCELERATE_USE_FSDP"):
        raise UnidiffError("FSDP was requested (ACCELERATE_USE_FSDP) but accelerate enables FSDP only on GPUs: on "
                           "CPU it would silently train with DDP; drop the FSDP config (configs/accelerate/ddp.yaml) "
                           "or run on GPUs")
    return Launch(world_size=world, cpu=cpu, device_type="cpu" if cpu else "cuda")


def cpu_flags(path: str | os.PathLike = "/proc/cpuinfo") -> Set[str]:
    """The CPU feature flags the kernel reports (the first ``flags`` line); empty where unreadable."""
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def resolve_precision(requested: str | MixedPrecision, device_type: str, flags: Optional[Set[str]] = None,
                      cuda_bf16: Optional[bool] = None) -> Tuple[str, str]:
    """accelerate's ``mixed_precision`` for ``requested`` on ``device_type``: ``(choice, reason)``.

    ``choice`` is ``"no"``, ``"bf16"`` or ``"fp16"``; ``reason`` a short sentence for the log. An
    explicit request is returned unchanged. ``auto``: on ``cuda`` bf16 when the device supports it
    (``torch.cuda.is_bf16_supported()``) else fp32; on ``cpu`` bf16 when ``flags`` (default: this
    machine's ``/proc/cpuinfo``) has ``amx_bf16``, else fp32 (``avx512_bf16`` without AMX included:
    measured slower, see ``BF16_CPU_FLAGS``); fp32 on any other device.
    """
    requested = MixedPrecision(getattr(requested, "value", requested))
    if requested is not MixedPrecision.auto:
        return requested.value, f"train.mixed_precision={requested.value} in the config"
    if device_type == "cuda":
        supported = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        if supported:
            return "bf16", "auto: the CUDA device supports bf16"
        return "no", "auto: the CUDA device has no bf16 support, fp32"
    if device_type == "cpu":
        have = cpu_flags() if flags is None else set(flags)
        found = sorted(set(BF16_CPU_FLAGS) & have)
        if found:
            return "bf16", f"auto: the CPU has native bf16 matrix units ({', '.join(found)})"
        if "avx512_bf16" in have:
            return "no", ("auto: the CPU has avx512_bf16 but no amx_bf16; bf16 autocast trained slower than fp32 "
                          "on such a CPU (BENCHMARKS.md): fp32")
        return "no", ("auto: the CPU has no amx_bf16 (nor avx512_bf16), where bf16 matmuls are emulated "
                      "and slower than fp32: fp32")
    return "no", f"auto: fp32 on {device_type}"


def autocast(choice: str, device_type: str):
    """The autocast context of a resolved ``choice`` (:func:`resolve_precision`) on ``device_type``:
    what accelerate applies to a training forward, for evaluation and sampling (a no-op for ``no``)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(choice)
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


_AT_EXIT = []


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the process exits (registered once).

    The group must outlive one ``train`` call: setting a new one up in the same process after
    ``destroy_process_group`` reuses the launcher's rendezvous keys and hangs (seen under torchrun
    with gloo), so several runs in one process share the first run's group.
    """
    if not _AT_EXIT and torch.distributed.is_available():
        _AT_EXIT.append(atexit.register(_destroy_process_group))


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
