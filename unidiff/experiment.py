"""The experiments of DESIGN.md §4: each setting against its single-task baseline(s).

``unidiff experiment configs/experiments/<setting>.yaml [key=value ...]`` trains every *arm* of an
experiment (the multi-task model and its single-task baselines, same backbone, steps and seed),
evaluates each, and writes into ``runs/experiments/<name>/``:

- ``<arm>/``: an ordinary run folder (``unidiff evaluate``/``sample`` work on it);
- ``results.json``: every metric of every arm, the comparison table, context numbers, timings;
- ``results.md``: the table (rows = metrics with the better direction, columns = arms);
- ``samples.png``: sample grids of each arm side by side (plus the data they were conditioned on);
- ``metrics.png``: one bar chart per metric;
- ``base.yaml``: the run config every arm starts from (base file + the experiment's own sections);
- ``representation/`` (``joint_image_representation``): the encoder summary, the PCA, and
  ``vectors.safetensors``, the ``data.extra_file`` of the arms with a representation modality.

An experiment file is an ``experiment:`` section (schema :class:`ExperimentSpec`) plus, optionally,
run-config sections (``data``, ``modalities``, ...) that are merged onto the ``base`` run config
(mappings merge, lists replace). The config of arm ``a`` is, in order of precedence::

    base file <- inline sections <- experiment.overrides <- CLI overrides <- experiment.arms.a
              <- run.name / run.dir (= <out_dir>/<a>)

so an arm's defining overrides (``modalities=[]``, ``image_head=false``) cannot be undone by a
budget override on the command line. CLI overrides whose key starts with ``experiment.`` change
the experiment spec itself (``experiment.out_dir=...``, ``experiment.n_cond=50``).

Resume is rerunning the same command: an arm whose final model (``<arm>/model``) was trained with
the same config is not retrained (an interrupted arm resumes from its checkpoints through
:func:`unidiff.train.train`); evaluation always reruns, with the *current* ``eval`` section.

Per-setting metrics (beside :func:`unidiff.evaluate.evaluate`'s; each only where the arm has the
part it measures, "—" in the table otherwise; none is faked):

- ``joint_image_label``: everything comes from ``evaluate`` (FID, bits/dim, image→label accuracy,
  joint consistency, class→image accuracy).
- ``joint_image_representation``: the vector ``r`` is the frozen multi-tower encoder's embedding
  (trained on the train split, cached in ``<eval.cache_dir>/encoder_<hash>``), PCA-reduced and
  whitened on train, written as ``train.<name>``/``val.<name>`` into
  ``representation/vectors.safetensors``; every arm with a representation modality gets that file as
  ``data.extra_file`` (an absolute path), so its batches carry ``r`` and the arm folder evaluates
  and samples on its own. ``joint_representation_cosine``: cos(generated r̂, the encoder's reading of
  the generated image); ``representation_to_image/cosine`` and ``/recall@K``: images generated from
  val vectors, read by the encoder, scored against the conditioning vector and by whether the
  nearest train-gallery items share the val item's class; ``image_to_<m>/cosine`` from evaluate.
- ``masked_image``: ``inpaint/masked_mse`` and ``/masked_psnr`` on val (fixed random patch masks,
  the same for every arm): the multi-task model conditions through the drift (§3); an arm without
  any auxiliary modality inpaints by *replacement* (the visible pixels of ``y_t`` are overwritten
  by a forward draw of the known image before every denoiser call: Song et al. 2021, RePaint
  without resampling), the standard way to inpaint with an unconditional model.
  ``image_to_<m>/masked_mse`` (the head's own reconstruction) from evaluate.
- ``image_transition``: ``transition/mse`` and ``/psnr`` (targets generated from val sources vs
  the true targets); ``image_to_<m>/mse`` and ``/psnr`` (target→source, the head) from evaluate;
  ``pair_consistency_mse``: for joint samples, MSE between the generated source and the built-in
  transform applied to the generated target.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import Config, _check_override, _omegaconf_error, read_yaml, to_container
from .data import InMemoryDataset
from .errors import ConfigError, DataError
from .io import image_grid, save_figure, write_text

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# What must be equal in every arm: "same backbone, steps and seed" (DESIGN.md §4 baselines).
_SHARED_KEYS = ("run.seed", "data", "model", "train.steps", "train.batch_size")


# --- schema ------------------------------------------------------------------------------------
class Setting(str, Enum):
    """The four settings of DESIGN.md §4; each picks the auxiliary modality kind it studies."""

    joint_image_label = "joint_image_label"
    joint_image_representation = "joint_image_representation"
    masked_image = "masked_image"
    image_transition = "image_transition"


SETTING_KIND = {
    Setting.joint_image_label: "label",
    Setting.joint_image_representation: "representation",
    Setting.masked_image: "masked_image",
    Setting.image_transition: "source_image",
}


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
    """

    name: str = ""
    setting: Setting = MISSING  # required
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


