"""Typed run configs (STYLE.md habit 3): dataclass schemas + OmegaConf, YAML file + CLI dotlist.

A run is described by one YAML file and optional ``key=value`` overrides::

    unidiff train configs/joint_image_label.yaml train.steps=2000 model.preset=debug

:func:`load_config` merges ``schema defaults <- YAML (or a mapping of sections) <- overrides`` and
returns a read-only ``DictConfig``. Unknown keys, wrong types and bad choices raise
:class:`ConfigError` naming the full dotted key (``train.stepz``, ``modalities[0].weight``); a missing or malformed YAML file
names the file (and the line when YAML reports one). String options are Enums, so a typo in
``model.prediction`` fails at load, not an hour into training. Validation also rejects what
would fail or hang later (issue 13, README "What survives what"): non-finite numbers anywhere,
unresolvable interpolations, ``run.name`` that is not one plain folder name, seeds outside
``[0, 2**32)``, sizes beyond :data:`MAX_TIMESTEPS`/:data:`MAX_BATCH`/:data:`MAX_GRID`, backbone
sizes below 1, sampler steps above the training timesteps, grids without an image head.
:func:`check_writable`/:func:`check_run_folder` check output folders, and
:func:`check_training_step` runs one no-grad step (the CLI's preflight and ``--dry-run``).

What a config cannot know until the data is read (the image shape, the number of classes) is
filled by :func:`resolve_with_data`; the resolved config is what ``train`` writes to
``RUN_DIR/config.yaml``. :func:`build_model` turns a resolved config into a
:class:`unidiff.model.UnifiedModel`, checking everything the constructors would otherwise reject
with a traceback.

Enum-valued fields read back as Enum members of :mod:`unidiff.choices` (re-exported here); use
``.value`` (or :func:`to_container`) where a plain string is needed. :func:`apply_overrides` and
:func:`config_error` are the dotlist merge and the one-line error of every config-like file (run
configs, experiment specs, encoder configs).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, read_write
from omegaconf.errors import OmegaConfBaseException

from .choices import (BetaSchedule, BudgetClock, LRSchedule, MixedPrecision, Prediction, Sampler, TimestepSampling, Tracker,
                      UnknownDrift, Weighting)
from .data import DataConfig
from .errors import ConfigError, DataError
from .latents import resolve_vae
from .seeds import SEED_LIMIT, check_seed  # noqa: F401 (SEED_LIMIT re-exported: the one seed range)

# The string options (BetaSchedule, Prediction, Weighting, Sampler, UnknownDrift, LRSchedule, MixedPrecision)
# are defined once in unidiff/choices.py, beside nothing heavy, and re-exported here.

# Upper bounds that keep an accepted config runnable (each would otherwise fail or hang later):
MAX_TIMESTEPS = 100_000  # the schedule is a table of T entries (diffusers' standard T is 1000)
MAX_BATCH = 1 << 20  # train.batch_size: the batch order materialises B indices per step
MAX_GRID = 10_000  # sample.n: one batch of samples, one PNG grid (100 x 100 cells)
# Backbone integers that are sizes or divisors (0 would divide by zero or build an empty layer).
_POSITIVE_BACKBONE_KEYS = ("hidden_size", "patch_size", "num_heads", "num_kv_heads", "d_state", "d_conv", "expand",
                           "headdim", "n_groups", "chunk_size", "num_experts", "top_k", "n_group", "topk_group",
                           "freq_dim")


# --- schemas ---------------------------------------------------------------------------------
@dataclass
class RunConfig:
    """name: run name, a plain string that is one path component (no ``/``, not ``.``/``..``/empty)
    unless ``dir`` is given; dir: run folder (default ``runs/<name>``); seed: the one seed of the
    run, in ``[0, 2**32)``; threads: intra-op CPU threads of training (None: chosen at start from
    the free cores, ``unidiff/runtime.py``; ``OMP_NUM_THREADS`` is respected)."""

    name: str = "run"
    dir: Optional[str] = None
    seed: int = 0
    threads: Optional[int] = None


@dataclass
class VAEConfig:
    """The latent space (``unidiff.latents``): ``path`` an ``AutoencoderKL`` folder or hub id (None:
    pixel space); the factors of ``(z - shift_factor) * scaling_factor``, None = the VAE's own config
    (the resolved config holds the values the latent cache was encoded with)."""

    path: Optional[str] = None
    scaling_factor: Optional[float] = None
    shift_factor: Optional[float] = None


@dataclass
class ModelConfig:
    """preset: a name in ``unidiff.models.presets.PRESETS``; backbone: keys merged onto the preset
    (checked by :class:`HybridBackbone`); prediction: the image head's target; vae: the latent space
    the model works in (sampling and evaluation decode through it)."""

    preset: str = "debug"
    backbone: Dict[str, Any] = field(default_factory=dict)
    prediction: Prediction = Prediction.epsilon
    vae: VAEConfig = field(default_factory=VAEConfig)


@dataclass
class DiffusionConfig:
    """The forward process (DESIGN.md §1) and the training objective (§2)."""

    beta_schedule: BetaSchedule = BetaSchedule.squaredcos_cap_v2
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    gamma: float = 1.0  # κ_t = γ a_t σ_t
    weighting: Weighting = Weighting.simple
    p_drop: float = 0.1  # modality dropout (§2)
    t_sampling: TimestepSampling = TimestepSampling.uniform  # how training draws t (§2)
    t_loc: float = 0.0  # logit_normal: the mean μ of logit(t/T) (negative: more low-noise steps)
    t_scale: float = 1.0  # logit_normal: its standard deviation s
    snr_gamma: Optional[float] = None  # image loss: Min-SNR-γ weighting (§2; null: L_simple)


@dataclass
class ModalityConfig:
    """One auxiliary modality: ``kind`` picks the file in ``heads/``; weight is π_m, loss_weight λ_m;
    options are the head's own keyword arguments (a label's ``num_classes`` is filled from the data)."""

    name: str = "label"
    kind: str = "label"
    weight: float = 1.0
    loss_weight: float = 1.0
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """The training loop. ``batch_size`` is the global batch of one optimiser step (summed over
    processes and gradient-accumulation micro-steps). DataLoader workers are ``data.num_workers``.
    ``resume``: continue from the latest
    complete checkpoint in the run folder when there is one (rerunning the same command resumes);
    false refuses to touch a run folder that already holds checkpoints."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 100
    lr_schedule: LRSchedule = LRSchedule.constant_with_warmup
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    mixed_precision: MixedPrecision = MixedPrecision.auto  # unidiff.launch.resolve_precision
    ema_decay: float = 0.999
    log_every: int = 50
    sample_every: int = 500  # 0 disables sample grids
    ckpt_every: int = 500
    keep_last: int = 2
    compile: bool = False  # torch.compile the backbone
    resume: bool = True
    # Experiment trackers fed through accelerate (README "Tracking and plots"); [] = log.jsonl only.
    report_to: List[Tracker] = field(default_factory=lambda: [Tracker.tensorboard])
    max_bad_steps: int = 10  # consecutive optimiser steps skipped for a non-finite loss/gradient before the run stops
    # A time budget (unidiff.train.train, README "Training for a time budget"): the loop stops once
    # budget_minutes of budget_clock are spent (train.steps stays the cap), and the LR schedule
    # runs over the budget's fraction spent instead of steps/train.steps; null = steps only.
    budget_minutes: Optional[float] = None
    budget_clock: BudgetClock = BudgetClock.wall
    # Fine-tuning: a run folder whose weights start this run (unidiff.checkpoint.init_from: every tensor
    # whose name and shape match is copied, the rest stay fresh); null = from scratch. In an experiment,
    # "arm:<name>" is an earlier arm's run folder (experiments/spec.py).
    init_from: Optional[str] = None


