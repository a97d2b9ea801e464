"""What a setting of DESIGN.md §4 is, the registry of settings, and what every setting shares.

A setting is a :class:`Setting` subclass in its own module (``experiments/<name>/__init__.py``,
beside the setting's README), registered by name with :func:`register`. It says which auxiliary
modality kind it studies and adds, to :func:`unidiff.evaluate.evaluate`'s metrics, its own:

- :meth:`Setting.configure_arm`: fill or check an arm's run config (the representation ``dim``);
- :meth:`Setting.prepare`: the conditioning inputs and judges shared by every arm (masks, sources,
  the representation encoder), into the :class:`Context`;
- :meth:`Setting.arm_configs`: the arms' configs once ``prepare`` has run (the vectors file);
- :meth:`Setting.joint_metrics` / :meth:`Setting.conditional_metrics`: the numbers of one arm;
- :meth:`Setting.rows`: its rows of the results table; :meth:`Setting.convergence_rows`: those
  repeated at every ``experiment.eval_at`` step.

:func:`arm_metrics` is the one driver that calls them for an arm, with one generator per metric
seeded alike in every arm (:func:`metric_seed`), so the arms start from the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Type

import torch
from omegaconf import DictConfig

import heads
from unidiff.config import backbone_kwargs, to_container
from unidiff.evaluate import sample_in_batches

Panels = List[Tuple[str, torch.Tensor]]  # (title, images (N, C, H, W)) for samples.png
Rows = List[Tuple[str, str, str]]  # (metric key, label, better = "lower" | "higher")

SETTINGS: Dict[str, Type["Setting"]] = {}


def register(cls: Type["Setting"]) -> Type["Setting"]:
    """Class decorator: add a setting to :data:`SETTINGS` under its ``name``."""
    if cls.name in SETTINGS:
        raise ValueError(f"setting {cls.name!r} is registered twice")
    SETTINGS[cls.name] = cls
    return cls


@dataclass
class Context:
    """What every arm is evaluated against: the data, its conditioning inputs, the judges."""

    train_set: Any
    val_set: Any
    info: Any
    val_images: torch.Tensor  # (n_cond, C, H, W) the first n_cond val items
    val_labels: torch.Tensor  # (n_cond,)
    grid: int  # images per data panel: experiment.grid, at most n_cond
    inputs: Dict[str, torch.Tensor] = field(default_factory=dict)  # masks, sources, vectors of those items
    data_panels: Panels = field(default_factory=list)  # the data row of samples.png
    reference: Dict[str, Any] = field(default_factory=dict)  # context numbers for results.json (ceilings, judges)


class Setting:
    """One setting of DESIGN.md §4 (module docstring); an instance holds its spec and what
    :meth:`prepare` built (the encoder, the source view, ...)."""

    name: ClassVar[str]
    kind: ClassVar[str]  # the auxiliary modality kind the setting studies (heads/ kind)
    scores_joint_samples: ClassVar[bool] = False  # whether joint_metrics reads experiment.n_joint samples

    def __init__(self, spec: DictConfig):
        self.spec = spec

    def configure_arm(self, sections: Dict[str, Any]) -> None:
        """Fill or check an arm's run config, given as plain sections (changed in place)."""

    def prepare(self, exp, ctx: Context, owner: DictConfig) -> None:
        """Build the shared conditioning inputs and judges into ``ctx``; ``owner`` is the config of
        the first arm with the setting's modality."""

    def arm_configs(self, exp) -> Dict[str, DictConfig]:
        """The arms' configs as trained, once :meth:`prepare` has run."""
        return exp.arms

    def joint_metrics(self, images: torch.Tensor, aux: torch.Tensor) -> Dict[str, Any]:
        """Scores of ``experiment.n_joint`` joint samples: images (n, C, H, W), the modality's read-out (n, ...)."""
        return {}

    def conditional_metrics(self, model, schedule, cfg: DictConfig, ctx: Context, device: torch.device,
                            name: Optional[str], gen: Callable[[int], torch.Generator]) -> Tuple[Dict[str, Any], Panels]:
        """The setting's conditional task on the val items: ``(metrics, panels)``. ``name``: the
        model's modality of the setting's kind (None when it has none); ``gen(k)``: metric k's generator."""
        return {}, []

    def rows(self, m: str) -> Rows:
        """The setting's rows of the results table; ``m`` is the arms' modality name."""
        return []

    def convergence_rows(self, m: str) -> Rows:
        """The rows repeated once per ``experiment.eval_at`` step (``<key>@<step>``)."""
        return [("fid", "FID (reference-classifier features)", "lower")]


