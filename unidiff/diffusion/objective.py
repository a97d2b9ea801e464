"""The training objective as one module (DESIGN.md §2, §6): from a data batch to every loss term.

:class:`MultiModalDiffusion` owns one training step's mathematics: each modality's value
(``from_batch``), modality dropout, the aggregate drift ``A(x)``, the forward marginal
``z_t = a_t x0 + κ_t A + σ_t ε``, the model call, the image term, every head term (``simple`` or
``vlb`` weighting), the MoE auxiliary loss and the MoE statistics. The training loop hands this
module to ``accelerator.prepare``, so DDP/FSDP wrap the encoders, null encodings and heads with
the backbone (everything with a gradient runs inside the wrapped forward), and it only does::

    out = objective(batch, generator=g)       # ObjectiveOutput
    accelerator.backward(out.loss)
    log(out.logs)

That is the whole interface: swapping the objective (flow matching, another weighting, another
forward process) is a change to this one module, and the loop stays ignorant of the loss's
internals. The split is DiT's (the network never sees the schedule: ``UnifiedModel`` is a
submodule called as ``model(z_t, t)``) in EDM2's form (the loss is a class holding its options).

Checkpoint keys: the module's state is exactly the model's, under the submodule name ``model.``
(the schedule holds no module state). A state dict without that prefix (a plain ``UnifiedModel``,
e.g. a training checkpoint written before this module existed) loads as well, and
:func:`model_state_dict` turns either form back into ``UnifiedModel`` keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ..choices import TimestepSampling, Weighting, values
from ..errors import ConfigError
from .schedule import DriftSchedule
MODEL_PREFIX = "model."  # the submodule name of the model in the objective's state dict


# --- random draws on the data's device from a (possibly CPU) generator -------------------------
def draw_uniform(shape: Tuple[int, ...], generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """U[0, 1) of ``shape`` drawn on the generator's device (a CPU generator gives the same numbers
    whatever the data's device), then moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def draw_randint(low: int, high: int, shape: Tuple[int, ...], generator: Optional[torch.Generator],
                 device: torch.device) -> torch.Tensor:
    """Integers in ``[low, high)``, drawn like :func:`draw_uniform`."""
    gen_device = generator.device if generator is not None else device
    return torch.randint(low, high, shape, generator=generator, device=gen_device).to(device)


def draw_timesteps(num_timesteps: int, shape: Tuple[int, ...], generator: Optional[torch.Generator],
                   device: torch.device, sampling: str = "uniform", loc: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """Training timesteps in ``[0, T)``: uniform (``U{0..T-1}``, the bound's own expectation) or
    logit-normal, ``⌊T·sigmoid(loc + scale·n)⌋`` with ``n ~ N(0, 1)``, so that
    ``P(t = k) = Φ((logit((k+1)/T) - loc)/scale) - Φ((logit(k/T) - loc)/scale)``."""
    if sampling == "uniform":
        return draw_randint(0, num_timesteps, shape, generator, device)
    gen_device = generator.device if generator is not None else device
    n = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float64)
    u = torch.sigmoid(loc + scale * n)
    return (u * num_timesteps).floor().long().clamp_(0, num_timesteps - 1).to(device)


