"""DriftSchedule (DESIGN.md §1-2) against diffusers and closed-form / Monte-Carlo oracles."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from unidiff.diffusion import DriftSchedule
from unidiff.errors import ConfigError

SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]


def _ref(beta_schedule="linear", T=1000, **kw):
    return DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, **kw)


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_tables_match_diffusers(beta_schedule):
    s = DriftSchedule.from_config(beta_schedule, 1000)
    ref = _ref(beta_schedule)
    torch.testing.assert_close(s.alphas_cumprod, ref.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.betas, ref.betas.double())


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_kappa_ends_and_positivity(beta_schedule, gamma):
    s = DriftSchedule.from_config(beta_schedule, 1000, gamma=gamma)
    b0 = float(_ref(beta_schedule).betas[0])
    # Chosen semantics: κ_0 = γ sqrt(ᾱ_0(1-ᾱ_0)) with ᾱ_0 = 1-β_0, small but not exactly 0.
    assert math.isclose(float(s.kappa[0]), gamma * math.sqrt(b0 * (1 - b0)), rel_tol=1e-5)
    kmax = float(s.kappa.max())
    assert math.isclose(kmax, gamma * 0.5, rel_tol=1e-3)  # a σ peaks at 1/2 where ᾱ = 1/2
    assert float(s.kappa[0]) / kmax < 0.05
    # κ_{T-1}/max κ = 2 a_{T-1} σ_{T-1}: ≈ 0 exactly as far as the beta schedule reaches N(0, I)
    # (scaled_linear keeps a_{T-1} ≈ 0.07).
    a_last = float(_ref(beta_schedule).alphas_cumprod[-1]) ** 0.5
    assert float(s.kappa[-1]) / kmax <= 2 * a_last * (1 + 1e-4)
    if beta_schedule in ("linear", "squaredcos_cap_v2"):
        assert float(s.kappa[-1]) / kmax < 0.05
    assert bool((s.kappa > 0).all())
    # ... and it is largest in between.
    assert 10 < int(s.kappa.argmax()) < 990


def test_w_reproduces_kappa_by_recursion():
    # The mean drift coefficient of the Markov chain: m_t = sqrt(α_t) m_{t-1} + w_t, m_{-1} = 0.
    s = DriftSchedule.from_config("squaredcos_cap_v2", 200, gamma=0.7)
    m, ms = 0.0, []
    for t in range(200):
        m = math.sqrt(float(s.alphas[t])) * m + float(s.w[t])
        ms.append(m)
    torch.testing.assert_close(torch.tensor(ms, dtype=torch.float64), s.kappa, rtol=1e-9, atol=1e-12)
    assert float(s.w[0]) == float(s.kappa[0])


def test_markov_chain_marginal_matches_closed_form():
    T, N = 40, 20000
    s = DriftSchedule.from_config("linear", T, beta_start=1e-3, beta_end=0.2)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 2, 2, 2, generator=g) * 2 - 1
    A = torch.randn(1, 2, 2, 2, generator=g)
    z = x0.expand(N, -1, -1, -1).double()
    A64, x64 = A.double(), x0.double()
    for t in range(T):
        z = s.q_step(z, A64, t, torch.randn(z.shape, generator=g, dtype=torch.float64))
        if t in (0, 1, 5, 20, T - 1):
            mean_cf = float(s.a[t]) * x64 + float(s.kappa[t]) * A64
            std_cf = float(s.sigma[t])
            se = std_cf / math.sqrt(N)
            assert (z.mean(0) - mean_cf[0]).abs().max() < 5 * se, t
            assert (z.std(0) / std_cf - 1).abs().max() < 5 / math.sqrt(2 * N), t


def test_q_sample_and_v_match_diffusers():
    s = DriftSchedule.from_config("linear", 1000)
    ref = _ref()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    A = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    y_ref = ref.add_noise(x0, eps, t)
    torch.testing.assert_close(s.q_sample(x0, None, t, eps), y_ref, rtol=1e-5, atol=1e-5)
    z = s.q_sample(x0, A, t, eps)
    kappa = (ref.alphas_cumprod[t] * (1 - ref.alphas_cumprod[t])).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(z, y_ref + kappa * A, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.dedrift(z, A, t), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.redrift(s.dedrift(z, A, t), A, t), z)
    v_ref = ref.get_velocity(x0, eps, t)
    torch.testing.assert_close(s.target(x0, eps, t, "v_prediction"), v_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_parameterisation_conversions(prediction):
    s = DriftSchedule.from_config("linear", 1000)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 400, 990])
    y = s.q_sample(x0, None, t, eps)
    pred = s.target(x0, eps, t, prediction)
    torch.testing.assert_close(s.to_eps(pred, y, t, prediction), eps)
    torch.testing.assert_close(s.to_x0(pred, y, t, prediction), x0)
    torch.testing.assert_close(s.from_eps(eps, y, t, prediction), pred)


def test_int_and_tensor_timesteps_agree():
    s = DriftSchedule.from_config("linear", 100)
    x = torch.randn(2, 1, 2, 2)
    A = torch.randn(2, 1, 2, 2)
    e = torch.randn(2, 1, 2, 2)
    torch.testing.assert_close(s.q_sample(x, A, 17, e), s.q_sample(x, A, torch.tensor([17, 17]), e))


def test_vlb_head_weight_matches_independent_formula():
    gamma = 1.3
    s = DriftSchedule.from_config("linear", 1000, gamma=gamma)
    abar = _ref().alphas_cumprod.double()
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    sig, sig_prev = (1 - abar).sqrt(), (1 - abar_prev).sqrt()
    # λA/λε = -γ a_t σ_t ᾱ_{t-1} / (σ_t + σ_{t-1}) (derived from σ_{t-1}² - σ_t² = -ᾱ_{t-1} β_t).
    r = (gamma * abar.sqrt() * sig * abar_prev / (sig + sig_prev)) ** 2
    torch.testing.assert_close(s.vlb_head_weight, r / r.mean(), rtol=1e-4, atol=1e-10)
    assert math.isclose(float(s.vlb_head_weight.mean()), 1.0, rel_tol=1e-12)


def test_bad_config_raises():
    with pytest.raises(ConfigError, match="beta_schedule"):
        DriftSchedule.from_config("cosine")
    with pytest.raises(ConfigError, match="gamma"):
        DriftSchedule.from_config("linear", gamma=-1)
    with pytest.raises(ConfigError, match="num_train_timesteps"):
        DriftSchedule.from_config("linear", 1)
