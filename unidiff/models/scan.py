"""2-D scan orders over the patch grid, and the mixer that scans in one (DESIGN.md §5).

Images are not sequences: a causal Mamba-2 scan sees, at each patch, only the patches before it in
the scan order. Each ``M`` sublayer therefore scans the grid in its own order, cycling over
row-major, reversed row-major, column-major and reversed column-major (the backbone gives the k-th
``M`` sublayer ``SCAN_ORDERS[k % 4]``), or both ways inside one sublayer (``"bidirectional"``).
An order is a precomputed permutation of the row-major patch indices; its inverse restores the
layout, so every sublayer reads and writes the backbone's row-major ``(B, L + R, D)`` tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .mamba2 import Mamba2Mixer

__all__ = ["SCAN_ORDERS", "scan_permutation", "inverse_permutation", "ScanMixer"]

SCAN_ORDERS = ("row", "row_rev", "col", "col_rev")


def scan_permutation(order: str, grid_h: int, grid_w: int, device=None) -> torch.Tensor:
    """Row-major patch indices in the order ``order`` visits them: LongTensor (L,), L = gh * gw.

    The scanned sequence is ``x[:, perm]``: ``row`` is the identity, ``col`` walks down each
    column in turn (the transposed grid), ``*_rev`` are the same walks backwards.
    """
    if order not in SCAN_ORDERS:
        raise ConfigError(f"unknown scan order {order!r}; expected one of {SCAN_ORDERS}")
    if grid_h < 1 or grid_w < 1:
        raise ConfigError(f"scan grid must be positive, got ({grid_h}, {grid_w})")
    idx = torch.arange(grid_h * grid_w, device=device).view(grid_h, grid_w)  # idx[i, j] = row-major index
    perm = idx.t() if order.startswith("col") else idx
    perm = perm.reshape(-1)
    return perm.flip(0) if order.endswith("_rev") else perm


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inv with ``inv[perm[i]] = i``, so ``x[:, perm][:, inv] == x``."""
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


class ScanMixer(nn.Module):
    """A :class:`Mamba2Mixer` run over the patch grid in a 2-D scan order (DESIGN.md §5).

    Args:
        hidden_size: token width D.
        grid_size: (gh, gw) patch grid; the first ``L = gh * gw`` tokens are patches, row-major.
        order: one of ``SCAN_ORDERS`` or ``"bidirectional"``.
        num_registers: R register tokens after the patches (CONTRACTS.md).
        **mamba_kwargs: passed to :class:`Mamba2Mixer`.

    forward: x (B, L + R, D) -> (B, L + R, D). Patches are permuted into the scan order and the
    registers appended after them, so the causal scan lets every register see every patch; the
    output is put back into the input layout. ``bidirectional`` runs the same mixer (shared
    weights) on the row-major sequence and on the reversed patch sequence (registers still last),
    batched together, and averages the two, so the output scale matches a one-way scan.
    """

    def __init__(self, hidden_size: int, grid_size: Sequence[int], order: str = "row", num_registers: int = 0,
                 **mamba_kwargs):
        super().__init__()
        allowed = SCAN_ORDERS + ("bidirectional",)
        if order not in allowed:
            raise ConfigError(f"unknown scan order {order!r}; expected one of {allowed}")
        gh, gw = (int(s) for s in grid_size)
        self.grid_size, self.order, self.num_registers = (gh, gw), order, int(num_registers)
        self.num_patches = gh * gw
        self.mixer = Mamba2Mixer(hidden_size, **mamba_kwargs)
        # "bidirectional" scans row-major forwards and backwards: the forward permutation is row's.
        # Built on the CPU even under a meta-device context (parameter counting), so the buffers
        # are always real; derived from the config, so not saved in checkpoints.
        perm = scan_permutation("row" if order == "bidirectional" else order, gh, gw, device="cpu")
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("inv_perm", inverse_permutation(perm), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L, R = self.num_patches, self.num_registers
        if x.shape[1] != L + R:
            raise ConfigError(
                f"ScanMixer expects {L} patch + {R} register tokens (grid_size {self.grid_size}, "
                f"num_registers {R}), got a sequence of {x.shape[1]}"
            )
        patches, registers = x[:, :L], x[:, L:]  # (B, L, D), (B, R, D)
        if self.order == "bidirectional":
            both = torch.cat([
                torch.cat([patches, registers], dim=1),  # forward, row-major
                torch.cat([patches.flip(1), registers], dim=1),  # reversed patches, registers last
            ], dim=0)  # (2B, L + R, D): one mixer call for both directions
            fwd, bwd = self.mixer(both).chunk(2, dim=0)
            # Undo the reversal on the backward pass's patches before averaging the directions.
            out_patches = 0.5 * (fwd[:, :L] + bwd[:, :L].flip(1))
            out_registers = 0.5 * (fwd[:, L:] + bwd[:, L:])
            return torch.cat([out_patches, out_registers], dim=1)
        if self.order == "row":  # the identity permutation: nothing to reorder
            return self.mixer(x)
        seq = torch.cat([patches.index_select(1, self.perm), registers], dim=1)  # (B, L + R, D) scan order
        out = self.mixer(seq)
        return torch.cat([out[:, :L].index_select(1, self.inv_perm), out[:, L:]], dim=1)
