"""The training objective, the exact bound and the ELBO classifier (DESIGN.md §2) against independent oracles.

Every model here is the real ``UnifiedModel`` (debug preset) with real label / representation
heads, so the objective's drift, dropout and head terms are checked against the model's own
encoders. Where a test needs a predictor with known outputs (a perfect model, a model that knows
the drift), :func:`_with_outputs` replaces only the network's forward by those outputs; the
encoders, ``aggregate`` and ``expected_aggregate`` stay the model's.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from scipy.stats import norm
from torch.distributions import Normal, kl_divergence

from unidiff.diffusion import (
    DriftSchedule,
    MultiModalDiffusion,
    bits_per_dim,
    bound_terms,
    discretized_gaussian_log_likelihood,
    elbo_classify,
    exact_kl_term,
    kl_upper_bound,
    model_state_dict,
    training_losses,
)
from unidiff.errors import ConfigError
from unidiff.model import ModelOutput, UnifiedModel
from unidiff.models.presets import get_preset

SHAPE = (1, 8, 8)  # the debug preset's patch size 2 needs an even image side
DIMS = 64  # C·H·W


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


# --- the real model, optionally with known outputs -------------------------------------------------
LABEL = {"name": "label", "kind": "label", "num_classes": 3, "weight": 0.7, "loss_weight": 0.5}
REPR = {"name": "representation", "kind": "representation", "dim": 4, "weight": 0.4, "loss_weight": 2.0}
B = 5


def _schedule(T=50):
    return DriftSchedule.from_config("linear", T, beta_start=1e-3, beta_end=0.2)


def _ddpm(T=50):
    """diffusers' own scheduler on the same betas: the oracle for a_t, σ_t and the targets."""
    return DDPMScheduler(num_train_timesteps=T, beta_start=1e-3, beta_end=0.2)


def _model(specs=(LABEL, REPR), prediction="epsilon", predict_image=True, seed=0, **backbone):
    """A real UnifiedModel whose zero-initialised outputs are opened (so every term is non-trivial)."""
    torch.manual_seed(seed)
    model = UnifiedModel(image_shape=SHAPE, backbone_config={**get_preset("debug"), **backbone},
                         modality_configs=[dict(s) for s in specs], prediction=prediction, predict_image=predict_image)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _batch(seed=0, n=B, K=3):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, *SHAPE, generator=g) * 2 - 1, "label": torch.randint(0, K, (n,), generator=g),
            "representation": torch.randn(n, 4, generator=g)}


def _capture_inputs(model):
    """Record the (z_t, t) of every forward of ``model``."""
    calls = []
    model.register_forward_pre_hook(lambda mod, args: calls.append((args[0].detach().clone(), args[1].clone())))
    return calls


def _with_outputs(model, image_fn, aux_fn):
    """``model`` with its network replaced by known outputs ``image_fn(z, t)``, ``aux_fn(z, t)``."""

    def forward(z, t, cond=None, collect_stats=False):
        image = None if image_fn is None else image_fn(z, t)
        return ModelOutput(image=image, aux=aux_fn(z, t), aux_loss=torch.zeros(()))

    model.forward = forward
    return model


def onehot_logits(labels, num_classes, gap=100.0):
    """Logits whose softmax is (numerically exactly) one-hot at ``labels``."""
    return gap * F.one_hot(labels, num_classes).float()


def _true_drift(model, batch, drop=None):
    """``Σ_m π_m E_m`` from the modalities' own encoders; dropped rows use the null encoding (§1-2)."""
    A = torch.zeros(batch["image"].shape)
    for spec in (LABEL, REPR):
        name = spec["name"]
        if name not in model.modalities:
            continue
        mod = model.modalities[name]
        e = mod.encode(batch[name])
        if drop is not None:
            e = torch.where(drop[name].view(-1, 1, 1, 1), mod.null_encoding(e.shape[0]), e)
        A = A + spec["weight"] * e
    return A


