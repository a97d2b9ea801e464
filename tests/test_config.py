"""Config loading and validation (unidiff/config.py): every shipped YAML builds; bad input names its key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from unidiff.config import ConfigError, build_model, load_config, resolve_with_data, to_container, to_yaml
from unidiff.data import DataInfo, build_datasets

ROOT = Path(__file__).resolve().parents[1]
# The ImageNet configs need ImageNet (and the latent ones a VAE cache): tests/test_imagenet_configs.py
# dry-runs each of them on a stand-in dataset and builds its full-size model.
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not p.name.startswith("imagenet"))


def _info(num_classes=10, shape=(1, 8, 8)):
    return DataInfo(name="digits", image_shape=shape, num_classes=num_classes, class_names=[str(i) for i in range(num_classes)])


def _run_configs(path):
    """{arm: run config} of a YAML: a run config is one run; an experiment file (``experiment:``
    section) gives one run per arm through the experiment loader."""
    if "encoder" in OmegaConf.load(path):  # an encoder config: checked in tests/test_cli.py
        return {}
    if "distributed_type" in OmegaConf.load(path):  # an accelerate launch config: tests/test_distributed.py
        return {}
    if "experiment" not in OmegaConf.load(path):
        return {"run": load_config(path, ["model.preset=debug"])}
    from experiments import load_experiment

    return load_experiment(path, ["model.preset=debug"]).arms


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_every_shipped_config_loads_and_builds(path):
    for arm, cfg in _run_configs(path).items():
        assert cfg.model.preset == "debug"
        _, _, info = build_datasets(cfg.data) if cfg.data.name == "digits" else (None, None, _info())
        cfg = resolve_with_data(cfg, info)
        model = build_model(cfg, info.image_shape)
        assert sum(p.numel() for p in model.parameters()) > 0, arm
        assert set(model.modalities) == {m.name for m in cfg.modalities}, arm
        assert (model.image_head is not None) == cfg.image_head, arm


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"joint_image_label.yaml", "image_only.yaml", "label_only.yaml", "debug.yaml"} <= names


def test_overrides_parse_values_as_yaml_and_win_over_the_file():
    cfg = load_config(ROOT / "configs/debug.yaml", ["train.lr=1e-4", "train.betas=[0.8,0.95]", "train.steps=7",
                                                   "modalities.0.weight=2.5", "model.backbone.hidden_size=48"])
    assert cfg.train.lr == float("1e-4") and isinstance(cfg.train.lr, float)
    assert list(cfg.train.betas) == [0.8, 0.95]
    assert cfg.train.steps == 7
    assert cfg.modalities[0].weight == 2.5
    assert cfg.model.backbone.hidden_size == 48


def test_config_is_read_only():
    cfg = load_config(ROOT / "configs/debug.yaml")
    with pytest.raises(Exception):
        cfg.train.steps = 3


def test_saved_yaml_round_trips(tmp_path):
    # mixed_precision=no: the configs say `auto`; `no` is the value YAML would read as false.
    cfg = resolve_with_data(load_config(ROOT / "configs/joint_image_label.yaml", ["train.mixed_precision=no"]), _info())
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    again = load_config(path)
    assert to_container(again) == to_container(cfg)
    # Enum fields are written as their plain string values.
    assert OmegaConf.load(path).model.prediction == cfg.model.prediction.value
    assert OmegaConf.load(path).train.mixed_precision == "no"  # a string, not YAML's false


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.stepz=3", "train.stepz"),
        ("train.steps=abc", "train.steps"),
        ("model.prediction=eps", "model.prediction"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("diffusion.beta_schedule=cosine", "diffusion.beta_schedule"),
        ("model.preset=huge", "model.preset"),
        ("model.backbone.not_an_option=1", "model.backbone"),
        ("modalities.0.wieght=1", "modalities[0].wieght"),
        ("modalities.0.kind=colour", "modalities[0].kind"),
        ("train.batch_size=0", "train.batch_size"),
        ("diffusion.p_drop=1.5", "diffusion.p_drop"),
        ("diffusion.t_sampling=lognormal", "diffusion.t_sampling"),
        ("diffusion.t_scale=0", "diffusion.t_scale"),
        ("diffusion.snr_gamma=-1", "diffusion.snr_gamma"),
        ("nosection.key=1", "nosection"),
    ],
)
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/debug.yaml", [override])
    assert key in str(err.value)
    assert "\n" not in str(err.value)


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(ROOT / "configs/debug.yaml", ["train.steps"])


def test_bad_modality_entry_in_yaml_names_its_index(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("modalities:\n  - {name: label, kind: label}\n  - {name: r, kind: representation, weigth: 2}\n")
    with pytest.raises(ConfigError, match=r"modalities\[1\]\.weigth"):
        load_config(path)


def test_unknown_section_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="trian"):
        load_config(path)


def test_missing_and_malformed_files_name_the_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n  lr: [1, 2\nmodel: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "bad.yaml" in str(err.value) and "line" in str(err.value)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="scalar.yaml"):
        load_config(scalar)


def test_num_classes_filled_from_data_and_disagreement_rejected():
    cfg = load_config(ROOT / "configs/debug.yaml")
    assert "num_classes" not in cfg.modalities[0].options
    assert resolve_with_data(cfg, _info(10)).modalities[0].options.num_classes == 10
    wrong = load_config(ROOT / "configs/debug.yaml", ["modalities.0.options.num_classes=7"])
    with pytest.raises(ConfigError, match=r"modalities\[0\]\.options\.num_classes"):
        resolve_with_data(wrong, _info(10))


def test_patch_size_must_divide_the_image():
    cfg = resolve_with_data(load_config(ROOT / "configs/debug.yaml", ["model.backbone.patch_size=3"]), _info())
    with pytest.raises(ConfigError, match="patch"):
        build_model(cfg, (1, 8, 8))


def test_unknown_head_option_names_the_modality():
    cfg = resolve_with_data(load_config(ROOT / "configs/debug.yaml", ["modalities.0.options.colour=1"]), _info())
    with pytest.raises(ConfigError, match=r"modalities\[0\]\.options"):
        build_model(cfg, (1, 8, 8))


def test_backbone_overrides_reach_the_model():
    cfg = resolve_with_data(load_config(ROOT / "configs/debug.yaml", ["model.backbone.hidden_size=40"]), _info())
    model = build_model(cfg, (1, 8, 8))
    assert model.backbone.hidden_size == 40


def test_mixed_precision_no_is_a_string_not_yaml_false(tmp_path):
    # YAML 1.1 reads a bare `no` as false; accelerate's value is the string "no".
    cfg = load_config("configs/debug.yaml", ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision.value == "no"
    path = tmp_path / "c.yaml"
    path.write_text(Path("configs/debug.yaml").read_text().replace("train:\n", "train:\n  mixed_precision: no\n", 1))
    assert load_config(path).train.mixed_precision.value == "no"


# --- configs as mappings ---------------------------------------------------------------------
def test_a_mapping_or_a_loaded_config_loads_like_its_yaml_file():
    path = ROOT / "configs/joint_image_label.yaml"
    from_file = load_config(path, ["train.steps=7"])
    from_dict = load_config(OmegaConf.to_container(OmegaConf.load(path)), ["train.steps=7"])
    assert to_container(from_dict) == to_container(from_file)
    again = load_config(from_file, ["train.lr=1e-4"])  # a DictConfig source is validated again
    assert again.train.steps == 7 and again.train.lr == 1e-4 and from_file.train.lr != 1e-4
    sections = {"train": {"steps": 3, "mixed_precision": False}}  # YAML's false for `no`, as in a file
    assert load_config(sections).train.mixed_precision.value == "no"
    assert sections == {"train": {"steps": 3, "mixed_precision": False}}  # the caller's mapping is left alone


@pytest.mark.parametrize("sections, key", [
    ({"trian": {"steps": 3}}, "trian"),
    ({"train": {"stepz": 3}}, "train.stepz"),
    ({"modalities": [{"name": "label", "kind": "label", "weigth": 2}]}, r"modalities\[0\]\.weigth"),
    ({"diffusion": {"p_drop": 2.0}}, "diffusion.p_drop"),
])
def test_a_bad_mapping_names_the_key(sections, key):
    with pytest.raises(ConfigError, match=key):
        load_config(sections)


# --- the option lists: one definition, accepted by the code behind it --------------------------
def test_every_beta_schedule_the_config_accepts_builds_a_schedule():
    from diffusers import DDPMScheduler

    from unidiff.config import BetaSchedule, build_schedule

    for name in BetaSchedule:  # sigmoid included: the schedule accepted it, the config did not
        cfg = load_config(ROOT / "configs/debug.yaml", [f"diffusion.beta_schedule={name.value}"])
        betas = build_schedule(cfg).betas
        ref = DDPMScheduler(num_train_timesteps=cfg.diffusion.num_train_timesteps, beta_schedule=name.value,
                            beta_start=cfg.diffusion.beta_start, beta_end=cfg.diffusion.beta_end).betas
        torch.testing.assert_close(betas.to(ref.dtype), ref)


def test_every_lr_schedule_and_sampler_the_config_accepts_runs():
    from diffusers.optimization import SchedulerType, get_scheduler

    from unidiff.config import LRSchedule, Sampler
    from unidiff.diffusion import DriftSchedule, make_scheduler

    assert {s.value for s in LRSchedule} <= {s.value for s in SchedulerType}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for name in LRSchedule:
        get_scheduler(name.value, opt, num_warmup_steps=1, num_training_steps=4)
    schedule = DriftSchedule.from_config("linear", 10)
    for name in Sampler:
        assert make_scheduler(name.value, schedule, "epsilon").config.num_train_timesteps == 10
    with pytest.raises(ConfigError, match="sample.sampler"):
        make_scheduler("euler", schedule, "epsilon")


def test_loss_errors_name_the_config_keys():
    from unidiff.diffusion import DriftSchedule, training_losses

    schedule, batch = DriftSchedule.from_config("linear", 10), {"image": torch.zeros(2, 1, 4, 4)}
    with pytest.raises(ConfigError, match=r"diffusion\.weighting"):
        training_losses(None, schedule, batch, weighting="elbo")
    with pytest.raises(ConfigError, match=r"diffusion\.p_drop"):
        training_losses(None, schedule, batch, p_drop=1.5)
