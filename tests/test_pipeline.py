"""unidiff/pipeline.py: a model folder that samples on its own, and the diffusers pipeline over it.

Oracles: diffusers' own scheduler loader and beta computation for the folder's schedule files, the
run's YAML (``build_schedule``) for the drift tables, :func:`unidiff.diffusion.sample` called by hand
for every task (the pipeline must return exactly its tensors with the same generator), PIL's pixels
and closed-form [-1, 1] -> [0, 1] maps for the output types.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

import heads
from unidiff.checkpoint import export_model, load_model
from unidiff.cli import main
from unidiff.config import build_model, build_schedule, load_config, resolve_with_data
from unidiff.data import build_datasets
from unidiff.diffusion import DriftSchedule, sample
from unidiff.errors import ConfigError, DataError, UnidiffError
from unidiff.evaluate import load_run_config
from unidiff.model import UnifiedModel
from unidiff.pipeline import SAMPLING_FILE, SCHEDULER_FILE, UnifiedDiffusionPipeline, UnifiedPipelineOutput

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")
EVAL_GUIDANCE = 2.5  # differs from sample.guidance (1.0): the default must be the evaluation's


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A debug run (label modality) trained two steps through the CLI, evaluated at guidance 2.5."""
    root = tmp_path_factory.mktemp("pipe")
    run_dir = root / "run"
    rc = main(["train", DEBUG, f"run.dir={run_dir}", "train.steps=2", "train.sample_every=0",
               f"eval.guidance={EVAL_GUIDANCE}", f"eval.cache_dir={root / 'cache'}"])
    assert rc == 0
    return run_dir


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """An untrained model folder with one modality of every built-in kind, exported with its config."""
    mods = ("modalities=[{name: label, kind: label}, {name: masked, kind: masked_image, options: {mask_ratio: 0.5}},"
            " {name: source, kind: source_image, options: {transform: invert}},"
            " {name: rep, kind: representation, options: {dim: 4}}]")
    cfg = load_config(DEBUG, [mods, "eval.guidance=1.5", "eval.classifier_scale=0.5"])
    _, _, info = build_datasets(cfg.data)
    cfg = resolve_with_data(cfg, info)
    torch.manual_seed(0)
    model = build_model(cfg, info.image_shape)
    folder = export_model(model.eval(), tmp_path_factory.mktemp("multi") / "model", run_config=cfg)
    return folder, cfg


def images_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=gen(seed)) * 2 - 1


# --- the model folder ---------------------------------------------------------------------------------
def test_model_folder_holds_the_schedule_and_the_sampler_settings(run):
    folder = run / "model"
    cfg = load_run_config(run)
    # diffusers' own loader reads the scheduler, and its betas are diffusers' betas of the run's schedule.
    sched = DDIMScheduler.from_pretrained(folder)
    ref = DDPMScheduler(num_train_timesteps=cfg.diffusion.num_train_timesteps, beta_schedule=cfg.diffusion.beta_schedule.value,
                        beta_start=cfg.diffusion.beta_start, beta_end=cfg.diffusion.beta_end)
    assert torch.equal(sched.betas, ref.betas)
    assert sched.config.prediction_type == cfg.model.prediction.value
    settings = json.loads((folder / SAMPLING_FILE).read_text())
    assert settings["gamma"] == cfg.diffusion.gamma
    assert settings["num_inference_steps"] == cfg.sample.steps and settings["num_images"] == cfg.sample.n
    assert settings["t_read"] == cfg.eval.t_read and settings["num_draws"] == cfg.eval.num_draws
    assert settings["guidance_scale"] == {"class_to_image": EVAL_GUIDANCE}
    # The pipeline's drift schedule is the YAML's, table for table.
    pipe = UnifiedDiffusionPipeline.from_pretrained(folder)
    yaml_schedule = build_schedule(cfg)
    for name in ("betas", "alphas_cumprod", "kappa", "sigma", "w"):
        assert torch.equal(getattr(pipe.schedule, name), getattr(yaml_schedule, name)), name


