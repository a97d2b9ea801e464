"""The aggregated-drift diffusion process (DESIGN.md §1-3): schedule, losses and bound, samplers.

The model is always an argument (STYLE.md habit 1): nothing here is a ``nn.Module``.
"""

from .losses import (
    bits_per_dim,
    bound_terms,
    discretized_gaussian_log_likelihood,
    elbo_classify,
    exact_kl_term,
    kl_upper_bound,
    training_losses,
)
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