@dataclass
class SampleConfig:
    """Sample grids during training and the defaults of ``unidiff sample``."""

    sampler: Sampler = Sampler.ddim
    steps: int = 50
    guidance: float = 1.0  # 1 = no classifier-free guidance
    classifier_scale: float = 0.0  # classifier guidance from the label head (§3); 0 = off
    # Conditional tasks: the drift of the modalities not given, heads' E(x̂) or E(∅) (DESIGN.md §3.3);
    # left at predicted, `unidiff sample` takes eval.unknown_drift (as it does eval.guidance).
    unknown_drift: UnknownDrift = UnknownDrift.predicted
    n: int = 64  # at most MAX_GRID


@dataclass
class EvalConfig:
    """``unidiff evaluate``: sample counts, solver, the image->label read-out (t_read, num_draws),
    the reference classifier's cache folder, the generative metrics and their features
    (README "Metrics for natural images") and the resumable sample shards."""

    n_samples: int = 500
    sampler: Sampler = Sampler.ddim
    steps: int = 50
    guidance: float = 1.0
    classifier_scale: float = 0.0  # classifier guidance from the label head for class -> image (§3)
    unknown_drift: UnknownDrift = UnknownDrift.predicted  # conditional samples: heads' E(x̂) or E(∅) for the rest (§3.3)
    t_read: int = 50
    num_draws: int = 4
    batch_size: int = 250
    bpd_num_t: int = 32  # Monte-Carlo draws of t for bits/dim (on up to n_samples val images)
    cache_dir: str = "runs/.cache"
    reference_steps: int = 600  # training steps of the reference classifier (cached per data + steps)
    metrics: List[str] = field(default_factory=lambda: ["fid"])  # of fid, is, kid, pr
    features: str = "classifier"  # classifier (reference classifier) | inception (standard FID Inception-v3)
    inception_weights: Optional[str] = None  # local FID Inception weights; else env UNIDIFF_INCEPTION_WEIGHTS
    reference: str = "val"  # the split whose statistics the samples are compared with: train | val
    reference_features: int = 10000  # reference items whose features are kept for kid and pr
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # at most the number of samples / kept reference features
    pr_k: int = 3  # k-th neighbour radius of precision/recall
    shard_size: int = 0  # samples per resumable shard (RUN_DIR/eval_shards/); 0 = eval.batch_size
    floor_samples: int = 0  # real images of the other split for fid_floor (streamed); 0 = eval.n_samples


