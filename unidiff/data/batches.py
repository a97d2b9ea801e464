"""Batches: the deterministic training order, each process's share of it, and one-pass evaluation.

The training batch of step ``s`` is a pure function of ``(seed, s)`` (:class:`BatchOrder`), so a
resumed run sees the batches an uninterrupted one would. Under data parallelism process ``rank`` of
``world_size`` loads only its rows of that global batch (:func:`rank_rows`): the indices and flips
are drawn for the whole batch and then sliced, so a rank's batch is a function of
``(seed, step, rank, world_size)``, the ranks' batches concatenated in rank order are the
one-process batch, and no process decodes another's items.

In-memory data is indexed directly (one index operation per batch, on the dataset's device);
lazy data (folders, the memory-mapped cache) goes through a DataLoader whose batch sampler yields
the same indices, with ``num_workers`` worker processes and pinned memory when CUDA is there.
Workers only decode: every random draw (order, flips) is made in the main process, so the batches
do not depend on the number of workers, and a resumed run's loader starts at its step.
Unreadable files found in a worker travel back in the batch and are acted on here
(:func:`~unidiff.data.datasets.report_bad_files`: a warning and a count, or a one-line error).
"""

from __future__ import annotations

from typing import Dict, Iterator, List

import torch
from torch.utils.data import DataLoader, Sampler, default_collate

from ..errors import ConfigError, DataError
from ..io import seed_for
from .datasets import AnyDataset, InMemoryDataset, report_bad_files


class BatchOrder:
    """The deterministic order of :func:`infinite_batches`.

    The stream of indices is the concatenation of one seeded permutation of ``range(n)`` per epoch
    (epoch ``e`` uses seed ``(seed, 0, e)``); step ``s`` takes positions ``[s*B, (s+1)*B)`` of the
    stream. A batch is thus a pure function of ``(seed, step)``: resuming at step ``k`` gives what
    an uninterrupted run gives from step ``k``, every item is seen once per epoch, and a dataset
    smaller than a batch still works. ``rows`` picks part of a batch (a process's share) without
    changing what the rest of it would be.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise DataError("cannot draw batches from an empty dataset")
        if batch_size < 1:
            raise ConfigError(f"batch size {batch_size} must be >= 1")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: Dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:  # steps move forward: keep only the recent epochs
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(seed_for(self.seed, 0, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, step: int, rows: slice = slice(None)) -> torch.Tensor:
        """(len(rows),) int64 dataset indices of rows ``rows`` of the batch at ``step`` (all B by default)."""
        start, stop, _ = rows.indices(self.batch_size)
        pos = torch.arange(step * self.batch_size + start, step * self.batch_size + stop)  # stream positions
        epoch, offset = pos // self.n, pos % self.n
        out = torch.empty_like(pos)
        for e in epoch.unique().tolist():
            sel = epoch == e
            out[sel] = self._perm(e)[offset[sel]]
        return out

    def flips(self, step: int, rows: slice = slice(None)) -> torch.Tensor:
        """(len(rows),) bool: which items of the batch at ``step`` are flipped horizontally.

        Drawn for all B items, then sliced: a row's flip does not depend on which rows are asked for.
        """
        g = torch.Generator().manual_seed(seed_for(self.seed, 1, step))
        return (torch.rand(self.batch_size, generator=g) < 0.5)[rows]


def rank_rows(batch_size: int, rank: int = 0, world_size: int = 1) -> slice:
    """The rows ``[rank * b, (rank + 1) * b)``, ``b = batch_size / world_size``, of a global batch
    that process ``rank`` loads (the order DDP's gradient average is indifferent to)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"process rank {rank} of {world_size} processes: need 0 <= rank < world_size")
    if batch_size % world_size:
        raise ConfigError(f"batch size {batch_size} is not divisible by the {world_size} processes")
    local = batch_size // world_size
    return slice(rank * local, (rank + 1) * local)


class _StepSampler(Sampler):
    """Batch sampler that yields ``BatchOrder.indices(step, rows)`` for step = start, start+1, ..."""

    def __init__(self, order: BatchOrder, start_step: int, rows: slice):
        self.order, self.start_step, self.rows = order, start_step, rows

    def __iter__(self) -> Iterator[List[int]]:
        step = self.start_step
        while True:
            yield self.order.indices(step, self.rows).tolist()
            step += 1


def _apply_flips(batch: Dict[str, torch.Tensor], flip: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Flip the selected items; image and source together, as paired images stay aligned."""
    flip = flip.to(batch["image"].device)
    for key in ("image", "source"):
        if key in batch:
            x = batch[key]
            batch[key] = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return batch


def collate(batch):
    """A batch a dataset's ``__getitems__`` already collated (a dict) as it is; items stacked otherwise."""
    return batch if isinstance(batch, dict) else default_collate(batch)


def _loader(dataset: AnyDataset, num_workers: int, **kwargs) -> DataLoader:
    """The DataLoader of a lazy dataset: workers, pinned memory when batches go to a GPU."""
    return DataLoader(dataset, num_workers=num_workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
                      **kwargs)


def infinite_batches(
    dataset: AnyDataset,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Dict[str, torch.Tensor]]:
    """Yield training batches forever, batch ``i`` being (this process's share of) the batch of step
    ``start_step + i``.

    ``batch_size`` is the global batch B of one step; process ``rank`` of ``world_size`` gets its
    ``B / world_size`` rows (:func:`rank_rows`; B must divide evenly) and loads only those items.
    The order is :class:`BatchOrder`'s; random flips (when ``dataset.hflip``) are drawn from
    ``(seed, step)`` too (a latent cache takes its stored latents of the flipped images instead of
    flipping latents: :meth:`unidiff.data.LatentDataset.flipped_batch`). In-memory data is indexed directly (on the dataset's device); folder
    data goes through a DataLoader with ``num_workers`` workers.
    """
    rows = rank_rows(batch_size, rank, world_size)
    order = BatchOrder(len(dataset), batch_size, seed)
    hflip = getattr(dataset, "hflip", False)
    if isinstance(dataset, InMemoryDataset):
        step = start_step
        while True:
            index = order.indices(step, rows).to(dataset.images.device)
            if hflip and hasattr(dataset, "flipped_batch"):  # a latent cache: the mirrored images' latents
                yield dataset.flipped_batch(index, order.flips(step, rows))
            else:
                batch = dataset.batch(index)
                yield _apply_flips(batch, order.flips(step, rows)) if hflip else batch
            step += 1
    # One loader iterator for the whole run: its workers live as long as training (persistent).
    loader = _loader(dataset, num_workers, batch_sampler=_StepSampler(order, start_step, rows))
    for step, batch in enumerate(loader, start=start_step):
        batch = report_bad_files(dataset, batch)
        yield _apply_flips(batch, order.flips(step, rows)) if hflip else batch


def iter_batches(dataset: AnyDataset, batch_size: int, num_workers: int = 0) -> Iterator[Dict[str, torch.Tensor]]:
    """One pass over ``dataset`` in order, no augmentation, the last batch possibly smaller (eval)."""
    if isinstance(dataset, InMemoryDataset):
        for start in range(0, len(dataset), batch_size):
            index = torch.arange(start, min(start + batch_size, len(dataset)), device=dataset.images.device)
            yield dataset.batch(index)
        return
    for batch in _loader(dataset, num_workers, batch_size=batch_size, shuffle=False):
        yield report_bad_files(dataset, batch)
