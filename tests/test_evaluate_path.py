"""The evaluation path (unidiff/evaluate.py): one sampling loop shared with the experiments, its
progress bar, the precision rule, latent runs judged in decoded pixels, and a metrics file that
never outlives the evaluation that replaces it.

Oracles: :func:`unidiff.diffusion.sample` called batch by batch by hand, the CPU's own
``/proc/cpuinfo`` flags, diffusers' ``AutoencoderKL.decode`` called directly, the pixel data built
without the latent cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from unidiff.cli import main
from unidiff.config import build_schedule, load_config
from unidiff.diffusion import sample
from unidiff.io import seed_for

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")


class OneProcess:
    """accelerate's surface that generate_sharded uses, for one process (``main``: rank 0 or not)."""

    def __init__(self, main: bool = True):
        self.is_main_process, self.process_index, self.num_processes = main, 0, 1

    def wait_for_everyone(self):
        pass

    def gather_for_metrics(self, obj, use_gather_object=False):
        return list(obj)


class FakeTqdm:
    """Records every bar: its total, ``disable``, each update and the last postfix."""

    bars: list = []

    def __init__(self, total=None, disable=False, **kwargs):
        self.total, self.disable, self.n, self.updates, self.postfix, self.closed = total, disable, 0, [], None, False
        FakeTqdm.bars.append(self)

    def update(self, k):
        self.updates.append(k)
        self.n += k

    def set_postfix(self, postfix=None, refresh=True):
        self.postfix = dict(postfix)

    def close(self):
        self.closed = True


@pytest.fixture
def fake_tqdm(monkeypatch):
    import unidiff.evaluate

    FakeTqdm.bars = []
    monkeypatch.setattr(unidiff.evaluate, "tqdm", FakeTqdm)
    return FakeTqdm


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalpath")
    rc = main(["train", DEBUG, f"run.dir={root / 'run'}", f"eval.cache_dir={root / 'cache'}", "train.sample_every=0"])
    assert rc == 0
    return root / "run"


def _model(run, *overrides):
    from unidiff.checkpoint import load_model

    cfg = load_config(run / "config.yaml", list(overrides))
    return load_model(run, "cpu"), build_schedule(cfg), cfg


# --- 1. one sampling loop --------------------------------------------------------------------------
def test_setting_generate_equals_a_naive_per_batch_loop(run):
    from experiments.setting import generate, known_values

    model, schedule, cfg = _model(run, "eval.batch_size=2")
    labels = torch.tensor([3, 1, 4, 1, 5])
    got, got_aux = generate(model, schedule, cfg, "class_to_image", 5, torch.Generator().manual_seed(3),
                            known_values("label", labels, torch.device("cpu")), guidance=2.0)
    joint, joint_aux = generate(model, schedule, cfg, "joint", 5, torch.Generator().manual_seed(4))

    def by_hand(task, seed, known=None, guidance=1.0):
        g, images, aux = torch.Generator().manual_seed(seed), [], []  # one generator across the batches
        for start in (0, 2, 4):
            b = min(2, 5 - start)
            rows = {"label": known[start:start + b]} if known is not None else None
            out = sample(model, schedule, task, batch_size=b, known=rows, scheduler=cfg.eval.sampler.value,
                         num_steps=cfg.eval.steps, guidance_scale=guidance, generator=g)
            images.append(out.image.float())
            aux.append(out.aux["label"])
        return torch.cat(images), torch.cat(aux)

    ref, _ = by_hand("class_to_image", 3, labels, 2.0)
    assert got.shape == (5, *model.image_shape) and torch.equal(got, ref)
    ref, ref_labels = by_hand("joint", 4)
    assert torch.equal(joint, ref) and torch.equal(joint_aux["label"], ref_labels)
    assert not torch.equal(joint[:2], joint[2:4])  # the batches really draw on in the one generator


