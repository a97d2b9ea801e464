"""A diffusers pipeline over a trained model: every task of DESIGN.md §3 from a folder, without the run's YAML.

    pipe = UnifiedDiffusionPipeline.from_pretrained("runs/joint_image_label/model").to("cuda")
    out = pipe.class_to_image([3, 1, 4], generator=torch.Generator("cuda").manual_seed(0))
    out.images            # a list of PIL images (output_type="pil"); "np", "pt", "latent" as diffusers
    out.arrays["labels"]  # the sample-file arrays: "images" uint8 N×H×W×C and each modality's npz_key

What a folder holds, and why this layout
---------------------------------------

``RUN_DIR/model/`` (written by :func:`unidiff.checkpoint.export_model`) stays the flat
``UnifiedModel.save_pretrained`` folder it always was, so ``UnifiedModel.from_pretrained(RUN_DIR/"model")``
and every older caller keep working, and it gains two small files::

    config.json, diffusion_pytorch_model.safetensors   the UnifiedModel (weights, model config, prediction)
    scheduler_config.json                              a diffusers scheduler: the betas (beta_schedule,
                                                       beta_start/end, num_train_timesteps), prediction_type,
                                                       and the default solver (its class: DDIM, DDPM, DPM-Solver++)
    sampling.json                                      ours (:class:`SamplingSettings`): γ of the drift
                                                       κ_t = γ a_t σ_t (§1) and the default sampler settings

``scheduler_config.json`` is the file name diffusers' own ``SchedulerMixin.from_pretrained`` reads, so
``DDIMScheduler.from_pretrained(RUN_DIR/"model")`` works on it too: the folder is at the same time a
model folder and a scheduler folder, as a diffusers user would look for them. γ and the sampler
settings have no diffusers home, so they are one plain JSON file of ours.

:meth:`UnifiedDiffusionPipeline.save_pretrained` writes the standard diffusers pipeline layout
instead (``model_index.json`` with ``model/`` and ``scheduler/`` subfolders; γ and the settings live in
``model_index.json`` as the pipeline's ``sampling`` argument, as diffusers stores non-module
arguments). :meth:`~UnifiedDiffusionPipeline.from_pretrained` reads either layout, and a run folder
(``RUN_DIR``): its ``model/``, or for runs exported before these files existed (or not exported yet:
the latest checkpoint's EMA weights) the run's ``config.yaml``, which gives the same values.

Sampler defaults (``sampling.json``, from the run's config at export)
--------------------------------------------------------------------

- ``num_inference_steps``/``num_images``: ``sample.steps``/``sample.n``; the solver is the scheduler's
  class (``sample.sampler``). Swap it as in diffusers:
  ``pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``.
- ``t_read``/``num_draws``/``read_batch_size``: ``eval.t_read``/``eval.num_draws``/``eval.batch_size``,
  the image→aux read-out the evaluation reports.
- ``guidance_scale``/``classifier_scale``: per conditional (generate) task. A conditional task samples
  as ``unidiff evaluate`` measured it: ``eval.guidance``/``eval.classifier_scale`` (the class→image
  accuracy of the main job is reported at ``eval.guidance: 2.0``). ``sample.guidance`` /
  ``sample.classifier_scale`` override them when set away from their unguided schema defaults
  (1.0 / 0.0). The joint and read tasks take no guidance.

The pipeline runs :func:`unidiff.diffusion.sample` (it re-implements nothing); with the same
generator every method returns exactly what ``sample`` returns. Task names are those of
:func:`heads.modality_tasks` (one method per built-in task; ``pipe(task, ...)`` for any task,
including those of a custom modality kind). Progress bars (steps, with images/s) follow
``set_progress_bar_config``; by default they show only on a terminal (tqdm's ``disable=None``), so
logs and notebooks stay quiet.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.distributed_utils import is_torch_dist_rank_zero
from tqdm.auto import tqdm

import heads

from .choices import Sampler
from .diffusion import DriftSchedule, make_scheduler, sample
from .errors import CheckpointError, ConfigError, DataError
from .io import write_text
from .modality import images_from_array, images_to_uint8
from .model import UnifiedModel

SAMPLING_FILE = "sampling.json"
SCHEDULER_FILE = SchedulerMixin.config_name  # "scheduler_config.json": diffusers' own file name
SCHEDULER_CLASSES = {Sampler.ddpm: DDPMScheduler, Sampler.ddim: DDIMScheduler, Sampler.dpm: DPMSolverMultistepScheduler}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Scheduler config keys that the drift schedule and the model fix (make_scheduler sets them).
_SCHEDULE_KEYS = ("num_train_timesteps", "trained_betas", "beta_schedule", "beta_start", "beta_end", "prediction_type")


# --- sampler settings ------------------------------------------------------------------------------
@dataclass
class SamplingSettings:
    """γ and the default sampler settings of a model folder (``sampling.json``); see the module docstring.

    ``guidance_scale``/``classifier_scale``: per conditional task name; a task not listed samples
    unguided (1.0 / 0.0).
    """

    gamma: float = 1.0
    num_inference_steps: int = 50
    num_images: int = 64
    t_read: int = 50
    num_draws: int = 4
    read_batch_size: int = 250
    guidance_scale: Dict[str, float] = field(default_factory=dict)
    classifier_scale: Dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "SamplingSettings":
        """Checked: unknown keys and wrong types are a one-line ConfigError naming ``where`` and the key."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        bad = sorted(set(data) - set(known))
        if bad:
            raise ConfigError(f"{where}: unknown key {bad[0]!r}; expected {list(known)}")
        out = {}
        for key, value in data.items():
            try:
                if key in ("guidance_scale", "classifier_scale"):
                    if not isinstance(value, dict):
                        raise TypeError(value)
                    out[key] = {str(k): float(v) for k, v in value.items()}
                elif known[key].type in ("int", int):
                    if isinstance(value, bool) or int(value) != value:
                        raise TypeError(value)
                    out[key] = int(value)
                else:
                    out[key] = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: {key} has the wrong type: {value!r}") from None
        return cls(**out)

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike]) -> "SamplingSettings":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{str(path)!r} cannot be read: {str(err).splitlines()[0]}") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def guidance_for(self, task: str) -> float:
        return float(self.guidance_scale.get(task, 1.0))

    def classifier_for(self, task: str) -> float:
        return float(self.classifier_scale.get(task, 0.0))