def _z_ref(x0, A, noise, t, T=50, gamma=1.0):
    """The drifted marginal from diffusers: ``add_noise`` (a_t x0 + σ_t ε) + κ_t A, κ_t = γ a_t σ_t."""
    abar = _ddpm(T).alphas_cumprod[t].view(-1, 1, 1, 1)
    return _ddpm(T).add_noise(x0, noise, t) + gamma * (abar * (1 - abar)).sqrt() * A


# --- the training objective ---------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_drift_image_and_head_terms_against_diffusers(prediction):
    s, model = _schedule(), _model(prediction=prediction, aux_loss_coef=0.05)
    calls = _capture_inputs(model)
    batch = _batch()
    x0, y, r = batch["image"], batch["label"], batch["representation"]
    t = torch.tensor([0, 3, 17, 30, 49])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    drop = {"label": torch.tensor([True, False, True, False, False]),
            "representation": torch.tensor([False, True, True, False, False])}
    out = MultiModalDiffusion(model, s)(batch, t=t, noise=noise, drop=drop)

    with torch.no_grad():
        # dropped rows drift with the null encoding, the others with their value (§2)
        z_ref = _z_ref(x0, _true_drift(model, batch, drop), noise, t)
        torch.testing.assert_close(calls[0][0], z_ref, rtol=1e-5, atol=1e-5)
        pred = model(z_ref, t)
        target = {"epsilon": noise, "v_prediction": _ddpm().get_velocity(x0, noise, t), "sample": x0}[prediction]
        image_ref = (pred.image - target).pow(2).mean(dim=(1, 2, 3))
        # heads are trained on the TRUE values, also in dropped rows
        ce = F.cross_entropy(pred.aux["label"], y, reduction="none")
        mse = (pred.aux["representation"] - r).pow(2).mean(dim=1)
    torch.testing.assert_close(out.image, image_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.heads["label"], ce, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.heads["representation"], mse, rtol=1e-4, atol=1e-6)
    per_sample = image_ref + 0.5 * ce + 2.0 * mse
    torch.testing.assert_close(out.per_sample, per_sample, rtol=1e-4, atol=1e-6)
    # the scalar for backward includes the MoE aux loss of the same forward
    assert float(pred.aux_loss) > 0
    torch.testing.assert_close(out.loss, per_sample.mean() + pred.aux_loss, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(out.drop[k], drop[k]) for k in drop) and torch.equal(out.t, t)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("weighting", ["simple", "vlb"])
def test_perfect_predictor_has_zero_loss(prediction, weighting):
    s, batch = _schedule(), _batch()
    x0, y, r = batch["image"], batch["label"], batch["representation"]
    model = _model(prediction=prediction)
    with torch.no_grad():
        A = _true_drift(model, batch)

    def image_fn(z, t):  # knows x0 and the true drift, hence ε, and outputs its parameterisation
        eps = (z - s.at("a", t, z) * x0 - s.at("kappa", t, z) * A) / s.at("sigma", t, z)
        return s.target(x0, eps, t, prediction)

    _with_outputs(model, image_fn, lambda z, t: {"label": onehot_logits(y, 3), "representation": r.clone()})
    drop = {name: torch.zeros(B, dtype=torch.bool) for name in ("label", "representation")}
    out = MultiModalDiffusion(model, s, weighting=weighting)(batch, drop=drop, generator=torch.Generator().manual_seed(1))
    assert out.per_sample.shape == (B,)
    assert float(out.per_sample.detach().abs().max()) < 1e-8


