"""Metrics: FID against a scipy oracle and closed forms, the reference classifier, simple scores."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from unidiff import metrics
from unidiff.data import DataConfig, build_datasets
from unidiff.errors import CheckpointError
from unidiff.metrics import (
    ClassifierFeatures,
    ReferenceClassifier,
    accuracy,
    compute_fid,
    cosine,
    fid_floor,
    get_reference_classifier,
    inception_feature_module,
    masked_mse,
    masked_psnr,
    psnr,
    recall_at_k,
)

DEBUG = str(Path(__file__).resolve().parents[1] / "configs" / "debug.yaml")


@pytest.fixture(scope="module")
def digits():
    return build_datasets(DataConfig(name="digits"))


def _scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """The Fréchet distance of the two feature Gaussians, written independently with scipy."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


class LinearFeatures(nn.Module):
    """Features = a fixed random projection of the pixels (FID has a closed form for it)."""

    def __init__(self, in_dim: int, num_features: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, num_features, bias=False)
        self.num_features = num_features

    def forward(self, x):
        return self.proj(x.flatten(1))


# ----------------------------------------------------------------------------------------------
# FID


def test_fid_matches_scipy(digits):
    train, val, info = digits
    torch.manual_seed(0)
    feats = ClassifierFeatures(ReferenceClassifier(info.image_shape, info.num_classes, width=8, feature_dim=16))
    real, fake = train.images[:600], val.images
    with torch.no_grad():
        f_real, f_fake = feats(real).double().numpy(), feats(fake).double().numpy()
    expected = _scipy_fid(f_real, f_fake)
    got = compute_fid(real, fake, feats, batch_size=128)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-8)


def test_fid_of_identical_sets_is_zero_and_grows_with_shift(digits):
    train, _, _ = digits
    torch.manual_seed(0)
    feats = LinearFeatures(64, 8)
    real = train.images[:400]
    scale = feats.proj.weight.sum(1).square().sum().item()  # ‖W 1‖²
    assert abs(compute_fid(real, real, feats)) < 1e-6 * scale
    # Shifting every pixel by c moves the feature mean by c·W1 and leaves the covariance alone,
    # so FID(x, x + c) = c² ‖W 1‖² exactly.
    shifts = [0.1, 0.3, 0.9]
    fids = [compute_fid(real, real + c, feats) for c in shifts]
    for c, fid in zip(shifts, fids):
        assert fid == pytest.approx(c**2 * scale, rel=1e-4)
    assert fids[0] < fids[1] < fids[2]


def test_fid_floor_is_fid_of_train_against_val(digits):
    train, val, _ = digits
    torch.manual_seed(0)
    feats = LinearFeatures(64, 8)
    with torch.no_grad():
        expected = _scipy_fid(feats(train.images).double().numpy(), feats(val.images).double().numpy())
    assert fid_floor(train, val, feats) == pytest.approx(expected, rel=1e-4)  # datasets as input


def test_inception_needs_a_local_file(tmp_path):
    missing = str(tmp_path / "weights-inception.pth")
    with pytest.raises(CheckpointError, match="weights-inception.pth"):
        inception_feature_module(missing)
    with pytest.raises(CheckpointError):
        inception_feature_module(None)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        inception_feature_module(str(garbage))


# ----------------------------------------------------------------------------------------------
# reference classifier


def test_reference_classifier_trains_caches_and_reloads(digits, tmp_path, monkeypatch):
    train, val, info = digits
    # The default recipe with fewer steps and a narrower net (the default takes ~2x longer).
    small = {"steps": 200, "width": 16}
    clf, acc = get_reference_classifier(train, val, info, str(tmp_path), **small)
    assert acc >= 0.95
    with torch.no_grad():
        logits = clf(val.images)
        feats = clf.features(val.images)
    assert logits.shape == (len(val), 10) and feats.shape == (len(val), clf.feature_dim)
    assert acc == pytest.approx((logits.argmax(-1) == val.labels).double().mean().item())
    (weights,) = tmp_path.glob("reference_*.safetensors")
    record = json.loads(weights.with_suffix(".json").read_text())
    assert record["val_accuracy"] == pytest.approx(acc)

    # The second call must come from the cache: training is now forbidden.
    def no_training(*args, **kwargs):
        raise AssertionError("retrained instead of loading the cache")

    monkeypatch.setattr(metrics, "train_reference_classifier", no_training)
    clf2, acc2 = get_reference_classifier(train, val, info, str(tmp_path), **small)
    assert acc2 == acc
    with torch.no_grad():
        torch.testing.assert_close(clf2(val.images), logits)
    # Different options or different data are a different cache entry.
    with pytest.raises(AssertionError, match="retrained"):
        get_reference_classifier(train, val, info, str(tmp_path), steps=5, width=16)
    with pytest.raises(AssertionError, match="retrained"):
        get_reference_classifier(train.subset(range(100)), val, info, str(tmp_path), **small)


