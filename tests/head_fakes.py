"""Shared fakes for the head tests: backbone features of a given shape."""

import torch

from unidiff.modality import BackboneOutput


def make_feats(L: int, D: int, B: int = 3, R: int = 0, seed: int = 0) -> BackboneOutput:
    """Random (B, L, D) tokens, (B, R, D) registers and (B, D) conditioning, as the backbone gives."""
    g = torch.Generator().manual_seed(seed)
    return BackboneOutput(
        tokens=torch.randn(B, L, D, generator=g),
        registers=torch.randn(B, R, D, generator=g),
        c=torch.randn(B, D, generator=g),
        aux_loss=torch.zeros(()),
    )
