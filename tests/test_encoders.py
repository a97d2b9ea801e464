"""The representation encoder (DESIGN.md §4): multi-tower training, losses, Recall@K, PCA, external loaders.

Oracles: hand-written InfoNCE / SupCon sums, a brute-force numpy Recall@K, scikit-learn's PCA,
transformers' own Dinov2Model forward; training is checked on the bundled 8x8 digits.
"""

import json
import math
import sys

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA

from unidiff.encoders import (
    EncoderConfig,
    PCAWhitener,
    encode_images,
    info_nce,
    load_encoder,
    load_external_encoder,
    symmetric_info_nce,
    train_encoder,
)
from unidiff.encoders.training import PairSampler, augment
from unidiff.metrics import recall_at_k
from unidiff.encoders.text import CharTokenizer, TextTower, class_queries, class_titles
from unidiff.errors import CheckpointError, ConfigError, DataError

CLASSES = [str(i) for i in range(10)]
TINY = dict(embed_dim=32, width=16, text_width=32, text_layers=1, text_heads=2, batch_size=64, device="cpu", log_every=20, warmup_steps=5)


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:1400], perm[1400:]
    return x[tr], y[tr], x[va], y[va]


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """One 3-tower run with alignment on the digits (the expensive part of this file)."""
    out = tmp_path_factory.mktemp("enc3")
    cfg = EncoderConfig(towers=3, steps=100, lr=2e-3, learn_temperature=False, out_dir=str(out), **TINY)
    xt, yt, xv, yv = digits
    model, metrics = train_encoder(cfg, xt, yt, CLASSES, xv, yv)
    return cfg, model, metrics, out


# --- training ------------------------------------------------------------------------------
def test_training_lowers_losses_and_raises_recall(trained):
    _, _, m, _ = trained
    assert not m["cached"]
    for k in ("total", "image", "text"):
        assert m["loss_end"][k] < 0.8 * m["loss_start"][k], (k, m["loss_start"], m["loss_end"])
    assert m["loss_start"]["query_text"] == 0.0  # 3 towers: no query-text loss
    # Chance Recall@1 with 10 balanced classes is ~0.1; training must beat it and its own start.
    assert m["recall@1"] > 0.8
    assert m["recall@1"] > m["recall@1_init"] + 0.03, (m["recall@1_init"], m["recall@1"])
    assert m["recall@5"] >= m["recall@1"]


def test_saved_encoder_reloads_and_recall_matches(trained, digits):
    _, model, m, out = trained
    assert {p.name for p in out.iterdir()} >= {"encoder.safetensors", "encoder_config.json", "metrics.json"}
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["recall@1"] == pytest.approx(m["recall@1"])
    loaded = load_encoder(out)
    xv, yv = digits[2], digits[3]
    e1, e2 = encode_images(model, xv, 100), encode_images(loaded, xv, 64)
    assert e1.shape == (len(xv), 32)
    torch.testing.assert_close(e1, e2, rtol=1e-5, atol=1e-5)
    assert torch.allclose(e1.norm(dim=1), torch.ones(len(xv)), atol=1e-5)  # L2-normalised
    assert recall_at_k(e2, yv, e2, yv, exclude_self=True)["recall@1"] == pytest.approx(m["recall@1"])


def test_four_towers_train_query_text_loss(digits, tmp_path):
    xt, yt, xv, yv = digits
    cfg = EncoderConfig(towers=4, steps=25, out_dir=str(tmp_path), **{**TINY, "batch_size": 32})
    model, m = train_encoder(cfg, xt, yt, CLASSES, xv, yv)
    assert model.towers == 4 and m["towers"] == 4
    assert math.isfinite(m["loss_start"]["query_text"]) and m["loss_start"]["query_text"] > 0
    assert m["loss_end"]["query_text"] < m["loss_start"]["query_text"]
    assert m["loss_end"]["total"] < m["loss_start"]["total"]
    assert load_encoder(tmp_path).towers == 4


