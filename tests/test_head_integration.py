"""Every modality kind inside ``unidiff.model.UnifiedModel`` with the real backbone (DESIGN.md §2).

Checks the contract end to end: heads read real ``BackboneOutput``s, the drift aggregates the
encodings, and one loss reaches the backbone, the heads and the encoders.
"""

import pytest
import torch

import heads
from unidiff.model import UnifiedModel

C, H, W, B = 1, 8, 8, 2
SPECS = {
    "label": dict(num_classes=4),
    "representation": dict(dim=5),
    "masked_image": dict(mask_ratio=0.5),
    "source_image": dict(transform="edges"),
}


def batch():
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(B, C, H, W, generator=g) * 2 - 1,
        "label": torch.tensor([1, 3]),
        "representation": torch.randn(B, 5, generator=g),
    }


@pytest.mark.parametrize("registers", [0, 2])
@pytest.mark.parametrize("kind", heads.MODALITY_KINDS)
def test_unified_model_with_each_kind(kind, registers):
    torch.manual_seed(0)
    model = UnifiedModel(
        image_shape=(C, H, W),
        backbone_config=dict(hidden_size=32, patch_size=2, pattern="M*E", num_heads=2, num_registers=registers),
        modality_configs=[dict(name=kind if kind in ("label", "representation") else "aux", kind=kind, weight=0.5, **SPECS[kind])],
    )
    (name, mod), = model.modalities.items()
    assert mod.kind == kind
    x_m = mod.from_batch(batch(), generator=torch.Generator().manual_seed(1))

    A = model.aggregate({name: x_m})
    assert A.shape == (B, C, H, W)
    torch.testing.assert_close(A, 0.5 * mod.encode(x_m))
    A_null = model.aggregate({name: x_m}, drop={name: torch.tensor([True, False])})
    torch.testing.assert_close(A_null[0], 0.5 * mod.null_encoding(1)[0])
    torch.testing.assert_close(A_null[1], A[1])

    z, t = torch.randn(B, C, H, W), torch.tensor([3, 700])
    out = model(z + A, t)
    assert out.image.shape == (B, C, H, W)
    assert torch.count_nonzero(out.image) == 0  # the whole denoiser outputs zero at init
    A_hat = model.expected_aggregate(out.aux)
    assert A_hat.shape == (B, C, H, W)
    # A known modality's true encoding replaces the prediction (DESIGN.md §3).
    torch.testing.assert_close(model.expected_aggregate(out.aux, known={name: x_m}), A)

    eps = torch.randn(B, C, H, W)
    loss = mod.loss(out.aux[name], x_m).mean() + (out.image - eps).pow(2).mean() + (A - A_hat).pow(2).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(f"modalities.{name}."))
    assert model.image_head.linear.weight.grad.abs().sum() > 0