def test_random_draws_follow_the_documented_order():
    # t, then ε, then each modality's from_batch (no draws for these two), then one dropout mask per
    # modality in model order: the main job's numbers depend on this order.
    s, model, batch = _schedule(), _model(), _batch()
    calls = _capture_inputs(model)
    out = MultiModalDiffusion(model, s, p_drop=0.5)(batch, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 50, (B,), generator=g)
    noise = torch.randn(batch["image"].shape, generator=g)
    drop = {name: torch.rand(B, generator=g) < 0.5 for name in ("label", "representation")}
    assert torch.equal(out.t, t)
    assert all(torch.equal(out.drop[k], drop[k]) for k in drop)
    assert any(bool(v.any()) and not bool(v.all()) for v in drop.values())  # masks are mixed
    with torch.no_grad():
        torch.testing.assert_close(calls[0][0], _z_ref(batch["image"], _true_drift(model, batch, drop), noise, t),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loc,scale", [(0.0, 1.0), (-1.5, 0.7)])
def test_logit_normal_timesteps_follow_the_closed_form(loc, scale):
    # Oracle: P(t = k) = Φ((logit((k+1)/T) - μ)/s) - Φ((logit(k/T) - μ)/s), from scipy's normal CDF.
    from unidiff.diffusion.objective import draw_timesteps

    T, n = 50, 200_000
    t = draw_timesteps(T, (n,), torch.Generator().manual_seed(0), torch.device("cpu"), "logit_normal", loc, scale)
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) < T
    edges = np.arange(T + 1) / T
    with np.errstate(divide="ignore"):
        logit = np.log(edges) - np.log1p(-edges)  # -inf .. +inf at the ends
    p = np.diff(norm.cdf((logit - loc) / scale))
    freq = np.bincount(t.numpy(), minlength=T) / n
    sd = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 5 * sd + 1e-12), np.max(np.abs(freq - p) / (sd + 1e-12))
    # and it is not the uniform draw: the mass at the ends is far below 1/T each
    assert freq[0] < 0.5 / T and freq[-1] < 0.5 / T


def test_the_objective_draws_t_as_configured():
    s, model, batch = _schedule(), _model(), _batch()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    uniform = MultiModalDiffusion(model, s)(batch, generator=g())
    assert torch.equal(uniform.t, torch.randint(0, 50, (B,), generator=g()))  # the default is unchanged
    low = MultiModalDiffusion(model, s, t_sampling="logit_normal", t_loc=-6.0, t_scale=0.1)(batch, generator=g())
    assert int(low.t.max()) == 0  # sigmoid(-6 ± 0.5) < 1/50: every row at t = 0
    high = MultiModalDiffusion(model, s, t_sampling="logit_normal", t_loc=6.0, t_scale=0.1)(batch, generator=g())
    assert int(high.t.min()) == 49
    with pytest.raises(ConfigError, match=r"diffusion\.t_sampling"):
        MultiModalDiffusion(model, s, t_sampling="lognormal")
    with pytest.raises(ConfigError, match=r"t_scale"):
        MultiModalDiffusion(model, s, t_sampling="logit_normal", t_scale=0.0)


