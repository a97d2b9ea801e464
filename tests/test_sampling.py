"""The sampler (DESIGN.md §3): its de-drifted path is a plain diffusers loop on y (the oracle)."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from diffusion_fakes import FakeLabel, FakeModel, TinyDenoiser, onehot_logits, tile_rows
import heads
from unidiff.diffusion import DriftSchedule, Task, image_to_aux, make_scheduler, resolve_task, sample
from unidiff.errors import ConfigError
from unidiff.modality import GENERIC_TASKS

SHAPE = (1, 4, 4)
T = 100
BETAS = dict(beta_start=1e-3, beta_end=0.2)


def _oracle_scheduler(name, prediction):
    kw = dict(num_train_timesteps=T, prediction_type=prediction, **BETAS)
    if name == "ddpm":
        return DDPMScheduler(clip_sample=False, **kw)
    if name == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **kw)
    return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **kw)


def _kappa(sched, t):
    abar = float(sched.alphas_cumprod[t])
    return math.sqrt(abar * (1 - abar))


def _oracle_loop(name, prediction, steps, seed, A, eps_fn):
    """diffusers' own loop on y_t = z_t - κ_t A with z_T ~ N(0, I); eps_fn(y, t) -> model output."""
    sched = _oracle_scheduler(name, prediction)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    z = randn_tensor((A.shape[0], *SHAPE), generator=g, dtype=torch.float32)
    y = z - _kappa(sched, int(sched.timesteps[0])) * A
    path = []
    for t in sched.timesteps.tolist():
        y = sched.step(eps_fn(y, t), t, y, generator=g).prev_sample
        path.append(y)
    return path


class LabelKindFake(FakeLabel):
    """The fake label under the built-in ``label`` kind, so the label's named tasks
    (``class_to_image``, ``image_to_label``) find it by kind."""

    kind = "label"


def _setup(K=3, weight=0.7, B=3, name="label"):
    s = DriftSchedule.from_config("linear", T, **BETAS)
    mod = LabelKindFake(name, SHAPE, K, weight=weight)
    labels = torch.tensor([2, 0, 1])[:B]
    return s, mod, labels


@pytest.mark.parametrize(
    "scheduler,prediction",
    [("ddpm", "epsilon"), ("ddim", "epsilon"), ("ddim", "v_prediction"), ("dpm", "sample"), ("dpm", "epsilon")],
)
@pytest.mark.parametrize("task", ["joint", "class_to_image"])
def test_dedrifted_path_equals_plain_diffusers_loop(scheduler, prediction, task):
    s, mod, labels = _setup()
    net = TinyDenoiser(1, T)
    A = mod.weight * mod.encode(labels)  # the true drift
    B = labels.shape[0]

    # The model sees z and de-drifts with the true drift internally; its head predicts the true
    # labels, so Â = A in both the joint (Â from heads) and conditional (Â from known) tasks.
    def image_fn(z, t):
        return net(z - s.at("kappa", t, z) * A, t)

    model = FakeModel({"label": mod}, image_fn, lambda z, t: {"label": onehot_logits(labels, 3)}, SHAPE, prediction)
    path = []
    kw = dict(known={"label": labels}) if task == "class_to_image" else dict(batch_size=B)
    out = sample(model, s, task, scheduler=scheduler, num_steps=8, generator=torch.Generator().manual_seed(0),
                 callback=lambda i, t, y, A_hat: path.append(y), **kw)
    ref = _oracle_loop(scheduler, prediction, 8, 0, A, lambda y, t: net(y, t))
    assert len(path) == len(ref) == 8
    for got, want in zip(path, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.image, ref[-1].clamp(-1, 1), rtol=1e-4, atol=1e-5)
    assert torch.equal(out.aux["label"], labels)