def test_training_is_deterministic_under_the_seed(digits):
    xt, yt = digits[0][:300], digits[1][:300]
    runs = [train_encoder(EncoderConfig(steps=4, seed=s, **TINY), xt, yt, CLASSES)[0].state_dict() for s in (3, 3, 4)]
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=0, atol=0)
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_cache_reuse_and_ablation(digits, tmp_path):
    xt, yt, xv, yv = digits[0][:300], digits[1][:300], digits[2][:100], digits[3][:100]
    cfg = EncoderConfig(steps=4, ablation=True, out_dir=str(tmp_path), **TINY)
    m1, met1 = train_encoder(cfg, xt, yt, CLASSES, xv, yv)
    assert met1["cached"] is False
    # The ablation: the same run with the image-text losses off, in its own cached folder.
    assert set(met1["ablation"]) == {"alignment", "no_alignment"}
    assert all("recall@1" in v for v in met1["ablation"].values())
    sub = tmp_path / "ablation_no_alignment"
    sub_metrics = json.loads((sub / "metrics.json").read_text())
    assert sub_metrics["alignment"] is False and sub_metrics["loss_start"]["text"] == 0.0
    assert "ablation" in json.loads((tmp_path / "metrics.json").read_text())

    weights = tmp_path / "encoder.safetensors"
    stamp = (weights.stat().st_mtime_ns, (sub / "encoder.safetensors").stat().st_mtime_ns)
    m2, met2 = train_encoder(cfg, xt, yt, CLASSES, xv, yv)  # same config + data: loaded, not trained
    assert met2["cached"] is True
    assert (weights.stat().st_mtime_ns, (sub / "encoder.safetensors").stat().st_mtime_ns) == stamp
    for k, v in m1.state_dict().items():
        torch.testing.assert_close(m2.state_dict()[k], v, rtol=0, atol=0)

    # A changed config or changed data invalidates the cache.
    _, met3 = train_encoder(EncoderConfig(steps=4, seed=1, out_dir=str(tmp_path), **TINY), xt, yt, CLASSES, xv, yv)
    assert met3["cached"] is False and weights.stat().st_mtime_ns != stamp[0]
    _, met4 = train_encoder(EncoderConfig(steps=4, seed=1, out_dir=str(tmp_path), **TINY), xt[:-1], yt[:-1], CLASSES, xv, yv)
    assert met4["cached"] is False


def test_learning_rate_follows_warmup_then_cosine(digits):
    """The loop's rate is diffusers' cosine schedule: lr * t / W during warm-up, then
    lr * (1 + cos(pi (t - W) / (S - W))) / 2 (closed form, written out here)."""
    xt, yt = digits[0][:200], digits[1][:200]
    W, S, lr = 3, 12, 1e-3
    cfg = EncoderConfig(steps=S, lr=lr, **{**TINY, "warmup_steps": W, "log_every": 1})
    curve = train_encoder(cfg, xt, yt, CLASSES)[1]["loss_curve"]
    assert [c["step"] for c in curve] == list(range(S))
    for c in curve:
        t = c["step"]
        want = lr * t / W if t < W else lr * 0.5 * (1 + math.cos(math.pi * (t - W) / (S - W)))
        assert c["lr"] == pytest.approx(want, rel=1e-12, abs=1e-15), t
    constant = EncoderConfig(steps=4, lr=lr, lr_schedule="constant", **{**TINY, "log_every": 1})
    assert {c["lr"] for c in train_encoder(constant, xt, yt, CLASSES)[1]["loss_curve"]} == {lr}


def test_bad_inputs_raise_named_errors(digits, tmp_path):
    xt, yt = digits[0][:50], digits[1][:50]
    with pytest.raises(ConfigError, match="towers"):
        train_encoder(EncoderConfig(towers=5), xt, yt, CLASSES)
    with pytest.raises(ConfigError, match="positives"):
        EncoderConfig(positives="item").validate()
    with pytest.raises(ConfigError, match="lr_schedule"):
        EncoderConfig(lr_schedule="cosine_to_ten_percent").validate()
    with pytest.raises(DataError, match="labels"):
        train_encoder(EncoderConfig(steps=1, **TINY), xt, yt, CLASSES[:5])
    with pytest.raises(DataError, match="images"):
        train_encoder(EncoderConfig(steps=1, **TINY), xt[:, 0], yt, CLASSES)
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        load_encoder(tmp_path)