def test_the_folder_samples_without_the_yaml(run, tmp_path):
    cfg = load_run_config(run)
    ref = sample(load_model(run), build_schedule(cfg), "class_to_image", known={"label": torch.tensor([0, 5, 9])},
                 scheduler="ddim", num_steps=3, guidance_scale=2.0, generator=gen(1))
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "config.yaml").unlink()
    # By hand: UnifiedModel.from_pretrained + the schedule from the folder's two files.
    model = UnifiedModel.from_pretrained(copy / "model").eval()
    betas = DDIMScheduler.from_pretrained(copy / "model").betas
    gamma = json.loads((copy / "model" / SAMPLING_FILE).read_text())["gamma"]
    out = sample(model, DriftSchedule(betas, gamma), "class_to_image", known={"label": torch.tensor([0, 5, 9])},
                 scheduler="ddim", num_steps=3, guidance_scale=2.0, generator=gen(1))
    assert torch.equal(out.image, ref.image)
    # And through the pipeline, from the model folder or the run folder.
    for path in (copy / "model", copy):
        pipe = UnifiedDiffusionPipeline.from_pretrained(path)
        got = pipe.class_to_image([0, 5, 9], num_inference_steps=3, guidance_scale=2.0, generator=gen(1),
                                  output_type="latent")
        assert torch.equal(got.images, ref.image)


