"""The image-valued auxiliary modalities: masked image and source image (DESIGN.md §4).

Oracles: per-sample loops over the masked pixels, ``torch.distributions.Normal``, the PSNR
definition ``10 log10(range² / MSE)`` (written out; torchmetrics' import alone takes ~20 s here),
``scipy.ndimage.sobel`` for the edge view, explicit block means for the downsampled view.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import heads
from head_fakes import make_feats
from unidiff.errors import ConfigError, DataError

C, H, W, D, P = 3, 8, 8, 32, 2
L = (H // P) * (W // P)
COMMON = dict(image_shape=(C, H, W), hidden_size=D, patch_size=P)


def fake_feats(B=3, R=0, seed=0):
    return make_feats(L, D, B, R, seed)


def rms(x):
    return x.pow(2).flatten(1).mean(1).sqrt()


def psnr_ref(p, t):
    """PSNR in dB for data in [-1, 1] (peak-to-peak range 2)."""
    return 10 * math.log10(2.0**2 / float(((p - t) ** 2).mean()))


def images(B=4, seed=0):
    return torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def make_masked(**kw):
    return heads.build_modality("masked_image", name="masked", **COMMON, **kw)


# --- masked image --------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio,mask_patch", [(0.5, None), (0.25, 2), (0.75, 4), (0.0, 2), (1.0, 2)])
def test_mask_ratio_exact_and_patchwise(ratio, mask_patch):
    m = make_masked(mask_ratio=ratio, mask_patch=mask_patch)
    mp = mask_patch or P
    x0 = images(B=6)
    xm = m.from_batch({"image": x0}, generator=torch.Generator().manual_seed(0))
    M = xm["mask"]
    assert M.shape == (6, 1, H, W)
    assert set(M.unique().tolist()) <= {0.0, 1.0}
    n_patches = (H // mp) * (W // mp)
    for b in range(6):
        blocks = M[b, 0].reshape(H // mp, mp, W // mp, mp).permute(0, 2, 1, 3).reshape(n_patches, mp * mp)
        assert (blocks == blocks[:, :1]).all()  # constant inside each mask patch
        assert int((blocks[:, 0] == 0).sum()) == round(ratio * n_patches)
    torch.testing.assert_close(xm["image"], x0 * M)
    assert torch.equal(xm["target"], x0)


def test_mask_reproducible_with_generator():
    m = make_masked()
    x0 = images()
    a = m.from_batch({"image": x0}, generator=torch.Generator().manual_seed(7))["mask"]
    b = m.from_batch({"image": x0}, generator=torch.Generator().manual_seed(7))["mask"]
    c = m.from_batch({"image": x0}, generator=torch.Generator().manual_seed(8))["mask"]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not all(torch.equal(a[0], a[i]) for i in range(1, 4))  # a fresh mask per sample


def test_batch_mask_overrides_random_mask():
    m = make_masked()
    x0 = images()
    mask = (torch.rand(4, H, W, generator=torch.Generator().manual_seed(1)) > 0.3).float()  # any pixel mask
    for given in (mask, mask[:, None], mask[:, None].bool()):
        xm = m.from_batch({"image": x0, "mask": given})
        torch.testing.assert_close(xm["mask"], mask[:, None])
        torch.testing.assert_close(xm["image"], x0 * mask[:, None])
    with pytest.raises(DataError, match="mask"):
        m.from_batch({"image": x0, "mask": mask[:, None, :4]})
    with pytest.raises(DataError, match="0 .*1"):
        m.from_batch({"image": x0, "mask": mask * 255})


def test_masked_encode_sees_only_visible_pixels():
    m = make_masked()
    xm = m.from_batch({"image": images()}, generator=torch.Generator().manual_seed(0))
    e = m.encode(xm)
    assert e.shape == (4, C, H, W)
    torch.testing.assert_close(rms(e), torch.ones(4), rtol=1e-4, atol=1e-4)
    # Whatever sits under the mask does not reach the encoding.
    other = {"image": xm["target"] + 5 * (1 - xm["mask"]) * torch.randn(4, C, H, W), "mask": xm["mask"]}
    torch.testing.assert_close(m.encode(other), e)
    null = m.null_encoding(4)
    assert null.shape == (4, C, H, W) and m.null.weight.requires_grad
    torch.testing.assert_close(rms(null), torch.ones(4), rtol=1e-4, atol=1e-4)


def test_masked_expected_encoding_is_all_visible_conv():
    m = make_masked()
    pred = torch.randn(2, C, H, W, requires_grad=True)
    e = m.expected_encoding(pred)
    conv = m.encoder.conv
    raw = F.conv2d(torch.cat([pred, torch.ones(2, 1, H, W)], 1), conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(e, raw / rms(raw).view(-1, 1, 1, 1), rtol=1e-4, atol=1e-5)
    (e * torch.randn_like(e)).sum().backward()
    assert pred.grad.abs().sum() > 0


@pytest.mark.parametrize("R", [0, 2])
def test_masked_head_zero_at_init(R):
    out = make_masked().head(fake_feats(R=R))
    assert out.shape == (3, C, H, W) and torch.count_nonzero(out) == 0


def test_masked_loss_likelihood_metrics_against_loops():
    m = make_masked(mask_ratio=0.5)
    xm = m.from_batch({"image": images(B=3)}, generator=torch.Generator().manual_seed(2))
    pred = torch.randn(3, C, H, W, generator=torch.Generator().manual_seed(3))
    loss, ll, met = m.loss(pred, xm), m.log_likelihood(pred, xm), m.metrics(pred, xm)
    mses, psnrs = [], []
    for b in range(3):
        hidden = (xm["mask"][b] == 0).expand(C, H, W)
        p, t = pred[b][hidden], xm["target"][b][hidden]
        mses.append(((p - t) ** 2).mean())
        assert float(loss[b]) == pytest.approx(float(mses[-1]), rel=1e-5)
        ref_ll = torch.distributions.Normal(p, 1.0).log_prob(t).sum()
        assert float(ll[b]) == pytest.approx(float(ref_ll), rel=1e-5)
        psnrs.append(psnr_ref(p, t))
    assert float(met["masked_mse"]) == pytest.approx(float(torch.stack(mses).mean()), rel=1e-5)
    assert float(met["masked_psnr"]) == pytest.approx(sum(psnrs) / 3, rel=1e-5)


def test_masked_loss_zero_without_masked_pixels_and_gradients():
    m = make_masked()
    x0 = images(B=2)
    xm = m.from_batch({"image": x0, "mask": torch.ones(2, 1, H, W)})
    assert torch.equal(m.loss(torch.randn(2, C, H, W), xm), torch.zeros(2))
    xm = m.from_batch({"image": x0}, generator=torch.Generator().manual_seed(0))
    m.loss(m.head(fake_feats(B=2)), xm).mean().backward()
    assert m.decoder.linear.weight.grad.abs().sum() > 0
    with pytest.raises(DataError, match="target"):
        m.loss(torch.zeros(2, C, H, W), {"image": x0, "mask": xm["mask"]})


# --- source image --------------------------------------------------------------------------------
def make_source(**kw):
    return heads.build_modality("source_image", name="source", **COMMON, **kw)


@pytest.mark.parametrize(
    "transform,channels", [("downsample", None), ("edges", None), ("edges", 1), ("grayscale", None), ("grayscale", 1), ("invert", None)]
)
def test_source_transforms_shape_and_range(transform, channels):
    m = make_source(transform=transform, source_channels=channels, downsample_factor=2)
    # Extreme inputs (random ±1) give the largest gradients and the range's corners.
    x0 = torch.randint(0, 2, (4, C, H, W), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    for x in (x0, images()):
        src = m.from_batch({"image": x})
        assert src.shape == (4, channels or C, H, W)
        assert src.min() >= -1 and src.max() <= 1


def test_source_transform_values():
    x = images(B=2)
    torch.testing.assert_close(make_source(transform="invert").from_batch({"image": x}), -x)
    down = make_source(transform="downsample", downsample_factor=4).from_batch({"image": x})
    for i in range(0, H, 4):
        for j in range(0, W, 4):
            block_mean = x[:, :, i : i + 4, j : j + 4].mean(dim=(2, 3), keepdim=True)
            torch.testing.assert_close(down[:, :, i : i + 4, j : j + 4], block_mean.expand(-1, -1, 4, 4))
    gray = make_source(transform="grayscale", source_channels=1).from_batch({"image": x})
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    torch.testing.assert_close(gray[:, 0], luma)
    edges = make_source(transform="edges", source_channels=2).from_batch({"image": x})
    for b in range(2):
        g = luma[b].double().numpy()
        mag = np.hypot(ndimage.sobel(g, axis=0, mode="nearest"), ndimage.sobel(g, axis=1, mode="nearest"))
        ref = torch.from_numpy(2 * mag / (8 * math.sqrt(2)) - 1).float()
        torch.testing.assert_close(edges[b, 0], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(edges[b, 1], ref, rtol=1e-5, atol=1e-5)
    flat = make_source(transform="edges").from_batch({"image": torch.full((1, C, H, W), 0.3)})
    torch.testing.assert_close(flat, -torch.ones(1, C, H, W))  # no edges anywhere, borders included


def test_source_from_batch_prefers_dataset_source():
    x, s = images(B=2), images(B=2, seed=1)
    assert torch.equal(make_source(transform="invert").from_batch({"image": x, "source": s}), s)
    assert torch.equal(make_source().from_batch({"image": x, "source": s}), s)
    with pytest.raises(DataError, match="'source'"):
        make_source().from_batch({"image": x})
    with pytest.raises(DataError, match="source images"):
        make_source().from_batch({"image": x, "source": s[:, :1]})


def test_source_encode_head_loss_metrics():
    m = make_source(transform="grayscale", source_channels=1)
    src = m.from_batch({"image": images()})
    e = m.encode(src)
    assert e.shape == (4, C, H, W)
    torch.testing.assert_close(rms(e), torch.ones(4), rtol=1e-4, atol=1e-4)
    null = m.null_encoding(4)
    assert null.shape == (4, C, H, W) and m.null.weight.requires_grad
    torch.testing.assert_close(rms(null), torch.ones(4), rtol=1e-4, atol=1e-4)
    for R in (0, 2):
        out = m.head(fake_feats(B=4, R=R))
        assert out.shape == (4, 1, H, W) and torch.count_nonzero(out) == 0
    pred = torch.randn(4, 1, H, W, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(m.loss(pred, src), F.mse_loss(pred, src, reduction="none").mean((1, 2, 3)))
    ref_ll = torch.distributions.Normal(pred, 1.0).log_prob(src).sum((1, 2, 3))
    torch.testing.assert_close(m.log_likelihood(pred, src), ref_ll)
    out = m.readout(pred)
    assert out.min() >= -1 and out.max() <= 1
    met = m.metrics(out, src)
    ref_psnr = sum(psnr_ref(out[b], src[b]) for b in range(4)) / 4  # per-image PSNR, averaged
    assert float(met["psnr"]) == pytest.approx(ref_psnr, rel=1e-5)
    assert float(met["mse"]) == pytest.approx(float(F.mse_loss(out, src)), rel=1e-5)


def test_source_gradients():
    m = make_source(transform="edges")
    src = m.from_batch({"image": images(B=3)})
    m.loss(m.head(fake_feats()), src).mean().backward()
    assert m.decoder.linear.weight.grad.abs().sum() > 0
    pred = torch.randn(3, C, H, W, requires_grad=True)
    (m.expected_encoding(pred) * torch.randn(3, C, H, W)).sum().backward()
    assert pred.grad.abs().sum() > 0
    assert m.encoder.conv.weight.grad.abs().sum() > 0


def test_source_config_errors():
    with pytest.raises(ConfigError, match="'source_image'.*'downsample_factor'"):
        make_source(transform="downsample", downsample_factor=0)
    with pytest.raises(ConfigError, match="'source_image'.*'source_channels'"):
        make_source(transform="downsample", source_channels=1)