# --- losses --------------------------------------------------------------------------------
def _supcon_reference(a, c, tau, mask):
    """-1/|P_i| Σ_p log(exp(a_i·c_p/τ) / Σ_j exp(a_i·c_j/τ)), averaged over anchors with a positive."""
    losses = []
    for i in range(len(a)):
        s = [float(a[i] @ c[j]) / tau for j in range(len(c))]
        log_z = math.log(sum(math.exp(v) for v in s))
        pos = [j for j in range(len(c)) if mask[i][j]]
        if pos:
            losses.append(-sum(s[p] - log_z for p in pos) / len(pos))
    return sum(losses) / len(losses)


def test_info_nce_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=1)
    c = torch.nn.functional.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=1)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 1]], dtype=torch.bool)
    got = info_nce(a, c, 0.3, mask)
    assert float(got) == pytest.approx(_supcon_reference(a, c, 0.3, mask.tolist()), rel=1e-10)
    # No mask = the diagonal (classic InfoNCE / CLIP).
    sq = c[:4]
    eye = torch.eye(4, dtype=torch.bool).tolist()
    assert float(info_nce(a, sq, 0.07)) == pytest.approx(_supcon_reference(a, sq, 0.07, eye), rel=1e-10)
    m4 = mask[:, :4]
    sym = 0.5 * (_supcon_reference(a, sq, 0.5, m4.tolist()) + _supcon_reference(sq, a, 0.5, m4.T.tolist()))
    assert float(symmetric_info_nce(a, sq, 0.5, m4)) == pytest.approx(sym, rel=1e-10)


def test_info_nce_ranks_aligned_pairs_lower():
    g = torch.Generator().manual_seed(1)
    a = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    noise = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    assert info_nce(a, a, 0.1) < info_nce(a, noise, 0.1)


# --- Recall@K ------------------------------------------------------------------------------
# --- text side, views, pairs ---------------------------------------------------------------
def test_titles_queries_and_padding_invariance():
    assert {"a handwritten three", "the digit 3", "a scanned number three"} <= set(class_titles("3"))
    assert class_titles("three") == class_titles("3")
    assert "a photo of a golden retriever" in class_titles("golden_retriever")
    assert {"three", "digit 3"} <= set(class_queries("3"))
    tok = CharTokenizer(16)
    ids = tok(["three", "the digit 3 and more than sixteen"])
    assert ids.shape == (2, 16) and (ids[0, 5:] == 0).all() and (ids[1] != 0).all()
    torch.manual_seed(0)
    tower = TextTower(tok.vocab_size, 16, 8, layers=1, heads=2, max_len=16).eval()
    # Padding must not change a title's embedding: alone vs batched with a longer one.
    alone = tower(tok(["three"]))
    batched = tower(tok(["three", "a handwritten digit"]))[:1]
    torch.testing.assert_close(alone, batched, rtol=1e-5, atol=1e-6)


def test_augment_is_a_shift_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 2, 5, 5, generator=g) * 2 - 1
    torch.testing.assert_close(augment(x, g, max_shift=0, noise_std=0.0), x)
    y = augment(x, g, max_shift=1, noise_std=0.0)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    for b in range(len(x)):
        crops = [padded[b, :, dy : dy + 5, dx : dx + 5] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(y[b], c) for c in crops)


def test_pair_sampler_partners_share_the_class():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    item, partner = PairSampler(labels, same_item_prob=0.3)(2000, torch.Generator().manual_seed(0))
    assert torch.equal(labels[item], labels[partner])
    frac_same = (item == partner).float().mean()
    # P(same) = 0.3 + 0.7 * E[1/|class|] over items; class 3 has one image and is always "same".
    expected = 0.3 + 0.7 * float((1.0 / torch.bincount(labels)[labels]).mean())
    assert abs(float(frac_same) - expected) < 0.05


# --- PCA -----------------------------------------------------------------------------------
def _align_signs(a, b):
    return a * np.sign(np.sum(a * b, axis=0, keepdims=True))