def test_sample_store_shards_are_the_naive_loop_per_shard_seed(run, tmp_path, fake_tqdm):
    from unidiff.evaluate import SampleStore

    model, schedule, cfg = _model(run, "eval.batch_size=2", "eval.shard_size=3")
    store = SampleStore(model, schedule, cfg, tmp_path, torch.device("cpu"), seed=5, accelerator=OneProcess())
    images, aux = store.generate("joint", 7, stream=1)
    expected, labels = [], []
    for i, (start, count) in enumerate([(0, 3), (3, 3), (6, 1)]):  # shard i: its own seed, batches of 2
        g = torch.Generator().manual_seed(seed_for(seed_for(5, 1), i))
        for b in ([2, 1] if count == 3 else [1]):
            out = sample(model, schedule, "joint", batch_size=b, scheduler=cfg.eval.sampler.value,
                         num_steps=cfg.eval.steps, generator=g)
            expected.append(out.image.float())
            labels.append(out.aux["label"])
    assert torch.equal(images, torch.cat(expected)) and torch.equal(aux["label"], torch.cat(labels))

    # --- 2. the progress bar: one per stream, over its samples, images/s; kept shards count too
    (bar,) = fake_tqdm.bars
    assert bar.total == 7 and bar.n == 7 and bar.updates == [2, 1, 2, 1, 1] and bar.closed
    assert bar.disable is None  # tqdm decides: no bar where stdout is not a terminal
    assert set(bar.postfix) == {"images/s"} and float(bar.postfix["images/s"]) > 0
    store.generate("joint", 7, stream=1)  # every shard kept: nothing generated, the bar still completes
    assert fake_tqdm.bars[1].updates == [7] and fake_tqdm.bars[1].n == 7
    other = SampleStore(model, schedule, cfg, tmp_path, torch.device("cpu"), seed=5, accelerator=OneProcess(main=False))
    other.generate("joint", 7, stream=1)
    assert fake_tqdm.bars[2].disable is True  # not the main process: no bar


