"""The Inception path end to end, with a randomly initialised weights file the test writes.

The standard FID weights are never downloaded (nor shipped); the network is torch-fidelity's
``FeatureExtractorInceptionV3`` built without weights, re-initialised, and its state dict saved:
the same file layout as ``weights-inception-2015-12-05-6726825d.pth``.
"""

import json
import math
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

from unidiff import metrics
from unidiff.cli import main
from unidiff.config import load_config
from unidiff.data import build_datasets
from unidiff.evaluate import evaluate
from unidiff.errors import CheckpointError

fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")

DEBUG = str(Path(__file__).resolve().parents[1] / "configs" / "debug.yaml")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random-weights Inception state dict file (ReLU-scaled init: features of order one)."""
    with mock.patch.object(fidelity, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None):
        net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


def test_features_are_torch_fidelitys_on_uint8_rgb(weights):
    feats = metrics.inception_feature_module(str(weights))
    g = torch.Generator().manual_seed(0)
    grey = torch.rand(3, 1, 12, 12, generator=g) * 2 - 1  # (B, 1, H, W) in [-1, 1]
    out = feats.extract(grey)
    assert out["features"].shape == (3, 2048) and out["logits"].shape == (3, 1008)
    assert out["features"].std() > 1e-3  # not a degenerate network
    # an independent path: torch-fidelity's own network on the same image as uint8 RGB
    reference = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                     feature_extractor_weights_path=str(weights))
    rgb = ((grey + 1) * 127.5).round().to(torch.uint8).repeat(1, 3, 1, 1)
    pool, logits = reference(rgb)
    torch.testing.assert_close(out["features"], pool)
    torch.testing.assert_close(out["logits"], logits)
    torch.testing.assert_close(feats(grey), pool)  # forward: the FID features


def test_weights_come_from_the_config_or_the_environment(weights, monkeypatch):
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    with pytest.raises(CheckpointError, match="eval.inception_weights.*UNIDIFF_INCEPTION_WEIGHTS"):
        metrics.inception_weights_path(None)
    assert metrics.inception_weights_path(str(weights)) == str(weights)
    monkeypatch.setenv(metrics.INCEPTION_ENV, str(weights))
    assert metrics.inception_weights_path(None) == str(weights)
    wrong = weights.parent / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(CheckpointError, match="wrong.pth"):
        metrics.inception_feature_module(str(wrong))


def test_evaluate_with_inception_metrics(weights, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    cache = f"eval.cache_dir={tmp_path / 'cache'}"
    assert main(["train", DEBUG, f"run.dir={run}", cache, "train.sample_every=0"]) == 0
    small = [cache, "eval.n_samples=8", "eval.batch_size=8", "eval.features=inception", "eval.metrics=[fid,is,kid,pr]"]

    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    capsys.readouterr()
    assert main(["evaluate", str(run), *small]) == 2  # no weights: one line naming the key, no file
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval.inception_weights" in err[0]
    assert not (run / "metrics.json").exists()

    # Inception on a CPU is slow (299x299 inputs): 8 samples against 8 val images, floor 8 train images
    monkeypatch.setenv(metrics.INCEPTION_ENV, str(weights))
    train, val, info = build_datasets(load_config(run / "config.yaml").data)
    evaluate(run, small, datasets=(train, val.subset(range(8)), info))
    out = json.loads((run / "metrics.json").read_text())
    for key in ("fid", "fid_floor", "inception_score", "kid", "precision", "recall"):
        assert math.isfinite(out[key]), key
    assert out["fid"] >= 0 and 0 <= out["precision"] <= 1 and 0 <= out["recall"] <= 1
    assert out["inception_score"] >= 1.0  # exp of a mean KL
    # the reference (val) and floor (8 train images) statistics were cached, keyed by data and weights
    assert len(list((tmp_path / "cache").glob("refstats_*.npz"))) == 2
    # the classifier-judged metrics do not depend on the FID features
    assert 0 <= out["class_conditional_accuracy"] <= 1