@dataclass
class Experiment:
    """A loaded experiment: the spec and the validated config of every arm."""

    spec: DictConfig
    path: Path
    base: Dict[str, Any]  # the merged base run config (what base.yaml holds)
    arms: Dict[str, DictConfig]
    out_dir: Path
    run_overrides: List[str]


# --- loading -----------------------------------------------------------------------------------
def _deep_merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    """Mappings merge key by key; anything else (lists included) is replaced by ``top``'s value."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


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
    spec = OmegaConf.structured(ExperimentSpec)
    section = data.get("experiment")
    if not isinstance(section, dict):
        raise ConfigError(f"experiment: experiment file {str(path)!r} needs an 'experiment:' mapping (name, setting, base, arms, ...)")
    try:
        spec = OmegaConf.merge(spec, section)
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err, prefix="experiment.") from None
    for item in exp_overrides:
        key = _check_override(item)
        try:
            spec.merge_with_dotlist([item[len("experiment."):]])
        except OmegaConfBaseException as err:
            raise _omegaconf_error(err, prefix="experiment.") from None
        except (TypeError, ValueError, IndexError, yaml.YAMLError) as err:
            raise ConfigError(f"{key}: cannot apply override {item!r} ({str(err).splitlines()[0]})") from None
    if OmegaConf.is_missing(spec, "setting"):
        raise ConfigError(f"experiment.setting: required in {str(path)!r}; one of {[s.value for s in Setting]}")
    if not spec.name:
        spec.name = path.stem
    _validate_spec(spec)
    return spec


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _validate_spec(spec: DictConfig) -> None:
    from .encoders import EncoderConfig

    _check(bool(_SAFE_NAME.match(spec.name)), "experiment.name", f"{spec.name!r} must be a plain folder name (letters, digits, _ . -)")
    _check(len(spec.arms) >= 1, "experiment.arms", "needs at least one arm (arm name -> list of overrides)")
    for arm in spec.arms:
        _check(bool(_SAFE_NAME.match(str(arm))), f"experiment.arms.{arm}", "arm names must be plain folder names (letters, digits, _ . -)")
    for key in ("n_joint", "n_cond", "grid"):
        _check(spec[key] >= 1, f"experiment.{key}", f"must be >= 1, got {spec[key]}")
    _check(len(spec.recall_k) >= 1 and all(k >= 1 for k in spec.recall_k), "experiment.recall_k",
           f"must be a non-empty list of integers >= 1, got {list(spec.recall_k)}")
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


def _modality_index(cfg: DictConfig, kind: str) -> Optional[int]:
    for i, m in enumerate(cfg.modalities):
        if m.kind == kind:
            return i
    return None


def representation_dim(spec: DictConfig) -> int:
    """The dimension of ``r``: the PCA components kept, else the encoder's embedding size."""
    from .encoders import EncoderConfig

    if spec.representation.pca_dim is not None:
        return int(spec.representation.pca_dim)
    return int(EncoderConfig(**OmegaConf.to_container(spec.representation.encoder)).embed_dim)


