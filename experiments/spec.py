"""The experiment file: the ``experiment:`` schema and the arms' run configs (writes nothing).

An experiment file is an ``experiment:`` section (schema :class:`ExperimentSpec`) plus, optionally,
run-config sections (``data``, ``modalities``, ...) that are merged onto the ``base`` run config
(``OmegaConf.merge``: mappings merge, lists replace). The config of arm ``a`` is, in order of
precedence::

    base file <- inline sections <- experiment.overrides <- CLI overrides <- experiment.arms.a
              <- run.name / run.dir (= <out_dir>/<a>) <- the setting's own (Setting.configure_arm)

so an arm's defining overrides (``modalities=[]``, ``image_head=false``) cannot be undone by a
budget override on the command line. CLI overrides whose key starts with ``experiment.`` change
the experiment spec itself (``experiment.out_dir=...``, ``experiment.n_cond=50``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from unidiff.config import Config, apply_overrides, config_error, load_config, override_key, read_yaml, to_container
from unidiff.encoders import EncoderConfig
from unidiff.errors import ConfigError

# The settings register themselves on import (one module each, beside its README), in §4's order.
from . import joint_image_label, joint_image_representation, masked_image, image_transition  # noqa: F401, I001
from . import masked_class_conditional  # noqa: F401, I001  (the paper's class-conditional claim)
from .setting import SETTINGS, Setting, modality_index

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# What must be equal in every arm: "same backbone, steps and seed" (DESIGN.md §4 baselines).
_SHARED_KEYS = ("run.seed", "data", "model", "train.steps", "train.batch_size")
# train.init_from=arm:<name>: start from the weights of an earlier arm (a fine-tuned baseline).
ARM_PREFIX = "arm:"

# The choice of experiment.setting: the registered names, so the schema rejects a typo at load.
SettingName = Enum("SettingName", {name: name for name in SETTINGS}, type=str)


@dataclass
class RepresentationSpec:
    """Where ``r`` comes from (``joint_image_representation`` only).

    encoder: :class:`unidiff.encoders.EncoderConfig` fields (``steps``, ``embed_dim``, ``towers``, ...;
        not ``out_dir``, which is the cache folder). pca_dim: PCA components kept (null: the raw
        embedding). whiten: unit variance per kept component on train.
    """

    encoder: Dict[str, Any] = field(default_factory=dict)
    pca_dim: Optional[int] = 16
    whiten: bool = True


@dataclass
class ExperimentSpec:
    """The ``experiment:`` section.

    name: folder name (default: the file's stem). setting: which of §4. base: run config file the
    arms start from (relative paths: the working directory, then the experiment file's folder and
    its parents). overrides: dotlist for every arm. arms: arm name -> its own dotlist.
    out_dir: default ``runs/experiments/<name>``. n_joint: joint samples per arm for the
    consistency metrics; n_cond: val items for the conditional-generation metrics (capped at the
    val size); grid: samples per panel of ``samples.png``; recall_k: the K of retrieval Recall@K.
    device: evaluation device (default CUDA when present).

    Convergence and ablation keys (any setting unless said otherwise):
    eval_at: training steps (strictly increasing, each below ``train.steps``) at which every arm is
        also evaluated, besides the final step: the arm trains to each in turn (``train(stop_at=s)``,
        one schedule for the whole run) and the latest checkpoint's EMA is evaluated; the metrics go
        into the table as ``<metric>@<step>`` and into ``results.json`` under ``by_step``.
    mask_augment_arms: arms trained with the masked modality's masks applied to the *image* as
        augmentation (``x0 ⊙ M`` as the diffusion target on a fraction ``mask_augment_p`` of the
        items), with the ratio and patch of the first arm's ``masked_image`` modality
        (:mod:`experiments.augment`); such an arm must not have a ``masked_image`` modality itself.
        The run config does not hold these two keys: changing them does not retrain a finished arm
        (use a new ``experiment.name``).
    n_fid: class→image samples of the class-conditional FID (``masked_class_conditional``).
    unknown_drift: how class→image treats the modalities that are not given
        (``masked_class_conditional``): ``predicted`` (the sampler's ``Â``, the heads' predictions)
        and/or ``null_encoding`` (their null encodings ``E(∅)``); each listed one is evaluated.
    mask_ratios: the constrained-inpainting sweep of ``masked_image`` (masked fraction ρ of each point).
    """

    name: str = ""
    setting: SettingName = MISSING  # required
    base: Optional[str] = None
    overrides: List[str] = field(default_factory=list)
    arms: Dict[str, List[str]] = field(default_factory=dict)
    out_dir: Optional[str] = None
    n_joint: int = 64
    n_cond: int = 100
    grid: int = 16
    recall_k: List[int] = field(default_factory=lambda: [1, 5])
    device: Optional[str] = None
    representation: RepresentationSpec = field(default_factory=RepresentationSpec)
    eval_at: List[int] = field(default_factory=list)
    mask_augment_arms: List[str] = field(default_factory=list)
    mask_augment_p: float = 0.5
    n_fid: int = 200
    unknown_drift: List[str] = field(default_factory=lambda: ["predicted"])
    mask_ratios: List[float] = field(default_factory=list)


@dataclass
class Experiment:
    """A loaded experiment: the spec, its setting and the validated config of every arm."""

    spec: DictConfig
    setting: Setting
    path: Path
    base: Dict[str, Any]  # the merged base run config (what base.yaml holds)
    arms: Dict[str, DictConfig]
    out_dir: Path
    run_overrides: List[str]


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _find_file(name: str, near: Path) -> Optional[Path]:
    """``name`` as given (absolute or from the working directory), else from ``near``'s folder upwards."""
    p = Path(name).expanduser()
    if p.is_absolute() or p.is_file():
        return p if p.is_file() else None
    for folder in [near.parent, *near.parent.parents][:4]:
        if (folder / p).is_file():
            return folder / p
    return None


def _load_spec(path: Path, data: Dict[str, Any], exp_overrides: Sequence[str]) -> DictConfig:
    section = data.get("experiment")
    if not isinstance(section, dict):
        raise ConfigError(f"experiment: experiment file {str(path)!r} needs an 'experiment:' mapping (name, setting, base, arms, ...)")
    try:
        spec = OmegaConf.merge(OmegaConf.structured(ExperimentSpec), section)
    except OmegaConfBaseException as err:
        raise config_error(err, prefix="experiment.") from None
    apply_overrides(spec, [item[len("experiment."):] for item in exp_overrides], prefix="experiment.")
    if OmegaConf.is_missing(spec, "setting"):
        raise ConfigError(f"experiment.setting: required in {str(path)!r}; one of {list(SETTINGS)}")
    if not spec.name:
        spec.name = path.stem
    _validate_spec(spec)
    return spec


def _validate_spec(spec: DictConfig) -> None:
    _check(bool(_SAFE_NAME.match(spec.name)), "experiment.name", f"{spec.name!r} must be a plain folder name (letters, digits, _ . -)")
    _check(len(spec.arms) >= 1, "experiment.arms", "needs at least one arm (arm name -> list of overrides)")
    for arm in spec.arms:
        _check(bool(_SAFE_NAME.match(str(arm))), f"experiment.arms.{arm}", "arm names must be plain folder names (letters, digits, _ . -)")
    for key in ("n_joint", "n_cond", "grid"):
        _check(spec[key] >= 1, f"experiment.{key}", f"must be >= 1, got {spec[key]}")
    _check(len(spec.recall_k) >= 1 and all(k >= 1 for k in spec.recall_k), "experiment.recall_k",
           f"must be a non-empty list of integers >= 1, got {list(spec.recall_k)}")
    eval_at = list(spec.eval_at)
    _check(all(s >= 1 for s in eval_at) and all(a < b for a, b in zip(eval_at, eval_at[1:])), "experiment.eval_at",
           f"must be strictly increasing training steps >= 1, got {eval_at}")
    for arm in spec.mask_augment_arms:
        _check(arm in spec.arms, "experiment.mask_augment_arms", f"{arm!r} is not an arm of experiment.arms ({list(spec.arms)})")
    _check(0.0 < spec.mask_augment_p <= 1.0, "experiment.mask_augment_p", f"must be in (0, 1], got {spec.mask_augment_p}")
    _check(spec.n_fid >= 2, "experiment.n_fid", f"must be >= 2 (FID needs two samples), got {spec.n_fid}")
    drifts = list(spec.unknown_drift)
    _check(len(drifts) >= 1 and set(drifts) <= {"predicted", "null_encoding"} and len(set(drifts)) == len(drifts),
           "experiment.unknown_drift", f"must be a non-empty list of distinct 'predicted' / 'null_encoding', got {drifts}")
    _check(all(0.0 < r < 1.0 for r in spec.mask_ratios), "experiment.mask_ratios",
           f"must be masked fractions in (0, 1), got {list(spec.mask_ratios)}")
    rep = spec.representation
    _check(rep.pca_dim is None or rep.pca_dim >= 1, "experiment.representation.pca_dim", f"must be >= 1 or null, got {rep.pca_dim}")
    allowed = {f.name for f in fields(EncoderConfig)} - {"out_dir"}
    for key in rep.encoder:
        _check(key in allowed, f"experiment.representation.encoder.{key}", f"unknown encoder option; allowed: {sorted(allowed)}")
    try:
        EncoderConfig(**OmegaConf.to_container(rep.encoder)).validate()
    except ConfigError as err:
        raise ConfigError(f"experiment.representation.{err}") from None
    except TypeError as err:
        raise ConfigError(f"experiment.representation.encoder: {err}") from None


def _same(a: Any, b: Any) -> bool:
    plain = [to_container(v) if isinstance(v, DictConfig) else v for v in (a, b)]
    return plain[0] == plain[1]


def load_experiment(config_path: str | os.PathLike, overrides: Sequence[str] = ()) -> Experiment:
    """Read and validate an experiment file and build every arm's run config; writes nothing.

    Raises :class:`ConfigError` naming the file, the ``experiment.*`` key, or the arm and run-config
    key that is wrong.
    """
    path = Path(config_path)
    data = read_yaml(path)
    sections = {f.name for f in fields(Config)}
    unknown = sorted(set(data) - sections - {"experiment"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section in experiment file {str(path)!r}; "
                          f"allowed: experiment and the run-config sections {sorted(sections)}")
    overrides = list(overrides)
    for item in overrides:
        override_key(item)
    exp_overrides = [o for o in overrides if o.startswith("experiment.")]
    run_overrides = [o for o in overrides if not o.startswith("experiment.")]
    spec = _load_spec(path, data, exp_overrides)
    setting = SETTINGS[spec.setting.value](spec)

    base: Dict[str, Any] = {}
    if spec.base is not None:
        found = _find_file(spec.base, path)
        _check(found is not None, "experiment.base", f"run config file {spec.base!r} does not exist "
               f"(looked in the working directory and above {str(path.parent)!r})")
        base = read_yaml(found)
    inline = {k: v for k, v in data.items() if k != "experiment"}
    base = OmegaConf.to_container(OmegaConf.merge(base, inline), resolve=False)
    out_dir = Path(spec.out_dir) if spec.out_dir else Path("runs") / "experiments" / spec.name

    arms: Dict[str, DictConfig] = {}
    for arm, arm_overrides in spec.arms.items():
        try:
            cfg = load_config(base, [*spec.overrides, *run_overrides, *arm_overrides])
            arm_sections = to_container(cfg)
            arm_sections["run"].update(name=f"{spec.name}-{arm}", dir=str(out_dir / arm))
            source = arm_sections["train"].get("init_from")
            if isinstance(source, str) and source.startswith(ARM_PREFIX):  # fine-tuned from an earlier arm
                ref = source[len(ARM_PREFIX):]
                _check(ref in arms, "train.init_from", f"{source!r}: {ref!r} is not an earlier arm of this "
                       f"experiment (arms train in order; earlier: {list(arms)})")
                arm_sections["train"]["init_from"] = str(out_dir / ref)
            setting.configure_arm(arm_sections)
            arms[str(arm)] = load_config(arm_sections)
        except ConfigError as err:
            raise ConfigError(f"experiment.arms.{arm}: {err}") from None

    kind = setting.kind
    _check(any(modality_index(c, kind) is not None for c in arms.values()), "experiment.arms",
           f"setting {setting.name!r} needs an arm with a {kind!r} modality; none of {list(arms)} has one")
    first_arm, first = next(iter(arms.items()))
    for arm, cfg in arms.items():
        for key in _SHARED_KEYS:
            _check(_same(OmegaConf.select(first, key), OmegaConf.select(cfg, key)), f"experiment.arms.{arm}",
                   f"{key} differs from arm {first_arm!r}: baselines share the backbone, "
                   "data, steps and seed (put such changes in experiment.overrides)")
    steps = int(first.train.steps)
    _check(all(s < steps for s in spec.eval_at), "experiment.eval_at",
           f"every step must be below train.steps = {steps} (the final step is always evaluated), got {list(spec.eval_at)}")
    for arm in spec.mask_augment_arms:
        _check(modality_index(arms[arm], "masked_image") is None, "experiment.mask_augment_arms",
               f"arm {arm!r} has a masked_image modality: the augmentation arm is the one without it")
    if spec.mask_augment_arms:
        _check(any(modality_index(c, "masked_image") is not None for c in arms.values()), "experiment.mask_augment_arms",
               "needs an arm with a masked_image modality (its mask ratio and patch are the augmentation's)")
    return Experiment(spec=spec, setting=setting, path=path, base=base, arms=arms, out_dir=out_dir,
                      run_overrides=run_overrides)
