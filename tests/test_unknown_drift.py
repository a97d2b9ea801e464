"""``sample(unknown_drift=...)``: what the drift ``Â`` holds for the modalities that are not given
(DESIGN.md §3.3), its config keys and ``unidiff sample --unknown-drift``.

The sampler tests run the fakes of ``diffusion_fakes.py`` against diffusers' own DDIM loop on the
de-drifted ``y = z - κ A`` with the drift built here from the modality objects (the oracle).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from diffusion_fakes import FakeLabel, FakeModel, TinyDenoiser, onehot_logits, tile_rows
from unidiff.diffusion import DriftSchedule, sample
from unidiff.errors import ConfigError

SHAPE = (1, 4, 4)
T = 100
BETAS = dict(beta_start=1e-3, beta_end=0.2)
STEPS = 6


class _Label(FakeLabel):
    kind = "label"  # so class_to_image finds it by kind


def _two_modalities():
    """A known label (π = 0.7) and a second label that is never given (π = 0.5), whose head
    always predicts class 2 (its E(x̂) is far from its E(∅))."""
    label = _Label("label", SHAPE, 3, weight=0.7, seed=0)
    other = FakeLabel("other", SHAPE, 3, weight=0.5, seed=1)
    return label, other


def _kappa(t):
    abar = float(DDIMScheduler(num_train_timesteps=T, **BETAS).alphas_cumprod[t])
    return math.sqrt(abar * (1 - abar))


def _ddim_oracle(A, eps_fn, seed, B):
    """diffusers' DDIM on y_t = z_t - κ_t A, z_T ~ N(0, I), with a fixed drift A (B, C, H, W)."""
    sched = DDIMScheduler(num_train_timesteps=T, clip_sample=False, set_alpha_to_one=True, **BETAS)
    sched.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(seed)
    z = randn_tensor((B, *SHAPE), generator=g, dtype=torch.float32)
    y = z - _kappa(int(sched.timesteps[0])) * A
    path = []
    for t in sched.timesteps.tolist():
        y = sched.step(eps_fn(y, t), t, y, generator=g).prev_sample
        path.append(y)
    return path


def _model(net, labels, A_seen, prediction="epsilon"):
    """The image head de-drifts with ``A_seen``; the label head is right, the other head says 2."""
    s = DriftSchedule.from_config("linear", T, **BETAS)
    label, other = _two_modalities()

    def image_fn(z, t):
        return net(z - s.at("kappa", t, z) * tile_rows(A_seen, z.shape[0]), t)

    def aux_fn(z, t):
        n = z.shape[0]
        return {"label": tile_rows(onehot_logits(labels, 3), n),
                "other": onehot_logits(torch.full((n,), 2, dtype=torch.long), 3)}

    return s, label, other, FakeModel({"label": label, "other": other}, image_fn, aux_fn, SHAPE, prediction)


def test_null_encoding_drift_is_known_encodings_plus_null_encodings():
    labels = torch.tensor([2, 0, 1])
    label, other = _two_modalities()
    # The oracle drift, from the modality objects: 0.7 E_label(y) + 0.5 E_other(∅).
    A_null = 0.7 * label.table[labels] + 0.5 * other.null.expand(3, *SHAPE)
    net = TinyDenoiser(1, T)
    s, _, _, model = _model(net, labels, A_null)
    seen, path = [], []
    out = sample(model, s, "class_to_image", known={"label": labels}, scheduler="ddim", num_steps=STEPS,
                 generator=torch.Generator().manual_seed(0), convert_with="known", unknown_drift="null_encoding",
                 callback=lambda i, t, y, A_hat: (seen.append(A_hat), path.append(y)))
    assert len(seen) == STEPS
    for A_hat in seen:
        torch.testing.assert_close(A_hat, A_null, rtol=0, atol=1e-6)
    ref = _ddim_oracle(A_null, lambda y, t: net(y, t), 0, 3)
    for got, want in zip(path, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.image, ref[-1].clamp(-1, 1), rtol=1e-4, atol=1e-5)
    assert torch.equal(out.aux["label"], labels)