def _model_tasks(model) -> Dict[str, Any]:
    """The task table restricted to the kinds of ``model``'s modalities."""
    kinds = {m.kind for m in model.modalities.values()}
    return {name: spec for name, spec in heads.modality_tasks().items() if spec.kind in kinds}


def sampling_settings(cfg, model) -> SamplingSettings:
    """The settings of a resolved run config for ``model`` (its modalities give the conditional tasks)."""
    s, ev = cfg.sample, cfg.eval
    # Conditional tasks sample as the evaluation measured them, unless sample.* asks otherwise.
    guidance = float(s.guidance) if float(s.guidance) != 1.0 else float(ev.guidance)
    classifier = float(s.classifier_scale) if float(s.classifier_scale) != 0.0 else float(ev.classifier_scale)
    generate = [name for name, spec in _model_tasks(model).items() if spec.action == "generate"]
    return SamplingSettings(
        gamma=float(cfg.diffusion.gamma), num_inference_steps=int(s.steps), num_images=int(s.n),
        t_read=int(ev.t_read), num_draws=int(ev.num_draws), read_batch_size=int(ev.batch_size),
        guidance_scale={t: guidance for t in generate}, classifier_scale={t: classifier for t in generate})


def scheduler_for(cfg) -> SchedulerMixin:
    """The run's default solver (``sample.sampler``) as a diffusers scheduler on the run's betas.

    Written with the named beta schedule (readable, the diffusers way); should diffusers ever compute
    other betas from the name than the drift schedule holds, the exact betas are written instead.
    """
    from .config import build_schedule

    d, schedule = cfg.diffusion, build_schedule(cfg)
    sched = make_scheduler(cfg.sample.sampler.value, schedule, cfg.model.prediction.value, trained_betas=None,
                           beta_schedule=d.beta_schedule.value, beta_start=float(d.beta_start), beta_end=float(d.beta_end))
    if not torch.equal(sched.betas.double(), schedule.betas):
        sched = make_scheduler(cfg.sample.sampler.value, schedule, cfg.model.prediction.value)
    return sched