# --- 2, 3, 6 through evaluate() -----------------------------------------------------------------------
def _auto_picks_bf16() -> bool:
    """Whether `auto` picks bf16 on this CPU (AMX: amx_bf16), from /proc/cpuinfo read here, apart from unidiff.launch."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return bool({"amx_bf16"} & set(flags))


def test_killed_evaluation_leaves_no_stale_metrics_and_records_what_produced_them(run, fake_tqdm):
    from unidiff.evaluate import evaluate

    overrides = [f"eval.cache_dir={run.parent / 'cache'}", "eval.shard_size=8"]
    old = {"fid": 123.0, "provenance": {"seed": 0}}
    (run / "metrics.json").write_text(json.dumps(old))

    class Killed(Exception):
        pass

    def kill(shard):
        raise Killed

    with pytest.raises(Killed):
        evaluate(run, overrides, on_shard=kill)
    assert not (run / "metrics.json").exists()  # the earlier result does not pass for this one
    (kept,) = run.glob("metrics.*.json")
    assert json.loads(kept.read_text()) == old

    fake_tqdm.bars = []
    metrics = evaluate(run, overrides)
    on_disk = json.loads((run / "metrics.json").read_text())
    record = on_disk["provenance"]
    # nothing was at the target when this evaluation began; the killed one had moved the old file aside
    assert record["previous"] is None and json.loads(kept.read_text()) == old
    assert record["step"] == on_disk["step"] == 4 == metrics["step"]  # debug.yaml trains 4 steps
    assert record["checkpoint"].endswith("model") and record["n_samples"] == 16
    # 3. the precision rule of training, recorded: this CPU without native bf16 -> fp32 ("no")
    assert record["precision"] == ("bf16" if _auto_picks_bf16() else "no")
    assert record["precision_reason"].startswith("auto:") and record["vae"] is None
    # 2. a bar per sample stream (16 joint, 16 class->image), each reaching its total
    assert [b.total for b in fake_tqdm.bars] == [16, 16] and all(b.n == b.total for b in fake_tqdm.bars)


def test_model_runs_under_the_resolved_autocast(run, tmp_path, monkeypatch):
    import unidiff.checkpoint
    import unidiff.evaluate
    import unidiff.launch
    from unidiff.evaluate import evaluate

    seen = []
    load = unidiff.checkpoint.load_model

    def spied(*args, **kwargs):
        model = load(*args, **kwargs)
        model.register_forward_pre_hook(
            lambda m, a: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))
        return model

    monkeypatch.setattr(unidiff.checkpoint, "load_model", spied)
    judged = []  # the reference classifier judges in fp32, outside the model's autocast
    classify = unidiff.evaluate._classify
    monkeypatch.setattr(unidiff.evaluate, "_classify",
                        lambda *a: judged.append(torch.is_autocast_enabled("cpu")) or classify(*a))
    monkeypatch.setattr(unidiff.launch, "resolve_precision", lambda requested, device_type: ("bf16", "test: bf16"))
    out = tmp_path / "m.json"
    evaluate(run, [f"eval.cache_dir={run.parent / 'cache'}", "eval.n_samples=4"], out_path=out)
    assert len(seen) > 10 and all(on and dtype == torch.bfloat16 for on, dtype in seen)
    assert judged == [False, False]  # joint consistency, class->image accuracy
    record = json.loads(out.read_text())["provenance"]
    assert record["precision"] == "bf16" and record["precision_reason"] == "test: bf16"
    assert not torch.is_autocast_enabled("cpu")  # nothing left on after the evaluation


# --- 4. latent runs are judged in decoded pixels --------------------------------------------------
SCALE, SHIFT = 0.5, 0.1


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """A tiny AutoencoderKL (1-channel 16x16 digits <-> 4x8x8 latents), its cache, 3 training steps."""
    from diffusers import AutoencoderKL

    from unidiff.latents import build_latent_cache

    root = tmp_path_factory.mktemp("latent_eval")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=SCALE, shift_factor=SHIFT)
    vae.save_pretrained(root / "vae")
    data = [f"model.vae.path={root / 'vae'}", f"data.latents={root / 'cache'}", "data.image_size=16",
            "data.max_items=24"]
    build_latent_cache(load_config(DEBUG, data), shard_size=24, batch_size=8, dtype="fp32", progress=False)
    args = [*data, f"run.dir={root / 'run'}", f"eval.cache_dir={root / 'evcache'}", "train.steps=3",
            "train.sample_every=0", "train.ckpt_every=3"]
    assert main(["train", DEBUG, *args]) == 0
    return root, data


def test_latent_samples_are_decoded_before_the_pixel_features(latent_run, monkeypatch):
    from diffusers import AutoencoderKL

    import unidiff.evaluate
    from unidiff.data import build_datasets
    from unidiff.evaluate import evaluate

    root, data = latent_run
    calls = []  # (kind, images) seen by the features and the reference classifier

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.num_features = inner, inner.num_features

        def forward(self, x):  # the real sets' statistics
            calls.append(("real", x.clone()))
            return self.inner(x)

        def extract(self, x):  # the generated images
            calls.append(("fake", x.clone()))
            return self.inner.extract(x)

    feature_module, classify = unidiff.evaluate._feature_module, unidiff.evaluate._classify
    monkeypatch.setattr(unidiff.evaluate, "_feature_module", lambda *a: Spy(feature_module(*a)))
    monkeypatch.setattr(unidiff.evaluate, "_classify",
                        lambda clf, images, *a: calls.append(("judged", images.clone())) or classify(clf, images, *a))
    run = root / "run"
    metrics = evaluate(run, [f"eval.cache_dir={root / 'evcache'}"])

    assert {kind for kind, _ in calls} == {"real", "fake", "judged"}
    assert all(x.shape[1:] == (1, 16, 16) for _, x in calls)  # pixels, not (4, 8, 8) latents
    # the real sets are the pixel data the cache was made of: val whole (the reference), then the
    # floor's first eval.n_samples = 16 train images
    pixel_cfg = load_config(DEBUG, [*data, "data.latents=null", "model.vae.path=null"])
    train, val, _ = build_datasets(pixel_cfg.data)
    pixels = lambda ds, n: torch.stack([ds[i]["image"] for i in range(n)])  # noqa: E731
    real = torch.cat([x for kind, x in calls if kind == "real"])
    torch.testing.assert_close(real, torch.cat([pixels(val, len(val)), pixels(train, 16)]), rtol=0, atol=0)

    # the generated images are diffusers' decode of the joint stream's stored latents
    joint = next(f for f in (run / "eval_shards").iterdir()
                 if json.loads((f / "shards.json").read_text())["settings"]["task"] == "joint")
    latents = []
    for shard in sorted(joint.glob("shard_*.npz")):
        with np.load(shard) as f:
            latents.append(torch.from_numpy(f["image"]))
    latents = torch.cat(latents)
    assert latents.shape == (16, 4, 8, 8)
    with torch.no_grad():
        decoded = AutoencoderKL.from_pretrained(root / "vae").decode(latents / SCALE + SHIFT).sample.clamp(-1, 1)
    fake = torch.cat([x for kind, x in calls if kind == "fake"])
    torch.testing.assert_close(fake, decoded, atol=1e-5, rtol=1e-5)
    judged = [x for kind, x in calls if kind == "judged"]  # joint consistency, then class->image
    torch.testing.assert_close(judged[0], decoded, atol=1e-5, rtol=1e-5)
    assert len(judged) == 2 and judged[1].shape == (16, 1, 16, 16)
    assert metrics["fid"] > 0 and 0.0 <= metrics["class_conditional_accuracy"] <= 1.0
    record = json.loads((run / "metrics.json").read_text())["provenance"]
    assert record["vae"] == str(root / "vae")
