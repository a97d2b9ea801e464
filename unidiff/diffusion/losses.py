"""The exact variational bound, bits/dim and the ELBO classifier (DESIGN.md §2).

The training loss lives in ``objective.py`` (:class:`MultiModalDiffusion`); this file is the
evaluation side. The model is an argument (DiT's split): it follows ``unidiff.model.UnifiedModel``'s
contract, ``model(z_t, t) -> ModelOutput(image, aux, aux_loss, stats)``, with
``model.modalities``, ``model.aggregate``, ``model.expected_aggregate`` and ``model.prediction``.

Bound bookkeeping (diffusers indices, see ``schedule.py``): for a sample ``x = (x0, x_1..M)``

    -log p_θ(x) ≤ L_T + Σ_{t=1}^{T-1} L_{t-1} + L_0,
    L_T     = KL(q(z_{T-1} | x) ‖ N(0, I)),
    L_{t-1} = KL(q(z_{t-1} | z_t, x) ‖ p_θ(z_{t-1} | z_t))         (closed form below),
    L_0     = -log p_θ(x0 | z_0) - Σ_m log p_θ(x_m | z_0)          (image decoder + heads).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..errors import ConfigError
from .objective import draw_randint
from .schedule import DriftSchedule


def _sum_dims(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,) sum over every non-batch dimension."""
    return x.flatten(1).sum(dim=1)


def _zeros_like_batch(x0: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x0.shape[0], device=x0.device, dtype=torch.float32)


# --- the exact per-step KL ------------------------------------------------------------------------
def _drift_residual(A: Optional[torch.Tensor], A_hat: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if A is None and A_hat is None:
        return torch.zeros_like(like)
    if A is None:
        return -A_hat
    return A if A_hat is None else A - A_hat


def exact_kl_term(
    schedule: DriftSchedule,
    A: Optional[torch.Tensor],
    eps: torch.Tensor,
    eps_hat: torch.Tensor,
    A_hat: Optional[torch.Tensor],
    t: torch.Tensor,
) -> torch.Tensor:
    """``L_{t-1} = KL(q(z_{t-1}|z_t,x) ‖ p_θ(z_{t-1}|z_t))`` in nats, (B,), for t ≥ 1.

    Both Gaussians have variance β̃_t, so the KL is ``‖μ̃ - μ_θ‖² / (2 β̃_t)`` summed over dims, and
    §2's closed form ``μ̃ - μ_θ = λA_t (A - Â) - λε_t (ε - ε̂)`` needs neither ``x0`` nor ``z_t``.
    A, A_hat: (B, C, H, W) true and predicted drift (None = no drift); eps, eps_hat: (B, C, H, W).
    ``ε̂`` must be the ε implied by the model at ``y = z_t - κ_t Â`` (see ``DriftSchedule.to_eps``).
    At t = 0 β̃ = 0 and the term is not defined: index 0 is the decoder ``L_0``.
    """
    dA = _drift_residual(A, A_hat, eps)
    diff = schedule.at("lambda_A", t, eps) * dA - schedule.at("lambda_eps", t, eps) * (eps - eps_hat)
    return _sum_dims(diff.pow(2)) / (2.0 * schedule.at("posterior_variance", t, eps).flatten())


def kl_upper_bound(
    schedule: DriftSchedule,
    A: Optional[torch.Tensor],
    eps: torch.Tensor,
    eps_hat: torch.Tensor,
    A_hat: Optional[torch.Tensor],
    t: torch.Tensor,
) -> torch.Tensor:
    """§2's bound ``L_{t-1} ≤ [λA_t² ‖A-Â‖² + λε_t² ‖ε-ε̂‖²] / β̃_t`` (from ‖u - v‖² ≤ 2‖u‖² + 2‖v‖²), (B,)."""
    dA = _drift_residual(A, A_hat, eps)
    lam_A = schedule.at("lambda_A", t, eps).flatten()
    lam_eps = schedule.at("lambda_eps", t, eps).flatten()
    num = lam_A**2 * _sum_dims(dA.pow(2)) + lam_eps**2 * _sum_dims((eps - eps_hat).pow(2))
    return num / schedule.at("posterior_variance", t, eps).flatten()


# --- the full bound -------------------------------------------------------------------------------
def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """Elementwise ``log P(x)`` of 8-bit data in ``[-1, 1]`` under ``N(mean, std²)`` binned (DDPM §3.3).

    Bins have half-width 1/255; the two extreme bins extend to ±∞.
    """
    lo = (x - 1.0 / 255 - mean) / std
    hi = (x + 1.0 / 255 - mean) / std
    log_cdf_hi = torch.special.log_ndtr(hi)  # log Φ(hi), used by the lowest bin
    log_sf_lo = torch.special.log_ndtr(-lo)  # log (1 - Φ(lo)), used by the highest bin
    # Φ(hi) - Φ(lo) = Φ(-lo) - Φ(-hi): use the tail where the difference is not a cancellation.
    flip = (lo + hi) > 0
    a = torch.where(flip, -hi, lo)
    b = torch.where(flip, -lo, hi)
    mid = torch.log((torch.special.ndtr(b) - torch.special.ndtr(a)).clamp_min(1e-12))
    return torch.where(x < -0.999, log_cdf_hi, torch.where(x > 0.999, log_sf_lo, mid))


def _model_eps(model, schedule: DriftSchedule, z: torch.Tensor, t, out) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ε̂, Â) implied by a model output at ``z_t``: de-drift with the model's own ``Â`` (§2)."""
    A_hat = model.expected_aggregate(out.aux) if len(model.modalities) else None
    A_hat = torch.zeros_like(z) if A_hat is None else A_hat.float()
    y_hat = z - schedule.at("kappa", t, z) * A_hat
    return schedule.to_eps(out.image.float(), y_hat, t, model.prediction), A_hat