def test_vlb_weighting_reproducibility_and_functional_form():
    s, model, batch = _schedule(), _model(), _batch()
    vlb = MultiModalDiffusion(model, s, weighting="vlb")
    a = vlb(batch, generator=torch.Generator().manual_seed(5))
    b = vlb(batch, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.per_sample, b.per_sample) and torch.equal(a.t, b.t)
    assert all(torch.equal(a.drop[k], b.drop[k]) for k in a.drop)
    simple = MultiModalDiffusion(model, s, weighting="simple")(batch, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(simple.image, a.image)
    # vlb: λ_m (λA_t/λε_t)² normalised to mean 1 over t, from diffusers' ᾱ (§2)
    abar = _ddpm().alphas_cumprod.double()
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    kappa = (abar * (1 - abar)).sqrt()
    kappa_prev = (abar_prev * (1 - abar_prev)).sqrt()
    alpha = abar / abar_prev
    ratio = ((kappa_prev - kappa / alpha.sqrt()) / ((1 - alpha) / (alpha.sqrt() * (1 - abar).sqrt()))) ** 2
    w = (ratio / ratio.mean())[a.t].float()
    torch.testing.assert_close(a.per_sample, a.image + 0.5 * w * a.heads["label"] + 2.0 * w * a.heads["representation"])
    torch.testing.assert_close(simple.per_sample, a.image + 0.5 * a.heads["label"] + 2.0 * a.heads["representation"])
    # training_losses is the same computation as a flat dict
    flat = training_losses(model, s, batch, weighting="vlb", generator=torch.Generator().manual_seed(5))
    assert torch.equal(flat["loss"], a.per_sample) and torch.equal(flat["t"], a.t)
    assert torch.equal(flat["head/label"], a.heads["label"]) and torch.equal(flat["drop/label"], a.drop["label"])


@pytest.mark.parametrize("gamma", [5.0, 0.5])
def test_min_snr_weighting_against_diffusers_snr_in_every_parameterisation(gamma):
    # Min-SNR-γ (Hang et al. 2023) weights the x0 error of the image by min(SNR_t, γ), whatever the
    # head predicts (up to the normalisation), from diffusers' compute_snr on the same betas.
    from diffusers.training_utils import compute_snr

    s, batch, T = _schedule(), _batch(), 50
    snr = compute_snr(_ddpm(T), torch.arange(T)).double()
    torch.testing.assert_close(s.snr, snr, rtol=1e-4, atol=0)
    capped = snr.clamp(max=gamma)
    x0 = batch["image"]
    t = torch.tensor([0, 1, 17, 30, 49])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    drop = {name: torch.zeros(B, dtype=torch.bool) for name in ("label", "representation")}
    x0_hat = x0 + 0.3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    x0_error = (x0_hat - x0).pow(2).mean(dim=(1, 2, 3))
    for prediction in ("epsilon", "v_prediction", "sample"):
        model = _model(prediction=prediction)
        with torch.no_grad():
            A = _true_drift(model, batch)

        def image_fn(z, t):  # the same x̂0 in the head's parameterisation (ε̂ under the true drift)
            eps_hat = (z - s.at("a", t, z) * x0_hat - s.at("kappa", t, z) * A) / s.at("sigma", t, z)
            return s.target(x0_hat, eps_hat, t, prediction)

        _with_outputs(model, image_fn, lambda z, t: {"label": torch.zeros(B, 3), "representation": torch.zeros(B, 4)})
        # ||ε̂-ε||² = SNR ||x̂0-x0||², ||v̂-v||² = (SNR+1) ||x̂0-x0||²: L_simple of each parameterisation
        factor = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones(T, dtype=torch.float64)}[prediction]
        plain = MultiModalDiffusion(model, s)(batch, t=t, noise=noise, drop=drop)
        torch.testing.assert_close(plain.image.double(), x0_error.double() * factor[t], rtol=1e-4, atol=1e-7)
        # Min-SNR: min(SNR, γ) on the x0 error; the head's own loss gets min(SNR, γ)/factor, mean 1 over t
        weight = capped / (capped / factor).mean()
        out = MultiModalDiffusion(model, s, snr_gamma=gamma)(batch, t=t, noise=noise, drop=drop)
        torch.testing.assert_close(out.image.double(), x0_error.double() * weight[t], rtol=1e-4, atol=1e-7)


def test_min_snr_above_every_snr_is_l_simple_for_epsilon_and_bad_gammas_are_rejected():
    s, model, batch = _schedule(), _model(), _batch()
    g = lambda: torch.Generator().manual_seed(4)
    plain = MultiModalDiffusion(model, s)(batch, generator=g())
    capped = MultiModalDiffusion(model, s, snr_gamma=float(s.snr.max()) * 2)(batch, generator=g())
    torch.testing.assert_close(capped.image, plain.image)
    torch.testing.assert_close(capped.per_sample, plain.per_sample)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match=r"snr_gamma"):
            MultiModalDiffusion(model, s, snr_gamma=bad)


