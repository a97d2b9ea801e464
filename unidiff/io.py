"""Small I/O helpers every layer uses: atomic writes, image grids, derived seeds.

One atomic writer (:func:`atomic_write`) for every file unidiff publishes: the content goes to a
temporary file in the same folder, is flushed and ``fsync``ed, then renamed over the target, so a
reader (another process, a resumed run) sees the old file or the new one and never half of one; on
any error the temporary file is removed. Folders (checkpoints, exported models) are published the
same way by :func:`atomic_dir`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

PathLike = "str | os.PathLike"


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Publish a file atomically: ``write(tmp_path)`` fills a temporary file, then it is renamed.

    ``write`` receives a path (libraries such as safetensors, torchvision and matplotlib want a
    name, not a stream). The temporary name keeps the target's suffix (``x.tmp123.png``) because
    some writers choose the format from it.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda p: Path(p).write_text(text))


def write_json(path: str | os.PathLike, obj: Any, indent: Optional[int] = 1) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (trailing newline)."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """``np.savez`` to ``path`` atomically."""

    def write(p: str) -> None:
        with open(p, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)

    return atomic_write(path, write)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary name and publish it by rename when the block succeeds.

    An existing ``path`` is replaced (moved aside first, removed after the rename); on error the
    temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    if tmp.exists():  # leftover of a crash
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb+") as f:
                    os.fsync(f.fileno())
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


# --- seeds ----------------------------------------------------------------------------------------
def seed_for(*keys: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's ``SeedSequence`` hashing).

    Every derived random stream (a step's noise, a batch order's epoch, an evaluation's draws) is
    seeded by the integers that name it, so it is a pure function of them: resume, several
    processes and reruns see the same numbers.
    """
    state = np.random.SeedSequence([int(k) % (1 << 32) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def generator_for(*keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`seed_for` of ``keys``."""
    return torch.Generator(device=device).manual_seed(seed_for(*keys))


# --- image grids ----------------------------------------------------------------------------------
def image_grid(images: torch.Tensor, nrow: Optional[int] = None) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> (3 or 1, H', W') grid in [0, 1] (torchvision ``make_grid``).

    More than 3 channels (e.g. latents) show the first 3; 2 channels show the first.
    """
    from torchvision.utils import make_grid

    x = images.detach().float().cpu()
    x = x[:, :3] if x.shape[1] > 3 else (x[:, :1] if x.shape[1] == 2 else x)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(x.shape[0]))))
    return make_grid((x + 1) / 2, nrow=nrow, padding=1, pad_value=1.0).clamp(0, 1)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: Optional[int] = None) -> Path:
    """Write a PNG grid of ``images`` (N, C, H, W) in [-1, 1] atomically."""
    from torchvision.utils import save_image

    grid = image_grid(images, nrow)
    return atomic_write(path, lambda p: save_image(grid, p, format="png"))


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write a matplotlib figure atomically (format from the suffix) and close it."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda p: fig.savefig(p, dpi=dpi, bbox_inches="tight", format=Path(path).suffix[1:]))
    finally:
        plt.close(fig)