@dataclass
class Config:
    """The whole run (``config.yaml`` in every run folder has this layout)."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    modalities: List[ModalityConfig] = field(default_factory=list)
    image_head: bool = True  # false: a label-only (classifier) baseline on the same backbone
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --- loading ---------------------------------------------------------------------------------
def config_error(err: OmegaConfBaseException, prefix: str = "") -> ConfigError:
    """One line naming the full dotted key of an omegaconf error (``prefix`` goes in front of it)."""
    key = getattr(err, "full_key", None) or ""
    key = f"{prefix}{key}" if prefix and key else (key or prefix.rstrip("."))
    msg = (getattr(err, "msg", None) or str(err)).splitlines()[0].strip()
    return ConfigError(f"{key}: {msg}" if key else msg)


def read_yaml(path: str | os.PathLike) -> Dict[str, Any]:
    """A YAML mapping from ``path``; ConfigError naming the file (and line) when missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist" if not path.exists() else f"config path {str(path)!r} is not a file")
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r}{where}: malformed YAML ({problem})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"config file {str(path)!r}: {str(err).splitlines()[0]}") from None
    if node is None or isinstance(node, ListConfig) or (isinstance(node, DictConfig) and node._is_none()):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections (run, data, model, ...)")
    return OmegaConf.to_container(node, resolve=False)


def override_key(item: str) -> str:
    """The key of a ``key=value`` override (its value is parsed as YAML by omegaconf, so ``1e-4``
    is a float and ``[0.9,0.95]`` a list); ConfigError when ``item`` is not of that form."""
    if not isinstance(item, str) or "=" not in item or item.startswith("="):
        raise ConfigError(f"override {item!r} is not of the form key=value")
    return item.split("=", 1)[0].strip()


def apply_overrides(node: DictConfig, overrides: Sequence[str], prefix: str = "") -> None:
    """Merge ``key=value`` overrides into ``node`` in order (in place); the first bad one raises a
    ConfigError naming ``<prefix><key>`` (``prefix``: where ``node`` sits, e.g. ``experiment.``)."""
    for item in overrides:
        key = override_key(item)
        try:
            node.merge_with_dotlist([item])
        except OmegaConfBaseException as err:
            # Errors inside a list entry lose their path (``bad`` for ``modalities[0].bad``).
            inside = (getattr(err, "full_key", "") or "").startswith(key.split(".")[0].split("[")[0])
            raise config_error(err, prefix=prefix if inside else f"{prefix}{key}: ") from None
        except (TypeError, ValueError, IndexError, yaml.YAMLError) as err:  # e.g. a scalar merged into a section
            raise ConfigError(f"{prefix}{key}: cannot apply override {item!r} ({str(err).splitlines()[0]})") from None