def test_p_drop_one_drops_everything():
    s, model, batch = _schedule(), _model(), _batch()
    calls = _capture_inputs(model)
    out = MultiModalDiffusion(model, s, p_drop=1.0)(batch, generator=torch.Generator().manual_seed(0))
    assert all(bool(v.all()) for v in out.drop.values())
    nulls = {name: torch.ones(B, dtype=torch.bool) for name in ("label", "representation")}
    g = torch.Generator().manual_seed(0)
    t, noise = torch.randint(0, 50, (B,), generator=g), torch.randn(batch["image"].shape, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(calls[0][0], _z_ref(batch["image"], _true_drift(model, batch, nulls), noise, t),
                                   rtol=1e-5, atol=1e-5)
    out = MultiModalDiffusion(model, s, p_drop=0.0)(batch, generator=torch.Generator().manual_seed(0))
    assert not any(bool(v.any()) for v in out.drop.values())


def test_label_only_baseline_and_bad_options():
    s, batch = _schedule(), _batch()
    model = _model(specs=(LABEL,), predict_image=False)
    calls = _capture_inputs(model)
    out = MultiModalDiffusion(model, s)(batch, generator=torch.Generator().manual_seed(0))
    assert float(out.image.abs().max()) == 0.0
    with torch.no_grad():
        logits = model(*calls[0]).aux["label"]
    torch.testing.assert_close(out.per_sample, 0.5 * F.cross_entropy(logits, batch["label"], reduction="none"))
    with pytest.raises(ConfigError, match=r"diffusion\.weighting"):
        MultiModalDiffusion(model, s, weighting="elbo")
    with pytest.raises(ConfigError, match=r"diffusion\.p_drop"):
        MultiModalDiffusion(model, s, p_drop=1.5)
    with pytest.raises(ConfigError, match="image head"):
        bits_per_dim(model, s, batch)


def test_one_forward_reaches_every_parameter_and_logs_detached_scalars():
    # Encoders, null encodings, heads and backbone all get their gradient from the objective's own
    # forward: what DDP/FSDP need to wrap them together (DESIGN.md §6).
    s, model, batch = _schedule(), _model(aux_loss_coef=0.05), _batch(n=8)
    drop = {name: torch.tensor([True, False] * 4) for name in ("label", "representation")}
    out = MultiModalDiffusion(model, s)(batch, drop=drop, generator=torch.Generator().manual_seed(3))
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    moe = {k: v for k, v in model.backbone.moe_stats().items() if v.ndim == 0}
    assert set(out.logs) == {"loss", "image", "aux_loss", "head/label", "head/representation", *moe}
    assert all(v.ndim == 0 and not v.requires_grad and v.dtype == torch.float32 for v in out.logs.values())
    torch.testing.assert_close(out.logs["loss"], out.loss.detach())
    torch.testing.assert_close(out.logs["head/representation"], out.heads["representation"].mean())
    for k, v in moe.items():  # the statistics of this very forward, which asked for them
        torch.testing.assert_close(out.logs[k], v)
    assert model(batch["image"], out.t).stats == {}  # a sampling forward computes none


def test_state_dict_is_the_models_and_the_schedule_is_not_module_state():
    s, model = _schedule(), _model()
    objective = MultiModalDiffusion(model, s)
    state = objective.state_dict()
    assert set(state) == {"model." + k for k in model.state_dict()}
    assert model_state_dict(state).keys() == model.state_dict().keys()
    assert model_state_dict(model.state_dict()).keys() == model.state_dict().keys()
    # both forms load: the objective's own, and a plain model's (checkpoints written before it)
    other = MultiModalDiffusion(_model(seed=3), s)
    other.load_state_dict(model.state_dict())
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in state.items())
    other.load_state_dict({k: torch.zeros_like(v) for k, v in state.items()})
    assert all(float(v.abs().sum()) == 0 for v in other.state_dict().values() if v.is_floating_point())
    # casting the module leaves the float64 tables alone
    objective.half()
    assert objective.schedule is s and s.alphas_cumprod.dtype == torch.float64


def test_mixed_precision_covers_the_network_only():
    # Under autocast (what accelerate wraps the prepared forward in) the drift and z_t stay fp32 and
    # equal to a full-precision step: only the model call runs in bf16.
    s, model, batch = _schedule(), _model(), _batch()
    calls = _capture_inputs(model)
    objective = MultiModalDiffusion(model, s)
    full = objective(batch, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = objective(batch, generator=torch.Generator().manual_seed(4))
    assert calls[1][0].dtype == torch.float32 and torch.equal(calls[0][0], calls[1][0])
    assert mixed.per_sample.dtype == torch.float32 and bool(torch.isfinite(mixed.loss))
    torch.testing.assert_close(mixed.per_sample, full.per_sample, rtol=0.1, atol=0.05)


# --- the full bound ----------------------------------------------------------------------------------
def _quantised(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *SHAPE), generator=g).float() / 255 * 2 - 1