# --- helpers the settings share -------------------------------------------------------------------
def modality_index(cfg: DictConfig, kind: str) -> Optional[int]:
    """Index in ``cfg.modalities`` of the first modality of ``kind``, or None."""
    return next((i for i, m in enumerate(cfg.modalities) if m.kind == kind), None)


def metric_seed(cfg: DictConfig, k: int) -> int:
    # One generator per metric, seeded alike in every arm: arms start from the same noise.
    return int(cfg.run.seed) * 1000 + 17 * k + 1


def standalone_modality(cfg: DictConfig, kind: str, image_shape):
    """The arm's modality of ``kind`` rebuilt outside a model, for its data-side methods only
    (``random_mask``, ``make_source``): every arm then sees the same masks and sources."""
    m = to_container(cfg)["modalities"][modality_index(cfg, kind)]
    p = int(backbone_kwargs(cfg).get("patch_size", 1))
    return heads.build_modality(kind, name=m["name"], image_shape=tuple(image_shape), hidden_size=8, patch_size=p,
                                weight=m["weight"], loss_weight=m["loss_weight"], **m["options"])


@torch.no_grad()
def generate(model, schedule, cfg: DictConfig, task: str, n: int, generator: torch.Generator,
             known_fn: Optional[Callable[[int, int], Dict[str, Any]]] = None, guidance: float = 1.0,
             unknown_drift: str = "predicted"):
    """``n`` samples of ``task`` in ``eval.batch_size`` batches, drawn one after the other from
    ``generator`` (:func:`unidiff.evaluate.sample_in_batches`): (images (n, C, H, W) on the CPU,
    {name: (n, ...) read-outs on the CPU}). ``known_fn(start, b)``: the known values of a batch.
    ``unknown_drift``: the drift of the modalities not known (``predicted`` | ``null_encoding``,
    DESIGN.md §3.3)."""
    return sample_in_batches(model, schedule, task, n, int(cfg.eval.batch_size), sampler=cfg.eval.sampler.value,
                             steps=int(cfg.eval.steps), generator=generator, known_fn=known_fn, guidance=guidance,
                             unknown_drift=unknown_drift)


def known_values(name: str, value: torch.Tensor, device: torch.device) -> Callable[[int, int], Dict[str, Any]]:
    """``known_fn`` of :func:`generate` for one modality known on every item: rows ``start:start+b``."""
    return lambda start, b: {name: value[start:start + b].to(device)}


@torch.no_grad()
def arm_metrics(setting: Setting, model, schedule, cfg: DictConfig, ctx: Context,
                device: torch.device) -> Tuple[Dict[str, Any], Panels]:
    """The per-setting metrics of one arm and its sample panels for ``samples.png``:
    ``(metrics, [(title, images (N, C, H, W))])``. Nothing for an arm without an image head."""
    out: Dict[str, Any] = {}
    panels: Panels = []
    if model.image_head is None:
        return out, panels  # a label-only baseline: nothing to generate
    spec, grid = setting.spec, int(setting.spec.grid)
    name = model.modality_of_kind(setting.kind)

    def gen(k: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(metric_seed(cfg, k))

    # Joint samples: the figure and, where the setting scores them, a few more for its metrics
    # (evaluate's own joint samples give FID; these are few, seeded alike in every arm).
    n_joint = int(spec.n_joint) if name is not None and setting.scores_joint_samples else 0
    joint, joint_aux = generate(model, schedule, cfg, "joint", max(n_joint, grid), gen(1))
    panels.append(("joint samples", joint[:grid]))
    if n_joint:
        out.update(setting.joint_metrics(joint[:n_joint], joint_aux[name][:n_joint]))
    more, more_panels = setting.conditional_metrics(model, schedule, cfg, ctx, device, name, gen)
    out.update(more)
    return out, panels + more_panels