# ----------------------------------------------------------------------------------------------
# simple scores against naive references


def test_accuracy():
    target = torch.tensor([0, 1, 2, 2, 1])
    logits = torch.zeros(5, 3)
    logits[torch.arange(5), torch.tensor([0, 1, 1, 2, 0])] = 1.0
    assert accuracy(logits, target) == pytest.approx(3 / 5)
    assert accuracy(torch.tensor([0, 1, 1, 2, 0]), target) == pytest.approx(3 / 5)


def test_psnr_and_masked_scores():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1
    y = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1
    per_image = [10 * math.log10(4.0 / ((x[i] - y[i]) ** 2).mean().item()) for i in range(3)]
    assert psnr(x, y) == pytest.approx(sum(per_image) / 3, rel=1e-5)

    mask = torch.zeros(3, 1, 4, 4)
    mask[0, :, :2] = 1  # top half of image 0
    mask[1, :, :, 1] = 1  # one column of image 1; image 2 has no masked pixel
    sq, n, psnrs = 0.0, 0, []
    for i in range(3):
        pixels = [(c, h, w) for c in range(2) for h in range(4) for w in range(4) if mask[i, 0, h, w]]
        vals = [(x[i, c, h, w] - y[i, c, h, w]).item() ** 2 for c, h, w in pixels]
        sq, n = sq + sum(vals), n + len(vals)
        if vals:
            psnrs.append(10 * math.log10(4.0 / (sum(vals) / len(vals))))
    assert masked_mse(x, y, mask) == pytest.approx(sq / n, rel=1e-5)
    assert masked_psnr(x, y, mask) == pytest.approx(sum(psnrs) / len(psnrs), rel=1e-5)


def test_cosine():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    assert cosine(a, b) == pytest.approx((0.0 + 1.0) / 2)


def _brute_force_recall(q, ql, gal, gl, k, exclude_self=False):
    """Recall@K from its definition, one query at a time in plain Python."""
    hits = 0
    for i in range(len(q)):
        cands = [j for j in range(len(gal)) if not (exclude_self and j == i)]
        sims = {j: float(torch.dot(q[i], gal[j]) / (q[i].norm() * gal[j].norm())) for j in cands}
        top = sorted(cands, key=lambda j: -sims[j])[:k]
        hits += any(int(gl[j]) == int(ql[i]) for j in top)
    return hits / len(q)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_recall_at_k_matches_its_definition(exclude_self):
    g = torch.Generator().manual_seed(0)
    q, ql = torch.randn(20, 5, generator=g), torch.randint(0, 3, (20,), generator=g)
    gal, gl = (q, ql) if exclude_self else (torch.randn(30, 5, generator=g), torch.randint(0, 3, (30,), generator=g))
    got = recall_at_k(q, ql, gal, gl, ks=(1, 3, 50), exclude_self=exclude_self, chunk=7)  # chunks split the queries
    assert list(got) == ["recall@1", "recall@3", "recall@50"]
    for k in (1, 3, 50):  # K = 50 exceeds the gallery: every candidate counts
        assert got[f"recall@{k}"] == pytest.approx(_brute_force_recall(q, ql, gal, gl, k, exclude_self))