def model_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The ``UnifiedModel`` keys of a state dict written from the objective (``model.``-prefixed)
    or from the plain model (returned unchanged)."""
    if state and all(k.startswith(MODEL_PREFIX) for k in state):
        return {k[len(MODEL_PREFIX):]: v for k, v in state.items()}
    return state


@dataclass
class ObjectiveOutput:
    """One training step's losses.

    loss:       () what backward sees: ``per_sample.mean() + aux_loss``.
    per_sample: (B,) image term + weighted head terms (the MoE ``aux_loss`` is a batch scalar).
    image:      (B,) unweighted image MSE (zeros for the label-only baseline).
    heads:      {modality name: (B,)} unweighted head losses ``ℓ_m``.
    drop:       {modality name: (B,) bool} modality-dropout masks.
    t:          (B,) int64 timesteps.
    aux_loss:   () the MoE auxiliary loss.
    logs:       detached () float32 scalars for the training log: ``loss``, ``image``,
                ``aux_loss``, ``head/<name>`` (batch means) and the scalar ``moe/<stat>``s.
    """

    loss: torch.Tensor
    per_sample: torch.Tensor
    image: torch.Tensor
    heads: Dict[str, torch.Tensor]
    drop: Dict[str, torch.Tensor]
    t: torch.Tensor
    aux_loss: torch.Tensor
    logs: Dict[str, torch.Tensor]

    def as_dict(self) -> Dict[str, torch.Tensor]:
        """The flat dict of :func:`training_losses`: ``loss`` (B,) per sample, ``image``,
        ``head/<name>``, ``drop/<name>``, ``aux_loss``, ``t``."""
        out = {"loss": self.per_sample, "image": self.image, "aux_loss": self.aux_loss, "t": self.t}
        out.update({f"head/{name}": v for name, v in self.heads.items()})
        out.update({f"drop/{name}": v for name, v in self.drop.items()})
        return out


class MultiModalDiffusion(nn.Module):
    """The multi-task loss of §2 at one timestep per sample, around a ``UnifiedModel``.

    Args:
        model: the denoiser, following ``unidiff.model.UnifiedModel``'s contract
            (``model(z_t, t, collect_stats=...) -> ModelOutput``, ``modalities``, ``aggregate``,
            ``prediction``); kept as the submodule ``self.model``.
        schedule: the drift schedule (§1). Not module state on purpose: no state-dict keys, and
            ``.to(dtype)``, mixed precision and FSDP's buffer casting never touch its float64
            tables; they follow the timesteps' device through ``DriftSchedule.table``'s per-device
            cache, so ``.to(device)`` of this module is all a device move needs.
        weighting: ``simple``: head ``m`` weighted by its constant ``λ_m``. ``vlb``: additionally
            by ``π_m² (λA_t/λε_t)²`` normalised to mean 1 over ``t ∈ [0, T)`` (the bound's relative
            weight of the drift term to the noise term, §2). Since the normalisation is per
            modality, ``π_m²`` cancels and the weight is ``λ_m · schedule.vlb_head_weight[t]``.
        p_drop: probability that each modality is replaced by ``E_m(∅)`` in the drift (§2).
        t_sampling, t_loc, t_scale: how ``t`` is drawn (:func:`draw_timesteps`): ``uniform``, or
            ``logit_normal`` with the mean ``t_loc`` and the standard deviation ``t_scale`` of
            ``logit(t/T)``. A non-uniform draw reweights the loss's terms over ``t`` (it is no
            longer the bound's expectation; ``bits_per_dim`` always draws uniformly).
        snr_gamma: ``None``: the image term is L_simple of the head's parameterisation. A number γ:
            Min-SNR-γ (Hang et al. 2023), the image term times ``min(SNR_t, γ)`` divided by what turns
            it into an x0 error (``SNR_t`` for ε, ``SNR_t + 1`` for v, 1 for x0: the convention of
            diffusers' ``--snr_gamma`` training scripts), then normalised to mean 1 over
            ``t ∈ [0, T)`` so that the balance against the heads' ``λ_m`` stays that of L_simple.
    """

    def __init__(self, model: nn.Module, schedule: DriftSchedule, weighting: str = "simple", p_drop: float = 0.1,
                 t_sampling: str = "uniform", t_loc: float = 0.0, t_scale: float = 1.0,
                 snr_gamma: Optional[float] = None):
        super().__init__()
        weighting = getattr(weighting, "value", weighting)  # the config's enum or its string
        if weighting not in values(Weighting):
            raise ConfigError(f"diffusion.weighting must be one of {values(Weighting)}, got {weighting!r}")
        if not 0.0 <= p_drop <= 1.0:
            raise ConfigError(f"diffusion.p_drop must be in [0, 1], got {p_drop}")
        t_sampling = getattr(t_sampling, "value", t_sampling)
        if t_sampling not in values(TimestepSampling):
            raise ConfigError(f"diffusion.t_sampling must be one of {values(TimestepSampling)}, got {t_sampling!r}")
        if not (t_scale > 0 and abs(t_loc) < float("inf") and t_scale < float("inf")):
            raise ConfigError(f"diffusion.t_loc / t_scale must be finite with t_scale > 0, got {t_loc}, {t_scale}")
        if snr_gamma is not None and not (0 < snr_gamma < float("inf")):
            raise ConfigError(f"diffusion.snr_gamma must be null or a number > 0, got {snr_gamma}")
        self.model = model
        self.schedule = schedule
        self.snr_gamma = None if snr_gamma is None else float(snr_gamma)
        if self.snr_gamma is not None:  # the weight's mean over t, from the float64 table (normalisation)
            self._snr_mean = float(self._min_snr(schedule.snr, model.prediction).mean())
        self.weighting = weighting
        self.p_drop = float(p_drop)
        self.t_sampling, self.t_loc, self.t_scale = t_sampling, float(t_loc), float(t_scale)
        # Checkpoints written from the plain model (before this module held it) still load.
        self.register_load_state_dict_pre_hook(_add_model_prefix)

    def _min_snr(self, snr: torch.Tensor, prediction: str) -> torch.Tensor:
        """Min-SNR-γ's weight of the image term for the head's ``prediction``, before normalisation."""
        weight = snr.clamp(max=self.snr_gamma)
        if prediction == "epsilon":
            return weight / snr
        if prediction == "v_prediction":
            return weight / (snr + 1.0)
        return weight

    def forward(
        self,
        batch: Dict[str, Any],
        generator: Optional[torch.Generator] = None,
        t: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
        drop: Optional[Dict[str, torch.Tensor]] = None,
    ) -> ObjectiveOutput:
        """Every loss term of one step.

        Args:
            batch: ``{"image": (B, C, H, W) in S, <modality name>: x_m, ...}``.
            generator: the source of every random draw, in this fixed order: ``t``, ``ε``, each
                modality's ``from_batch`` (e.g. random masks), the dropout masks. A re-seeded
                generator reproduces the step.
            t: (B,) int64 timesteps instead of the ``t_sampling`` draw. noise: (B, C, H, W) ``ε`` instead of
                N(0, I). drop: ``{name: (B,) bool}`` masks instead of Bernoulli(p_drop) draws.
        """
        model, schedule = self.model, self.schedule
        x0 = batch["image"]  # (B, C, H, W)
        B, device = x0.shape[0], x0.device
        # Mixed precision covers the network only: accelerate autocasts this whole forward, so the
        # draws, encodings, drift and losses opt out and stay float32 (unit-RMS encodings and the
        # loss sums are reductions that bf16 would round).
        with _full_precision(device):
            if t is None:
                t = draw_timesteps(schedule.num_train_timesteps, (B,), generator, device, self.t_sampling,
                                   self.t_loc, self.t_scale)
            if noise is None:
                noise = randn_tensor(x0.shape, generator=generator, device=device, dtype=x0.dtype)
            x_aux = {name: mod.from_batch(batch, generator=generator) for name, mod in model.modalities.items()}
            if drop is None:
                drop = {name: draw_uniform((B,), generator, device) < self.p_drop for name in x_aux}
            A = model.aggregate(x_aux, drop, batch_size=B)  # (B, C, H, W), dropped rows use E_m(∅)
            z_t = schedule.q_sample(x0, A, t, noise)
        out = model(z_t, t, collect_stats=True)

        with _full_precision(device):
            if out.image is not None:
                # DDPM's L_simple on whichever parameterisation the head uses; targets live in
                # y-space, so the drift never enters the image term (§1: y_t is a plain DDPM chain).
                target = schedule.target(x0, noise, t, model.prediction)
                image = (out.image.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
                if self.snr_gamma is not None:
                    image = image * (self._min_snr(schedule.at("snr", t, image), model.prediction) / self._snr_mean)
            else:  # label-only baseline: the backbone is a noise-aware classifier and nothing else
                image = torch.zeros(B, device=device, dtype=torch.float32)
            per_sample = image
            heads: Dict[str, torch.Tensor] = {}
            for name, mod in model.modalities.items():
                # Trained on the TRUE x_m even when its drift was dropped: that is what teaches the
                # head to read x_m from the image alone (§2, modality dropout).
                head = mod.loss(out.aux[name], x_aux[name]).float()  # (B,)
                weight = mod.loss_weight
                if self.weighting == "vlb":
                    weight = weight * schedule.at("vlb_head_weight", t, head)
                per_sample = per_sample + weight * head
                heads[name] = head
            loss = per_sample.mean() + out.aux_loss

        logs = {"loss": loss.detach(), "image": image.detach().mean(), "aux_loss": out.aux_loss.detach().float()}
        logs.update({f"head/{name}": v.detach().float().mean() for name, v in heads.items()})
        logs.update({k: v.detach().float() for k, v in out.stats.items() if v.ndim == 0})
        return ObjectiveOutput(loss=loss, per_sample=per_sample, image=image, heads=heads,
                               drop={name: drop[name] for name in heads}, t=t, aux_loss=out.aux_loss, logs=logs)


def _full_precision(device: torch.device):
    """A context with autocast off on ``device``'s type (a no-op outside mixed precision)."""
    return torch.autocast(device.type, enabled=False)


def _add_model_prefix(module, state_dict, prefix, *args) -> None:
    """Load-state pre-hook: rename plain ``UnifiedModel`` keys to the objective's ``model.`` keys."""
    inner = prefix + MODEL_PREFIX
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


def training_losses(
    model: nn.Module,
    schedule: DriftSchedule,
    batch: Dict[str, Any],
    t: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    weighting: str = "simple",
    p_drop: float = 0.1,
    generator: Optional[torch.Generator] = None,
    drop: Optional[Dict[str, torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    """Functional form of :class:`MultiModalDiffusion` (DiT's call shape), see
    :meth:`ObjectiveOutput.as_dict` for the keys: ``loss`` is (B,) per sample and excludes the MoE
    ``aux_loss`` (a scalar, add it to ``loss.mean()``)."""
    objective = MultiModalDiffusion(model, schedule, weighting=weighting, p_drop=p_drop)
    return objective(batch, generator=generator, t=t, noise=noise, drop=drop).as_dict()