def write_sampling_files(folder: Union[str, os.PathLike], cfg, model) -> None:
    """``scheduler_config.json`` + ``sampling.json`` of a run config into a model folder."""
    folder = Path(folder)
    write_text(folder / SCHEDULER_FILE, scheduler_for(cfg).to_json_string())
    write_text(folder / SAMPLING_FILE, json.dumps(sampling_settings(cfg, model).to_dict(), indent=1) + "\n")


def load_scheduler(folder: Union[str, os.PathLike]) -> SchedulerMixin:
    """The scheduler of ``folder/scheduler_config.json`` (one of the solvers ``unidiff`` samples with)."""
    path = Path(folder) / SCHEDULER_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{str(path)!r} cannot be read: {str(err).splitlines()[0]}") from None
    classes = {cls.__name__: cls for cls in SCHEDULER_CLASSES.values()}
    cls = classes.get(config.get("_class_name"))
    if cls is None:
        raise CheckpointError(f"{str(path)!r}: _class_name {config.get('_class_name')!r} is not one of {list(classes)}")
    return cls.from_config(config)


def sampler_of(scheduler) -> str:
    """The ``Sampler`` name of a scheduler object (the class decides: DDPM, DDIM or DPM-Solver)."""
    for name, cls in SCHEDULER_CLASSES.items():
        if type(scheduler) is cls:
            return name.value
    raise ConfigError(f"pipeline scheduler {type(scheduler).__name__} is not one of "
                      f"{[c.__name__ for c in SCHEDULER_CLASSES.values()]}")


# --- inputs and outputs --------------------------------------------------------------------------------
@dataclass
class UnifiedPipelineOutput(BaseOutput):
    """images: as ``output_type`` asked (PIL list, NHWC float numpy in [0, 1], NCHW tensor in [0, 1],
    or ``"latent"``: the raw (B, C, H, W) sample in S, [-1, 1]); for a read task the given images.
    aux: {modality name: value}: the generated or read values (a label's (B,) classes), and the
    known ones passed through. arrays: the sample-file arrays: ``images`` uint8 N×H×W×C and, per
    modality involved (first of a key wins), its ``to_array`` under its ``npz_key``."""

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]
    aux: Dict[str, Any] = field(default_factory=dict)
    arrays: Dict[str, np.ndarray] = field(default_factory=dict)