def test_predicted_drift_is_the_heads_and_differs_from_null():
    labels = torch.tensor([2, 0, 1])
    label, other = _two_modalities()
    A_pred = 0.7 * label.table[labels] + 0.5 * other.table[torch.full((3,), 2)]  # the "other" head says 2
    A_null = 0.7 * label.table[labels] + 0.5 * other.null.expand(3, *SHAPE)
    net = TinyDenoiser(1, T)
    s, _, _, model = _model(net, labels, A_pred)
    kw = dict(known={"label": labels}, scheduler="ddim", num_steps=STEPS, convert_with="known")
    seen, path = [], []
    out_p = sample(model, s, "class_to_image", generator=torch.Generator().manual_seed(0), unknown_drift="predicted",
                   callback=lambda i, t, y, A_hat: (seen.append(A_hat), path.append(y)), **kw)
    for A_hat in seen:
        torch.testing.assert_close(A_hat, A_pred, rtol=0, atol=1e-5)
    for got, want in zip(path, _ddim_oracle(A_pred, lambda y, t: net(y, t), 0, 3)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    out_d = sample(model, s, "class_to_image", generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(out_d.image, out_p.image)  # predicted is the default
    out_n = sample(model, s, "class_to_image", generator=torch.Generator().manual_seed(0),
                   unknown_drift="null_encoding", **kw)
    assert float((A_pred - A_null).abs().max()) > 0.1
    assert float((out_n.image - out_p.image).abs().max()) > 1e-3  # the two choices are different chains


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("convert_with", ["known", "predicted"])
def test_nothing_unknown_gives_bit_identical_samples(prediction, convert_with):
    # Both modalities given: Â is the known encodings under either choice, bit for bit.
    labels, others = torch.tensor([2, 0, 1]), torch.tensor([1, 1, 0])
    net = TinyDenoiser(1, T, seed=2)
    s, _, _, model = _model(net, labels, torch.zeros(3, *SHAPE), prediction)
    outs = [sample(model, s, "conditional", known={"label": labels, "other": others}, scheduler="ddpm", num_steps=STEPS,
                   guidance_scale=2.0, generator=torch.Generator().manual_seed(1), convert_with=convert_with,
                   unknown_drift=drift) for drift in ("predicted", "null_encoding")]
    assert torch.equal(outs[0].image, outs[1].image)


def test_image_only_model_ignores_the_choice():
    s = DriftSchedule.from_config("linear", T, **BETAS)
    net = TinyDenoiser(1, T, seed=3)
    model = FakeModel({}, lambda z, t: net(z, t), lambda z, t: {}, SHAPE, "epsilon")
    outs = [sample(model, s, "joint", batch_size=2, scheduler="ddim", num_steps=STEPS,
                   generator=torch.Generator().manual_seed(4), unknown_drift=d) for d in ("predicted", "null_encoding")]
    assert torch.equal(outs[0].image, outs[1].image)


def test_null_encoding_with_predicted_conversion_reads_at_the_models_own_drift():
    # The ε head is exact under its own drift Â_θ (every head's prediction): ε = (z - a x0 - κ Â_θ)/σ.
    # The joint chain under null_encoding carries A_∅ = Σ π E(∅) ≠ Â_θ; the predicted conversion
    # reads x̂0 at z - κ Â_θ, so DDIM (η = 0, trailing spacing) ends on x0. The known reading ends
    # γ σ_t (Â_θ - A_∅) off at the last step (t = 19), DESIGN.md §3.3.
    s = DriftSchedule.from_config("linear", T, **BETAS)
    label, other = _two_modalities()
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, *SHAPE, generator=g)
    believed = torch.tensor([0, 1, 2])
    A_theta = 0.7 * label.table[believed] + 0.5 * other.table[torch.full((3,), 2)]
    A_null = (0.7 * label.null + 0.5 * other.null).expand(3, *SHAPE)

    def image_fn(z, t):
        return (z - s.at("a", t, z) * x0 - s.at("kappa", t, z) * A_theta) / s.at("sigma", t, z)

    def aux_fn(z, t):
        return {"label": onehot_logits(believed, 3), "other": onehot_logits(torch.full((3,), 2), 3)}

    model = FakeModel({"label": label, "other": other}, image_fn, aux_fn, SHAPE, "epsilon")
    kw = dict(batch_size=3, scheduler="ddim", num_steps=5, clamp=False, unknown_drift="null_encoding",
              scheduler_kwargs={"timestep_spacing": "trailing"})
    out_p = sample(model, s, "joint", generator=torch.Generator().manual_seed(0), convert_with="predicted", **kw)
    out_k = sample(model, s, "joint", generator=torch.Generator().manual_seed(0), convert_with="known", **kw)
    torch.testing.assert_close(out_p.image, x0, atol=1e-4, rtol=1e-4)
    sigma_19 = math.sqrt(1 - float(DDIMScheduler(num_train_timesteps=T, **BETAS).alphas_cumprod[19]))
    torch.testing.assert_close(out_k.image, x0 + s.gamma * sigma_19 * (A_theta - A_null), atol=1e-4, rtol=1e-4)


def test_bad_unknown_drift_is_a_one_line_config_error():
    labels = torch.tensor([2, 0, 1])
    s, _, _, model = _model(TinyDenoiser(1, T), labels, torch.zeros(3, *SHAPE))
    with pytest.raises(ConfigError) as err:
        sample(model, s, "class_to_image", known={"label": labels}, num_steps=2, unknown_drift="prior")
    msg = str(err.value)
    assert "unknown_drift" in msg and "'prior'" in msg and "null_encoding" in msg and "\n" not in msg


# --- the config keys and `unidiff sample --unknown-drift` -----------------------------------------
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from test_sample_shards import run  # noqa: E402,F401 (the tiny trained debug run, a module fixture)
from unidiff.cli import main  # noqa: E402
from unidiff.config import load_config  # noqa: E402
from unidiff.io import seed_for  # noqa: E402
from unidiff.modality import images_to_uint8  # noqa: E402
from unidiff.pipeline import UnifiedDiffusionPipeline  # noqa: E402

DEBUG = str(Path(__file__).resolve().parents[1] / "configs" / "debug.yaml")


@pytest.mark.parametrize("key", ["eval.unknown_drift", "sample.unknown_drift"])
def test_config_keys_accept_the_choices_and_name_a_bad_value(key, capsys, tmp_path):
    section, leaf = key.split(".")
    assert load_config(DEBUG)[section][leaf].value == "predicted"
    assert load_config(DEBUG, [f"{key}=null_encoding"])[section][leaf].value == "null_encoding"
    rc = main(["train", DEBUG, f"run.dir={tmp_path / 'r'}", "--dry-run", f"{key}=prior"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("unidiff: error: "), err
    assert key in err[0] and "prior" in err[0]
    assert not (tmp_path / "r").exists()  # --dry-run writes nothing


def _sample(run_dir, out, *extra):
    assert main(["sample", str(run_dir), "--task", "joint", "-n", "4", "--shard-size", "4", "--steps", "2",
                 "--seed", "9", "--out", str(out), *extra]) == 0
    with np.load(out) as f:
        arrays = {k: f[k] for k in f.files}
    return arrays, json.loads(out.with_suffix(".json").read_text())


def test_unidiff_sample_unknown_drift_is_sampled_and_recorded(run, tmp_path):  # noqa: F811
    null, record = _sample(run, tmp_path / "null.npz", "--unknown-drift", "null_encoding")
    assert record["unknown_drift"] == "null_encoding"
    # Oracle: the run's pipeline with shard 0's documented seed and the same choice.
    pipe = UnifiedDiffusionPipeline.from_run(run)
    by_hand = pipe.generate("joint", batch_size=4, num_inference_steps=2, output_type="latent",
                            generator=torch.Generator().manual_seed(seed_for(9, 0)), unknown_drift="null_encoding")
    assert np.array_equal(null["images"], images_to_uint8(by_hand.images))
    predicted, record_p = _sample(run, tmp_path / "pred.npz")
    assert record_p["unknown_drift"] == "predicted"  # joint's default: every drift from its head
    assert not np.array_equal(null["images"], predicted["images"])  # E(∅) is not the label head's E(x̂)


@pytest.mark.parametrize("eval_drift,sample_drift,want", [("predicted", "predicted", "predicted"),
                                                          ("null_encoding", "predicted", "null_encoding"),
                                                          ("predicted", "null_encoding", "null_encoding")])
def test_unidiff_sample_conditional_default_is_the_evaluations(run, tmp_path, eval_drift, sample_drift, want):  # noqa: F811
    # As for the guidance: sample.unknown_drift when set away from predicted, else eval.unknown_drift.
    import shutil

    import yaml

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["eval"]["unknown_drift"], cfg["sample"]["unknown_drift"] = eval_drift, sample_drift
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "c.npz"
    assert main(["sample", str(copy), "--task", "class_to_image", "-n", "2", "--steps", "2", "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["unknown_drift"] == want
    joint = tmp_path / "j.npz"  # joint samples take every drift from the heads unless told
    assert main(["sample", str(copy), "--task", "joint", "-n", "2", "--steps", "2", "--out", str(joint)]) == 0
    assert json.loads(joint.with_suffix(".json").read_text())["unknown_drift"] == "predicted"


def test_unidiff_sample_unknown_drift_on_a_read_task_is_a_one_line_error(run, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "r.npz"
    rc = main(["sample", str(run), "--task", "image_to_label", "-n", "2", "--unknown-drift", "null_encoding",
               "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--unknown-drift" in err[0] and "image_to_label" in err[0], err
    assert not out.exists() and not out.with_suffix(".json").exists()