def _merge_modalities(entries: Any) -> List[Dict[str, Any]]:
    """Validate each ``modalities[i]`` against :class:`ModalityConfig` (errors keep the index)."""
    if not isinstance(entries, (list, tuple)):
        raise ConfigError(f"modalities: must be a list of modality entries, got {type(entries).__name__}")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"modalities[{i}]: must be a mapping with name, kind, ..., got {entry!r}")
        try:
            node = OmegaConf.merge(OmegaConf.structured(ModalityConfig), entry)
        except OmegaConfBaseException as err:
            raise config_error(err, prefix=f"modalities[{i}].") from None
        out.append(OmegaConf.to_container(node))
    return out


ConfigSource = Union[str, os.PathLike, Mapping[str, Any], DictConfig, None]


def load_config(source: ConfigSource = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Schema defaults <- ``source`` <- ``key=value`` overrides; validated, read-only.

    ``source``: a YAML file's path, or the sections themselves as a mapping (a plain dict, or a
    ``DictConfig`` such as another :func:`load_config` result, checked all over again), or None for
    the defaults. Raises :class:`ConfigError` naming the file, key or value that is wrong.
    """
    cfg = OmegaConf.structured(Config)
    if source is not None:
        if isinstance(source, DictConfig):
            where, data = "the given config", to_container(source)
        elif isinstance(source, Mapping):
            where, data = "the given config", copy.deepcopy(dict(source))
        else:
            where, data = repr(str(source)), read_yaml(source)
        unknown = sorted(set(data) - set(cfg.keys()))
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown config section in {where}; sections are {list(cfg.keys())}")
        if "modalities" in data and data["modalities"] is not None:
            data["modalities"] = _merge_modalities(data["modalities"])
        if isinstance(data.get("train"), dict) and data["train"].get("mixed_precision") is False:
            data["train"]["mixed_precision"] = "no"  # YAML 1.1 reads a bare `no` as false
        if isinstance(data.get("run"), dict) and "name" in data["run"]:
            _check_name_is_text(data["run"]["name"], str(data["run"]["name"]), f"in {where}")
        try:
            cfg = OmegaConf.merge(cfg, data)
        except OmegaConfBaseException as err:
            raise config_error(err) from None
    # keep accelerate's `no` a string, not YAML's false
    overrides = ["train.mixed_precision='no'" if override_key(item) == "train.mixed_precision"
                 and item.split("=", 1)[1].strip() == "no" else item for item in overrides]
    for item in overrides:
        if override_key(item) == "run.name":
            try:
                value = OmegaConf.select(OmegaConf.from_dotlist([item]), "run.name")
            except (OmegaConfBaseException, ValueError, yaml.YAMLError):
                value = ""  # apply_overrides reports it
            _check_name_is_text(value, item.split("=", 1)[1].strip(), f"in override {item!r}")
    apply_overrides(cfg, overrides)
    try:  # an interpolation that points nowhere (train.steps=${nope}) fails here, naming its key
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise config_error(err) from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _check_name_is_text(value: Any, text: str, where: str) -> None:
    """``run.name`` as written (``text``) must be a string: YAML reads ``no``/``on``/``1e3`` as a bool
    or a number, which the schema would silently turn into the folder name ``False``/``1000.0``."""
    _check(isinstance(value, str) or value is None, "run.name",
           f"must be a plain string, got {type(value).__name__} {value!r} {where} (quote it: run.name='{text}')")


def _check_finite(node: Any, key: str) -> None:
    """Every float of the (plain) config is finite; the error names the dotted key."""
    if isinstance(node, dict):
        for k, v in node.items():
            _check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _check_finite(v, f"{key}[{i}]")
    elif isinstance(node, float):
        _check(math.isfinite(node), key, f"must be a finite number, got {node}")


def _is_path_component(name: str) -> bool:
    """One plain folder name: not empty, not ``.``/``..``, no separator or control character, no
    leading or trailing blank."""
    return (bool(name) and name not in (".", "..") and name == name.strip()
            and not any(c in name for c in "/\\") and all(c.isprintable() for c in name))


def validate(cfg: DictConfig) -> None:
    """Range and consistency checks the types alone cannot express (raise ConfigError naming the key)."""
    from .models.presets import PRESETS

    _check(cfg.model.preset in PRESETS, "model.preset", f"unknown preset {cfg.model.preset!r}; available: {sorted(PRESETS)}")
    from .models.backbone import validate_backbone_options

    _check_finite(to_container(cfg), "")
    r = cfg.run
    if not r.dir:
        _check(_is_path_component(r.name), "run.name",
               f"{r.name!r} must be one plain folder name under runs/ (no '/', not '.' or '..' or empty); "
               "to write elsewhere give run.dir")
    check_seed(r.seed, "run.seed")

    validate_backbone_options(dict(cfg.model.backbone))
    _check(cfg.run.threads is None or cfg.run.threads >= 1, "run.threads", f"must be a positive integer or null, got {cfg.run.threads}")
    from .data import validate_data_config

    validate_data_config(cfg.data)  # data.* ranges (data.channels, data.on_bad_file, ...) at load, not first use
    for key, value in backbone_kwargs(cfg).items():
        if key in _POSITIVE_BACKBONE_KEYS and value is not None and isinstance(value, (int, float)):
            where = f"model.backbone.{key}" if key in cfg.model.backbone else f"model.backbone.{key} (preset {cfg.model.preset!r})"
            _check(value >= 1, where, f"must be >= 1, got {value}")
    d = cfg.diffusion
    _check(2 <= d.num_train_timesteps <= MAX_TIMESTEPS, "diffusion.num_train_timesteps",
           f"must be in [2, {MAX_TIMESTEPS}], got {d.num_train_timesteps}")
    _check(0 < d.beta_start < d.beta_end < 1, "diffusion.beta_start", f"need 0 < beta_start < beta_end < 1, got {d.beta_start}, {d.beta_end}")
    _check(d.gamma >= 0, "diffusion.gamma", f"must be >= 0, got {d.gamma}")
    _check(0 <= d.p_drop <= 1, "diffusion.p_drop", f"must be in [0, 1], got {d.p_drop}")
    _check(math.isfinite(d.t_loc), "diffusion.t_loc", f"must be a finite number, got {d.t_loc}")
    _check(d.t_scale > 0 and math.isfinite(d.t_scale), "diffusion.t_scale", f"must be > 0, got {d.t_scale}")
    _check(d.snr_gamma is None or (d.snr_gamma > 0 and math.isfinite(d.snr_gamma)), "diffusion.snr_gamma",
           f"must be null or a number > 0, got {d.snr_gamma}")

    import heads

    names = set()
    for i, m in enumerate(cfg.modalities):
        try:  # a registered kind or "package.module:Class" (imported here)
            heads.modality_class(m.kind)
        except ConfigError as err:
            raise ConfigError(f"modalities[{i}].kind: {err}") from None
        _check(m.name not in names and m.name != "image", f"modalities[{i}].name", f"duplicate or reserved name {m.name!r}")
        _check(m.weight >= 0, f"modalities[{i}].weight", f"must be >= 0, got {m.weight}")
        _check(m.loss_weight >= 0, f"modalities[{i}].loss_weight", f"must be >= 0, got {m.loss_weight}")
        names.add(m.name)
    _check(cfg.image_head or len(cfg.modalities) > 0, "image_head", "false needs at least one modality to train")

    t = cfg.train
    for key in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "keep_last"):
        _check(t[key] >= 1, f"train.{key}", f"must be >= 1, got {t[key]}")
    for key in ("warmup_steps", "sample_every"):
        _check(t[key] >= 0, f"train.{key}", f"must be >= 0, got {t[key]}")
    _check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", f"must be two numbers in [0, 1), got {list(t.betas)}")
    _check(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {t.grad_clip}")
    _check(t.max_bad_steps >= 1, "train.max_bad_steps", f"must be >= 1, got {t.max_bad_steps}")
    _check(t.budget_minutes is None or (t.budget_minutes > 0 and math.isfinite(t.budget_minutes)),
           "train.budget_minutes", f"must be null or a number of minutes > 0, got {t.budget_minutes}")
    _check(0 <= t.ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
    _check(t.batch_size <= MAX_BATCH, "train.batch_size", f"must be <= {MAX_BATCH}, got {t.batch_size}")
    _check(t.batch_size % t.grad_accum == 0, "train.batch_size",
           f"{t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    _check(cfg.image_head or t.sample_every == 0, "train.sample_every",
           f"must be 0 with image_head=false (sample grids draw images), got {t.sample_every}")
    for sec in ("sample", "eval"):
        _check(1 <= cfg[sec].steps <= d.num_train_timesteps, f"{sec}.steps",
               f"must be in [1, diffusion.num_train_timesteps={d.num_train_timesteps}], got {cfg[sec].steps}")
        _check(cfg[sec].guidance >= 0, f"{sec}.guidance", f"must be >= 0, got {cfg[sec].guidance}")
        _check(cfg[sec].classifier_scale >= 0, f"{sec}.classifier_scale", f"must be >= 0, got {cfg[sec].classifier_scale}")
    _check(1 <= cfg.sample.n <= MAX_GRID, "sample.n", f"must be in [1, {MAX_GRID}], got {cfg.sample.n}")
    _check(cfg.eval.n_samples >= 1, "eval.n_samples", f"must be >= 1, got {cfg.eval.n_samples}")
    _check(cfg.eval.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {cfg.eval.batch_size}")
    _check(0 <= cfg.eval.t_read < d.num_train_timesteps, "eval.t_read",
           f"must be in [0, diffusion.num_train_timesteps={d.num_train_timesteps}), got {cfg.eval.t_read}")
    _check(cfg.eval.reference_steps >= 1, "eval.reference_steps", f"must be >= 1, got {cfg.eval.reference_steps}")
    _check(cfg.eval.bpd_num_t >= 1, "eval.bpd_num_t", f"must be >= 1, got {cfg.eval.bpd_num_t}")
    _check(cfg.eval.num_draws >= 1, "eval.num_draws", f"must be >= 1, got {cfg.eval.num_draws}")
    ev = cfg.eval
    bad = sorted(set(ev.metrics) - {"fid", "is", "kid", "pr"})
    _check(not bad, "eval.metrics", f"unknown metric(s) {bad}; choices: fid, is, kid, pr")
    _check(ev.features in ("classifier", "inception"), "eval.features",
           f"must be classifier or inception, got {ev.features!r}")
    _check(ev.reference in ("train", "val"), "eval.reference", f"must be train or val, got {ev.reference!r}")
    for key in ("reference_features", "kid_subsets", "kid_subset_size", "pr_k"):
        _check(ev[key] >= 1, f"eval.{key}", f"must be >= 1, got {ev[key]}")
    _check(ev.shard_size >= 0, "eval.shard_size", f"must be >= 0 (0 = eval.batch_size), got {ev.shard_size}")
    _check(ev.floor_samples >= 0, "eval.floor_samples", f"must be >= 0 (0 = eval.n_samples), got {ev.floor_samples}")


def resolve_with_data(cfg: DictConfig, info: Any) -> DictConfig:
    """Fill what only the data knows: each modality kind's ``Modality.resolve_options`` (a label's
    ``num_classes`` from ``info.num_classes``; a value the data contradicts is an error naming
    ``modalities[i].options.<option>``), and ``model.vae`` from a latent cache
    (:func:`unidiff.latents.resolve_vae`). Returns a new read-only config.
    """
    import heads

    cfg = copy.deepcopy(cfg)
    with read_write(cfg):
        resolve_vae(cfg, info)
        for i, m in enumerate(cfg.modalities):
            options = OmegaConf.to_container(m.options, resolve=True)
            try:
                resolved = heads.modality_class(m.kind).resolve_options(options, info)
            except ConfigError as err:
                raise ConfigError(f"modalities[{i}].options.{err}") from None
            for key, value in resolved.items():
                if key not in options or options[key] != value:
                    m.options[key] = value
    OmegaConf.set_readonly(cfg, True)
    return cfg


def run_dir(cfg: DictConfig) -> Path:
    """The run folder: ``run.dir`` or ``runs/<run.name>``."""
    return Path(cfg.run.dir) if cfg.run.dir else Path("runs") / cfg.run.name


def check_writable(path: str | os.PathLike, what: str) -> None:
    """``path`` is a folder this process may write, or one it may create: ConfigError naming
    ``what`` (the key or argument that chose the path) otherwise. Creates nothing.

    Checked on the path itself when it exists, else on its nearest existing ancestor (where
    ``mkdir -p`` would start); ``os.access`` sees permissions and read-only file systems.
    """
    path = Path(path)
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what}: {str(probe)!r} is a file, not a folder" if probe == path
                          else f"{what}: cannot create {str(path)!r}: {str(probe)!r} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: {str(probe)!r} is not writable" if probe == path
                          else f"{what}: cannot create {str(path)!r}: {str(probe)!r} is not writable")


def check_run_folder(cfg: DictConfig) -> None:
    """The run folder (:func:`run_dir`) can be written; ConfigError naming ``run.dir``/``run.name``."""
    check_writable(run_dir(cfg), "run.dir" if cfg.run.dir else "run.name")


def check_training_step(cfg: DictConfig, model, dataset) -> None:
    """What the first training step computes, on two items of ``dataset``, without gradients: each
    modality's value from a batch, then the training losses (DESIGN.md §2). Raises ConfigError
    naming the modality or the model when that fails (the ``--dry-run`` check: a config it accepts
    does not fail at step 1). Leaves the parameters untouched (buffers such as MoE token counts
    may move: call it on a model that will not be trained)."""
    import torch

    from .data import iter_batches
    from .diffusion import training_losses

    batch = next(iter(iter_batches(dataset, 2)), None)
    if batch is None:
        raise DataError("data: the train split is empty")
    g = torch.Generator(device=model.device).manual_seed(0)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    for i, (name, mod) in enumerate(model.modalities.items()):
        try:
            mod.from_batch(batch, generator=g)
        except KeyError:
            raise ConfigError(f"modalities[{i}].name: the data batch has no entry {name!r} (it has {sorted(batch)}); "
                              "name the modality after its data entry") from None
    try:
        with torch.no_grad():
            training_losses(model, build_schedule(cfg), batch, weighting=cfg.diffusion.weighting.value,
                            p_drop=cfg.diffusion.p_drop, generator=g)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, ZeroDivisionError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"model: the first training step fails with this config: {msg}") from None


def to_container(cfg: DictConfig) -> Dict[str, Any]:
    """Plain dicts/lists with Enum members as their string values (for JSON, logging, kwargs)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text (what ``config.yaml`` holds)."""
    return OmegaConf.to_yaml(OmegaConf.create(to_container(cfg)))


def backbone_kwargs(cfg: DictConfig) -> Dict[str, Any]:
    """The preset's backbone kwargs with ``model.backbone`` overrides merged on top."""
    from .models.presets import get_preset

    kwargs = get_preset(cfg.model.preset)
    kwargs.update(OmegaConf.to_container(cfg.model.backbone, resolve=True))
    return kwargs


