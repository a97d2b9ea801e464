"""Random SSD inputs shared by the compile and GPU tests (x, dt, A, B, C, D and an initial state)."""

import torch
import torch.nn.functional as F


def ssd_inputs(b=1, l=21, h=4, p=4, g=2, n=8, seed=0, device="cpu"):
    """[x, dt, A, B, C, D, s0] on ``device``, drawn on the CPU from ``seed`` (device-independent values)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen)
    dt = F.softplus(torch.randn(b, l, h, generator=gen) - 1.0)
    A = -torch.rand(h, generator=gen) * 2 - 0.2
    B, C = torch.randn(b, l, g, n, generator=gen), torch.randn(b, l, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    s0 = torch.randn(b, h, p, n, generator=gen)
    return [t.to(device) for t in (x, dt, A, B, C, D, s0)]