def to_pil(images: torch.Tensor) -> List[PIL.Image.Image]:
    """(N, C, H, W) in [-1, 1] -> N PIL images (C = 1: mode "L", C = 3: "RGB")."""
    arr = images_to_uint8(images)  # (N, H, W, C)
    if arr.shape[-1] not in (1, 3):
        raise ConfigError(f"output_type='pil' needs 1 or 3 channels, the images have {arr.shape[-1]}; use 'np' or 'pt'")
    return [PIL.Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def postprocess(images: torch.Tensor, output_type: str):
    """(N, C, H, W) in [-1, 1] as diffusers' output types (see :class:`UnifiedPipelineOutput`)."""
    if output_type == "latent":
        return images
    if output_type == "pil":
        return to_pil(images)
    x = ((images.float() + 1.0) / 2.0).clamp(0, 1)
    if output_type == "pt":
        return x
    if output_type == "np":
        return x.permute(0, 2, 3, 1).cpu().numpy()
    raise ConfigError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")


def as_images(images: Any, shape: Sequence[int], device) -> torch.Tensor:
    """Images as (N, C, H, W) float in [-1, 1] on ``device``, from what the output types give: a
    tensor of that layout in [-1, 1] (``"latent"``), a PIL image or list of them (``"pil"``), a numpy
    N×H×W×C array, uint8 or float in [0, 1] (``"np"``, diffusers' convention)."""
    if torch.is_tensor(images):
        x = images if images.ndim == 4 else images[None]
        if tuple(x.shape[1:]) != tuple(shape):
            raise DataError(f"images: expected (N, {', '.join(map(str, shape))}), got {tuple(images.shape)}")
        return x.float().to(device)
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], PIL.Image.Image):
        mode = "L" if shape[0] == 1 else "RGB"
        images = np.stack([np.asarray(im.convert(mode)) for im in images])
    arr = np.asarray(images)
    if arr.dtype.kind == "f":
        if arr.size and not (arr.min() >= 0 and arr.max() <= 1):
            raise DataError(f"images: a float numpy array must be in [0, 1] (output_type='np'), got "
                            f"[{arr.min():.3g}, {arr.max():.3g}]")
        arr = arr * 2.0 - 1.0  # [0, 1] -> the model's [-1, 1]
    return images_from_array(arr, "images", tuple(shape)).to(device)


def _to_device(value: Any, device) -> Any:
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value.to(device) if torch.is_tensor(value) else value


