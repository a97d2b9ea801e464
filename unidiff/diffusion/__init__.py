"""The aggregated-drift diffusion process (DESIGN.md §1-3): schedule, training objective, bound, samplers.

- ``schedule.py``: :class:`DriftSchedule`, the per-timestep tables of the drifted forward process.
- ``objective.py``: :class:`MultiModalDiffusion`, the one ``nn.Module`` of the package: it holds
  the model and turns a data batch into every loss term of a training step (:class:`ObjectiveOutput`);
  the training loop hands it to accelerate so DDP/FSDP wrap encoders, heads and backbone together
  (DESIGN.md §6). :func:`training_losses` is its functional form.
- ``losses.py``: the exact per-step KL, the full bound, bits/dim and the ELBO classifier.
- ``sampling.py``: the samplers and tasks of §3.

Outside the objective the model is an argument (STYLE.md habit 1), and the model never sees the
schedule: ``unidiff.diffusion`` owns ``a_t, σ_t, κ_t`` and calls the model.
"""

from .losses import (
    bits_per_dim,
    bound_terms,
    discretized_gaussian_log_likelihood,
    elbo_classify,
    exact_kl_term,
    kl_upper_bound,
)
from .objective import MultiModalDiffusion, ObjectiveOutput, model_state_dict, training_losses
from .sampling import (
    SampleOutput,
    SchedulerName,
    Task,
    image_to_aux,
    make_scheduler,
    replacement_inpaint,
    resolve_task,
    sample,
)
from .schedule import DriftSchedule

__all__ = [
    "DriftSchedule",
    "MultiModalDiffusion",
    "ObjectiveOutput",
    "model_state_dict",
    "training_losses",
    "exact_kl_term",
    "kl_upper_bound",
    "bound_terms",
    "bits_per_dim",
    "elbo_classify",
    "discretized_gaussian_log_likelihood",
    "Task",
    "SchedulerName",
    "SampleOutput",
    "make_scheduler",
    "sample",
    "resolve_task",
    "image_to_aux",
    "replacement_inpaint",
]