def test_pca_matches_sklearn_and_whitens():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6)
    for whiten in (True, False):
        p = PCAWhitener().fit(torch.tensor(X), dim=3, whiten=whiten)
        ours = p.transform(torch.tensor(X)).numpy()
        ref = PCA(n_components=3, whiten=whiten, svd_solver="full").fit_transform(X)
        np.testing.assert_allclose(_align_signs(ours, ref), ref, atol=1e-8)
    full = PCAWhitener().fit(torch.tensor(X), dim=6, whiten=True)
    Y = full.transform(torch.tensor(X)).numpy()
    np.testing.assert_allclose(Y.mean(0), 0, atol=1e-10)
    np.testing.assert_allclose(np.cov(Y, rowvar=False), np.eye(6), atol=1e-8)  # identity on train
    np.testing.assert_allclose(full.inverse_transform(torch.tensor(Y)).numpy(), X, atol=1e-10)  # exact round trip
    # float32 in -> float32 out
    assert full.transform(torch.tensor(X, dtype=torch.float32)).dtype == torch.float32


def test_pca_save_load_and_errors(tmp_path):
    X = torch.randn(50, 5, generator=torch.Generator().manual_seed(0))
    p = PCAWhitener().fit(X, dim=2)
    p.save(tmp_path / "pca.safetensors")
    q = PCAWhitener.load(tmp_path / "pca.safetensors")
    torch.testing.assert_close(q.transform(X), p.transform(X), rtol=0, atol=0)
    r = PCAWhitener().load_state_dict(p.state_dict())
    torch.testing.assert_close(r.inverse_transform(r.transform(X)), p.inverse_transform(p.transform(X)), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="dim"):
        PCAWhitener().fit(X, dim=6)
    with pytest.raises(ConfigError, match="not fitted"):
        PCAWhitener().transform(X)
    with pytest.raises(CheckpointError, match="nope"):
        PCAWhitener.load(tmp_path / "nope.safetensors")


# --- external encoders ---------------------------------------------------------------------
def test_external_loader_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="kind"):
        load_external_encoder("resnet", tmp_path)
    for bad in (None, ""):
        with pytest.raises(CheckpointError):
            load_external_encoder("dinov2", bad)
    missing = tmp_path / "no_such_weights"
    with pytest.raises(CheckpointError, match=str(missing)):
        load_external_encoder("dinov2", missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=str(empty)):
        load_external_encoder("clip", empty)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "readme.txt").write_text("not a model")
    with pytest.raises(CheckpointError, match=str(junk)):
        load_external_encoder("dinov2", junk)
    # open_clip missing: a clear instruction, not an ImportError traceback.
    ckpt = tmp_path / "clip.pt"
    ckpt.write_bytes(b"\0" * 8)
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ConfigError, match="pip install open_clip_torch"):
        load_external_encoder("clip", ckpt)


def test_dinov2_loads_from_a_local_folder(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14)
    ref = Dinov2Model(cfg).eval()
    ref.save_pretrained(tmp_path)
    enc = load_external_encoder("dinov2", tmp_path)
    assert enc.dim == 32
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(enc.backbone.state_dict()[k], v, rtol=0, atol=0)
    # At the native size no resize happens: features = transformers' CLS on ImageNet-normalised pixels.
    x = torch.rand(3, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = ref(pixel_values=((x + 1) / 2 - mean) / std).pooler_output
    torch.testing.assert_close(enc(x), want, rtol=1e-5, atol=1e-5)
    # Tiny grey digits are upsampled and broadcast to RGB; encode_images batches through it.
    grey = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    feats = encode_images(enc, grey, batch_size=2)
    assert feats.shape == (5, 32) and torch.isfinite(feats).all()
    assert not torch.allclose(feats[0], feats[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda(digits, tmp_path):
    xt, yt, xv, yv = digits
    cfg = EncoderConfig(towers=4, steps=100, out_dir=str(tmp_path), **{**TINY, "device": "cuda"})
    model, m = train_encoder(cfg, xt, yt, CLASSES, xv, yv)
    assert next(model.parameters()).is_cuda
    assert m["recall@1"] > 0.8 and m["loss_end"]["total"] < m["loss_start"]["total"]
    # The saved encoder loads on the CPU and gives the same embeddings up to kernel differences.
    torch.testing.assert_close(encode_images(load_encoder(tmp_path), xv), encode_images(model, xv), rtol=1e-3, atol=1e-3)