def _knowing_model(s, x0, y, K=3, eps_offset=0.0, t0_logits_uniform=False, prediction="epsilon"):
    """The real label model with known outputs: ε̂ = ε + offset at the true drift, a one-hot head
    (so ``expected_aggregate`` gives Â = A). Returns (model, A)."""
    model = _model(specs=({**LABEL, "num_classes": K},), prediction=prediction)
    with torch.no_grad():
        A = LABEL["weight"] * model.modalities["label"].encode(y)

    def image_fn(z, t):
        eps = (z - s.at("a", t, z) * x0 - s.at("kappa", t, z) * A) / s.at("sigma", t, z) + eps_offset
        return s.target(x0, eps, t, prediction)

    def aux_fn(z, t):
        logits = onehot_logits(y, K)
        if t0_logits_uniform:
            logits = torch.where((t == 0).view(-1, 1), torch.zeros_like(logits), logits)
        return {"label": logits}

    return _with_outputs(model, image_fn, aux_fn), A


@pytest.mark.parametrize("num_t,prediction", [(None, "epsilon"), (3, "epsilon"), (3, "v_prediction"), (3, "sample")])
def test_bits_per_dim_of_a_perfect_model_is_prior_plus_decoder(num_t, prediction):
    T = 40
    s, y = _schedule(T), _batch()["label"]
    x0 = _quantised(B, 1)
    model, A = _knowing_model(s, x0, y, prediction=prediction)
    with torch.no_grad():
        bpd = bits_per_dim(model, s, {"image": x0, "label": y}, num_t=num_t, generator=torch.Generator().manual_seed(0))
    abar = _ddpm(T).alphas_cumprod.double()
    # L_T: KL(N(a x0 + κ A, σ²) ‖ N(0, 1)) at the last index
    a, sig = abar[-1].sqrt(), (1 - abar[-1]).sqrt()
    mean = a * x0.double() + a * sig * A.double()
    prior = kl_divergence(Normal(mean, sig.expand_as(mean)), Normal(0.0, 1.0)).flatten(1).sum(1)
    # L_0: x̂0 = x0 exactly, decoder variance β̃_1 = (1-ᾱ_0) β_1 / (1-ᾱ_1)
    std = math.sqrt(float((1 - abar[0]) * (1 - abar[1] / abar[0]) / (1 - abar[1])))
    xs = x0.double().numpy()
    p = norm.cdf(1 / 255 / std) - norm.cdf(-1 / 255 / std)
    logp = torch.full(xs.shape, math.log(p), dtype=torch.float64)
    logp[torch.from_numpy(xs < -0.999) | torch.from_numpy(xs > 0.999)] = math.log(norm.cdf(1 / 255 / std))
    decoder = -logp.flatten(1).sum(1)
    expected = (prior + decoder) / (DIMS * math.log(2))
    torch.testing.assert_close(bpd.double(), expected, rtol=1e-4, atol=1e-5)


def test_diffusion_sum_all_t_and_monte_carlo_match_closed_form():
    # ε̂ = ε + δ, Â = A: L_{t-1} = δ² D β_t / (2 α_t (1 - ᾱ_{t-1})) independently of the noise.
    T, delta = 20, 0.1
    s, y = _schedule(T), _batch()["label"]
    x0 = _quantised(B, 2)
    model, _ = _knowing_model(s, x0, y, eps_offset=delta)
    betas = _ddpm(T).betas.double()
    abar = torch.cumprod(1 - betas, 0)
    per_t = delta**2 * DIMS * betas[1:] / (2 * (1 - betas[1:]) * (1 - abar[:-1]))
    with torch.no_grad():
        terms = bound_terms(model, s, x0, {"label": y}, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(terms["diffusion"].double(), per_t.sum().expand(B), rtol=1e-4, atol=1e-6)
    # Monte Carlo over t only (L does not depend on the noise): n·draws of (T-1)·L_{t-1}; tight
    # enough to tell the (T-1) scaling from T (a 5% shift).
    n, draws = 2000, 50
    x0 = _quantised(n, 5)
    y = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(6))
    model, _ = _knowing_model(s, x0, y, eps_offset=delta)
    with torch.no_grad():
        mc = bound_terms(model, s, x0, {"label": y}, num_t=draws, generator=torch.Generator().manual_seed(0))["diffusion"]
    se = (T - 1) * per_t.std() / math.sqrt(n * draws)
    assert abs(float(mc.mean()) - float(per_t.sum())) < 4 * float(se) < 0.05 * float(per_t.sum())


