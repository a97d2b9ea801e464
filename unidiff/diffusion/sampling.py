"""One sampler for every task (DESIGN.md §3).

Every task is one of three generic kinds (:class:`Task`):
- ``joint``: nothing known; generate the image and read every auxiliary modality at the end;
- ``conditional``: some modalities are known (``known = {name: x_m}``); their true encodings
  replace the heads' predictions in the drift ``Â`` (class→image, representation→image,
  masked image→full image, source→target);
- ``image_to_aux``: the image is given; read one modality's head at small ``t`` (image→label,
  image→representation, target→source).

The named tasks (``class_to_image``, ``inpaint``, ...) are declared by the modality kinds
(``Modality.tasks``) in one table, :func:`heads.modality_tasks`: a ``generate`` task is
``conditional`` on the model's modality of that kind, a ``read`` task is ``image_to_aux`` of it.
Nothing here depends on what a modality is named.

The loop steps the de-drifted ``y`` with an unmodified diffusers scheduler and re-adds the drift
(§1: ``y_t = z_t - κ_t A`` is a plain DDPM chain):

    out = model(z, t);  Â = Σ_m π_m E_m(x̂_m or known x_m);  y = z - κ_t Â
    y' = scheduler.step(out.image, t, y);  z = y' + κ_{t'} Â

where ``t'`` is the level the scheduler steps to (``κ = 0`` once it reaches the data). In a
conditional task an ε head's output is first moved to the same x̂0 at that ``y`` from the model's
own ``z - κ_t Â_θ`` (:class:`Conversion`, §3.3). ``sample(unknown_drift="null_encoding")`` puts
``E_m(∅)`` in ``Â`` for the modalities not known instead of their heads' ``E_m(x̂_m)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from einops import repeat

import heads

from ..choices import Sampler, UnknownDrift, values
from ..errors import ConfigError
from .schedule import DriftSchedule


class Task(str, Enum):
    """The sampler's generic tasks (``unidiff.modality.GENERIC_TASKS``); the named tasks of the
    modality kinds resolve to one of them (:func:`resolve_task`)."""

    joint = "joint"
    conditional = "conditional"
    image_to_aux = "image_to_aux"


class Conversion(str, Enum):
    """Where a conditional task turns the image head's raw ε̂ or v̂ into its clean estimate
    (DESIGN.md §3.3): at ``z_t - κ_t Â`` with the known modalities' true encodings in ``Â``
    (``known``), or with every modality from its head (``predicted``, the model's own drift
    estimate, under which it produced ε̂). The scheduler steps ``z_t - κ_t Â_known`` either way.
    An x̂0 head gives the same samples under both."""

    known = "known"
    predicted = "predicted"


# The conversion a conditional task uses unless told (``sample(convert_with=None)``), per
# ``model.prediction``. ε: ``predicted``, measured better on the digits (BENCHMARKS.md); v: not
# measured, so it keeps the old path (its mismatch is damped by a_t², §3.3); x̂0 heads keep the one
# code path they always had (the choice cannot change their samples).
DEFAULT_CONVERSION = {"epsilon": Conversion.predicted, "v_prediction": Conversion.known, "sample": Conversion.known}


# A modality task's action -> the generic task that runs it.
_ACTION_TASK = {"generate": Task.conditional, "read": Task.image_to_aux}


SchedulerName = Sampler  # the one list of solvers: unidiff/choices.py


@dataclass
class SampleOutput:
    """image: (B, C, H, W) the de-drifted sample (clamped to [-1, 1] unless ``clamp=False``), or the
    given image for ``image_to_aux``. aux: {name: value in X_m} (readouts; known ones passed through).
    aux_pred: {name: raw head prediction} at the last step (averaged over draws for image→aux)."""

    image: torch.Tensor
    aux: Dict[str, Any] = field(default_factory=dict)
    aux_pred: Dict[str, Any] = field(default_factory=dict)


# --- schedulers -----------------------------------------------------------------------------------
def make_scheduler(name: Union[str, SchedulerName], schedule: DriftSchedule, prediction: str, **overrides):
    """A diffusers scheduler on exactly ``schedule``'s betas, predicting ``prediction``.

    ``clip_sample`` is off by default: S may be a VAE latent space; pass ``clip_sample=True`` for
    pixels. ``dpm`` is DPM-Solver++ (2M).
    """
    try:
        name = SchedulerName(name)
    except ValueError:
        raise ConfigError(f"sample.sampler / eval.sampler (the diffusers scheduler) must be one of {values(Sampler)}, "
                          f"got {name!r}") from None
    kwargs: Dict[str, Any] = dict(
        num_train_timesteps=schedule.num_train_timesteps,
        trained_betas=schedule.betas.numpy(),
        prediction_type=prediction,
    )
    if name is SchedulerName.ddpm:
        kwargs.update(clip_sample=False)
        cls = DDPMScheduler
    elif name is SchedulerName.ddim:
        kwargs.update(clip_sample=False, set_alpha_to_one=True)
        cls = DDIMScheduler
    else:
        kwargs.update(algorithm_type="dpmsolver++", solver_order=2)
        cls = DPMSolverMultistepScheduler
    kwargs.update(overrides)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sampling.scheduler_kwargs rejected by diffusers {cls.__name__}: {e}") from e


def _target_alpha_bar(scheduler, i: int, t: int) -> float:
    """ᾱ of the level that ``scheduler.step`` at position ``i`` (timestep ``t``) moves the sample to."""
    if isinstance(scheduler, DDIMScheduler):
        # DDIM steps by a fixed stride, whatever the timestep list says (diffusers' step()).
        prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        return float(scheduler.alphas_cumprod[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) == len(scheduler.timesteps) + 1:
        # DPM-Solver works with VE sigmas s = σ/a, so ᾱ = 1/(1 + s²); its last sigma is 0 (data).
        s = float(sigmas[i + 1])
        return 1.0 / (1.0 + s * s)
    # DDPM (and the default): the next timestep in the list, the data after the last one.
    if i + 1 < len(scheduler.timesteps):
        return float(scheduler.alphas_cumprod[int(scheduler.timesteps[i + 1])])
    return 1.0


# --- helpers --------------------------------------------------------------------------------------
def _model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    return next(model.parameters()).device


def _batch_size_of(value: Any) -> int:
    while isinstance(value, dict):
        value = next(iter(value.values()))
    return int(value.shape[0])


def resolve_task(task: Union[str, Task], model) -> Tuple[Task, Optional[str]]:
    """``task`` (a generic :class:`Task` or a modality task of :func:`heads.modality_tasks`) as
    ``(generic task, modality name)``: the name of the model's first modality of the task's kind
    (None for the generic tasks, or when the model has no modality of that kind)."""
    if isinstance(task, Task):
        return task, None
    if task in Task._value2member_map_:
        return Task(task), None
    table = heads.modality_tasks()
    if task not in table:
        names = [t.value for t in Task] + list(table)
        raise ConfigError(f"sampling.task must be one of {names}, got {task!r}")
    spec = table[task]
    name = next((n for n, m in model.modalities.items() if m.kind == spec.kind), None)
    return _ACTION_TASK[spec.action], name


def _task_kind(task: Union[str, Task]) -> Optional[str]:
    """The modality kind a named task needs (None for the generic tasks)."""
    if isinstance(task, Task) or task in Task._value2member_map_:
        return None
    return heads.modality_tasks()[task].kind


# --- image -> auxiliary modality --------------------------------------------------------------------
@torch.no_grad()
def image_to_aux(
    model,
    schedule: DriftSchedule,
    x0: torch.Tensor,
    name: str,
    t_read: Optional[int] = None,
    num_draws: int = 4,
    generator: Optional[torch.Generator] = None,
    known: Optional[Dict[str, Any]] = None,
) -> Tuple[Any, Any]:
    """Read head ``name`` from the image alone (§3): ``z_t = a_t x0 + κ_t A_∅ + σ_t ε`` at small t.

    ``A_∅ = Σ_m π_m E_m(∅)`` (modalities in ``known`` keep their true encoding), the drift the model
    saw for dropped modalities in training. The prediction is averaged over ``num_draws`` noise
    draws (one batched forward) by ``Modality.average_predictions`` (a label averages
    probabilities; the default is the mean of the raw tensors).

    Args:
        x0: (B, C, H, W). t_read: the read-out timestep, default ``max(1, T // 100)``.

    Returns ``(readout, averaged raw prediction)``.
    """
    if name not in model.modalities:
        raise ConfigError(f"image_to_aux: model has no modality {name!r}; has {list(model.modalities)}")
    if num_draws < 1:
        raise ConfigError(f"sampling.num_draws must be >= 1, got {num_draws}")
    T = schedule.num_train_timesteps
    t_read = max(1, T // 100) if t_read is None else int(t_read)
    if not 0 <= t_read < T:
        raise ConfigError(f"sampling.t_read must be in [0, {T}), got {t_read}")
    mod = model.modalities[name]
    B = x0.shape[0]
    A = model.aggregate(dict(known or {}), None, batch_size=B).float()  # (B, C, H, W)
    x_rep = repeat(x0.float(), "b c h w -> (n b) c h w", n=num_draws)
    A_rep = repeat(A, "b c h w -> (n b) c h w", n=num_draws)
    noise = randn_tensor(x_rep.shape, generator=generator, device=x0.device, dtype=x_rep.dtype)
    z = schedule.q_sample(x_rep, A_rep, t_read, noise)
    out = model(z, torch.full((num_draws * B,), t_read, dtype=torch.long, device=x0.device))
    rows = torch.arange(num_draws * B, device=x0.device).view(num_draws, B)
    preds = [mod.select(out.aux[name], rows[d]) for d in range(num_draws)]
    avg = mod.average_predictions(preds)
    return mod.readout(avg), avg


# --- the sampler --------------------------------------------------------------------------------------
def _guided_prediction(
    model,
    schedule: DriftSchedule,
    z: torch.Tensor,
    t: int,
    known: Dict[str, Any],
    shift: Optional[torch.Tensor],
    guidance_scale: float,
    classifier: Optional[Tuple[str, Any, float]],
    convert_with: Conversion = Conversion.known,
    unknown_drift: UnknownDrift = UnknownDrift.predicted,
) -> Tuple[torch.Tensor, Dict[str, Any], torch.Tensor]:
    """One denoiser evaluation with drift and classifier guidance.

    Returns (raw image prediction for the scheduler at ``z - κ_t Â``, conditional aux predictions,
    Â), all for the B rows of ``z``; ``Â`` holds the known modalities' true encodings and, for the
    others, their heads' expected encodings (``unknown_drift=predicted``) or their null encodings
    ``E_m(∅)`` (``null_encoding``). ``convert_with=predicted`` reads the raw prediction at the
    model's own ``z - κ_t Â_θ`` instead and hands the scheduler the prediction with the same x̂0 at
    ``z - κ_t Â`` (§3.3).
    """
    B = z.shape[0]
    kappa = float(schedule.kappa[t])
    # Drift guidance: the unconditional branch sees the known modalities' drift swapped for the
    # null drift, z - κ_t Σ_known π_m (E_m(x_m) - E_m(∅)); both branches in one forward.
    z_in = z if shift is None else torch.cat([z, z - kappa * shift])
    t_in = torch.full((z_in.shape[0],), t, dtype=torch.long, device=z.device)
    rows = torch.arange(B, device=z.device)
    grad = None
    if classifier is None:
        out = model(z_in, t_in)
    else:
        # Classifier guidance (§3): ∇_z log p̂(x_m | z_t) by autograd through the shared backbone.
        cname, target, _ = classifier
        with torch.enable_grad():
            z_in = z_in.detach().requires_grad_(True)
            out = model(z_in, t_in)
            mod = model.modalities[cname]
            logp = mod.log_likelihood(mod.select(out.aux[cname], rows), target).float().sum()
            grad = torch.autograd.grad(logp, z_in)[0][:B].float()  # (B, C, H, W)
    aux = {n: m.select(out.aux[n], rows) for n, m in model.modalities.items()}
    null = unknown_drift is UnknownDrift.null_encoding
    if not len(model.modalities):
        A_hat = None
    elif null:
        # §3.3: Σ_m π_m (E_m(x_m) if known else E_m(∅)), the aggregate with the rest dropped.
        A_hat = model.aggregate(known, None, batch_size=B)
    else:
        A_hat = model.expected_aggregate(aux, known)
    A_hat = torch.zeros_like(z) if A_hat is None else A_hat.detach().float()
    pred = out.image.detach().float()
    # §3.3: the model made ε̂ (or v̂) under its own drift estimate Â_θ (every modality from its
    # head), so its consistent clean estimate is read at y_θ = z - κ_t Â_θ. Â_θ differs from the
    # chain's Â where a modality is known, and for the unknown ones under null_encoding (Â_θ stays
    # the heads' own estimate either way); an x̂0 head is the same at every point (old path kept).
    mismatch = bool(known) or (null and len(model.modalities) > 0)
    own = convert_with is Conversion.predicted and mismatch and model.prediction != "sample"
    A_conv = model.expected_aggregate(aux).detach().float() if own else A_hat
    if shift is None and grad is None and not own:
        return pred, aux, A_hat

    # Guidance acts on ε. Both branches are converted at the same point y_c (the unconditional
    # branch's drift differs only in the swapped known term, which the shift removed).
    y_c = z - kappa * A_conv
    if shift is not None or grad is not None:
        eps = schedule.to_eps(pred[:B], y_c, t, model.prediction)
        if shift is not None:
            eps_u = schedule.to_eps(pred[B:], y_c, t, model.prediction)
            eps = eps_u + guidance_scale * (eps - eps_u)
        if grad is not None:
            # score = -ε/σ, so adding s∇log p̂ to the score is ε ← ε - s σ_t ∇log p̂.
            eps = eps - classifier[2] * float(schedule.sigma[t]) * grad
        pred = schedule.from_eps(eps, y_c, t, model.prediction)
    if not own:
        return pred, aux, A_hat
    # The scheduler steps y = z - κ_t Â (the known drift is what the chain carries): hand it the
    # prediction with the same x̂0 there, ε' = ε̂ + κ_t (Â_θ - Â)/σ_t.
    return schedule.reframe(pred, y_c, z - kappa * A_hat, t, model.prediction), aux, A_hat


@torch.no_grad()
def sample(
    model,
    schedule: DriftSchedule,
    task: Union[str, Task] = Task.joint,
    *,
    batch_size: Optional[int] = None,
    known: Optional[Dict[str, Any]] = None,
    image: Optional[torch.Tensor] = None,
    name: Optional[str] = None,
    scheduler: Union[str, SchedulerName] = SchedulerName.ddim,
    num_steps: int = 50,
    guidance_scale: float = 1.0,
    classifier_scale: float = 0.0,
    classifier_modality: Optional[str] = None,
    classifier_target: Any = None,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    scheduler_kwargs: Optional[Dict[str, Any]] = None,
    clamp: bool = True,
    t_read: Optional[int] = None,
    num_draws: int = 4,
    callback: Optional[Callable[[int, int, torch.Tensor, torch.Tensor], None]] = None,
    convert_with: Union[str, Conversion, None] = None,
    unknown_drift: Union[str, UnknownDrift] = UnknownDrift.predicted,
) -> SampleOutput:
    """Run a task of §3.

    Args:
        task: a generic :class:`Task` (or its string value), or a task of a modality kind
            (:func:`heads.modality_tasks`: ``class_to_image``, ``inpaint``, ``image_to_label``, ...).
        batch_size: number of samples (joint); inferred from ``known`` or ``image`` otherwise.
        known: ``{name: x_m}`` values of known modalities (conditional tasks; a named ``generate``
            task needs its kind's modality among them).
        image: (B, C, H, W) the given image (image→aux tasks). name: the modality to read there
            (default: the model's modality of the task's kind, e.g. the label for ``image_to_label``).
        scheduler: ``ddpm``, ``ddim`` or ``dpm`` (:func:`make_scheduler`), ``num_steps`` steps;
            ``scheduler_kwargs`` override its diffusers config; ``eta`` is DDIM's η.
        guidance_scale: drift guidance ``w`` (1 = no guidance; needs known modalities).
        classifier_scale: classifier guidance ``s`` from head ``classifier_modality`` (default: the
            task's modality, else the only known one) toward ``classifier_target`` (default: its
            known value).
        callback: called after every step as ``callback(i, t, y_next, A_hat)`` (de-drifted path).
        convert_with: :class:`Conversion` of a conditional task's raw ε̂ / v̂ to its clean estimate
            (default :data:`DEFAULT_CONVERSION` of ``model.prediction``).
        unknown_drift: what the drift ``Â`` holds for the modalities not in ``known``
            (:class:`~unidiff.choices.UnknownDrift`): their heads' predictions ``E_m(x̂_m)``
            (``predicted``) or their null encodings ``E_m(∅)`` (``null_encoding``, the ablation of
            §3.3); the same for every task that generates (in ``joint`` nothing is known).

    The loop makes no host syncs of its own: timesteps stay on the CPU and every schedule scalar
    is read from the CPU tables.
    """
    generic, task_name = resolve_task(task, model)
    label = task.value if isinstance(task, Task) else str(task)
    kind = _task_kind(task)
    if kind is not None and task_name is None:
        kinds = sorted({m.kind for m in model.modalities.values()})
        raise ConfigError(f"task {label!r} needs a modality of kind {kind!r}; the model has {kinds or 'none'}")
    known = dict(known or {})
    for k in known:
        if k not in model.modalities:
            raise ConfigError(f"sampling: known modality {k!r} is not a modality of the model ({list(model.modalities)})")

    if generic is Task.image_to_aux:
        name = name or task_name
        if image is None or name is None:
            raise ConfigError(f"task {label!r} needs the image and a modality name (got name={name!r})")
        readout, pred = image_to_aux(model, schedule, image, name, t_read, num_draws, generator, known)
        return SampleOutput(image=image, aux={name: readout, **known}, aux_pred={name: pred})
    if generic is Task.conditional and (not known or (task_name is not None and task_name not in known)):
        need = f"known[{task_name!r}]" if task_name else "known modality values"
        raise ConfigError(f"task {label!r} needs {need}")
    if guidance_scale != 1.0 and not known:
        raise ConfigError("sampling.guidance_scale != 1 needs known modalities (drift guidance is conditional)")

    if convert_with is None:
        convert_with = DEFAULT_CONVERSION.get(model.prediction, Conversion.known)
    try:
        convert_with = Conversion(convert_with)
    except ValueError:
        raise ConfigError(f"sampling.convert_with must be one of {[c.value for c in Conversion]}, "
                          f"got {convert_with!r}") from None
    try:
        unknown_drift = UnknownDrift(unknown_drift)
    except ValueError:
        raise ConfigError(f"sampling.unknown_drift must be one of {values(UnknownDrift)}, "
                          f"got {unknown_drift!r}") from None

    device = _model_device(model)
    if batch_size is None:
        if not known:
            raise ConfigError("sampling.batch_size is required for the joint task")
        batch_size = _batch_size_of(next(iter(known.values())))
    B = int(batch_size)

    classifier = None
    if classifier_scale != 0.0:
        cname = classifier_modality or task_name or (next(iter(known)) if len(known) == 1 else None)
        if cname is None or cname not in model.modalities:
            raise ConfigError(f"sampling.classifier_modality {cname!r} is not a modality of the model ({list(model.modalities)})")
        target = classifier_target if classifier_target is not None else known.get(cname)
        if target is None:
            raise ConfigError(f"classifier guidance needs a target for {cname!r}: pass classifier_target or known[{cname!r}]")
        classifier = (cname, target, float(classifier_scale))

    shift = None
    if guidance_scale != 1.0:
        # Σ_known π_m (E_m(x_m) - E_m(∅)): fixed through the loop, computed once.
        shift = sum(
            model.modalities[k].weight * (model.encoding(k, v, B) - model.encoding(k, None, B)).float() for k, v in known.items()
        )

    sched = make_scheduler(scheduler, schedule, model.prediction, **(scheduler_kwargs or {}))
    sched.set_timesteps(num_steps)  # timesteps on the CPU: int(t) below is free
    step_kwargs = {"eta": eta} if isinstance(sched, DDIMScheduler) else {}
    shape = (B, *tuple(getattr(model, "image_shape")))
    # The prior p(z_T) = N(0, I) (κ ≈ 0 at the end of the chain, §1).
    z = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) * sched.init_noise_sigma

    aux: Dict[str, Any] = {}
    y_next = z
    for i, t in enumerate(sched.timesteps.tolist()):
        pred, aux, A_hat = _guided_prediction(model, schedule, z, t, known, shift, guidance_scale, classifier,
                                            convert_with, unknown_drift)
        y = z - float(schedule.kappa[t]) * A_hat
        y_next = sched.step(pred, t, y, generator=generator, **step_kwargs).prev_sample
        abar = _target_alpha_bar(sched, i, t)
        kappa_next = schedule.gamma * math.sqrt(abar * (1.0 - abar))
        z = y_next + kappa_next * A_hat
        if callback is not None:
            callback(i, t, y_next, A_hat)

    x = y_next.clamp(-1.0, 1.0) if clamp else y_next
    readouts = {n: (known[n] if n in known else m.readout(aux[n])) for n, m in model.modalities.items()}
    return SampleOutput(image=x, aux=readouts, aux_pred=aux)


# --- the replacement baseline ------------------------------------------------------------------------
@torch.no_grad()
def replacement_inpaint(model, schedule: DriftSchedule, x0: torch.Tensor, mask: torch.Tensor,
                        sampler: Union[str, SchedulerName], steps: int, generator: Optional[torch.Generator] = None
                        ) -> torch.Tensor:
    """Inpaint with a model that has no auxiliary modality, by replacement (Song et al. 2021;
    RePaint without resampling): before every denoiser call the visible pixels of ``y_t`` are
    overwritten by a fresh forward draw ``a_t x0 + σ_t ε`` of the known image. The standard way an
    unconditional model inpaints: the image-only baseline of DESIGN.md §4's masked-image setting.

    x0: (B, C, H, W) the known image (masked pixels ignored); mask: (B, 1, H, W), 1 = visible.
    Returns (B, C, H, W) in [-1, 1], the visible pixels pasted back.
    """
    if len(model.modalities):
        raise ConfigError("replacement inpainting is for image-only models (no drift); this one has modalities "
                          f"{list(model.modalities)}")
    x0, mask = x0.float(), mask.float()
    B = x0.shape[0]
    sched = make_scheduler(sampler, schedule, model.prediction)
    sched.set_timesteps(steps)
    # Without modalities A = 0, so z_t = y_t: the plain DDPM chain of §1.
    y = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=torch.float32) * sched.init_noise_sigma
    for t in sched.timesteps.tolist():
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        y = mask * schedule.q_sample(x0, None, t, noise) + (1 - mask) * y  # (B, C, H, W)
        pred = model(y, torch.full((B,), t, dtype=torch.long, device=x0.device)).image.float()
        y = sched.step(pred, t, y, generator=generator).prev_sample
    return (mask * x0 + (1 - mask) * y).clamp(-1, 1)