@torch.no_grad()
def bound_terms(
    model,
    schedule: DriftSchedule,
    x0: torch.Tensor,
    x_aux: Dict[str, Any],
    A: Optional[torch.Tensor] = None,
    num_t: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, torch.Tensor]:
    """The terms of the bound on ``-log p_θ(x0, x_aux)`` in nats, each (B,).

    Args:
        x0: (B, C, H, W) image in ``[-1, 1]`` (8-bit data for the decoder term). x_aux: the true
            auxiliary values (every modality absent from it is absent from the drift).
        A: the aggregate ``A(x)``; computed from ``x_aux`` when None.
        num_t: None sums ``L_{t-1}`` over all ``t = 1..T-1`` (T-1 forwards); an int draws that
            many independent ``t ~ U{1..T-1}`` per sample and scales the mean by ``T-1`` (an
            unbiased Monte-Carlo estimate). ``L_0`` and ``L_T`` are always exact.

    Returns ``prior`` (L_T), ``diffusion`` (Σ L_{t-1}), ``decoder`` (image part of L_0),
    ``aux/<name>`` (``-log p_θ(x_m | z_0)``) and ``total``. Random draws happen in a fixed order
    (``L_0`` noise, then per draw ``t`` then noise), so a re-seeded generator reproduces them.
    """
    if getattr(model, "image_head", True) is None:
        raise ConfigError("the bound needs an image head; this model has image_head=False (label-only baseline)")
    x0 = x0.float()
    B, device, T = x0.shape[0], x0.device, schedule.num_train_timesteps
    if A is None:
        A = model.aggregate(x_aux, None, batch_size=B)
    A = A.float()
    terms: Dict[str, torch.Tensor] = {}

    # L_T: closed-form KL of N(a x0 + κ A, σ²) from N(0, I) at the last index.
    last = T - 1
    mean = schedule.q_sample(x0, A, last, torch.zeros_like(x0))
    var = float(schedule.sigma[last]) ** 2
    terms["prior"] = 0.5 * _sum_dims(var + mean.pow(2) - 1.0 - math.log(var))

    # L_0: the model at z_0. μ_θ(z_0) = x̂0 (c1_0 = 1, c2_0 = κ_{-1} = 0), so the decoder is a
    # discretised Gaussian around x̂0; each head contributes its own likelihood of the true x_m.
    t0 = torch.zeros(B, dtype=torch.long, device=device)
    noise = randn_tensor(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    z0 = schedule.q_sample(x0, A, t0, noise)
    out = model(z0, t0)
    eps_hat, A_hat = _model_eps(model, schedule, z0, t0, out)
    x0_hat = schedule.to_x0(eps_hat, z0 - schedule.at("kappa", t0, z0) * A_hat, t0, "epsilon")
    std = math.sqrt(schedule.decoder_variance)
    terms["decoder"] = -_sum_dims(discretized_gaussian_log_likelihood(x0, x0_hat, std))
    for name, mod in model.modalities.items():
        if name in x_aux:
            terms[f"aux/{name}"] = -mod.log_likelihood(out.aux[name], x_aux[name]).float()

    # Σ_{t≥1} L_{t-1}: exact per-step KL at the model's (ε̂, Â), all steps or Monte Carlo.
    steps = range(1, T) if num_t is None else range(int(num_t))
    diffusion = _zeros_like_batch(x0)
    for k in steps:
        if num_t is None:
            t = torch.full((B,), k, dtype=torch.long, device=device)
        else:
            t = draw_randint(1, T, (B,), generator, device)
        noise = randn_tensor(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        z = schedule.q_sample(x0, A, t, noise)
        eps_hat, A_hat = _model_eps(model, schedule, z, t, model(z, t))
        diffusion = diffusion + exact_kl_term(schedule, A, noise, eps_hat, A_hat, t)
    if num_t is not None:
        diffusion = diffusion * (T - 1) / max(int(num_t), 1)
    terms["diffusion"] = diffusion
    terms["total"] = sum(terms.values())
    return terms


def bits_per_dim(
    model,
    schedule: DriftSchedule,
    batch: Dict[str, Any],
    num_t: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Per-sample bound on ``-log p_θ(x0, x_1..M)`` in bits per *image* dimension, (B,).

    Convention: the auxiliary modalities' ``-log p_θ(x_m | z_0)`` are part of the joint bound and
    are included in the numerator; the denominator is the image's ``C·H·W`` only, so a single-task
    image model gives the usual DDPM bits/dim. ``num_t`` as in :func:`bound_terms`.
    """
    x0 = batch["image"]
    x_aux = {name: mod.from_batch(batch, generator=generator) for name, mod in model.modalities.items()}
    terms = bound_terms(model, schedule, x0, x_aux, num_t=num_t, generator=generator)
    return terms["total"] / (x0[0].numel() * math.log(2.0))


@torch.no_grad()
def elbo_classify(
    model,
    schedule: DriftSchedule,
    x0: torch.Tensor,
    modality_name: str,
    candidates: Sequence[Any],
    num_t: Optional[int] = 16,
    generator: Optional[torch.Generator] = None,
    known: Optional[Dict[str, Any]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ELBO classifier (§3): the candidate ``x_m`` whose drift gives the lowest bound on ``-log p(x0, x_m)``.

    Args:
        x0: (B, C, H, W) images. modality_name: the modality to classify (e.g. ``"label"``).
        candidates: K values of ``x_m``; a Python int or 0-d tensor ``c`` means ``full((B,), c)``
            (e.g. ``range(num_classes)``).
        num_t: Monte-Carlo draws of ``t`` per candidate (None: all t). The same ``t`` and noise are
            used for every candidate (the generator state is replayed), so the differences between
            candidates are not swamped by Monte-Carlo noise.
        known: other modalities' true values to keep in the drift (absent ones use ``E(∅)``).

    Returns ``(best, bounds)``: best (B,) int64 index into ``candidates``, bounds (B, K) in nats.
    """
    if modality_name not in model.modalities:
        raise ConfigError(f"elbo_classify: model has no modality {modality_name!r}; has {list(model.modalities)}")
    B, device = x0.shape[0], x0.device
    if generator is None:
        seed = int(torch.randint(0, 2**62, (1,)))
        generator = torch.Generator(device=device).manual_seed(seed)
    state = generator.get_state()
    bounds = []
    for c in candidates:
        if isinstance(c, int):
            c = torch.full((B,), c, dtype=torch.long, device=device)
        elif isinstance(c, torch.Tensor) and c.ndim == 0:
            c = c.to(device).expand(B)
        x_aux = dict(known or {})
        x_aux[modality_name] = c
        generator.set_state(state)  # shared draws across candidates
        bounds.append(bound_terms(model, schedule, x0, x_aux, num_t=num_t, generator=generator)["total"])
    bounds = torch.stack(bounds, dim=1)  # (B, K)
    return bounds.argmin(dim=1), bounds
