"""Small stand-ins for the model contract of ``unidiff/model.py`` used by the sampler tests.

``FakeModel`` implements ``aggregate``/``encoding``/``expected_aggregate`` with the semantics of
``UnifiedModel`` (which needs the backbone and ``heads/``), and takes its image and head outputs
from plain callables so a test can make them perfect, fixed or analytic. The objective and bound
tests (``test_diffusion_losses.py``) use the real ``UnifiedModel`` instead.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from unidiff.modality import Modality, unit_rms


class FakeOutput:
    """Same fields as ``unidiff.model.ModelOutput``."""

    def __init__(self, image, aux, aux_loss):
        self.image, self.aux, self.aux_loss, self.stats = image, aux, aux_loss, {}


class FakeLabel(Modality):
    """A class label with a fixed random unit-RMS embedding table and null encoding."""

    kind = "fake_label"

    def __init__(self, name="label", image_shape=(1, 4, 4), num_classes=3, weight=1.0, loss_weight=1.0, seed=0):
        super().__init__(name, image_shape, hidden_size=8, patch_size=1, weight=weight, loss_weight=loss_weight)
        g = torch.Generator().manual_seed(seed)
        table = unit_rms(torch.randn(num_classes + 1, *image_shape, generator=g))
        self.register_buffer("table", table[:-1].clone())  # (K, C, H, W)
        self.register_buffer("null", table[-1:].clone())  # (1, C, H, W)
        self.num_classes = num_classes

    def encode(self, x_m):
        return self.table[x_m]

    def null_encoding(self, batch_size):
        return self.null.expand(batch_size, *self.image_shape)

    def expected_encoding(self, logits):
        return torch.einsum("bk,kchw->bchw", logits.float().softmax(-1), self.table)

    def loss(self, logits, x_m):
        return F.cross_entropy(logits.float(), x_m, reduction="none")

    def readout(self, logits):
        return logits.argmax(-1)


class FakeModel(nn.Module):
    """``image_fn(z, t) -> (B, C, H, W)`` (or None), ``aux_fn(z, t) -> {name: raw prediction}``."""

    def __init__(self, modalities: Dict[str, Modality], image_fn: Optional[Callable], aux_fn: Callable,
                 image_shape=(1, 4, 4), prediction="epsilon"):
        super().__init__()
        self.modalities = nn.ModuleDict(modalities)
        self.image_fn, self.aux_fn = image_fn, aux_fn
        self.image_head = None if image_fn is None else object()
        self.image_shape = tuple(image_shape)
        self.prediction = prediction
        self.calls = []
        self.register_buffer("_anchor", torch.zeros(1))

    @property
    def device(self):
        return self._anchor.device

    def encoding(self, name, x_m, batch_size, drop=None):
        mod = self.modalities[name]
        null = mod.null_encoding(batch_size)
        if x_m is None:
            return null
        e = mod.encode(x_m)
        return e if drop is None else torch.where(drop.view(-1, 1, 1, 1), null, e)

    def aggregate(self, x_aux: Dict[str, Any], drop=None, batch_size=None):
        B = batch_size if batch_size is not None else next(iter(x_aux.values())).shape[0]
        A = torch.zeros(B, *self.image_shape, device=self.device)
        for name, mod in self.modalities.items():
            A = A + mod.weight * self.encoding(name, x_aux.get(name), B, None if drop is None else drop.get(name))
        return A

    def expected_aggregate(self, aux_pred, known=None):
        known = known or {}
        A = 0
        for name, mod in self.modalities.items():
            e = mod.encode(known[name]) if name in known else mod.expected_encoding(aux_pred[name])
            A = A + mod.weight * e
        return A

    def forward(self, z, t, collect_stats=False):  # no MoE: nothing to collect
        self.calls.append((z.detach().clone(), t.clone()))
        image = None if self.image_fn is None else self.image_fn(z, t)
        return FakeOutput(image, self.aux_fn(z, t), torch.zeros(()))


class TinyDenoiser(nn.Module):
    """A fixed random conv net ``f(u, t)``: the 'ε-network' of the oracle tests."""

    def __init__(self, channels=1, T=100, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(channels + 1, channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(0.3 * torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(0.1 * torch.randn(self.conv.bias.shape, generator=g))
        self.T = T

    def forward(self, u, t):
        t = torch.as_tensor(t, device=u.device).float().expand(u.shape[0]) / self.T
        tmap = t.view(-1, 1, 1, 1).expand(u.shape[0], 1, *u.shape[2:]).to(u.dtype)
        return torch.tanh(self.conv(torch.cat([u, tmap], dim=1)))


def onehot_logits(labels: torch.Tensor, num_classes: int, gap: float = 100.0) -> torch.Tensor:
    """Logits whose softmax is (numerically exactly) one-hot at ``labels``."""
    return gap * F.one_hot(labels, num_classes).float()


def tile_rows(x: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Repeat per-sample data ``x`` (B, ...) to ``n_rows`` rows (the sampler batches branches)."""
    return x.repeat(n_rows // x.shape[0], *([1] * (x.ndim - 1)))