def test_recall_at_k_by_hand():
    # Query 0 is nearest to gallery item 0 (other class), then 1 (its class); query 1 is the
    # gallery's item 2 exactly (its class). Recall@1 = 1/2, Recall@2 = 2/2.
    q = torch.tensor([[1.0, 0.1], [0.0, 1.0]])
    gal = torch.tensor([[1.0, 0.0], [1.0, 0.5], [0.0, 2.0]])
    got = recall_at_k(q, torch.tensor([0, 1]), gal, torch.tensor([1, 0, 1]), ks=(1, 2))
    assert got == {"recall@1": 0.5, "recall@2": 1.0}
    # Against itself, the self match is left out: each of two same-class items finds the other.
    same = recall_at_k(gal[:2], torch.tensor([0, 0]), gal[:2], torch.tensor([0, 0]), exclude_self=True)
    assert same == {"recall@1": 1.0}
    with pytest.raises(ValueError, match="exclude_self"):
        recall_at_k(q, torch.tensor([0, 1]), gal, torch.tensor([1, 0, 1]), exclude_self=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fid_on_the_gpu_matches_the_cpu(digits):
    train, val, _ = digits
    torch.manual_seed(0)
    feats = LinearFeatures(64, 8)
    expected = compute_fid(train.images, val.images, feats)
    assert compute_fid(train.images, val.images, feats.cuda()) == pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------------------------
# metrics from features: FID, IS, KID, precision/recall against independent references


def _features(n, d, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64) + shift


def test_fid_of_two_feature_sets_matches_scipy_sqrtm():
    a, b = _features(300, 12, 0), _features(200, 12, 1, shift=0.3)
    got = metrics.frechet_distance(metrics.FeatureStats.from_features(a), metrics.FeatureStats.from_features(b))
    assert got == pytest.approx(_scipy_fid(a.numpy(), b.numpy()), rel=1e-5)
    stats = metrics.FeatureStats.from_features(a, keep=7)
    np.testing.assert_allclose(stats.mu.numpy(), a.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma.numpy(), np.cov(a.numpy(), rowvar=False), rtol=1e-9, atol=1e-12)
    assert stats.features.shape == (7, 12) and stats.n == 300


def test_inception_score_matches_its_definition():
    logits = _features(40, 6, 2) * 2
    p = torch.softmax(logits, 1).numpy()
    marginal = p.mean(0)
    expected = math.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), axis=1)))
    mean, _ = metrics.inception_score(logits, splits=1)
    assert mean == pytest.approx(expected, rel=1e-6)
    # the random split assignment is a function of the seed
    assert metrics.inception_score(logits, splits=4, seed=3) == metrics.inception_score(logits, splits=4, seed=3)


def test_kid_matches_the_unbiased_polynomial_mmd():
    x, y = _features(25, 5, 3).numpy(), _features(25, 5, 4, shift=0.5).numpy()
    d = x.shape[1]

    def k(a, b):
        return (a @ b.T / d + 1.0) ** 3

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    mmd = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
           - 2 * kxy.mean())
    # one subset of every item (subset_size is capped at the set size): no randomness left
    mean, std = metrics.kernel_inception_distance(torch.from_numpy(x), torch.from_numpy(y), subsets=1, subset_size=10**6)
    assert mean == pytest.approx(mmd, rel=1e-6) and std == 0.0


def _brute_precision_recall(real, fake, k):
    """Kynkäänniemi et al. 2019 from the definition, one pair of points at a time."""

    def dist(a, b):
        return math.sqrt(sum((float(u) - float(v)) ** 2 for u, v in zip(a, b)))

    def radii(points):
        return [sorted(dist(p, q) for j, q in enumerate(points) if j != i)[k - 1] for i, p in enumerate(points)]

    def share_inside(points, centres):
        r = radii(centres)
        return sum(any(dist(p, c) <= r[j] for j, c in enumerate(centres)) for p in points) / len(points)

    return share_inside(fake, real), share_inside(real, fake)


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_matches_brute_force(k):
    real, fake = _features(40, 4, 5), _features(30, 4, 6, shift=1.5) * 0.7
    got = metrics.precision_recall(real, fake, k=k, chunk=7)
    assert got == pytest.approx(_brute_precision_recall(real.tolist(), fake.tolist(), k))
    assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0  # the sets overlap partly: a real test
    assert metrics.precision_recall(real, real, k=k) == (1.0, 1.0)
    with pytest.raises(ValueError, match="k=3"):
        metrics.precision_recall(real[:3], fake, k=3)


def test_generative_metrics_names_and_choices():
    ref = metrics.FeatureStats.from_features(_features(50, 4, 7), keep=50)
    fake = {"features": _features(20, 4, 8), "logits": _features(20, 3, 9)}
    out = metrics.generative_metrics(ref, fake, ["fid", "is", "kid", "pr"], kid_subset_size=10)
    assert set(out) == {"fid", "inception_score", "inception_score_std", "kid", "kid_std", "precision", "recall"}
    assert all(math.isfinite(v) for v in out.values())
    with pytest.raises(ValueError, match="ssim"):
        metrics.generative_metrics(ref, fake, ["ssim"])
    with pytest.raises(ValueError, match="logits"):
        metrics.generative_metrics(ref, {"features": fake["features"]}, ["is"])