def model_kwargs(cfg: DictConfig, image_shape: Sequence[int]) -> Dict[str, Any]:
    """Keyword arguments of :class:`UnifiedModel` for a resolved config and the data's ``(C, H, W)``."""
    mods = []
    for m in to_container(cfg)["modalities"]:
        mods.append(dict(name=m["name"], kind=m["kind"], weight=m["weight"], loss_weight=m["loss_weight"], **m["options"]))
    return dict(image_shape=[int(s) for s in image_shape], backbone_config=backbone_kwargs(cfg), modality_configs=mods,
                prediction=cfg.model.prediction.value, predict_image=bool(cfg.image_head))


def build_model(cfg: DictConfig, image_shape: Sequence[int]):
    """A fresh :class:`UnifiedModel` for a resolved config; constructor complaints become ConfigError."""
    from .model import UnifiedModel

    kwargs = model_kwargs(cfg, image_shape)
    C, H, W = kwargs["image_shape"]
    p = int(kwargs["backbone_config"].get("patch_size", 1))
    _check(p >= 1 and H % p == 0 and W % p == 0, "model.backbone.patch_size",
           f"image size {H}x{W} (data) is not divisible by patch size {p}")
    for i, m in enumerate(kwargs["modality_configs"]):
        opts = {k: v for k, v in m.items() if k not in ("name", "kind", "weight", "loss_weight")}
        import heads

        allowed = heads.modality_options(m["kind"])
        bad = sorted(set(opts) - set(allowed))
        _check(not bad, f"modalities[{i}].options", f"unknown option(s) {bad} for kind {m['kind']!r}; allowed: {list(allowed)}")
    try:
        return UnifiedModel(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError, ZeroDivisionError) as err:
        raise ConfigError(f"model: cannot build the model from this config: {err}") from None


def build_schedule(cfg: DictConfig):
    """The drift schedule of §1 from the ``diffusion`` section."""
    from .diffusion import DriftSchedule

    d = cfg.diffusion
    return DriftSchedule.from_config(d.beta_schedule.value, d.num_train_timesteps, d.beta_start, d.beta_end, d.gamma)
