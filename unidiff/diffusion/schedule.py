"""The aggregated-drift noise schedule (DESIGN.md §1-2).

Any diffusers beta schedule gives ``ᾱ_t``; on top of it the drift schedule ``κ_t = γ a_t σ_t``
turns a plain DDPM chain into the multi-modal forward process

    q(z_t | x)        = N(a_t x0 + κ_t A(x), σ_t² I)                              (marginal)
    q(z_t | z_{t-1}, x) = N(sqrt(α_t) z_{t-1} + w_t A(x), β_t I),  w_t = κ_t - sqrt(α_t) κ_{t-1}

and the de-drifted ``y_t = z_t - κ_t A`` is an ordinary DDPM chain ``y_t = a_t x0 + σ_t ε``.

Index convention (diffusers'): timesteps are integers ``t ∈ [0, T)``; index 0 is the least noisy
latent ``z_0`` and the data ``x0`` sits at index ``-1`` with ``ᾱ_{-1} := 1`` and ``κ_{-1} := 0``.
So ``ᾱ_0 = 1 - β_0 < 1`` and ``κ_0 = γ sqrt(ᾱ_0 (1 - ᾱ_0)) ≈ γ sqrt(β_0)`` is small (0.01 for
the linear schedule, ~2% of max κ) but not exactly zero: the first transition from ``x0`` already
carries the drift ``w_0 A = κ_0 A``, which keeps marginal and transitions consistent at every
index. The DDPM loss terms follow the same shift: ``L_{t-1}`` (t ≥ 1) compares
``q(z_{t-1} | z_t, x)`` with ``p_θ(z_{t-1} | z_t)``; the decoder ``L_0`` reads ``x`` from ``z_0``;
the prior ``L_T`` is ``q(z_{T-1} | x)`` against ``N(0, I)``.

All per-timestep tables are float64 on the CPU; :meth:`DriftSchedule.at` gathers a table at a
(B,) timestep tensor on its device and casts to the dtype of the tensor it will multiply.
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch
from diffusers import DDPMScheduler

from ..choices import BetaSchedule, Prediction, values
from ..errors import ConfigError

Timestep = Union[int, torch.Tensor]


class DriftSchedule:
    """Per-timestep coefficients of the drifted forward process and its posterior.

    Args:
        betas: (T,) β_t of any beta schedule (take them from a diffusers scheduler, see
            :meth:`from_config`).
        gamma: γ, the drift scale in ``κ_t = γ a_t σ_t``.

    Tables, all (T,) float64 indexed by the diffusers timestep ``t``:
        ``betas`` β_t, ``alphas`` α_t, ``alphas_cumprod`` ᾱ_t, ``alphas_cumprod_prev`` ᾱ_{t-1},
        ``a`` sqrt(ᾱ_t), ``sigma`` sqrt(1-ᾱ_t), ``kappa`` κ_t, ``kappa_prev`` κ_{t-1},
        ``w`` transition drift weight, ``c1``/``c2``/``posterior_variance`` (β̃_t) of the
        posterior mean ``c1 x0 + c2 (z_t - κ_t A) + κ_{t-1} A``, ``lambda_eps`` λε_t,
        ``lambda_A`` λA_t, ``vlb_head_weight`` (see :meth:`vlb_head_weight`), ``snr`` ᾱ_t/(1-ᾱ_t) of
        the image chain (diffusers' ``compute_snr``; the Min-SNR-γ image weighting).
    """

    def __init__(self, betas: torch.Tensor, gamma: float = 1.0):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten().cpu()
        if betas.numel() < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ConfigError(f"diffusion betas must be a schedule of length >= 2 inside (0, 1); got {betas.numel()} values")
        if not gamma >= 0:
            raise ConfigError(f"diffusion.gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.num_train_timesteps = betas.numel()
        one = torch.ones(1, dtype=torch.float64)
        zero = torch.zeros(1, dtype=torch.float64)

        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # ᾱ_{-1} := 1: the data itself sits one index before z_0.
        self.alphas_cumprod_prev = torch.cat([one, self.alphas_cumprod[:-1]])
        self.a = self.alphas_cumprod.sqrt()
        self.sigma = (1.0 - self.alphas_cumprod).sqrt()
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        a_prev = self.alphas_cumprod_prev.sqrt()

        # §1: κ_t = γ a_t σ_t, largest where ᾱ_t = 1/2, vanishing at both ends; κ_{-1} := 0.
        self.kappa = self.gamma * self.a * self.sigma
        self.kappa_prev = torch.cat([zero, self.kappa[:-1]])
        # Transition drift: keeps the Markov chain's marginals equal to the closed form (§1).
        self.w = self.kappa - self.alphas.sqrt() * self.kappa_prev

        # DDPM posterior coefficients (Ho et al. eq. 7) in the de-drifted space; β̃_0 = 0 because
        # z_{-1} = x0 is known exactly given z_0 and x.
        self.c1 = a_prev * self.betas / (1.0 - self.alphas_cumprod)
        self.c2 = self.alphas.sqrt() * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_variance = (1.0 - self.alphas_cumprod_prev) * self.betas / (1.0 - self.alphas_cumprod)

        # §2: μ̃ - μ_θ = λA_t (A - Â) - λε_t (ε - ε̂).
        self.lambda_eps = self.betas / (self.alphas.sqrt() * self.sigma)
        self.lambda_A = self.kappa_prev - self.kappa / self.alphas.sqrt()
        # §2 `vlb` weighting: the bound's ratio of drift to noise weights, mean 1 over t ∈ [0, T).
        ratio = (self.lambda_A / self.lambda_eps) ** 2
        self.vlb_head_weight = ratio / ratio.mean()
        self._device_cache: Dict[torch.device, Dict[str, torch.Tensor]] = {}

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        beta_schedule: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        gamma: float = 1.0,
    ) -> "DriftSchedule":
        """Betas from diffusers' ``DDPMScheduler`` (so every diffusers beta schedule works)."""
        if beta_schedule not in values(BetaSchedule):
            raise ConfigError(f"diffusion.beta_schedule must be one of {values(BetaSchedule)}, got {beta_schedule!r}")
        if int(num_train_timesteps) < 2:
            raise ConfigError(f"diffusion.num_train_timesteps must be >= 2, got {num_train_timesteps}")
        if not 0 < beta_start < beta_end < 1:
            raise ConfigError(f"diffusion needs 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
        ref = DDPMScheduler(
            num_train_timesteps=int(num_train_timesteps),
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
        )
        return cls(ref.betas, gamma=gamma)

    @property
    def decoder_variance(self) -> float:
        """Variance of the image decoder ``p_θ(x0 | z_0)`` in the bound.

        β̃_0 = 0 would make the decoder degenerate, so (as improved-diffusion's clipped
        ``fixed_small`` log-variance does) the next posterior variance β̃_1 is used.
        """
        return float(self.posterior_variance[1])

    # --- gathering ------------------------------------------------------------------------------
    def table(self, name: str, device: Optional[torch.device] = None) -> torch.Tensor:
        """The float64 table ``name`` on ``device`` (cached per device)."""
        src = getattr(self, name)
        device = torch.device("cpu") if device is None else torch.device(device)
        if device.type == "cpu":
            return src
        cache = self._device_cache.setdefault(device, {})
        if name not in cache:
            cache[name] = src.to(device)
        return cache[name]

    def at(self, name: str, t: Timestep, like: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at ``t`` shaped to broadcast against ``like`` (B, ...).

        ``t`` is an int (one timestep for the batch) or a (B,) integer tensor.
        """
        if isinstance(t, torch.Tensor) and t.ndim > 0:
            coef = self.table(name, t.device)[t]  # (B,)
            coef = coef.view(-1, *([1] * (like.ndim - 1)))
        else:
            coef = self.table(name)[int(t)]
        return coef.to(device=like.device, dtype=like.dtype)

    # --- forward process (§1) -------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, A: Optional[torch.Tensor], t: Timestep, noise: torch.Tensor) -> torch.Tensor:
        """Marginal draw ``z_t = a_t x0 + κ_t A + σ_t ε``; x0, A, noise (B, C, H, W)."""
        z = self.at("a", t, x0) * x0 + self.at("sigma", t, x0) * noise
        return z if A is None else z + self.at("kappa", t, x0) * A

    def q_step(self, z_prev: torch.Tensor, A: Optional[torch.Tensor], t: Timestep, noise: torch.Tensor) -> torch.Tensor:
        """Transition ``z_{t-1} -> z_t`` (``z_{-1} = x0``): ``sqrt(α_t) z_{t-1} + w_t A + sqrt(β_t) ε``."""
        z = self.at("alphas", t, z_prev).sqrt() * z_prev + self.at("betas", t, z_prev).sqrt() * noise
        return z if A is None else z + self.at("w", t, z_prev) * A

    def dedrift(self, z: torch.Tensor, A: Optional[torch.Tensor], t: Timestep) -> torch.Tensor:
        """``y_t = z_t - κ_t A``: the plain DDPM variable (§1)."""
        return z if A is None else z - self.at("kappa", t, z) * A

    def redrift(self, y: torch.Tensor, A: Optional[torch.Tensor], t: Timestep) -> torch.Tensor:
        """``z_t = y_t + κ_t A``, the inverse of :meth:`dedrift`."""
        return y if A is None else y + self.at("kappa", t, y) * A

    def posterior_mean(self, x0: torch.Tensor, A: Optional[torch.Tensor], z_t: torch.Tensor, t: Timestep) -> torch.Tensor:
        """Mean of ``q(z_{t-1} | z_t, x)``: ``c1 x0 + c2 (z_t - κ_t A) + κ_{t-1} A`` (§2).

        With the model's ``x̂0, Â`` in place of ``x0, A`` this is the mean of ``p_θ``; the variance of
        both is ``posterior_variance`` (β̃_t).
        """
        mean = self.at("c1", t, z_t) * x0 + self.at("c2", t, z_t) * self.dedrift(z_t, A, t)
        return mean if A is None else mean + self.at("kappa_prev", t, z_t) * A

    # --- parameterisations in y-space (diffusers' v = a ε - σ x0) ---------------------------------
    def v_target(self, x0: torch.Tensor, eps: torch.Tensor, t: Timestep) -> torch.Tensor:
        return self.at("a", t, x0) * eps - self.at("sigma", t, x0) * x0

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: Timestep, prediction: str) -> torch.Tensor:
        """What an image head with parameterisation ``prediction`` should output."""
        if prediction == "epsilon":
            return eps
        if prediction == "v_prediction":
            return self.v_target(x0, eps, t)
        if prediction == "sample":
            return x0
        raise ConfigError(f"model.prediction must be one of {values(Prediction)}, got {prediction!r}")

    def to_eps(self, pred: torch.Tensor, y: torch.Tensor, t: Timestep, prediction: str) -> torch.Tensor:
        """ε implied by a raw prediction at the de-drifted ``y_t`` (y = a x0 + σ ε)."""
        a, s = self.at("a", t, y), self.at("sigma", t, y)
        if prediction == "epsilon":
            return pred
        if prediction == "v_prediction":
            return a * pred + s * y  # a v + σ y = a²ε - aσx0 + σa x0 + σ²ε = ε
        if prediction == "sample":
            return (y - a * pred) / s
        raise ConfigError(f"model.prediction must be one of {values(Prediction)}, got {prediction!r}")

    def to_x0(self, pred: torch.Tensor, y: torch.Tensor, t: Timestep, prediction: str) -> torch.Tensor:
        """x0 implied by a raw prediction at the de-drifted ``y_t``."""
        a, s = self.at("a", t, y), self.at("sigma", t, y)
        if prediction == "epsilon":
            return (y - s * pred) / a
        if prediction == "v_prediction":
            return a * y - s * pred
        if prediction == "sample":
            return pred
        raise ConfigError(f"model.prediction must be one of {values(Prediction)}, got {prediction!r}")

    def from_eps(self, eps: torch.Tensor, y: torch.Tensor, t: Timestep, prediction: str) -> torch.Tensor:
        """The raw prediction of type ``prediction`` equivalent to ``eps`` at ``y_t``."""
        if prediction == "epsilon":
            return eps
        x0 = (y - self.at("sigma", t, y) * eps) / self.at("a", t, y)
        return self.target(x0, eps, t, prediction)

    def reframe(self, pred: torch.Tensor, y_from: torch.Tensor, y_to: torch.Tensor, t: Timestep,
                prediction: str) -> torch.Tensor:
        """The raw prediction at ``y_to`` with the same x0 as ``pred`` has at ``y_from`` (DESIGN.md §3.3).

        With ``Δ = y_to - y_from`` and x0 fixed, ``y = a x0 + σ ε`` gives ``ε' = ε + Δ/σ`` and
        ``v' = a ε' - σ x0 = v + a Δ/σ``; an x0 prediction does not move. Written as an increment
        so that ``Δ = 0`` returns ``pred`` bit for bit.
        """
        if prediction == "sample":
            return pred
        step = (y_to - y_from) / self.at("sigma", t, y_to)
        if prediction == "epsilon":
            return pred + step
        if prediction == "v_prediction":
            return pred + self.at("a", t, y_to) * step
        raise ConfigError(f"model.prediction must be one of {values(Prediction)}, got {prediction!r}")

    def __repr__(self) -> str:
        return f"DriftSchedule(T={self.num_train_timesteps}, gamma={self.gamma}, max_kappa={float(self.kappa.max()):.4f})"
