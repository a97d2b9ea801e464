"""Every string option of a run, defined once (STYLE.md habit 3: string options are enums).

A leaf module with no heavy imports: the config schemas (:mod:`unidiff.config`), the diffusion
code (:mod:`unidiff.diffusion`, which must not import the config) and the CLI's argument choices
all read their lists from here, so what a config accepts is what the code behind it runs.

The members are ``str`` subclasses: ``Sampler.ddim == "ddim"``, and ``Sampler("ddim")`` validates a
plain string.
"""

from __future__ import annotations

from enum import Enum
from typing import List, Type


class BetaSchedule(str, Enum):
    """diffusers' ``beta_schedule`` names (DESIGN.md §1: any of them gives ``ᾱ_t``)."""

    linear = "linear"
    scaled_linear = "scaled_linear"
    squaredcos_cap_v2 = "squaredcos_cap_v2"
    sigmoid = "sigmoid"


class Prediction(str, Enum):
    """What the image head predicts; diffusers' ``prediction_type`` names (DESIGN.md §2)."""

    epsilon = "epsilon"
    v_prediction = "v_prediction"
    sample = "sample"


class Weighting(str, Enum):
    """Head-loss weighting over t (DESIGN.md §2): constant ``λ_m`` or the bound's own weights."""

    simple = "simple"
    vlb = "vlb"


class TimestepSampling(str, Enum):
    """How training draws t (DESIGN.md §2): uniform on ``{0..T-1}`` (the bound's own expectation) or
    logit-normal, ``t = ⌊T·sigmoid(μ + s·n)⌋`` with ``n ~ N(0, 1)`` (Esser et al. 2024, SD3)."""

    uniform = "uniform"
    logit_normal = "logit_normal"


class Sampler(str, Enum):
    """Reverse-process solvers (DESIGN.md §3): diffusers DDPM, DDIM, DPM-Solver++ (2M)."""

    ddpm = "ddpm"
    ddim = "ddim"
    dpm = "dpm"


class UnknownDrift(str, Enum):
    """What a generating task puts in the drift ``Â`` for the modalities that are not given
    (DESIGN.md §3.3): their heads' predictions ``E_m(x̂_m)`` or their null encodings ``E_m(∅)``."""

    predicted = "predicted"
    null_encoding = "null_encoding"


class LRSchedule(str, Enum):
    """diffusers ``get_scheduler`` names (``piecewise_constant`` left out: it needs step rules)."""

    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    linear = "linear"
    cosine = "cosine"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"


class MixedPrecision(str, Enum):
    """accelerate's ``mixed_precision`` values, and ``auto``: chosen by the machine
    (``unidiff.launch.resolve_precision``: bf16 where bf16 matmuls are native, fp32 otherwise)."""

    auto = "auto"
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


class BudgetClock(str, Enum):
    """What ``train.budget_minutes`` counts: wall time, or the process's CPU time (all its threads;
    on one thread, what an idle machine's wall clock would show, whatever else runs beside it)."""

    wall = "wall"
    cpu = "cpu"


class Tracker(str, Enum):
    """accelerate's experiment trackers (``train.report_to``); only ``tensorboard`` is a dependency,
    the others work when their package is installed (checked when training starts)."""

    tensorboard = "tensorboard"
    wandb = "wandb"
    mlflow = "mlflow"
    aim = "aim"
    comet_ml = "comet_ml"
    clearml = "clearml"
    dvclive = "dvclive"


def values(choice: Type[Enum]) -> List[str]:
    """The accepted strings of an option, in definition order (for messages and argparse choices)."""
    return [member.value for member in choice]