# --- the pipeline ------------------------------------------------------------------------------------
class UnifiedDiffusionPipeline(DiffusionPipeline):
    """The tasks of DESIGN.md §3 on a :class:`UnifiedModel` (see the module docstring).

    Args:
        model: the trained model. scheduler: a DDPM, DDIM or DPM-Solver scheduler on the training
            betas (its class is the default solver). sampling: :class:`SamplingSettings` as a dict
            (γ and the defaults).
    """

    model_cpu_offload_seq = "model"

    def __init__(self, model: UnifiedModel, scheduler: SchedulerMixin, sampling: Optional[Dict[str, Any]] = None):
        super().__init__()
        settings = sampling if isinstance(sampling, SamplingSettings) else SamplingSettings.from_dict(
            dict(sampling or {}), "pipeline sampling settings")
        self.register_modules(model=model, scheduler=scheduler)
        self.register_to_config(sampling=settings.to_dict())
        self._schedule_cache = None

    # --- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs):
        """A pipeline folder (``model_index.json``, diffusers' loader), a model folder (``RUN_DIR/model``)
        or a run folder; see the module docstring."""
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir() or (path / cls.config_name).is_file():
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if kwargs:
            raise ConfigError(f"from_pretrained of a model or run folder takes no options, got {sorted(kwargs)}")
        if (path / "config.json").is_file() and (path / SCHEDULER_FILE).is_file():
            return cls.from_model_folder(path)
        if (path / "config.json").is_file() and (path.parent / "config.yaml").is_file():
            return cls.from_run(path.parent)  # a model/ exported before the schedule files existed
        return cls.from_run(path)

    @classmethod
    def from_model_folder(cls, folder: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu"):
        """A flat model folder: the UnifiedModel files + ``scheduler_config.json`` + ``sampling.json``."""
        folder = Path(folder)
        try:
            model = UnifiedModel.from_pretrained(str(folder))
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"model {str(folder)!r} cannot be loaded: {str(err).splitlines()[0]}") from None
        settings = SamplingSettings.from_file(folder / SAMPLING_FILE)
        model = model.to(device).eval().requires_grad_(False)
        return cls(model=model, scheduler=load_scheduler(folder), sampling=settings.to_dict())

    @classmethod
    def from_run(cls, run_dir: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu"):
        """The pipeline of a run folder: ``RUN_DIR/model`` with its schedule files; else the model
        :func:`unidiff.checkpoint.load_model` finds (``model/`` or the latest checkpoint's EMA weights)
        with the schedule and settings of the run's ``config.yaml``."""
        from .checkpoint import load_model
        from .evaluate import load_run_config

        run_dir = Path(run_dir)
        exported = run_dir / "model"
        if all((exported / f).is_file() for f in ("config.json", SCHEDULER_FILE, SAMPLING_FILE)):
            return cls.from_model_folder(exported, device)
        cfg = load_run_config(run_dir)
        model = load_model(run_dir, device)
        return cls(model=model, scheduler=scheduler_for(cfg), sampling=sampling_settings(cfg, model).to_dict())

    # --- what the tasks share -----------------------------------------------------------------------
    @property
    def sampling(self) -> SamplingSettings:
        return SamplingSettings.from_dict(dict(self.config.sampling), "pipeline sampling settings")

    @property
    def schedule(self) -> DriftSchedule:
        """The drift schedule (§1): the scheduler's betas and γ."""
        key = (id(self.scheduler), self.sampling.gamma)
        if self._schedule_cache is None or self._schedule_cache[0] != key:
            self._schedule_cache = (key, DriftSchedule(self.scheduler.betas, gamma=self.sampling.gamma))
        return self._schedule_cache[1]

    def progress_bar(self, iterable=None, total=None, **defaults):
        """diffusers' progress bar, shown only on a terminal (tqdm's ``disable=None``) and on rank 0,
        unless ``set_progress_bar_config`` says otherwise; ``defaults`` (``desc``, ``unit``) give way
        to that config too."""
        config = {"disable": None if is_torch_dist_rank_zero() else True, **defaults,
                  **getattr(self, "_progress_bar_config", {})}
        return tqdm(iterable, total=total, **config)

    def resolve_task(self, task: str):
        """``(ModalityTask, modality name)`` of a task of :func:`heads.modality_tasks` on this model
        (``(None, None)`` for ``joint``); ConfigError for an unknown task or a model without its kind."""
        if task == "joint":
            return None, None
        table = heads.modality_tasks()
        if task not in table:
            raise ConfigError(f"task {task!r} is not one of {['joint', *table]}")
        spec = table[task]
        name = self.model.modality_of_kind(spec.kind)
        if name is None:
            kinds = sorted({m.kind for m in self.model.modalities.values()})
            raise ConfigError(f"task {task!r} needs a modality of kind {spec.kind!r}; the model has {kinds or 'none'}")
        return spec, name

    def _output(self, images: torch.Tensor, aux: Dict[str, Any], arrays: Dict[str, np.ndarray], output_type: str,
                return_dict: bool):
        out = postprocess(images, output_type)
        return UnifiedPipelineOutput(images=out, aux=aux, arrays=arrays) if return_dict else (out, aux)

    # --- the two kinds of task ----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, task: str = "joint", known: Optional[Dict[str, Any]] = None, *, batch_size: Optional[int] = None,
                 num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                 classifier_scale: Optional[float] = None, sampler: Optional[str] = None, eta: float = 0.0,
                 generator: Optional[torch.Generator] = None, output_type: str = "pil", return_dict: bool = True,
                 unknown_drift: str = "predicted"):
        """Images of ``task`` (``joint`` or a generate task) in one batch: :func:`unidiff.diffusion.sample`.

        known: ``{modality name: value}`` (a conditional task needs its modality's value).
        batch_size: joint only (default ``sampling.num_images``). sampler: ``ddpm``/``ddim``/``dpm``
        with make_scheduler's defaults, instead of the pipeline's scheduler. guidance_scale /
        classifier_scale: default the task's :class:`SamplingSettings`. unknown_drift: the drift of
        the modalities not in ``known``, ``predicted`` or ``null_encoding`` (DESIGN.md §3.3).
        """
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        spec, name = self.resolve_task(task)
        if spec is not None and spec.action != "generate":
            raise ConfigError(f"task {task!r} reads a modality off images: call pipe.read({task!r}, images)")
        if self.model.image_head is None:
            raise ConfigError(f"task {task!r} generates images; this model was trained with image_head=false")
        settings = self.sampling
        known = _to_device(dict(known or {}), self.device) or None
        if spec is not None and (known is None or name not in known):
            raise ConfigError(f"task {task!r} needs the value of modality {name!r}")
        steps = int(num_inference_steps or settings.num_inference_steps)
        guidance = settings.guidance_for(task) if guidance_scale is None else float(guidance_scale)
        cscale = settings.classifier_for(task) if classifier_scale is None else float(classifier_scale)
        if sampler is not None:
            scheduler, scheduler_kwargs = sampler, None
        else:  # the pipeline's scheduler: its class and its config, the betas being the schedule's
            scheduler = sampler_of(self.scheduler)
            # A config carried over by from_config may hold another class's keys: keep this class's own.
            accepted = inspect.signature(type(self.scheduler).__init__).parameters
            scheduler_kwargs = {k: v for k, v in self.scheduler.config.items()
                                if k in accepted and k not in _SCHEDULE_KEYS}
        batch = int(batch_size or settings.num_images) if known is None else None  # else: the known values'
        # Known values without a named task (pipe.generate("joint", known)) are the generic conditional task.
        sample_task = task if spec is not None else ("conditional" if known else "joint")

        with self.progress_bar(total=steps, desc=task, unit="step") as bar:
            t0 = time.perf_counter()

            def step(i, t, y_next, A_hat):
                bar.update(1)
                rate = y_next.shape[0] * (i + 1) / steps / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{rate:.1f} img/s", refresh=False)

            res = sample(self.model, self.schedule, sample_task, batch_size=batch, known=known,
                         scheduler=scheduler, num_steps=steps, guidance_scale=guidance if known else 1.0,
                         classifier_scale=cscale if known else 0.0,
                         classifier_modality=name if known else None, eta=eta,
                         generator=generator, scheduler_kwargs=scheduler_kwargs, callback=step,
                         unknown_drift=unknown_drift)
        arrays = {"images": images_to_uint8(res.image)}
        for m_name, m in self.model.modalities.items():  # the known values, and every generated modality
            array = m.to_array(res.aux[m_name]) if m.npz_key and m.npz_key not in arrays else None
            if array is not None:
                arrays[m.npz_key] = array
        return self._output(res.image, res.aux, arrays, output_type, return_dict)

    @torch.no_grad()
    def read(self, task: str, images: Any, *, batch_size: Optional[int] = None, t_read: Optional[int] = None,
             num_draws: Optional[int] = None, generator: Optional[torch.Generator] = None, output_type: str = "pil",
             return_dict: bool = True):
        """A read task: the task's modality read off ``images`` (§3 image→aux), in batches of
        ``batch_size`` (default ``sampling.read_batch_size``), one generator through all of them."""
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        spec, name = self.resolve_task(task)
        if spec is None or spec.action != "read":
            raise ConfigError(f"task {task!r} generates images: call pipe.generate({task!r}, ...)")
        settings = self.sampling
        x = as_images(images, self.model.image_shape, self.device)
        size = int(batch_size or settings.read_batch_size)
        t_read = settings.t_read if t_read is None else int(t_read)
        num_draws = settings.num_draws if num_draws is None else int(num_draws)
        parts = []
        with self.progress_bar(total=x.shape[0], desc=task, unit="img") as bar:
            for chunk in x.split(size):
                res = sample(self.model, self.schedule, task, image=chunk, name=name, t_read=t_read,
                             num_draws=num_draws, generator=generator)
                parts.append(res.aux[name])
                bar.update(chunk.shape[0])
        value = _cat(parts)
        mod = self.model.modalities[name]
        arrays = {"images": images_to_uint8(x)}
        array = mod.to_array(value) if mod.npz_key else None
        if array is not None:
            arrays[mod.npz_key] = array
        return self._output(x, {name: value}, arrays, output_type, return_dict)

    def __call__(self, task: str = "joint", *args, **kwargs):
        """Any task by name: a read task is :meth:`read` (``images``), the others :meth:`generate`."""
        spec, _ = self.resolve_task(task)
        if spec is not None and spec.action == "read":
            return self.read(task, *args, **kwargs)
        return self.generate(task, *args, **kwargs)

    # --- one method per built-in task (the names of heads.modality_tasks()) -------------------------------
    def joint(self, batch_size: Optional[int] = None, **kwargs):
        """``batch_size`` images with every auxiliary modality generated with them."""
        return self.generate("joint", batch_size=batch_size, **kwargs)

    def class_to_image(self, class_labels: Any, **kwargs):
        """Images of the given classes (an int, a list, an array or a (B,) tensor); drift guidance
        ``guidance_scale`` and classifier guidance ``classifier_scale`` default to the evaluation's."""
        _, name = self.resolve_task("class_to_image")
        labels = torch.as_tensor(np.asarray(class_labels), dtype=torch.long).reshape(-1)
        K = self.model.modalities[name].num_classes
        if labels.numel() == 0 or bool(((labels < 0) | (labels >= K)).any()):
            raise DataError(f"class_labels must be classes in [0, {K}), got {labels.tolist()}")
        return self.generate("class_to_image", {name: labels}, **kwargs)

    def representation_to_image(self, representations: Any, **kwargs):
        """Images from (B, K) representation vectors."""
        _, name = self.resolve_task("representation_to_image")
        r = torch.as_tensor(np.asarray(representations), dtype=torch.float32)
        return self.generate("representation_to_image", {name: r}, **kwargs)

    def inpaint(self, image: Any, mask: Any = None, generator: Optional[torch.Generator] = None, **kwargs):
        """Full images from ``image`` with ``mask`` ((B, 1, H, W) or (B, H, W), 1 = visible; default:
        random masks of the model's ratio, drawn from ``generator``)."""
        _, name = self.resolve_task("inpaint")
        batch = {"image": as_images(image, self.model.image_shape, self.device)}
        if mask is not None:
            batch["mask"] = torch.as_tensor(np.asarray(mask), dtype=torch.float32).to(self.device)
        value = self.model.modalities[name].from_batch(batch, generator=generator)
        return self.generate("inpaint", {name: value}, generator=generator, **kwargs)

    def transition(self, source: Any = None, image: Any = None, **kwargs):
        """Target images from ``source`` images ((B, C_src, H, W) in [-1, 1]), or from the built-in
        source view (the modality's transform) of ``image``."""
        _, name = self.resolve_task("transition")
        mod = self.model.modalities[name]
        if source is not None:
            value = mod.from_batch({name: as_images(source, (mod.source_channels, *self.model.image_shape[1:]), self.device)})
        elif image is not None:
            value = mod.from_batch({"image": as_images(image, self.model.image_shape, self.device)})
        else:
            raise ConfigError("transition needs source images (or target images whose built-in source view to use)")
        return self.generate("transition", {name: value}, **kwargs)

    def image_to_label(self, images: Any, **kwargs):
        """The label head read off images: ``aux[label]`` (B,) classes, ``arrays["labels"]``."""
        return self.read("image_to_label", images, **kwargs)

    def image_to_representation(self, images: Any, **kwargs):
        """The representation head read off images: (B, K) vectors."""
        return self.read("image_to_representation", images, **kwargs)

    def target_to_source(self, images: Any, **kwargs):
        """The source head read off target images: (B, C_src, H, W) in [-1, 1]."""
        return self.read("target_to_source", images, **kwargs)


def _cat(parts: list) -> Any:
    if isinstance(parts[0], dict):
        return {k: _cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)
