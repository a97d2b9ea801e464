"""The intra-op thread count a process should use, chosen once at start.

PyTorch starts one intra-op thread per core it sees. On a small machine that other processes are
already busy on, that oversubscribes the cores: OpenMP's parallel regions wait at barriers for a
thread the scheduler has parked, and a training step or a sampling loop runs many times slower than
on one thread (measured on a busy 2-core machine: 8-12x for the main job and sampling; issue 11).
:func:`choose_threads` picks the count, :func:`apply_threads` sets it and says what it chose.

The rule, in order:

1. an explicit request (a config key or a command-line flag) wins;
2. else ``OMP_NUM_THREADS``, if set, is respected: torch already read it at import, so nothing is
   changed;
3. else the cores this process may run on (``os.sched_getaffinity``) minus the cores other
   processes keep busy: the 1-minute load average rounded up (a load below ``LOAD_NOISE`` counts
   as idle), never below 1 thread.

Rounding the load up is deliberate: one thread too few costs at most a factor ``n/(n-1)``, while
one thread on a core another process is using stalls the whole pool (on the 2-core machine, two
threads beside one busy process were over 20x slower than one thread).
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Optional, Tuple

from .errors import ConfigError

# A 1-minute load average below this is an idle machine's background, not a busy neighbour.
LOAD_NOISE = 0.1

__all__ = ["LOAD_NOISE", "available_cores", "load_average", "omp_num_threads", "choose_threads", "apply_threads"]


def available_cores() -> int:
    """The number of cores this process may run on (its CPU affinity; ``os.cpu_count()`` where the
    platform has no affinity call), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS / Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def load_average() -> Optional[float]:
    """The 1-minute load average (runnable processes, averaged), or None where it is unknown."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def omp_num_threads(environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """``OMP_NUM_THREADS`` as a positive int, or None when it is unset or not a positive integer.

    OpenMP allows a comma-separated list (one count per nesting level); the first entry is the one
    that sizes torch's intra-op pool.
    """
    env = os.environ if environ is None else environ
    raw = env.get("OMP_NUM_THREADS", "").strip()
    if not raw:
        return None
    try:
        n = int(raw.split(",")[0])
    except ValueError:
        return None
    return n if n >= 1 else None


def choose_threads(
    requested: Optional[int] = None,
    *,
    environ: Optional[Mapping[str, str]] = None,
    cores: Optional[int] = None,
    load: Optional[float] = None,
    key: str = "threads",
) -> Tuple[int, str]:
    """The intra-op thread count and why: ``(n, reason)`` with ``n >= 1``.

    Args:
        requested: an explicit count (wins); None chooses automatically.
        environ, cores, load: the environment, the usable core count and the 1-minute load average;
            None reads them from this process and machine (tests inject them).
        key: the name of the setting ``requested`` came from, for the error message.

    Raises:
        ConfigError: ``requested`` is not a positive integer.
    """
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ConfigError(f"{key} must be a positive integer (or null to choose automatically), got {requested!r}")
        return int(requested), "requested"
    omp = omp_num_threads(environ)
    if omp is not None:
        return omp, f"OMP_NUM_THREADS={omp}"
    cores = available_cores() if cores is None else max(1, int(cores))
    load = load_average() if load is None else float(load)
    if load is None or not math.isfinite(load):
        return cores, f"{cores} cores, load unknown"
    # Cores other processes keep busy, rounded up: a thread that shares its core with a busy
    # process holds up every barrier of every parallel region, so even a part-time neighbour costs
    # more than the core is worth. Below LOAD_NOISE the load is background noise (kernel threads,
    # daemons), not a neighbour. What is left is ours, and we always take at least one.
    busy = max(0, math.ceil(load - LOAD_NOISE))
    n = max(1, min(cores, cores - busy))
    return n, f"{cores} cores, load {load:.2f}"


def apply_threads(
    requested: Optional[int] = None,
    *,
    environ: Optional[Mapping[str, str]] = None,
    cores: Optional[int] = None,
    load: Optional[float] = None,
    key: str = "threads",
) -> str:
    """Choose the count (:func:`choose_threads`), set it with ``torch.set_num_threads`` and return a
    one-line message to print, e.g. ``"threads: 1 (2 cores, load 1.90)"``.

    When ``OMP_NUM_THREADS`` decides, torch is left alone: it sized its pool from the variable.
    """
    # torch is imported here, not at the top, so that the CLI can import this module before it
    # knows whether the command needs torch at all (start-up time).
    import torch

    global _LAST
    n, reason = choose_threads(requested, environ=environ, cores=cores, load=load, key=key)
    if requested is not None or omp_num_threads(environ) is None:
        torch.set_num_threads(n)
    _LAST = f"threads: {n} ({reason})"
    return _LAST


_LAST: Optional[str] = None


def last_threads() -> str:
    """The message of the last :func:`apply_threads` in this process, or torch's own count."""
    if _LAST is not None:
        return _LAST
    import torch

    return f"threads: {torch.get_num_threads()} (PyTorch default)"