def load_experiment(config_path: str | os.PathLike, overrides: Sequence[str] = ()) -> Experiment:
    """Read and validate an experiment file and build every arm's run config; writes nothing.

    Raises :class:`ConfigError` naming the file, the ``experiment.*`` key, or the arm and run-config
    key that is wrong.
    """
    from .config import load_config

    path = Path(config_path)
    data = read_yaml(path)
    sections = {f.name for f in fields(Config)}
    unknown = sorted(set(data) - sections - {"experiment"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section in experiment file {str(path)!r}; "
                          f"allowed: experiment and the run-config sections {sorted(sections)}")
    overrides = list(overrides)
    for item in overrides:
        _check_override(item)
    exp_overrides = [o for o in overrides if o.startswith("experiment.")]
    run_overrides = [o for o in overrides if not o.startswith("experiment.")]
    spec = _load_spec(path, data, exp_overrides)

    base: Dict[str, Any] = {}
    if spec.base is not None:
        found = _find_file(spec.base, path)
        _check(found is not None, "experiment.base", f"run config file {spec.base!r} does not exist "
               f"(looked in the working directory and above {str(path.parent)!r})")
        base = read_yaml(found)
    base = _deep_merge(base, {k: v for k, v in data.items() if k != "experiment"})
    out_dir = Path(spec.out_dir) if spec.out_dir else Path("runs") / "experiments" / spec.name

    arms: Dict[str, DictConfig] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base_file = Path(tmp) / "base.yaml"
        base_file.write_text(yaml.safe_dump(base, sort_keys=False))
        for arm, arm_overrides in spec.arms.items():
            items = [*spec.overrides, *run_overrides, *arm_overrides,
                     f"run.name={spec.name}-{arm}", f"run.dir={json.dumps(str(out_dir / arm))}"]
            try:
                cfg = load_config(base_file, items)
                if spec.setting is Setting.joint_image_representation:
                    cfg = _with_representation_dim(cfg, spec, base_file, items)
            except ConfigError as err:
                raise ConfigError(f"experiment.arms.{arm}: {err}") from None
            arms[str(arm)] = cfg

    kind = SETTING_KIND[spec.setting]
    _check(any(_modality_index(c, kind) is not None for c in arms.values()), "experiment.arms",
           f"setting {spec.setting.value!r} needs an arm with a {kind!r} modality; none of {list(arms)} has one")
    first_arm, first = next(iter(arms.items()))
    for arm, cfg in arms.items():
        for key in _SHARED_KEYS:
            a, b = OmegaConf.select(first, key), OmegaConf.select(cfg, key)
            same = (to_container(a) if isinstance(a, DictConfig) else a) == (to_container(b) if isinstance(b, DictConfig) else b)
            _check(same, f"experiment.arms.{arm}", f"{key} differs from arm {first_arm!r}: baselines share the backbone, "
                   "data, steps and seed (put such changes in experiment.overrides)")
    return Experiment(spec=spec, path=path, base=base, arms=arms, out_dir=out_dir, run_overrides=run_overrides)


def _with_representation_dim(cfg: DictConfig, spec: DictConfig, base_file: Path, items: List[str]) -> DictConfig:
    """Fill the representation modality's ``dim`` from the spec (or check a given one agrees)."""
    from .config import load_config

    i = _modality_index(cfg, "representation")
    if i is None:
        return cfg
    dim = representation_dim(spec)
    given = cfg.modalities[i].options.get("dim")
    if given is None:
        return load_config(base_file, [*items, f"modalities.{i}.options.dim={dim}"])
    _check(int(given) == dim, f"modalities[{i}].options.dim", f"{given} disagrees with the representation's "
           f"dimension {dim} (experiment.representation.pca_dim, or the encoder's embed_dim without PCA)")
    return cfg


def vectors_path(out_dir: Path) -> Path:
    """``<out_dir>/representation/vectors.safetensors`` as an absolute path: it goes into the arms'
    configs, and ``unidiff evaluate``/``sample`` on an arm folder may run from any directory."""
    return Path(os.path.abspath(Path(out_dir) / "representation" / "vectors.safetensors"))


def with_representation_file(exp: Experiment) -> Dict[str, DictConfig]:
    """The arms' configs, those with a representation modality pointing ``data.extra_file`` at the
    experiment's vectors (:func:`vectors_path`), so their batches carry ``r``. Applied by the runner
    after it has written the file, last (no override undoes it); :func:`load_experiment` leaves it
    out, its configs being buildable before anything exists. The other arms read no ``r``."""
    path = str(vectors_path(exp.out_dir))
    return {arm: (OmegaConf.merge(cfg, {"data": {"extra_file": path}})
                  if _modality_index(cfg, "representation") is not None else cfg)
            for arm, cfg in exp.arms.items()}


# --- representation data -------------------------------------------------------------------------
def _in_memory(ds, what: str) -> InMemoryDataset:
    if not isinstance(ds, InMemoryDataset):
        raise DataError(f"setting joint_image_representation needs the {what} split in memory (set data.in_memory=true)")
    return ds


@dataclass
class RepresentationData:
    """The frozen encoder, the PCA, and ``r`` for every train/val item."""

    encoder: Any
    pca: Any  # PCAWhitener or None
    vectors: Dict[str, torch.Tensor]  # split -> (N, dim) float32
    embeddings: Dict[str, torch.Tensor]  # split -> (N, E) raw encoder embeddings (retrieval gallery)
    fingerprints: Dict[str, str]
    info: Dict[str, Any]

    def read(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The encoder's reading of images (N, C, H, W): (raw embedding (N, E), r (N, dim))."""
        from .encoders import encode_images

        emb = encode_images(self.encoder, images)
        return emb, (self.pca.transform(emb) if self.pca is not None else emb)


def prepare_representation(spec: DictConfig, cfg: DictConfig, train_set, val_set, info, out_dir: Path,
                           keys: Sequence[str] = ("representation",)) -> RepresentationData:
    """Train (or load from the cache) the multi-tower encoder on the train split, fit the PCA on the
    train embeddings, and compute ``r`` for both splits; saves ``pca.safetensors``, ``encoder.json``
    and ``vectors.safetensors`` under ``out_dir``. The last is a ``data.extra_file``: ``r`` as
    ``train.<key>``/``val.<key>`` for every ``key`` in ``keys`` (the arms' representation modality
    names), stamped with the splits' fingerprints so it is refused for other data."""
    from .data import save_extra_file
    from .encoders import EncoderConfig, PCAWhitener, encode_images, train_encoder

    train_set, val_set = _in_memory(train_set, "train"), _in_memory(val_set, "val")
    if info.num_classes < 2:
        raise DataError(f"setting joint_image_representation needs class-labelled data (the encoder's titles are class "
                        f"names); dataset {info.name!r} has {info.num_classes} class(es)")
    rep = spec.representation
    enc_cfg = EncoderConfig(**OmegaConf.to_container(rep.encoder))
    fp = {"train": train_set.fingerprint(), "val": val_set.fingerprint()}
    key = hashlib.sha256(json.dumps({"encoder": enc_cfg.cache_key(), **fp}, sort_keys=True).encode()).hexdigest()[:16]
    enc_cfg = replace(enc_cfg, out_dir=str(Path(cfg.eval.cache_dir) / f"encoder_{key}"))
    encoder, enc_metrics = train_encoder(enc_cfg, train_set.images.cpu(), train_set.labels.cpu(), info.class_names,
                                         val_set.images.cpu(), val_set.labels.cpu())
    emb = {s: encode_images(encoder, ds.images.cpu()) for s, ds in (("train", train_set), ("val", val_set))}
    pca = None
    if rep.pca_dim is not None:
        pca = PCAWhitener().fit(emb["train"], dim=int(rep.pca_dim), whiten=bool(rep.whiten))
    vectors = {s: (pca.transform(e) if pca is not None else e).float().contiguous() for s, e in emb.items()}

    out_dir.mkdir(parents=True, exist_ok=True)
    if pca is not None:
        pca.save(out_dir / "pca.safetensors")
    save_extra_file(out_dir / "vectors.safetensors", {s: {k: v for k in keys} for s, v in vectors.items()}, fp)
    summary = {
        "encoder_dir": enc_cfg.out_dir,
        "cached": bool(enc_metrics.get("cached", False)),
        "encoder_val_recall": {k: v for k, v in enc_metrics.items() if k.startswith("recall@")},
        "embed_dim": int(emb["train"].shape[1]),
        "dim": int(vectors["train"].shape[1]),
        "pca_explained_variance_ratio": (float(pca.explained_variance.sum() / emb["train"].double().var(0).sum())
                                         if pca is not None else None),
    }
    write_text(out_dir / "encoder.json", json.dumps(summary, indent=1))
    return RepresentationData(encoder, pca, vectors, emb, fp, summary)


# --- sampling helpers --------------------------------------------------------------------------
@torch.no_grad()
def _generate(model, schedule, cfg: DictConfig, task: str, n: int, generator: torch.Generator,
              known_fn: Optional[Callable[[int, int], Dict[str, Any]]] = None, guidance: float = 1.0):
    """``n`` samples of ``task`` in ``eval.batch_size`` batches: (images (n, C, H, W) on the CPU,
    {name: (n, ...) read-outs on the CPU})."""
    from .diffusion import sample

    images, aux = [], {}
    for start in range(0, n, cfg.eval.batch_size):
        b = min(cfg.eval.batch_size, n - start)
        known = known_fn(start, b) if known_fn is not None else None
        out = sample(model, schedule, task, batch_size=b, known=known, scheduler=cfg.eval.sampler.value,
                     num_steps=cfg.eval.steps, guidance_scale=guidance if known else 1.0, generator=generator)
        images.append(out.image.float().cpu())
        for k, v in out.aux.items():
            if torch.is_tensor(v):
                aux.setdefault(k, []).append(v.float().cpu() if v.is_floating_point() else v.cpu())
    return torch.cat(images), {k: torch.cat(v) for k, v in aux.items()}


@torch.no_grad()
def replacement_inpaint(model, schedule, x0: torch.Tensor, mask: torch.Tensor, sampler: str, steps: int,
                        generator: torch.Generator) -> torch.Tensor:
    """Inpaint with a model that has no auxiliary modality, by replacement (Song et al. 2021;
    RePaint without resampling): before every denoiser call the visible pixels of ``y_t`` are
    overwritten by a fresh forward draw ``a_t x0 + σ_t ε`` of the known image.

    x0: (B, C, H, W) the known image (masked pixels ignored); mask: (B, 1, H, W), 1 = visible.
    Returns (B, C, H, W) in [-1, 1], the visible pixels pasted back.
    """
    from diffusers.utils.torch_utils import randn_tensor

    from .diffusion import make_scheduler

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
        y = mask * schedule.q_sample(x0, None, t, noise) + (1 - mask) * y
        pred = model(y, torch.full((B,), t, dtype=torch.long, device=x0.device)).image.float()
        y = sched.step(pred, t, y, generator=generator).prev_sample
    return (mask * x0 + (1 - mask) * y).clamp(-1, 1)


def standalone_modality(cfg: DictConfig, kind: str, image_shape):
    """The arm's modality of ``kind`` rebuilt outside a model, for its data-side methods only
    (``random_mask``, ``make_source``): every arm then sees the same masks and sources."""
    import heads

    from .config import backbone_kwargs

    i = _modality_index(cfg, kind)
    m = to_container(cfg)["modalities"][i]
    p = int(backbone_kwargs(cfg).get("patch_size", 1))
    return heads.build_modality(kind, name=m["name"], image_shape=tuple(image_shape), hidden_size=8, patch_size=p,
                                weight=m["weight"], loss_weight=m["loss_weight"], **m["options"])


# --- per-setting evaluation ----------------------------------------------------------------------
@dataclass
class Context:
    """What every arm is evaluated against: the data, its conditioning inputs, the judges."""

    setting: Setting
    train_set: Any
    val_set: Any
    info: Any
    val_images: torch.Tensor  # (n_cond, C, H, W)
    val_labels: torch.Tensor  # (n_cond,)
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)  # masks, sources, vectors of the n_cond items
    rep: Optional[RepresentationData] = None
    source_view: Any = None  # the source modality's built-in transform (image_transition)
    data_panels: List[Tuple[str, torch.Tensor]] = field(default_factory=list)
    reference: Dict[str, Any] = field(default_factory=dict)


def _metric_seed(cfg: DictConfig, k: int) -> int:
    # One generator per metric, seeded alike in every arm: arms start from the same noise.
    return int(cfg.run.seed) * 1000 + 17 * k + 1


def build_context(exp: Experiment, device: torch.device) -> Context:
    """The shared evaluation inputs of an experiment (and, for representations, ``r`` itself)."""
    from .data import build_datasets, iter_batches

    spec = exp.spec
    cfg = next(iter(exp.arms.values()))
    train_set, val_set, info = build_datasets(cfg.data)
    n = min(int(spec.n_cond), len(val_set))
    if n < 1:
        raise DataError("the val split is empty: the experiment metrics need val items (data.val_fraction)")
    batches = list(iter_batches(val_set, max(n, 1)))
    val_images, val_labels = batches[0]["image"][:n].cpu().float(), batches[0]["label"][:n].cpu()
    ctx = Context(spec.setting, train_set, val_set, info, val_images, val_labels)
    g = max(1, min(int(spec.grid), n))
    ctx.data_panels.append(("val images", val_images[:g]))
    kind = SETTING_KIND[spec.setting]
    owner = next(c for c in exp.arms.values() if _modality_index(c, kind) is not None)

    if spec.setting is Setting.joint_image_representation:
        keys = sorted({c.modalities[i].name for c in exp.arms.values() if (i := _modality_index(c, kind)) is not None})
        ctx.rep = prepare_representation(spec, owner, train_set, val_set, info, vectors_path(exp.out_dir).parent, keys)
        ctx.extras["representation"] = ctx.rep.vectors["val"][:n]
        # The ceiling of the retrieval metric: the same Recall@K for the real val images.
        from . import metrics as M

        for k in spec.recall_k:
            ctx.reference[f"real_val_recall@{k}"] = M.retrieval_recall_at_k(
                ctx.rep.embeddings["val"], val_set.labels.cpu(), ctx.rep.embeddings["train"], train_set.labels.cpu(), k)
    elif spec.setting is Setting.masked_image:
        mod = standalone_modality(owner, kind, info.image_shape)
        gen = torch.Generator().manual_seed(_metric_seed(cfg, 0))
        mask = mod.random_mask(n, torch.device("cpu"), gen)  # (n, 1, H, W), 1 = visible
        ctx.extras["mask"] = mask
        ctx.data_panels.append(("masked inputs", (val_images * mask)[:g]))
    elif spec.setting is Setting.image_transition:
        mod = standalone_modality(owner, kind, info.image_shape)
        ctx.extras["source"] = mod.make_source(val_images).float()
        ctx.source_view = mod  # its make_source is the built-in view, for the paired-consistency metric
        ctx.data_panels.append(("val sources", ctx.extras["source"][:g]))
    return ctx


@torch.no_grad()
def setting_metrics(model, schedule, cfg: DictConfig, spec: DictConfig, ctx: Context, device: torch.device):
    """The per-setting metrics of one arm (module docstring) and its sample panels for ``samples.png``:
    ``(metrics, [(title, images (N, C, H, W))])``."""
    from . import metrics as M

    out: Dict[str, Any] = {}
    panels: List[Tuple[str, torch.Tensor]] = []
    if model.image_head is None:
        return out, panels  # a label-only baseline: nothing to generate
    grid, n = int(spec.grid), ctx.val_images.shape[0]
    kind = SETTING_KIND[ctx.setting]
    name = model.modality_of_kind(kind)
    gen = lambda k: torch.Generator(device=device).manual_seed(_metric_seed(cfg, k))  # noqa: E731

    # --- joint samples: the figure, and the pair-consistency metrics ------------------------------
    # (evaluate's own joint samples give FID; these are few, seeded alike in every arm)
    n_joint = int(spec.n_joint) if name is not None and kind in ("representation", "source_image") else 0
    joint, joint_aux = _generate(model, schedule, cfg, "joint", max(n_joint, grid), gen(1))
    panels.append(("joint samples", joint[:grid]))
    if name is not None and kind == "representation":
        _, r_img = ctx.rep.read(joint[:n_joint])
        out["joint_representation_cosine"] = M.cosine(joint_aux[name][:n_joint], r_img)
    if name is not None and kind == "source_image":
        src_of_target = ctx.source_view.make_source(joint[:n_joint]).float()
        out["pair_consistency_mse"] = M.mse(joint_aux[name][:n_joint].clamp(-1, 1), src_of_target)

    # --- conditional generation from the val items ------------------------------------------------
    def known(value: torch.Tensor):
        return lambda start, b: {name: value[start:start + b].to(device)}

    if kind == "label" and name is not None:
        K = model.modalities[name].num_classes
        cond = torch.arange(grid) % K
        images, _ = _generate(model, schedule, cfg, "class_to_image", grid, gen(2), known(cond), cfg.eval.guidance)
        panels.append(("class→image (classes 0,1,2,...)", images))
    elif kind == "representation" and name is not None:
        r = ctx.extras["representation"]
        images, _ = _generate(model, schedule, cfg, "representation_to_image", n, gen(2), known(r), cfg.eval.guidance)
        emb, r_img = ctx.rep.read(images)
        out["representation_to_image/cosine"] = M.cosine(r_img, r)
        for k in spec.recall_k:
            out[f"representation_to_image/recall@{k}"] = M.retrieval_recall_at_k(
                emb, ctx.val_labels, ctx.rep.embeddings["train"], ctx.train_set.labels.cpu(), k)
        panels.append(("representation→image (val r)", images[:grid]))
    elif kind == "masked_image" and (name is not None or len(model.modalities) == 0):
        mask, x = ctx.extras["mask"], ctx.val_images
        if name is not None:  # the multi-task model: the masked image drives the drift (§3)
            masked = {"image": x * mask, "mask": mask}

            def known_masked(start, b):
                return {name: {k: v[start:start + b].to(device) for k, v in masked.items()}}

            images, _ = _generate(model, schedule, cfg, "inpaint", n, gen(2), known_masked, cfg.eval.guidance)
            how = "drift"
        else:  # an image-only model: replacement
            g2, parts = gen(2), []
            for start in range(0, n, cfg.eval.batch_size):
                sl = slice(start, start + cfg.eval.batch_size)
                parts.append(replacement_inpaint(model, schedule, x[sl].to(device), mask[sl].to(device),
                                                 cfg.eval.sampler.value, cfg.eval.steps, g2).cpu())
            images, how = torch.cat(parts), "replacement"
        out["inpaint/masked_mse"] = M.masked_mse(images, x, 1 - mask)
        out["inpaint/masked_psnr"] = M.masked_psnr(images, x, 1 - mask)
        out["inpaint/method"] = how
        panels.append((f"inpainted ({how})", images[:grid]))
    elif kind == "source_image" and name is not None:
        src, x = ctx.extras["source"], ctx.val_images
        images, _ = _generate(model, schedule, cfg, "transition", n, gen(2), known(src), cfg.eval.guidance)
        out["transition/mse"] = M.mse(images, x)
        out["transition/psnr"] = M.psnr(images, x)
        panels.append(("source→target (val sources)", images[:grid]))
    return out, panels


def table_rows(setting: Setting, spec: DictConfig, arms: Dict[str, DictConfig]) -> List[Tuple[str, str, str]]:
    """The rows of the results table: ``(metric key, label, better)`` with better = lower|higher."""
    kind = SETTING_KIND[setting]
    names = sorted({c.modalities[i].name for c in arms.values() if (i := _modality_index(c, kind)) is not None})
    m = names[0] if names else kind
    rows = [("fid", "FID (reference-classifier features)", "lower"),
            ("bits_per_dim", "bits/dim (bound on -log p(image, aux) per image dim)", "lower")]
    if setting is Setting.joint_image_label:
        rows += [("label_accuracy", "image→label accuracy (val)", "higher"),
                 ("joint_consistency", "joint samples: label = classifier(image)", "higher"),
                 ("class_conditional_accuracy", "class→image accuracy (reference classifier)", "higher")]
    elif setting is Setting.joint_image_representation:
        rows += [("joint_representation_cosine", "joint samples: cos(r̂, encoder(image))", "higher"),
                 ("representation_to_image/cosine", "r→image: cos(r, encoder(image))", "higher")]
        rows += [(f"representation_to_image/recall@{k}", f"r→image retrieval Recall@{k} (train gallery)", "higher")
                 for k in spec.recall_k]
        rows += [(f"image_to_{m}/cosine", "image→r cosine (val)", "higher"),
                 (f"image_to_{m}/mse", "image→r MSE (val)", "lower")]
    elif setting is Setting.masked_image:
        rows += [("inpaint/masked_mse", "inpainting MSE, masked region (val)", "lower"),
                 ("inpaint/masked_psnr", "inpainting PSNR dB, masked region (val)", "higher"),
                 (f"image_to_{m}/masked_mse", "head reconstruction MSE, masked region (val)", "lower"),
                 (f"image_to_{m}/masked_psnr", "head reconstruction PSNR dB, masked region (val)", "higher")]
    else:
        rows += [("transition/mse", "source→target MSE (val)", "lower"),
                 ("transition/psnr", "source→target PSNR dB (val)", "higher"),
                 (f"image_to_{m}/mse", "target→source MSE, head (val)", "lower"),
                 (f"image_to_{m}/psnr", "target→source PSNR dB, head (val)", "higher"),
                 ("pair_consistency_mse", "joint pairs: MSE(source, transform(target))", "lower")]
    return rows


# --- outputs -----------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def results_markdown(results: Dict[str, Any]) -> str:
    """``results.md``: the table (rows = metrics with ↓/↑, columns = arms) and the context numbers."""
    arms = list(results["arms"])
    lines = [f"# {results['experiment']} ({results['setting']})", "",
             f"Config `{results['config']}`" + (f", overrides `{' '.join(results['overrides'])}`" if results["overrides"] else "")
             + f"; {results['train_steps']} training steps per arm, seed {results['seed']}.", "",
             "| metric | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for row in results["table"]:
        arrow = "↓" if row["better"] == "lower" else "↑"
        lines.append(f"| {row['label']} {arrow} | " + " | ".join(_fmt(row["values"].get(a)) for a in arms) + " |")
    lines += ["", "↓ lower is better, ↑ higher is better; — : the arm has no such output."]
    if results.get("context"):
        lines += ["", "Context:", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in results["context"].items()]
    notes = {a: r["metrics"].get("inpaint/method") for a, r in results["arms"].items() if r["metrics"].get("inpaint/method")}
    if notes:
        lines += ["", "Inpainting method per arm: " + ", ".join(f"{a}: {m}" for a, m in notes.items()) + "."]
    return "\n".join(lines) + "\n"


def plot_samples(data_panels, arm_panels: Dict[str, List[Tuple[str, torch.Tensor]]], path: Path) -> None:
    """``samples.png``: one row for the data, then one row per arm, one column per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    rows = [("data", data_panels)] + list(arm_panels.items())
    ncols = max(1, max(len(p) for _, p in rows))
    fig, axes = plt.subplots(len(rows), ncols, figsize=(3.2 * ncols, 3.4 * len(rows)), squeeze=False)
    for r, (row_name, panels) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(panels):
                ax.axis("off")
                if c == 0:
                    ax.text(0.5, 0.5, f"{row_name}: no images", ha="center", va="center", transform=ax.transAxes)
                continue
            title, images = panels[c]
            grid = image_grid(images).permute(1, 2, 0).numpy()
            ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(row_name, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_metrics(results: Dict[str, Any], path: Path) -> None:
    """``metrics.png``: one bar chart per table row with at least one value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results["arms"])
    rows = [r for r in results["table"] if any(isinstance(r["values"].get(a), (int, float)) for a in arms)]
    n = max(1, len(rows))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ax in enumerate(axes.flat):
        if i >= len(rows):
            ax.axis("off")
            continue
        row = rows[i]
        vals = [row["values"].get(a) for a in arms]
        heights = [v if isinstance(v, (int, float)) and math.isfinite(v) else 0.0 for v in vals]
        ax.bar(range(len(arms)), heights, color=[colours[j % len(colours)] for j in range(len(arms))])
        for j, v in enumerate(vals):
            ax.text(j, heights[j], _fmt(v), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(arms)), arms, fontsize=8)
        ax.set_title(f"{row['label']} {'↓' if row['better'] == 'lower' else '↑'}", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# --- the runner --------------------------------------------------------------------------------
def _yaml_value(v: Any) -> str:
    """A value as omegaconf's override grammar reads it back."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_yaml_value(x) for x in v) + "]"
    return json.dumps(str(v))


_TRAINING_SECTIONS = ("data", "model", "diffusion", "modalities", "image_head", "train")


def _is_trained(cfg: DictConfig, run_dir: Path) -> bool:
    """The arm's final model exists and was trained with this config (seed and training sections)."""
    from .config import load_config, resolve_with_data
    from .data import build_datasets

    if not (run_dir / "model" / "config.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    try:
        saved = to_container(load_config(run_dir / "config.yaml"))
    except ConfigError:
        return False
    _, _, info = build_datasets(cfg.data)
    new = to_container(resolve_with_data(cfg, info))
    return saved["run"]["seed"] == new["run"]["seed"] and all(saved[k] == new[k] for k in _TRAINING_SECTIONS)


def run_experiment(config_path: str | os.PathLike, overrides: Sequence[str] = ()) -> Path:
    """Train and evaluate every arm of an experiment; write the results; return the experiment folder.

    Rerunning the same command resumes: trained arms are not retrained (module docstring).
    """
    from .checkpoint import load_model
    from .config import build_schedule
    from .evaluate import evaluate
    from .train import train

    exp = load_experiment(config_path, overrides)
    spec = exp.spec
    device = torch.device(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    exp.out_dir.mkdir(parents=True, exist_ok=True)
    write_text(exp.out_dir / "base.yaml", yaml.safe_dump(exp.base, sort_keys=False))

    ctx = build_context(exp, device)
    if ctx.rep is not None:  # the vectors are written now: the representation arms read them as data
        exp = replace(exp, arms=with_representation_file(exp))

    results: Dict[str, Any] = {
        "experiment": spec.name, "setting": spec.setting.value, "config": str(exp.path), "overrides": list(overrides),
        "train_steps": int(next(iter(exp.arms.values())).train.steps),
        "seed": int(next(iter(exp.arms.values())).run.seed), "arms": {}, "table": [], "context": {},
    }
    arm_panels: Dict[str, List[Tuple[str, torch.Tensor]]] = {}
    for arm, cfg in exp.arms.items():
        run_dir = Path(cfg.run.dir)
        t0 = time.time()
        trained_now = not _is_trained(cfg, run_dir)
        if trained_now:
            train(cfg)
        t1 = time.time()
        eval_overrides = [f"eval.{k}={_yaml_value(v)}" for k, v in to_container(cfg)["eval"].items()]
        metrics = evaluate(run_dir, eval_overrides, device=str(device), seed=int(cfg.run.seed))
        model = load_model(run_dir, device)
        extra, panels = setting_metrics(model, build_schedule(cfg), cfg, spec, ctx, device)
        del model
        metrics.update(extra)
        arm_panels[arm] = panels
        results["arms"][arm] = {"run_dir": str(run_dir), "trained_now": trained_now, "metrics": metrics,
                                "seconds": {"train": round(t1 - t0, 1), "evaluate": round(time.time() - t1, 1)}}

    for key, label, better in table_rows(spec.setting, spec, exp.arms):
        values = {}
        for arm, r in results["arms"].items():
            v = r["metrics"].get(key)
            values[arm] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
        results["table"].append({"key": key, "label": label, "better": better, "values": values})
    for arm, r in results["arms"].items():  # properties of the data and the judge, equal in every arm
        for key in ("fid_floor", "reference_accuracy"):
            if key in r["metrics"] and key not in results["context"]:
                results["context"][key] = r["metrics"][key]
    results["context"].update(ctx.reference)
    if ctx.rep is not None:
        results["context"].update({f"encoder_{k}": v for k, v in ctx.rep.info["encoder_val_recall"].items()})
        results["context"]["representation_dim"] = ctx.rep.info["dim"]

    write_text(exp.out_dir / "results.json", json.dumps(results, indent=1))
    write_text(exp.out_dir / "results.md", results_markdown(results))
    plot_samples(ctx.data_panels, arm_panels, exp.out_dir / "samples.png")
    plot_metrics(results, exp.out_dir / "metrics.png")
    return exp.out_dir