def test_drift_guidance_matches_oracle():
    s, mod, labels = _setup()
    net = TinyDenoiser(1, T, seed=1)
    A = mod.weight * mod.encode(labels)
    null = mod.null_encoding(3)
    w = 3.0
    model = FakeModel({"label": mod}, lambda z, t: net(z, t),
                      lambda z, t: {"label": onehot_logits(tile_rows(labels, z.shape[0]), 3)}, SHAPE)

    def guided(y, t):
        k = _kappa(_oracle_scheduler("ddim", "epsilon"), t)
        z = y + k * A
        eps_c = net(z, t)
        eps_u = net(z - k * mod.weight * (mod.encode(labels) - null), t)  # drift swapped for E(∅)
        return eps_u + w * (eps_c - eps_u)

    path = []
    sample(model, s, "class_to_image", known={"label": labels}, scheduler="ddim", num_steps=6,
           guidance_scale=w, generator=torch.Generator().manual_seed(3), callback=lambda i, t, y, a: path.append(y))
    ref = _oracle_loop("ddim", "epsilon", 6, 3, A, guided)
    for got, want in zip(path, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # one batched forward per step: cond and uncond rows together
    assert all(z.shape[0] == 6 for z, _ in model.calls)


def test_classifier_guidance_matches_analytic_gradient():
    s, mod, labels = _setup()
    net = TinyDenoiser(1, T, seed=2)
    A = mod.weight * mod.encode(labels)
    c, scale = 0.8, 2.0
    E = mod.table  # (K, C, H, W)

    def logits_of(z):  # linear head: logits_k = c <z, E_k>
        return c * torch.einsum("bchw,kchw->bk", z, E)

    model = FakeModel({"label": mod}, lambda z, t: net(z, t), lambda z, t: {"label": logits_of(z)}, SHAPE)

    def guided(y, t):
        sched = _oracle_scheduler("ddim", "epsilon")
        z = y + _kappa(sched, t) * A
        p = logits_of(z).softmax(-1)
        # ∇_z log softmax(c<z,E>)_y = c (E_y - Σ_k p_k E_k)
        grad = c * (E[labels] - torch.einsum("bk,kchw->bchw", p, E))
        sigma = math.sqrt(1 - float(sched.alphas_cumprod[t]))
        return net(z, t) - scale * sigma * grad

    path = []
    sample(model, s, "class_to_image", known={"label": labels}, scheduler="ddim", num_steps=6,
           classifier_scale=scale, generator=torch.Generator().manual_seed(4),
           callback=lambda i, t, y, a: path.append(y), convert_with="known")  # the oracle reads ε at z - κA
    ref = _oracle_loop("ddim", "epsilon", 6, 4, A, guided)
    for got, want in zip(path, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_image_to_aux_averages_over_noise_draws():
    s, mod, labels = _setup()
    c = 0.5
    E = mod.table

    def logits_of(z):
        return c * torch.einsum("bchw,kchw->bk", z, E)

    model = FakeModel({"label": mod}, None, lambda z, t: {"label": logits_of(z)}, SHAPE)
    x0 = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    t_read, n = 30, 4000
    readout, avg = image_to_aux(model, s, x0, "label", t_read=t_read, num_draws=n,
                                generator=torch.Generator().manual_seed(1))
    ref = DDPMScheduler(num_train_timesteps=T, **BETAS)
    abar = float(ref.alphas_cumprod[t_read])
    a, sig = math.sqrt(abar), math.sqrt(1 - abar)
    # E_ε[logits] for a linear head: the logits of the mean z = a x0 + κ π E(∅)
    expected = logits_of(a * x0 + a * sig * mod.weight * mod.null_encoding(3))
    se = c * sig * E.flatten(1).norm(dim=1) / math.sqrt(n)  # (K,)
    assert bool(((avg - expected).abs() < 5 * se).all())
    assert torch.equal(readout, avg.argmax(-1))
    assert all(float(tt[0]) == t_read for _, tt in model.calls)
    # dispatch through the task enum
    out = sample(model, s, "image_to_label", image=x0, num_draws=2, generator=torch.Generator().manual_seed(1))
    assert out.aux["label"].shape == (3,) and out.image is x0


def test_bf16_autocast_and_reproducibility():
    s, mod, labels = _setup()
    net = TinyDenoiser(1, T)
    model = FakeModel({"label": mod}, lambda z, t: net(z, t), lambda z, t: {"label": z.flatten(1)[:, :3]}, SHAPE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = sample(model, s, "joint", batch_size=3, scheduler="dpm", num_steps=5, generator=torch.Generator().manual_seed(7))
    b = sample(model, s, "joint", batch_size=3, scheduler="dpm", num_steps=5, generator=torch.Generator().manual_seed(7))
    c = sample(model, s, "joint", batch_size=3, scheduler="dpm", num_steps=5, generator=torch.Generator().manual_seed(7))
    assert a.image.dtype == torch.float32 and bool(torch.isfinite(a.image).all())
    assert float(a.image.abs().max()) <= 1.0
    assert torch.equal(b.image, c.image)


def test_bad_inputs_raise():
    s, mod, labels = _setup()
    model = FakeModel({"label": mod}, TinyDenoiser(1, T), lambda z, t: {"label": torch.zeros(z.shape[0], 3)}, SHAPE)
    with pytest.raises(ConfigError, match="scheduler"):
        make_scheduler("euler", s, "epsilon")
    with pytest.raises(ConfigError, match="task"):
        sample(model, s, "text_to_image", batch_size=2)
    with pytest.raises(ConfigError, match="label"):
        sample(model, s, "class_to_image", batch_size=2)
    with pytest.raises(ConfigError, match="guidance_scale"):
        sample(model, s, "joint", batch_size=2, guidance_scale=2.0)
    with pytest.raises(ConfigError, match="classifier"):
        sample(model, s, "joint", batch_size=2, classifier_scale=1.0)
    with pytest.raises(ConfigError, match="not a modality"):
        sample(model, s, "conditional", known={"representation": torch.zeros(2, 4)})


def test_named_tasks_resolve_by_kind_not_by_name():
    """A label-kind modality named ``digit``: image_to_label reads it, class_to_image conditions on it,
    each exactly like the generic task on that name."""
    s, mod, labels = _setup(name="digit")
    c = 0.5

    def logits_of(z):
        return c * torch.einsum("bchw,kchw->bk", z, mod.table)

    net = TinyDenoiser(1, T, seed=3)
    model = FakeModel({"digit": mod}, lambda z, t: net(z, t), lambda z, t: {"digit": logits_of(z)}, SHAPE)
    x0 = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    named = sample(model, s, "image_to_label", image=x0, num_draws=3, generator=torch.Generator().manual_seed(1))
    generic = sample(model, s, "image_to_aux", image=x0, name="digit", num_draws=3, generator=torch.Generator().manual_seed(1))
    assert set(named.aux) == {"digit"} and torch.equal(named.aux["digit"], generic.aux["digit"])
    kw = dict(known={"digit": labels}, num_steps=3, classifier_scale=1.0)
    a = sample(model, s, "class_to_image", generator=torch.Generator().manual_seed(2), **kw)
    b = sample(model, s, "conditional", classifier_modality="digit", generator=torch.Generator().manual_seed(2), **kw)
    torch.testing.assert_close(a.image, b.image, rtol=0, atol=0)
    assert resolve_task("image_to_label", model) == (Task.image_to_aux, "digit")
    assert resolve_task("inpaint", model) == (Task.conditional, None)
    # a task of a kind the model lacks names that kind
    with pytest.raises(ConfigError, match="masked_image"):
        sample(model, s, "inpaint", known={"digit": labels})
    with pytest.raises(ConfigError, match=r"known\['digit'\]"):
        sample(model, s, "class_to_image", batch_size=3)


def test_one_task_table_with_the_documented_names():
    assert {t.value for t in Task} == set(GENERIC_TASKS)
    table = heads.modality_tasks()  # (other tests may have registered kinds of their own)
    assert {name: (t.kind, t.action) for name, t in table.items() if t.kind in heads.MODALITY_KINDS} == {
        "class_to_image": ("label", "generate"),
        "image_to_label": ("label", "read"),
        "representation_to_image": ("representation", "generate"),
        "image_to_representation": ("representation", "read"),
        "inpaint": ("masked_image", "generate"),
        "transition": ("source_image", "generate"),
        "target_to_source": ("source_image", "read"),
    }
    s, mod, _ = _setup()
    model = FakeModel({"label": mod}, None, lambda z, t: {}, SHAPE)
    with pytest.raises(ConfigError, match="target_to_source"):  # the error lists the table
        sample(model, s, "reverse_transition", image=torch.zeros(1, *SHAPE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_a_cpu_generator():
    from unidiff.diffusion import training_losses

    s, mod, labels = _setup()
    net = TinyDenoiser(1, T)

    def build():
        return FakeModel({"label": mod}, net, lambda z, t: {"label": torch.einsum("bchw,kchw->bk", z, mod.table)}, SHAPE)

    runs = []
    for device in ("cpu", "cuda"):
        model = build().to(device)
        out = sample(model, s, "class_to_image", known={"label": labels.to(device)}, scheduler="dpm", num_steps=6,
                     guidance_scale=2.0, classifier_scale=0.5, generator=torch.Generator().manual_seed(0))
        x0 = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1
        loss = training_losses(model, s, {"image": x0, "label": labels.to(device)}, weighting="vlb",
                               generator=torch.Generator().manual_seed(2))
        runs.append((out.image.cpu(), loss["loss"].cpu()))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-3, atol=1e-4)


# --- §3.3: converting ε̂ with the model's own drift estimate -------------------------------------
from unidiff.diffusion.sampling import Conversion, _guided_prediction  # noqa: E402


def _mismatched_model(prediction, x0, believed, weight=0.7):
    """A model whose label head predicts ``believed`` (so Â_θ = π E(believed)) and whose image head
    is exact under that belief: for every z, the raw prediction of ε = (z - a x0 - κ Â_θ)/σ."""
    s = DriftSchedule.from_config("linear", T, **BETAS)
    mod = LabelKindFake("label", SHAPE, 3, weight=weight)
    A_theta = weight * mod.encode(believed)  # (B, C, H, W)

    def image_fn(z, t):
        A = tile_rows(A_theta, z.shape[0])
        x = tile_rows(x0, z.shape[0])
        eps = (z - s.at("a", t, z) * x - s.at("kappa", t, z) * A) / s.at("sigma", t, z)
        return eps if prediction == "epsilon" else s.at("a", t, z) * eps - s.at("sigma", t, z) * x  # v

    def aux_fn(z, t):
        return {"label": tile_rows(onehot_logits(believed, 3), z.shape[0])}

    return s, mod, A_theta, FakeModel({"label": mod}, image_fn, aux_fn, SHAPE, prediction)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("w", [1.0, 2.5])
@pytest.mark.parametrize("t", [5, 30, 60])
def test_predicted_conversion_recovers_x0_that_known_misses_by_gamma_sigma(prediction, w, t):
    # z_t = a x0 + κ Â_θ + σ ε with the model's ε exact under Â_θ ≠ A = π E(y). The clean estimate
    # the scheduler reads at y = z - κ A (diffusers: x̂0 = (y - σ ε)/a):
    #   predicted: ε' = ε + κ(Â_θ - A)/σ          ->  x̂0 = x0
    #   known:     ε                               ->  x̂0 = x0 + (κ/a)(Â_θ - A) = x0 + γ σ (Â_θ - A)
    # With drift guidance w the unconditional branch sees z - κ·shift, shift = π(E(y) - E(∅)), so
    # ε_g = ε + (w - 1) κ shift/σ and both estimates move by -(w - 1) γ σ shift.
    # A v head is read by x̂0 = a y - σ v̂: moving y by κ(Â_θ - A) moves x̂0 by a κ(Â_θ - A), so
    # for v both terms carry a factor a² (the unconditional v̂ is converted at the same y as well).
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, *SHAPE, generator=g)
    labels, believed = torch.tensor([2, 0, 1]), torch.tensor([0, 1, 1])  # one row believes the truth
    s, mod, A_theta, model = _mismatched_model(prediction, x0, believed)
    A = mod.weight * mod.encode(labels)
    shift = None if w == 1.0 else mod.weight * (mod.encode(labels) - mod.null_encoding(3))
    z = s.q_sample(x0, A_theta, t, torch.randn(x0.shape, generator=g))
    a, sig, kap, gamma = float(s.a[t]), float(s.sigma[t]), float(s.kappa[t]), s.gamma
    y = z - kap * A
    f = 1.0 if prediction == "epsilon" else a * a
    guided = 0.0 if shift is None else (w - 1) * f * gamma * sig * shift
    x0_hat = {}
    for conv in Conversion:
        pred, _, A_out = _guided_prediction(model, s, z, t, {"label": labels}, shift, w, None, conv)
        torch.testing.assert_close(A_out, A)  # the chain carries the known drift either way
        eps = pred if prediction == "epsilon" else a * pred + sig * y
        x0_hat[conv] = (y - sig * eps) / a
    torch.testing.assert_close(x0_hat[Conversion.predicted], x0 - guided, atol=1e-4, rtol=1e-4)
    off = f * gamma * sig * (A_theta - A)
    torch.testing.assert_close(x0_hat[Conversion.known], x0 - guided + off, atol=1e-4, rtol=1e-4)
    assert float(off[:2].abs().max()) > 0.01  # the two really differ (not both ≈ x0)
    assert torch.equal(off[2], torch.zeros_like(off[2]))  # and agree where the head is right


def test_predicted_conversion_end_to_end_lands_on_x0():
    # DDIM (η = 0, trailing spacing: 99, 79, ..., 19, then the data): with x̂0 = x0 at every step
    # the chain ends on x0; the known conversion ends on its last step's x̂0, x0 + γ σ_19 (Â_θ - A).
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(3, *SHAPE, generator=g)
    labels, believed = torch.tensor([2, 0, 1]), torch.tensor([0, 1, 2])
    s, mod, A_theta, model = _mismatched_model("epsilon", x0, believed)
    kw = dict(known={"label": labels}, scheduler="ddim", num_steps=5, clamp=False,
              scheduler_kwargs={"timestep_spacing": "trailing"})
    out_p = sample(model, s, "class_to_image", generator=torch.Generator().manual_seed(0), convert_with="predicted", **kw)
    out_k = sample(model, s, "class_to_image", generator=torch.Generator().manual_seed(0), convert_with="known", **kw)
    out_d = sample(model, s, "class_to_image", generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(out_p.image, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_k.image, x0 + s.gamma * float(s.sigma[19]) * (A_theta - mod.weight * mod.encode(labels)),
                               atol=1e-4, rtol=1e-4)
    assert torch.equal(out_d.image, out_p.image)  # ε-prediction converts with its own Â by default


def _linear_logits(z, mod, c=0.1):
    """A z-dependent part of the logits, so that classifier guidance has a gradient."""
    return c * torch.einsum("bchw,kchw->bk", z, mod.table)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("w,cls", [(1.0, 0.0), (2.0, 0.0), (2.0, 0.5)])
def test_conversions_agree_bitwise_when_the_heads_are_right(prediction, w, cls):
    # Heads predicting the known label exactly make Â_θ = Â bit for bit: the increment is 0.
    s, mod, labels = _setup()
    net = TinyDenoiser(1, T)
    model = FakeModel({"label": mod}, lambda z, t: net(z, t),
                      lambda z, t: {"label": tile_rows(onehot_logits(labels, 3), z.shape[0]) + _linear_logits(z, mod)},
                      SHAPE, prediction)
    outs = [sample(model, s, "class_to_image", known={"label": labels}, scheduler="ddpm", num_steps=6,
                   guidance_scale=w, classifier_scale=cls, generator=torch.Generator().manual_seed(1), convert_with=c)
            for c in Conversion]
    assert torch.equal(outs[0].image, outs[1].image)


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm"])
def test_sample_prediction_ignores_the_conversion(scheduler):
    # An x̂0 head predicts x̂0 directly; its samples must not depend on convert_with, even when its
    # label head is wrong (Â_θ ≠ Â), with both kinds of guidance.
    s, mod, labels = _setup()
    net = TinyDenoiser(1, T)
    wrong = (labels + 1) % 3
    model = FakeModel({"label": mod}, lambda z, t: net(z, t),
                      lambda z, t: {"label": tile_rows(onehot_logits(wrong, 3, 3.0), z.shape[0]) + _linear_logits(z, mod)},
                      SHAPE, "sample")
    outs = [sample(model, s, "class_to_image", known={"label": labels}, scheduler=scheduler, num_steps=6, guidance_scale=2.0,
                   classifier_scale=0.5, generator=torch.Generator().manual_seed(2), convert_with=c)
            for c in (None, "known", "predicted")]
    assert torch.equal(outs[0].image, outs[1].image) and torch.equal(outs[1].image, outs[2].image)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_reframe_keeps_x0(prediction):
    s = DriftSchedule.from_config("linear", T, **BETAS)
    g = torch.Generator().manual_seed(5)
    pred, y1, y2 = (torch.randn(2, *SHAPE, generator=g) for _ in range(3))
    t = torch.tensor([10, 90])
    moved = s.reframe(pred, y1, y2, t, prediction)
    torch.testing.assert_close(s.to_x0(moved, y2, t, prediction), s.to_x0(pred, y1, t, prediction), atol=1e-5, rtol=1e-5)
    assert torch.equal(s.reframe(pred, y1, y1.clone(), t, prediction), pred)


def test_bad_conversion_is_a_config_error():
    s, mod, labels = _setup()
    model = FakeModel({"label": mod}, lambda z, t: torch.zeros_like(z), lambda z, t: {"label": onehot_logits(labels, 3)}, SHAPE)
    with pytest.raises(ConfigError, match="sampling.convert_with"):
        sample(model, s, "class_to_image", known={"label": labels}, num_steps=2, convert_with="true")