def test_reference_statistics_are_cached_per_data_and_features(digits, tmp_path, monkeypatch):
    train, val, _ = digits
    torch.manual_seed(0)
    feats = LinearFeatures(64, 8)
    stats = metrics.reference_statistics(val, feats, str(tmp_path), batch_size=50, keep=20)
    with torch.no_grad():
        direct = feats(val.images).double()
    np.testing.assert_allclose(stats.mu.numpy(), direct.mean(0).numpy(), rtol=1e-6, atol=1e-9)
    assert stats.n == len(val) and stats.features.shape == (20, 8)
    (entry,) = tmp_path.glob("refstats_*.npz")
    with np.load(entry) as f:  # ADM-style mu/sigma beside the sums
        np.testing.assert_allclose(f["sigma"], np.cov(direct.numpy(), rowvar=False), rtol=1e-5, atol=1e-8)

    def no_features(*args, **kwargs):
        raise AssertionError("recomputed instead of loading the cache")

    monkeypatch.setattr(metrics, "feature_statistics", no_features)
    again = metrics.reference_statistics(val, feats, str(tmp_path), batch_size=50, keep=20)
    torch.testing.assert_close(again.feature_cov_sum, stats.feature_cov_sum, rtol=0, atol=0)
    other = LinearFeatures(64, 8)  # other weights: another extractor
    for args in ((val, other, str(tmp_path)), (train, feats, str(tmp_path))):
        with pytest.raises(AssertionError, match="recomputed"):
            metrics.reference_statistics(*args, batch_size=50, keep=20)
    with pytest.raises(AssertionError, match="recomputed"):
        metrics.reference_statistics(val, feats, str(tmp_path), batch_size=50, max_items=10, keep=20)


def _recording_dataset(images):
    """An in-memory dataset that records the size of every batch it materialises."""
    from unidiff.data import InMemoryDataset

    class Recording(InMemoryDataset):
        def batch(self, index):
            self.sizes.append(len(index))
            return super().batch(index)

        def __getitem__(self, i):
            raise AssertionError("items read one by one: not the batched stream")

    ds = Recording(images, torch.zeros(len(images), dtype=torch.long))
    ds.sizes = []
    return ds


class RecordingFeatures(LinearFeatures):
    def __init__(self, in_dim, num_features):
        super().__init__(in_dim, num_features)
        self.sizes = []

    def forward(self, x):
        self.sizes.append(len(x))
        return super().forward(x)


def test_streamed_statistics_and_floor_match_the_all_at_once_closed_form(tmp_path):
    """The reference split and the floor's other split are streamed batch by batch: the same Fréchet
    distance as scipy on every feature at once, and no batch above the batch size is ever built."""
    from unidiff.config import load_config
    from unidiff.evaluate import _image_metrics

    g = torch.Generator().manual_seed(0)
    train = _recording_dataset(torch.rand(53, 1, 4, 4, generator=g) * 2 - 1)
    val = _recording_dataset(torch.rand(41, 1, 4, 4, generator=g) * 1.6 - 0.7)
    fake = torch.rand(30, 1, 4, 4, generator=g) * 2 - 1
    torch.manual_seed(1)
    feats = RecordingFeatures(16, 5)
    with torch.no_grad():
        f_train, f_val, f_fake = (feats.proj(x.flatten(1)).double().numpy() for x in (train.images, val.images, fake))

    # the statistics of one set: the oracle's moments
    stats = metrics.feature_statistics(train, feats, batch_size=7, keep=10)
    np.testing.assert_allclose(stats.mu.numpy(), f_train.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.sigma.numpy(), np.cov(f_train, rowvar=False), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.features.numpy(), f_train[:10], rtol=1e-6)
    assert stats.n == 53 and max(train.sizes) <= 7 and max(feats.sizes) <= 7

    # evaluation's fid and fid_floor: the reference (val) whole, the floor's first 20 train images
    train.sizes.clear(), val.sizes.clear(), feats.sizes.clear()
    cfg = load_config(DEBUG, [f"eval.cache_dir={tmp_path}", "eval.batch_size=6", "eval.floor_samples=20",
                              "eval.n_samples=30"])
    out = _image_metrics(fake, cfg, train, val, feats, seed=0)
    assert out["fid"] == pytest.approx(_scipy_fid(f_val, f_fake), rel=1e-6)
    assert out["fid_floor"] == pytest.approx(_scipy_fid(f_val, f_train[:20]), rel=1e-6)
    assert sum(train.sizes) == 24 and max(train.sizes + val.sizes + feats.sizes) <= 6
    # eval.floor_samples=0: the floor at the samples' count (eval.n_samples)
    cfg = load_config(DEBUG, [f"eval.cache_dir={tmp_path / 'b'}", "eval.batch_size=6", "eval.n_samples=30"])
    out = _image_metrics(fake, cfg, train, val, feats, seed=0)
    assert out["fid_floor"] == pytest.approx(_scipy_fid(f_val, f_train[:30]), rel=1e-6)