def test_older_runs_without_the_files_use_the_run_config(run, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(run, copy)
    for f in (SCHEDULER_FILE, SAMPLING_FILE, "MANIFEST.json"):  # older exports had none of these
        (copy / "model" / f).unlink()
    new = UnifiedDiffusionPipeline.from_pretrained(run / "model").joint(3, generator=gen(2), output_type="latent")
    for path in (copy, copy / "model"):
        old = UnifiedDiffusionPipeline.from_pretrained(path)
        assert old.sampling == UnifiedDiffusionPipeline.from_pretrained(run / "model").sampling
        assert torch.equal(old.joint(3, generator=gen(2), output_type="latent").images, new.images)
    # No model/ at all: the latest checkpoint's EMA weights (what load_model falls back to).
    shutil.rmtree(copy / "model")
    assert UnifiedDiffusionPipeline.from_run(copy).joint(3, generator=gen(2), output_type="latent").images.shape == (3, 1, 8, 8)


# --- the pipeline's tasks are unidiff.diffusion.sample ----------------------------------------------------------
def test_every_builtin_task_has_a_pipeline_method_of_its_name():
    for name, spec in heads.modality_tasks().items():
        if spec.kind in heads.MODALITY_KINDS:
            assert callable(getattr(UnifiedDiffusionPipeline, name, None)), name
    assert callable(UnifiedDiffusionPipeline.joint)


def test_label_tasks_equal_sample(run):
    pipe = UnifiedDiffusionPipeline.from_pretrained(run / "model")
    model, schedule = load_model(run), build_schedule(load_run_config(run))
    ref = sample(model, schedule, "joint", batch_size=4, scheduler="ddim", num_steps=3, generator=gen(3))
    got = pipe.joint(4, generator=gen(3), output_type="latent")  # steps: sample.steps = 3
    assert torch.equal(got.images, ref.image) and torch.equal(got.aux["label"], ref.aux["label"])
    assert np.array_equal(got.arrays["labels"], ref.aux["label"].numpy())

    # class_to_image: the evaluation's guidance by default.
    labels = torch.tensor([1, 2, 3, 4])
    ref = sample(model, schedule, "class_to_image", known={"label": labels}, scheduler="ddim", num_steps=3,
                 guidance_scale=EVAL_GUIDANCE, generator=gen(4))
    got = pipe.class_to_image(labels, generator=gen(4), output_type="latent")
    assert torch.equal(got.images, ref.image)
    unguided = pipe.class_to_image(labels, guidance_scale=1.0, generator=gen(4), output_type="latent")
    assert not torch.equal(unguided.images, ref.image)
    assert np.array_equal(got.arrays["labels"], labels.numpy())

    x = images_of(5)
    ref = sample(model, schedule, "image_to_label", image=x, t_read=5, num_draws=2, generator=gen(5))
    got = pipe.image_to_label(x, generator=gen(5), output_type="latent")
    assert torch.equal(got.aux["label"], ref.aux["label"]) and torch.equal(got.images, x)

    # sampler= picks a solver with unidiff's defaults; swapping the scheduler the diffusers way keeps
    # its config (from_config carries DDIM's timestep_spacing "leading" over DPM's "linspace").
    ref = sample(model, schedule, "joint", batch_size=2, scheduler="dpm", num_steps=3, generator=gen(6))
    assert torch.equal(pipe.joint(2, sampler="dpm", generator=gen(6), output_type="latent").images, ref.image)
    ref = sample(model, schedule, "joint", batch_size=2, scheduler="dpm", num_steps=3, generator=gen(6),
                 scheduler_kwargs={"timestep_spacing": "leading"})
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    assert torch.equal(pipe.joint(2, generator=gen(6), output_type="latent").images, ref.image)


def test_other_modality_tasks_equal_sample(multi):
    folder, cfg = multi
    pipe = UnifiedDiffusionPipeline.from_pretrained(folder)
    model, schedule = UnifiedModel.from_pretrained(folder).eval(), build_schedule(cfg)
    x = images_of(3)
    kw = dict(scheduler="ddim", num_steps=3, guidance_scale=1.5, classifier_scale=0.5)

    mask = (torch.rand(3, 1, 8, 8, generator=gen(7)) > 0.5).float()
    known = {"masked": model.modalities["masked"].from_batch({"image": x, "mask": mask})}
    ref = sample(model, schedule, "inpaint", known=known, classifier_modality="masked", generator=gen(8), **kw)
    assert torch.equal(pipe.inpaint(x, mask, generator=gen(8), output_type="latent").images, ref.image)

    src = -x  # the invert transform's source view
    ref = sample(model, schedule, "transition", known={"source": src}, classifier_modality="source", generator=gen(9), **kw)
    assert torch.equal(pipe.transition(src, generator=gen(9), output_type="latent").images, ref.image)
    assert torch.equal(pipe.transition(image=x, generator=gen(9), output_type="latent").images, ref.image)

    r = torch.randn(3, 4, generator=gen(10))
    ref = sample(model, schedule, "representation_to_image", known={"rep": r}, classifier_modality="rep",
                 generator=gen(11), **kw)
    got = pipe.representation_to_image(r, generator=gen(11), output_type="latent")
    assert torch.equal(got.images, ref.image)
    assert np.array_equal(got.arrays["representations"], r.numpy())

    for task, name in (("target_to_source", "source"), ("image_to_representation", "rep")):
        ref = sample(model, schedule, task, image=x, t_read=5, num_draws=2, generator=gen(12))
        got = getattr(pipe, task)(x, generator=gen(12), output_type="latent")
        assert torch.equal(got.aux[name], ref.aux[name]), task
        assert torch.equal(pipe(task, x, generator=gen(12), output_type="latent").aux[name], ref.aux[name])


def test_save_pretrained_round_trip(run, tmp_path):
    pipe = UnifiedDiffusionPipeline.from_pretrained(run / "model")
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "UnifiedDiffusionPipeline" and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    again = UnifiedDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert again.sampling == pipe.sampling
    for p in (pipe, again):
        p.set_progress_bar_config(disable=True)
    a = pipe.class_to_image([7, 8], generator=gen(13), output_type="latent")
    b = again.class_to_image([7, 8], generator=gen(13), output_type="latent")
    assert torch.equal(a.images, b.images)
    x = images_of(4, seed=1)
    assert torch.equal(pipe.image_to_label(x, generator=gen(14)).aux["label"],
                       again.image_to_label(x, generator=gen(14)).aux["label"])


def test_output_types(run):
    pipe = UnifiedDiffusionPipeline.from_pretrained(run / "model")
    latent = pipe.joint(3, generator=gen(15), output_type="latent")
    assert isinstance(latent, UnifiedPipelineOutput) and latent.images.shape == (3, 1, 8, 8)
    u8 = latent.arrays["images"]
    assert u8.dtype == np.uint8 and u8.shape == (3, 8, 8, 1)
    expected_u8 = np.round((latent.images.numpy().transpose(0, 2, 3, 1) + 1) * 127.5).clip(0, 255).astype(np.uint8)
    assert np.array_equal(u8, expected_u8)

    pil = pipe.joint(3, generator=gen(15)).images  # the default, as in diffusers
    assert isinstance(pil, list) and len(pil) == 3
    assert all(im.mode == "L" and im.size == (8, 8) for im in pil)
    assert np.array_equal(np.stack([np.asarray(im) for im in pil])[..., None], u8)

    arr = pipe.joint(3, generator=gen(15), output_type="np").images
    assert arr.dtype == np.float32 and arr.shape == (3, 8, 8, 1) and arr.min() >= 0 and arr.max() <= 1
    np.testing.assert_allclose(arr, (latent.images.numpy().transpose(0, 2, 3, 1) + 1) / 2, atol=1e-6)
    pt = pipe.joint(3, generator=gen(15), output_type="pt").images
    assert torch.is_tensor(pt) and pt.shape == (3, 1, 8, 8)
    torch.testing.assert_close(pt, (latent.images + 1) / 2)
    images, aux = pipe.joint(3, generator=gen(15), output_type="np", return_dict=False)
    assert np.array_equal(images, arr) and torch.equal(aux["label"], latent.aux["label"])

    # Read tasks take images as diffusers users hold them: PIL, numpy uint8, tensors.
    by_tensor = pipe.image_to_label(latent.images, generator=gen(16)).aux["label"]
    assert torch.equal(pipe.image_to_label(pil, generator=gen(16)).aux["label"],
                       pipe.image_to_label(torch.from_numpy(u8).permute(0, 3, 1, 2) / 127.5 - 1, generator=gen(16)).aux["label"])
    assert torch.equal(pipe.image_to_label(u8, generator=gen(16)).aux["label"],
                       pipe.image_to_label(pil, generator=gen(16)).aux["label"])
    assert by_tensor.shape == (3,)
    # output_type="np" (floats in [0, 1]) reads back as the same images.
    assert torch.equal(pipe.image_to_label(arr, generator=gen(16), output_type="latent").images.float(),
                       pipe.image_to_label(pt * 2 - 1, generator=gen(16), output_type="latent").images)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        pipe.image_to_label(arr * 2 - 1)


def test_progress_bar_shows_images_per_second_only_when_asked(run):
    pipe = UnifiedDiffusionPipeline.from_pretrained(run / "model")
    quiet = io.StringIO()  # not a terminal: the default shows nothing
    pipe.set_progress_bar_config(file=quiet)
    pipe.joint(2, generator=gen(17))
    assert quiet.getvalue() == ""
    shown = io.StringIO()
    pipe.set_progress_bar_config(file=shown, disable=False)
    pipe.joint(2, generator=gen(17))
    assert "img/s" in shown.getvalue() and "3/3" in shown.getvalue()  # sample.steps = 3 denoising steps


def test_bad_input_is_a_one_line_error(run, tmp_path):
    pipe = UnifiedDiffusionPipeline.from_pretrained(run / "model")
    with pytest.raises(ConfigError, match="dream"):
        pipe("dream")
    with pytest.raises(ConfigError, match="masked_image"):
        pipe.inpaint(images_of(2))
    with pytest.raises(DataError, match="class_labels"):
        pipe.class_to_image([3, 10])
    with pytest.raises(ConfigError, match="output_type"):
        pipe.joint(2, output_type="jpeg")
    copy = tmp_path / "bad"
    shutil.copytree(run / "model", copy)
    (copy / SAMPLING_FILE).write_text(json.dumps({"gamma": 1.0, "num_stepz": 3}))
    with pytest.raises(ConfigError, match="num_stepz") as err:
        UnifiedDiffusionPipeline.from_pretrained(copy)
    assert SAMPLING_FILE in str(err.value)
    with pytest.raises(UnidiffError, match="no_such"):
        UnifiedDiffusionPipeline.from_run(tmp_path / "no_such")


def test_cli_class_to_image_uses_the_evaluation_guidance(run, tmp_path, capsys):
    def c2i(name, *extra):
        rc = main(["sample", str(run), "--task", "class_to_image", "-n", "4", "--steps", "2", "--seed", "5", *extra,
                   "--out", str(tmp_path / name)])
        assert rc == 0, capsys.readouterr().err
        with np.load(tmp_path / name) as f:
            return {k: f[k] for k in f.files}

    default, evaluated, unguided = c2i("d.npz"), c2i("e.npz", "--guidance", str(EVAL_GUIDANCE)), c2i("u.npz", "--guidance", "1")
    assert np.array_equal(default["images"], evaluated["images"])
    assert not np.array_equal(default["images"], unguided["images"])
    assert np.array_equal(default["arr_0"], default["images"]) and np.array_equal(default["arr_1"], default["labels"])
    assert default["labels"].tolist() == [0, 1, 2, 3]
