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
from typing import Any, Callable, Iterator, Optional, Sequence

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
# Grid cells are upscaled (nearest neighbour: no invented detail, pixels stay visible) to at least
# this many pixels on their shorter side, so that an 8x8 or 28x28 sample is large enough to see.
MIN_CELL = 64


def _for_display(images: torch.Tensor, min_cell: int = 0) -> torch.Tensor:
    """(N, C, H, W) -> (N, 1 or 3, kH, kW) float on the CPU, ``k`` the nearest-neighbour factor that
    brings ``min(H, W)`` to at least ``min_cell`` (1 when it is already there or ``min_cell`` is 0)."""
    x = images.detach().float().cpu()
    x = x[:, :3] if x.shape[1] > 3 else (x[:, :1] if x.shape[1] == 2 else x)
    k = max(1, math.ceil(min_cell / min(x.shape[-2:]))) if min_cell else 1
    return torch.nn.functional.interpolate(x, scale_factor=k, mode="nearest") if k > 1 else x


def image_grid(images: torch.Tensor, nrow: Optional[int] = None, min_cell: int = 0) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> (3 or 1, H', W') grid in [0, 1] (torchvision ``make_grid``).

    More than 3 channels (e.g. latents) show the first 3; 2 channels show the first. ``min_cell``:
    upscale every cell by a whole factor (nearest neighbour) to at least that many pixels.
    """
    from torchvision.utils import make_grid

    x = _for_display(images, min_cell)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(x.shape[0]))))
    return make_grid((x + 1) / 2, nrow=nrow, padding=1, pad_value=1.0).clamp(0, 1)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: Optional[int] = None, min_cell: int = 0) -> Path:
    """Write a PNG grid of ``images`` (N, C, H, W) in [-1, 1] atomically (``min_cell``: see :func:`image_grid`)."""
    from torchvision.utils import save_image

    grid = image_grid(images, nrow, min_cell)
    return atomic_write(path, lambda p: save_image(grid, p, format="png"))


def save_labelled_grid(images: torch.Tensor, labels: Optional[Sequence[Any]], path: str | os.PathLike,
                       class_names: Optional[Sequence[str]] = None, nrow: Optional[int] = None,
                       min_cell: int = MIN_CELL) -> Path:
    """A PNG grid of ``images`` (N, C, H, W) in [-1, 1], each cell captioned with its label, atomically.

    ``labels``: one per image, row-major like the cells (the generated label of a joint sample, the
    conditioning class of class->image; ints, strings, or None for no caption), or None for no
    captions at all. An int ``k`` shows ``class_names[k]`` when given, else ``k``; a caption wider than its cell is shortened with an ellipsis.
    Cells are upscaled with nearest neighbour to at least ``min_cell`` pixels (:data:`MIN_CELL`);
    the caption is drawn with PIL's built-in font under each cell.
    """
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid, save_image

    x = (_for_display(images, min_cell) + 1).div(2).clamp(0, 1)  # (N, c, h, w) in [0, 1]
    if labels is None:
        cells = x
    else:
        labels = [v.item() if torch.is_tensor(v) else v for v in labels]
        if len(labels) != x.shape[0]:
            raise ValueError(f"{len(labels)} labels for {x.shape[0]} images")
        font = ImageFont.load_default(size=max(10, min(16, x.shape[-1] // 5)))
        band = font.size + 6  # caption band under each cell, in pixels
        cells = []
        for img, label in zip(x, labels):
            rgb = img.expand(3, -1, -1) if img.shape[0] == 1 else img
            canvas = Image.new("RGB", (rgb.shape[-1], rgb.shape[-2] + band), "white")
            canvas.paste(Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)), (0, 0))
            if label is not None:
                text = str(label)
                if class_names is not None and isinstance(label, (int, np.integer)) and 0 <= label < len(class_names):
                    text = str(class_names[label])
                draw = ImageDraw.Draw(canvas)
                while len(text) > 1 and draw.textlength(text, font=font) > canvas.width - 2:
                    text = text[:-2] + "…"  # shorten a long class name to the cell's width
                width = draw.textlength(text, font=font)
                draw.text(((canvas.width - width) / 2, rgb.shape[-2] + 2), text, fill="black", font=font)
            cells.append(torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255).permute(2, 0, 1))
        cells = torch.stack(cells)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(cells.shape[0]))))
    grid = make_grid(cells, nrow=nrow, padding=2, pad_value=1.0)
    return atomic_write(path, lambda p: save_image(grid, p, format="png"))


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write a matplotlib figure atomically (format from the suffix) and close it."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda p: fig.savefig(p, dpi=dpi, bbox_inches="tight", format=Path(path).suffix[1:]))
    finally:
        plt.close(fig)