def test_bits_per_dim_random_model_finite_positive():
    T = 20
    s, model = _schedule(T), _model(specs=(LABEL,))
    x0, y = _quantised(4, 3), _batch(n=4)["label"]
    for num_t in (None, 4):
        bpd = bits_per_dim(model, s, {"image": x0, "label": y}, num_t=num_t, generator=torch.Generator().manual_seed(0))
        assert bpd.shape == (4,) and bool(torch.isfinite(bpd).all()) and bool((bpd > 0).all())


def test_elbo_classifier_picks_the_true_drift():
    T, K = 30, 4
    s = _schedule(T)
    y = torch.tensor([0, 3, 1, 2, 3])
    x0 = _quantised(B, 4)
    # The head is uninformative at t = 0, so only the diffusion terms (the drift) can separate.
    model, _ = _knowing_model(s, x0, y, K=K, t0_logits_uniform=True)
    with torch.no_grad():
        best, bounds = elbo_classify(model, s, x0, "label", range(K), num_t=6, generator=torch.Generator().manual_seed(0))
        true_terms = bound_terms(model, s, x0, {"label": y}, generator=torch.Generator().manual_seed(0))
    assert bounds.shape == (B, K)
    assert torch.equal(best, y)
    assert float(true_terms["diffusion"].abs().max()) < 1e-6  # the true drift has zero KL
    with pytest.raises(ConfigError, match="no modality"):
        elbo_classify(model, s, x0, "representation", range(K))


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_with_one_modality_the_bound_term_is_the_ddpm_term(gamma):
    """The paper's reduction: with the image alone (no drift: A = Â = 0, whatever γ) the bound's
    t-term is DDPM's L_{t-1} = ||μ̃(x0) − μ̃(x̂0)||² / (2 σ̃²), μ̃'s coefficients from diffusers'
    DDPMScheduler tables and σ̃² its ``_get_variance`` (the posterior variance, "fixed_small")."""
    T = 1000
    s = DriftSchedule.from_config("linear", T, gamma=gamma)
    ddpm = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", prediction_type="sample",
                         variance_type="fixed_small", clip_sample=False)
    ddpm.set_timesteps(T)
    abars = ddpm.alphas_cumprod.double()
    g = torch.Generator().manual_seed(3)
    shape = (2, 1, 4, 4)
    zero = torch.zeros(shape, dtype=torch.float64)
    for t in [1, 5, 250, 999]:
        x0, eps = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
        eps_hat = eps + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)
        a, sig = float(abars[t]) ** 0.5, float(1 - abars[t]) ** 0.5
        z_t = a * x0 + sig * eps
        x0_hat = (z_t - sig * eps_hat) / a
        # DDPM's posterior mean coefficients (Ho et al. eq. 7) from diffusers' tables:
        coef_x0 = abars[t - 1] ** 0.5 * ddpm.betas.double()[t] / (1 - abars[t])
        coef_zt = ddpm.alphas.double()[t] ** 0.5 * (1 - abars[t - 1]) / (1 - abars[t])
        var = float(ddpm._get_variance(t))
        oracle = ((coef_x0 * (x0 - x0_hat)) ** 2).flatten(1).sum(1) / (2 * var)
        tt = torch.full((shape[0],), t)
        got = exact_kl_term(s, zero, eps, eps_hat, zero, tt)
        # diffusers keeps its tables in fp32: 1 - ᾱ near t = 0 loses digits to cancellation (~1e-3 at t = 1)
        torch.testing.assert_close(got, oracle, rtol=2e-3 if t < 10 else 1e-5, atol=1e-9)
