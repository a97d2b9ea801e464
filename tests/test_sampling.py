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
           callback=lambda i, t, y, a: path.append(y))
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
