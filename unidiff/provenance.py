"""What produced a result: the ``provenance`` record every metrics file carries.

:func:`provenance` gathers what is needed to reproduce a number (the package version, the git
commit of the checkout it ran from, the command line, the overrides, the seed) plus whatever the
caller adds (checkpoint, sampler, steps, guidance, sample count); :func:`keep_previous` is the
policy that no result is overwritten silently: an existing file is moved aside first.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from . import __version__

PACKAGE_DIR = Path(__file__).resolve().parent


def git_commit(folder: str | os.PathLike = PACKAGE_DIR) -> Optional[Dict[str, Any]]:
    """``{"commit", "dirty"}`` of the git checkout that holds the ``unidiff`` package, or None.

    None when git is not installed, ``folder`` is not in a work tree, or the package is not this
    checkout's own ``unidiff/`` (an installed copy inside some other repository must not report
    that repository's commit). ``dirty``: tracked files differ from the commit.
    """

    def git(*args: str) -> Optional[str]:
        try:
            res = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):  # no git, or it hung
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != Path(folder).resolve().parent:
        return None
    commit = git("rev-parse", "HEAD")
    if commit is None:  # a repository without commits
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def provenance(seed: Optional[int] = None, overrides: Sequence[str] = (), command: Optional[Sequence[str]] = None,
               **extra: Any) -> Dict[str, Any]:
    """The provenance record: ``unidiff_version``, ``git_commit`` (null outside a git checkout),
    ``git_dirty``, ``command`` (default ``sys.argv``), ``overrides``, ``seed``, ``created`` (UTC,
    ISO 8601), ``python``/``torch`` versions, then ``extra`` (e.g. ``checkpoint``, ``sampler``)."""
    import torch

    git = git_commit()
    argv = list(sys.argv if command is None else command)
    return {
        "unidiff_version": __version__,
        "git_commit": git["commit"] if git else None,
        "git_dirty": git["dirty"] if git else None,
        "command": " ".join(argv),
        "overrides": list(overrides),
        "seed": seed,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **extra,
    }


def keep_previous(path: str | os.PathLike) -> Optional[Path]:
    """Move an existing ``path`` aside as ``<stem>.<timestamp><suffix>`` (its modification time,
    ``%Y%m%d-%H%M%S``; ``-1``, ``-2``, ... on a clash) and return the new name; None if absent.

    The rename is atomic, so a reader sees the old file under one of its two names, never none of it.
    """
    path = Path(path)
    if not path.exists():
        return None
    stamp = dt.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y%m%d-%H%M%S")
    target, i = path.with_name(f"{path.stem}.{stamp}{path.suffix}"), 0
    while target.exists():
        i += 1
        target = path.with_name(f"{path.stem}.{stamp}-{i}{path.suffix}")
    os.replace(path, target)
    return target
