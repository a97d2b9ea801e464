"""Losses, the exact bound and the ELBO classifier (DESIGN.md §2) against independent oracles."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from scipy.stats import norm
from torch.distributions import Normal, kl_divergence

from diffusion_fakes import FakeLabel, FakeModel, TinyDenoiser, onehot_logits
from unidiff.diffusion import (
    DriftSchedule,
    bits_per_dim,
    bound_terms,
    discretized_gaussian_log_likelihood,
    elbo_classify,
    exact_kl_term,
    kl_upper_bound,
    training_losses,
)
from unidiff.errors import ConfigError

SHAPE = (1, 4, 4)


# --- the exact KL against Bayes' rule on the explicit Gaussians ------------------------------------
def _bayes_posterior(abar, abar_prev, x0, A, z_t, gamma):
    """q(z_{t-1} | z_t, x) from the marginal q(z_{t-1}|x) and the transition q(z_t|z_{t-1},x)."""
    alpha = abar / abar_prev
    beta = 1 - alpha
    kappa = gamma * math.sqrt(abar * (1 - abar))
    kappa_prev = gamma * math.sqrt(abar_prev * (1 - abar_prev))
    w = kappa - math.sqrt(alpha) * kappa_prev  # DESIGN §1 transition drift
    m1, v1 = math.sqrt(abar_prev) * x0 + kappa_prev * A, 1 - abar_prev  # prior on z_{t-1}
    # likelihood in z_{t-1}: z_t ~ N(sqrt(α) z_{t-1} + w A, β)
    prec = 1 / v1 + alpha / beta
    mean = (m1 / v1 + math.sqrt(alpha) * (z_t - w * A) / beta) / prec
    return mean, 1 / prec


@pytest.mark.parametrize("beta_schedule,gamma", [("linear", 1.0), ("squaredcos_cap_v2", 0.6)])
def test_exact_kl_equals_gaussian_kl_from_bayes(beta_schedule, gamma):
    T = 1000
    s = DriftSchedule.from_config(beta_schedule, T, gamma=gamma)
    abars = DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule).betas.double()
    abars = torch.cumprod(1 - abars, 0)
    g = torch.Generator().manual_seed(0)
    shape = (3, 2, 3, 3)
    for t in [1, 2, 37, 500, T - 2, T - 1]:
        x0, A, A_hat, eps = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4))
        eps_hat = eps + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
        abar, abar_prev = float(abars[t]), float(abars[t - 1])
        a, sig = math.sqrt(abar), math.sqrt(1 - abar)
        kappa = gamma * a * sig
        z_t = a * x0 + kappa * A + sig * eps
        x0_hat = (z_t - kappa * A_hat - sig * eps_hat) / a  # DESIGN §2
        mu_q, var_q = _bayes_posterior(abar, abar_prev, x0, A, z_t, gamma)
        mu_p, var_p = _bayes_posterior(abar, abar_prev, x0_hat, A_hat, z_t, gamma)
        oracle = kl_divergence(Normal(mu_q, math.sqrt(var_q)), Normal(mu_p, math.sqrt(var_p))).flatten(1).sum(1)
        tt = torch.full((shape[0],), t)
        got = exact_kl_term(s, A, eps, eps_hat, A_hat, tt)
        torch.testing.assert_close(got, oracle, rtol=1e-6, atol=1e-9)
        # the posterior pieces themselves
        torch.testing.assert_close(s.posterior_mean(x0, A, z_t, tt), mu_q, rtol=1e-8, atol=1e-8)
        assert math.isclose(float(s.posterior_variance[t]), var_q, rel_tol=1e-8)
        assert bool((got <= kl_upper_bound(s, A, eps, eps_hat, A_hat, tt) * (1 + 1e-12)).all())


def test_kl_zero_iff_perfect_and_bound_tight_cases():
    s = DriftSchedule.from_config("linear", 100)
    g = torch.Generator().manual_seed(3)
    A, eps = torch.randn(4, 1, 4, 4, generator=g), torch.randn(4, 1, 4, 4, generator=g)
    t = torch.tensor([1, 10, 50, 99])
    assert float(exact_kl_term(s, A, eps, eps, A, t).abs().max()) == 0.0
    assert bool((exact_kl_term(s, A, eps, eps + 0.1, A, t) > 0).all())


# --- the image decoder ----------------------------------------------------------------------------------
def test_discretized_gaussian_matches_scipy():
    g = torch.Generator().manual_seed(4)
    x = (torch.randint(0, 256, (200,), generator=g).double() / 255) * 2 - 1
    x[:3] = torch.tensor([-1.0, 1.0, 1 / 255])
    mean = x + 0.02 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    std = 0.01
    got = discretized_gaussian_log_likelihood(x, mean, std)
    xs, ms = x.numpy(), mean.numpy()
    hi = norm.cdf((xs + 1 / 255 - ms) / std)
    lo = norm.cdf((xs - 1 / 255 - ms) / std)
    p = (hi - lo)
    p[xs < -0.999] = hi[xs < -0.999]
    p[xs > 0.999] = 1 - lo[xs > 0.999]
    ref = torch.from_numpy(p).clamp_min(1e-12).log()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8)


# --- training losses -------------------------------------------------------------------------------
def _label_setup(T=50, prediction="epsilon", K=3, weight=0.7, loss_weight=0.5, seed=0):
    s = DriftSchedule.from_config("linear", T, beta_start=1e-3, beta_end=0.2)
    g = torch.Generator().manual_seed(seed)
    B = 5
    x0 = torch.rand(B, *SHAPE, generator=g) * 2 - 1
    y = torch.randint(0, K, (B,), generator=g)
    mod = FakeLabel("label", SHAPE, K, weight=weight, loss_weight=loss_weight)
    return s, x0, y, mod


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("weighting", ["simple", "vlb"])
def test_perfect_predictor_has_zero_loss(prediction, weighting):
    s, x0, y, mod = _label_setup()
    A = mod.weight * mod.encode(y)

    def image_fn(z, t):  # knows x0 and the drift, hence ε, and outputs its parameterisation
        eps = (z - s.at("a", t, z) * x0 - s.at("kappa", t, z) * A) / s.at("sigma", t, z)
        return s.target(x0, eps, t, prediction)

    model = FakeModel({"label": mod}, image_fn, lambda z, t: {"label": onehot_logits(y, 3)}, SHAPE, prediction)
    drop = {"label": torch.zeros(5, dtype=torch.bool)}
    out = training_losses(model, s, {"image": x0, "label": y}, weighting=weighting, drop=drop,
                          generator=torch.Generator().manual_seed(1))
    assert out["loss"].shape == (5,)
    assert float(out["loss"].abs().max()) < 1e-8


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_image_term_and_dropout_against_diffusers(prediction):
    T = 50
    s, x0, y, mod = _label_setup(T=T)
    net = TinyDenoiser(1, T)
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(9))
    model = FakeModel({"label": mod}, net, lambda z, t: {"label": logits}, SHAPE, prediction)
    t = torch.tensor([0, 3, 17, 30, 49])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    drop = {"label": torch.tensor([True, False, True, False, False])}
    out = training_losses(model, s, {"image": x0, "label": y}, t=t, noise=noise, drop=drop)

    ref = DDPMScheduler(num_train_timesteps=T, beta_start=1e-3, beta_end=0.2)
    kappa = (ref.alphas_cumprod[t] * (1 - ref.alphas_cumprod[t])).sqrt().view(-1, 1, 1, 1)
    # dropped rows drift with the null encoding, the others with their label (§2)
    E = torch.where(drop["label"].view(-1, 1, 1, 1), mod.null.expand(5, *SHAPE), mod.table[y])
    z_ref = ref.add_noise(x0, noise, t) + kappa * 0.7 * E
    torch.testing.assert_close(model.calls[0][0], z_ref, rtol=1e-5, atol=1e-5)
    target = {"epsilon": noise, "v_prediction": ref.get_velocity(x0, noise, t), "sample": x0}[prediction]
    image_ref = (net(z_ref, t) - target).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out["image"], image_ref, rtol=1e-4, atol=1e-6)
    # head loss on the TRUE label, also for dropped rows
    ce = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(out["head/label"], ce)
    torch.testing.assert_close(out["loss"], image_ref + 0.5 * ce, rtol=1e-4, atol=1e-6)
    assert torch.equal(out["drop/label"], drop["label"])


def test_vlb_weighting_and_reproducibility():
    T = 50
    s, x0, y, mod = _label_setup(T=T)
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(9))
    model = FakeModel({"label": mod}, TinyDenoiser(1, T), lambda z, t: {"label": logits}, SHAPE)
    batch = {"image": x0, "label": y}
    a = training_losses(model, s, batch, weighting="vlb", generator=torch.Generator().manual_seed(5))
    b = training_losses(model, s, batch, weighting="vlb", generator=torch.Generator().manual_seed(5))
    for k in ("loss", "t", "drop/label"):
        assert torch.equal(a[k], b[k])
    w = s.vlb_head_weight[a["t"]].float()
    torch.testing.assert_close(a["loss"], a["image"] + 0.5 * w * a["head/label"])


def test_p_drop_one_drops_everything():
    s, x0, y, mod = _label_setup()
    model = FakeModel({"label": mod}, TinyDenoiser(1, 50), lambda z, t: {"label": torch.zeros(5, 3)}, SHAPE)
    out = training_losses(model, s, {"image": x0, "label": y}, p_drop=1.0, generator=torch.Generator().manual_seed(0))
    assert bool(out["drop/label"].all())
    out = training_losses(model, s, {"image": x0, "label": y}, p_drop=0.0, generator=torch.Generator().manual_seed(0))
    assert not bool(out["drop/label"].any())


def test_label_only_baseline_and_bad_weighting():
    s, x0, y, mod = _label_setup()
    logits = torch.randn(5, 3)
    model = FakeModel({"label": mod}, None, lambda z, t: {"label": logits}, SHAPE)
    out = training_losses(model, s, {"image": x0, "label": y}, generator=torch.Generator().manual_seed(0))
    assert float(out["image"].abs().max()) == 0.0
    torch.testing.assert_close(out["loss"], 0.5 * F.cross_entropy(logits, y, reduction="none"))
    with pytest.raises(ConfigError, match="weighting"):
        training_losses(model, s, {"image": x0, "label": y}, weighting="elbo")
    with pytest.raises(ConfigError, match="image head"):
        bits_per_dim(model, s, {"image": x0, "label": y})


# --- the full bound ----------------------------------------------------------------------------------
def _quantised(B, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, *SHAPE), generator=g).float() / 255 * 2 - 1


def _knowing_model(s, x0, y, mod, eps_offset=0.0, t0_logits_uniform=False, prediction="epsilon"):
    """A model that knows x0 and the true drift: ε̂ = ε + offset, Â = A (one-hot head)."""
    A = mod.weight * mod.encode(y)

    def image_fn(z, t):
        eps = (z - s.at("a", t, z) * x0 - s.at("kappa", t, z) * A) / s.at("sigma", t, z) + eps_offset
        return s.target(x0, eps, t, prediction)

    def aux_fn(z, t):
        logits = onehot_logits(y, mod.num_classes)
        if t0_logits_uniform:
            logits = torch.where((t == 0).view(-1, 1), torch.zeros_like(logits), logits)
        return {"label": logits}

    return FakeModel({"label": mod}, image_fn, aux_fn, SHAPE, prediction)


@pytest.mark.parametrize("num_t,prediction", [(None, "epsilon"), (3, "epsilon"), (3, "v_prediction"), (3, "sample")])
def test_bits_per_dim_of_a_perfect_model_is_prior_plus_decoder(num_t, prediction):
    T = 40
    s, _, y, mod = _label_setup(T=T)
    x0 = _quantised(5, 1)
    model = _knowing_model(s, x0, y, mod, prediction=prediction)
    bpd = bits_per_dim(model, s, {"image": x0, "label": y}, num_t=num_t, generator=torch.Generator().manual_seed(0))
    ref = DDPMScheduler(num_train_timesteps=T, beta_start=1e-3, beta_end=0.2)
    abar = ref.alphas_cumprod.double()
    # L_T: KL(N(a x0 + κ A, σ²) ‖ N(0, 1)) at the last index
    a, sig = abar[-1].sqrt(), (1 - abar[-1]).sqrt()
    mean = a * x0.double() + a * sig * mod.weight * mod.encode(y).double()
    prior = kl_divergence(Normal(mean, sig.expand_as(mean)), Normal(0.0, 1.0)).flatten(1).sum(1)
    # L_0: x̂0 = x0 exactly, decoder variance β̃_1 = (1-ᾱ_0) β_1 / (1-ᾱ_1)
    std = math.sqrt(float((1 - abar[0]) * (1 - abar[1] / abar[0]) / (1 - abar[1])))
    xs = x0.double().numpy()
    p = norm.cdf(1 / 255 / std) - norm.cdf(-1 / 255 / std)
    logp = torch.full(xs.shape, math.log(p), dtype=torch.float64)
    logp[torch.from_numpy(xs < -0.999) | torch.from_numpy(xs > 0.999)] = math.log(norm.cdf(1 / 255 / std))
    decoder = -logp.flatten(1).sum(1)
    expected = (prior + decoder) / (16 * math.log(2))
    torch.testing.assert_close(bpd.double(), expected, rtol=1e-4, atol=1e-5)


def test_diffusion_sum_all_t_and_monte_carlo_match_closed_form():
    # ε̂ = ε + δ, Â = A: L_{t-1} = δ² D β_t / (2 α_t (1 - ᾱ_{t-1})) independently of the noise.
    T, delta = 20, 0.1
    s, _, y, mod = _label_setup(T=T)
    x0 = _quantised(5, 2)
    model = _knowing_model(s, x0, y, mod, eps_offset=delta)
    betas = DDPMScheduler(num_train_timesteps=T, beta_start=1e-3, beta_end=0.2).betas.double()
    abar = torch.cumprod(1 - betas, 0)
    per_t = delta**2 * 16 * betas[1:] / (2 * (1 - betas[1:]) * (1 - abar[:-1]))
    terms = bound_terms(model, s, x0, {"label": y}, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(terms["diffusion"].double(), per_t.sum().expand(5), rtol=1e-4, atol=1e-6)
    # Monte Carlo over t only (L does not depend on the noise): B·n draws of (T-1)·L_{t-1}; tight
    # enough to tell the (T-1) scaling from T (a 5% shift).
    B, n = 2000, 50
    x0 = _quantised(B, 5)
    y = torch.randint(0, 3, (B,), generator=torch.Generator().manual_seed(6))
    model = _knowing_model(s, x0, y, mod, eps_offset=delta)
    mc = bound_terms(model, s, x0, {"label": y}, num_t=n, generator=torch.Generator().manual_seed(0))["diffusion"]
    se = (T - 1) * per_t.std() / math.sqrt(B * n)
    assert abs(float(mc.mean()) - float(per_t.sum())) < 4 * float(se) < 0.05 * float(per_t.sum())


def test_bits_per_dim_random_model_finite_positive():
    T = 20
    s, _, y, mod = _label_setup(T=T)
    x0 = _quantised(4, 3)
    y = y[:4]
    model = FakeModel({"label": mod}, TinyDenoiser(1, T), lambda z, t: {"label": torch.randn(z.shape[0], 3)}, SHAPE)
    for num_t in (None, 4):
        bpd = bits_per_dim(model, s, {"image": x0, "label": y}, num_t=num_t, generator=torch.Generator().manual_seed(0))
        assert bpd.shape == (4,) and bool(torch.isfinite(bpd).all()) and bool((bpd > 0).all())


def test_elbo_classifier_picks_the_true_drift():
    T, K = 30, 4
    s, _, y, mod = _label_setup(T=T, K=K)
    x0 = _quantised(5, 4)
    # The head is uninformative at t = 0, so only the diffusion terms (the drift) can separate.
    model = _knowing_model(s, x0, y, mod, t0_logits_uniform=True)
    best, bounds = elbo_classify(model, s, x0, "label", range(K), num_t=6, generator=torch.Generator().manual_seed(0))
    assert bounds.shape == (5, K)
    assert torch.equal(best, y)
    true_terms = bound_terms(model, s, x0, {"label": y}, generator=torch.Generator().manual_seed(0))
    assert float(true_terms["diffusion"].abs().max()) < 1e-6  # the true drift has zero KL
    with pytest.raises(ConfigError, match="no modality"):
        elbo_classify(model, s, x0, "representation", range(K))
