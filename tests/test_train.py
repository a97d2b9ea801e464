"""The training loop, checkpoints and EMA (unidiff/train.py, unidiff/checkpoint.py).

Resume is checked the strong way (STYLE.md habit 10): N steps straight and N/2 + stop + rerun of
the same command must give the same logged losses and bit-identical weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from unidiff import checkpoint as ckpt
from unidiff.config import load_config
from unidiff.diffusion import model_state_dict
from unidiff.train import param_groups, prepare_run, train

ROOT = Path(__file__).resolve().parents[1]


def _cfg(run_dir: Path, *overrides: str):
    # sample_every=0: grids are the CLI test's business; here only the optimisation path matters.
    return load_config(ROOT / "configs/debug.yaml", [f"run.dir={run_dir}", "train.sample_every=0", *overrides])


def _losses(run_dir: Path):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _weights(run_dir: Path):
    return load_file(str(run_dir / "model" / "diffusion_pytorch_model.safetensors"))


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    # cosine LR and EMA decay < 1 so that scheduler and EMA state must be restored too.
    extra = ("train.steps=4", "train.ckpt_every=1", "train.lr_schedule=cosine", "train.ema_decay=0.5",
             "train.weight_decay=0.1")
    straight = train(_cfg(tmp_path / "a", *extra))
    cfg_b = _cfg(tmp_path / "b", *extra)
    train(cfg_b, stop_at=2)
    assert not (tmp_path / "b" / "model").exists()  # interrupted: no inference export yet
    assert ckpt.step_of(ckpt.latest(tmp_path / "b" / "checkpoints")) == 2
    resumed = train(cfg_b)  # the same command again

    assert _losses(resumed) == _losses(straight)
    assert len(_losses(straight)) == 4
    wa, wb = _weights(straight), _weights(resumed)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # The live weights of the last checkpoint agree as well (optimiser state was restored).
    la = load_file(str(ckpt.latest(straight / "checkpoints") / "model.safetensors"))
    lb = load_file(str(ckpt.latest(resumed / "checkpoints") / "model.safetensors"))
    assert all(torch.equal(la[k], lb[k]) for k in la)


def test_rerunning_a_finished_run_changes_nothing(tmp_path):
    out = train(_cfg(tmp_path / "r", "train.steps=2", "train.ckpt_every=1"))
    before = _weights(out)
    n_lines = len(_losses(out))
    train(_cfg(tmp_path / "r", "train.steps=2", "train.ckpt_every=1"))
    after = _weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(_losses(out)) == n_lines


def test_checkpoint_contents_keep_last_and_weights_only(tmp_path):
    out = train(_cfg(tmp_path / "k", "train.steps=3", "train.ckpt_every=1", "train.keep_last=2", "train.ema_decay=0"))
    folders = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert folders == ["step_000002", "step_000003"]  # keep-last-2, no .tmp leftovers
    last = out / "checkpoints" / "step_000003"
    assert (last / ckpt.DONE).is_file()
    # No pickles of our own: EMA in safetensors, LR schedule and counters in JSON; accelerate's
    # optimiser and RNG files load with weights_only=True; a manifest lists every file.
    assert not list(last.glob("custom_checkpoint_*"))
    torch.load(last / "optimizer.bin", map_location="cpu", weights_only=True)
    plain = json.loads((last / ckpt.STATE_FILE).read_text())
    spent = plain["train"].pop("spent")  # seconds of the (wall) budget clock the loop ran
    assert plain["train"] == {"step": 3, "bad_steps": 0, "bad_in_a_row": 0} and 0 < spent < 600
    assert plain["lr_scheduler"]["last_epoch"] == 3 and plain["ema"]["optimization_step"] == 3
    listed = set(json.loads((last / ckpt.MANIFEST).read_text())["files"])
    assert listed == {p.name for p in last.iterdir()} - {ckpt.MANIFEST, ckpt.DONE}
    assert {"model.safetensors", "optimizer.bin", ckpt.EMA_FILE, ckpt.STATE_FILE, "model_config.json"} <= listed
    # ema_decay=0: the EMA is the live model, so the export equals the last live weights. The
    # checkpoint holds the prepared objective's state: the model's weights under "model.".
    raw = load_file(str(last / "model.safetensors"))
    assert all(k.startswith("model.") for k in raw)
    live = model_state_dict(raw)
    exported = _weights(out)
    assert all(torch.equal(live[k], exported[k]) for k in exported)
    # Without model/, the inference model comes from the latest checkpoint's EMA.
    import shutil

    shutil.rmtree(out / "model")
    fallback = ckpt.load_model(out)
    for k, v in fallback.state_dict().items():
        assert torch.equal(v, live[k]), k


def test_ema_is_an_exact_copy_then_a_moving_average(tmp_path, monkeypatch):
    from accelerate.utils import set_seed
    from diffusers.training_utils import EMAModel

    # Observe (not change) every EMA update: the shadow before it and the live weights it is given.
    seen = []
    original_step = EMAModel.step

    def observed_step(self, parameters):
        parameters = list(parameters)
        seen.append(([s.detach().clone() for s in self.shadow_params], [p.detach().clone() for p in parameters]))
        return original_step(self, parameters)

    monkeypatch.setattr(EMAModel, "step", observed_step)
    # decay 0.9 is never reached in 4 steps: every update uses the warm-up value (the cap is the
    # checkpoint test's ema_decay=0). lr 1e-2 moves the weights well past the tolerances below.
    decay, k = 0.9, 4
    cfg = _cfg(tmp_path / "e", f"train.steps={k}", f"train.ckpt_every={k}", f"train.ema_decay={decay}",
               "train.grad_accum=2", "train.lr=1e-2")
    out = train(cfg)
    assert len(seen) == k  # one update per optimiser step, not per micro-step

    # Exact copy at start: the shadow equals the initial weights, rebuilt from the same seed.
    set_seed(cfg.run.seed)
    init = prepare_run(cfg)[4]
    names = [n for n, _ in init.named_parameters()]
    for name, s0, p0 in zip(names, seen[0][0], init.parameters()):
        assert torch.equal(s0, p0), name
    live = [dict(zip(names, params)) for _, params in seen]  # live weights after steps 1..k
    last = model_state_dict(load_file(str(out / "checkpoints" / f"step_{k:06d}" / "model.safetensors")))
    assert all(torch.equal(live[-1][n], last[n]) for n in names)  # what was recorded is the live model

    # Then a moving average with diffusers' warm-up: update j uses d_j = min(decay, j / (9 + j)),
    # d_1 = 0, so EMA_j = sum_i (1 - d_i) prod_{l=i+1..j} d_l L_i (+ prod_{l<=j} d_l * initial = 0).
    d = [0.0] + [min(decay, j / (9 + j)) for j in range(2, k + 1)]

    def closed_form(j, name, decays):
        total = math.prod(decays[:j]) * dict(init.named_parameters())[name].detach().double()
        for i in range(1, j + 1):
            total = total + (1 - decays[i - 1]) * math.prod(decays[i:j]) * live[i - 1][name].double()
        return total

    exported = _weights(out)
    for name in names:
        for j in range(1, k):  # the shadow before update j + 1 is EMA_j
            torch.testing.assert_close(seen[j][0][names.index(name)].double(), closed_form(j, name, d),
                                       rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(exported[name].double(), closed_form(k, name, d), rtol=1e-5, atol=1e-6)
    # and the check has teeth: a constant decay, or no averaging, would give other weights
    moved = max(float((closed_form(k, n, [decay] * k) - closed_form(k, n, d)).abs().max()) for n in names)
    lag = max(float((exported[n].double() - live[-1][n].double()).abs().max()) for n in names)
    assert moved > 1e-3 and lag > 1e-3, (moved, lag)


def test_latest_ignores_tmp_and_unmarked_folders(tmp_path):
    root = tmp_path / "checkpoints"
    for name, marked in (("step_000010", True), ("step_000020", False), ("step_000030.tmp", True), ("notes", True)):
        (root / name).mkdir(parents=True)
        (root / name / "weights.safetensors").write_bytes(b"x" * 10)
        ckpt.write_manifest(root / name)
        if marked:
            (root / name / ckpt.DONE).write_text("x")
    assert ckpt.latest(root).name == "step_000010"
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_000010"]
    assert ckpt.latest(tmp_path / "missing") is None


def test_crash_mid_save_leaves_no_complete_looking_folder(tmp_path, monkeypatch):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    net, opt = acc.prepare(nn.Linear(2, 2), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    ckpt.save_checkpoint(acc, tmp_path, 1, keep_last=3)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(acc, "save_state", boom)
    with pytest.raises(RuntimeError):
        ckpt.save_checkpoint(acc, tmp_path, 2, keep_last=3)
    assert ckpt.latest(tmp_path).name == "step_000001"


def test_no_weight_decay_on_norms_biases_embeddings():
    net = nn.ModuleDict(dict(lin=nn.Linear(4, 4), norm=nn.LayerNorm(4), emb=nn.Embedding(3, 4), conv=nn.Conv2d(1, 2, 3)))
    decay, no_decay = param_groups(net, 0.1)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == {id(net["lin"].weight), id(net["conv"].weight)}
    assert ids(no_decay["params"]) == {id(net["lin"].bias), id(net["norm"].weight), id(net["norm"].bias),
                                       id(net["emb"].weight), id(net["conv"].bias)}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_bf16_autocast_run_after_an_fp32_run_in_the_same_process(tmp_path):
    train(_cfg(tmp_path / "fp32", "train.steps=1"))
    out = train(_cfg(tmp_path / "bf16", "train.steps=2", "train.mixed_precision=bf16"))
    losses = _losses(out)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # Weights stay float32 (autocast only changes the compute dtype).
    assert all(v.dtype == torch.float32 for v in _weights(out).values() if v.is_floating_point())


# --- train.init_from: fine-tuning from another run -------------------------------------------------
def test_init_from_copies_the_matching_weights_and_leaves_the_rest_fresh(tmp_path):
    from unidiff.train import prepare_seeded

    src = train(_cfg(tmp_path / "src", "modalities=[]", "train.steps=2", "train.lr=1e-2"))  # image-only
    source = ckpt.load_model(src).state_dict()
    label_only = ("image_head=false", "diffusion.p_drop=1.0")
    scratch = prepare_seeded(_cfg(tmp_path / "a", *label_only)).model.state_dict()
    tuned = prepare_seeded(_cfg(tmp_path / "b", *label_only, f"train.init_from={src}")).model.state_dict()
    backbone = [k for k in tuned if k.startswith("backbone.")]
    assert backbone and set(backbone) <= set(source)
    assert all(torch.equal(tuned[k], source[k]) for k in backbone)  # the trained backbone ...
    assert not all(torch.equal(scratch[k], source[k]) for k in backbone)  # ... not a fresh one
    heads = [k for k in tuned if k.startswith("modalities.")]
    assert heads and all(torch.equal(tuned[k], scratch[k]) for k in heads)  # the source has no label head
    report = ckpt.init_from(prepare_seeded(_cfg(tmp_path / "c", *label_only)).model, src)
    assert report["fresh"] == sorted(heads) and report["copied"] == len(tuned) - len(heads)
    assert report["dropped"] and all(k.startswith("image_head.") for k in report["dropped"])
    # and a run from it trains, the source recorded in its config
    tuned_cfg = _cfg(tmp_path / "d", *label_only, f"train.init_from={src}", "train.steps=4", "train.ckpt_every=2")
    train(tuned_cfg, stop_at=2)
    assert load_config(tmp_path / "d" / "config.yaml").train.init_from == str(src)
    # a resumed run continues from its own checkpoint: the source may be gone by then
    import shutil

    shutil.rmtree(src)
    out = train(tuned_cfg)
    assert ckpt.step_of(ckpt.latest(out / "checkpoints")) == 4


def test_init_from_a_missing_or_unrelated_run_is_refused_before_training(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="nowhere"):
        prepare_run(_cfg(tmp_path / "a", f"train.init_from={tmp_path / 'nowhere'}"))
    other = train(_cfg(tmp_path / "src", "model.backbone.hidden_size=16", "model.backbone.headdim=4",
                       "train.steps=1", "train.ckpt_every=1"))
    with pytest.raises(ckpt.CheckpointError, match="backbone differs"):
        prepare_run(_cfg(tmp_path / "b", f"train.init_from={other}"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


class _TickClock:
    """A fake ``time.process_time`` that advances one second per call: the loop reads its budget
    clock once at the start and once per optimiser step, so the spent seconds count the steps."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1.0
        return self.now


def _lrs(run_dir: Path):
    return [json.loads(line)["lr"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_a_time_budget_stops_the_run_and_runs_the_lr_schedule_over_the_budget(tmp_path, monkeypatch):
    # 0.2 min = 12 s of CPU clock, one second per step: 12 steps of the 1000 allowed, then the
    # export; the cosine schedule (warm-up 2) decays over the budget, reaching 0 as it is spent.
    monkeypatch.setattr("time.process_time", _TickClock())
    extra = ("train.steps=1000", "train.budget_minutes=0.2", "train.budget_clock=cpu", "train.lr_schedule=cosine",
             "train.warmup_steps=2", "train.ckpt_every=1000", "train.lr=0.01")
    out = train(_cfg(tmp_path / "a", *extra))
    lrs = _lrs(out)
    assert len(lrs) == 12 and (out / "model").is_dir()
    state = json.loads((ckpt.latest(out / "checkpoints") / ckpt.STATE_FILE).read_text())["train"]
    assert state["step"] == 12 and state["spent"] == 12.0
    # logged after step k: the LR of step k+1, cosine at the budget's fraction k/12 spent (warm-up: k/2)
    expected = [0.01 * (k / 2 if k < 2 else 0.5 * (1 + math.cos(math.pi * k / 12))) for k in range(1, 13)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)

    # Interrupted at step 5 and rerun: the spent seconds come from the checkpoint, so the resumed
    # run follows the same schedule, stops at the same step and ends with the same weights.
    monkeypatch.setattr("time.process_time", _TickClock())
    cfg_b = _cfg(tmp_path / "b", *extra)
    train(cfg_b, stop_at=5)
    assert not (tmp_path / "b" / "model").exists()
    resumed = train(cfg_b)
    assert _lrs(resumed) == pytest.approx(lrs, rel=1e-9, abs=1e-12) and _losses(resumed) == _losses(out)
    wa, wb = _weights(out), _weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # A rerun once the budget is spent trains nothing, and so keeps the model's metrics.json.
    (resumed / "metrics.json").write_text('{"fid": 1.0}\n')
    train(cfg_b)
    assert len(_lrs(resumed)) == 12
    assert (resumed / "metrics.json").read_text() == '{"fid": 1.0}\n' and not (resumed / "metrics.stale.json").exists()
    # A raised budget trains on: now the metrics are stale.
    train(_cfg(tmp_path / "b", *extra[:1], "train.budget_minutes=0.25", *extra[2:]))
    assert len(_lrs(resumed)) == 15 and (resumed / "metrics.stale.json").is_file()


def test_a_budget_the_step_count_reaches_first_is_a_plain_run(tmp_path, monkeypatch):
    # 100 minutes of a one-second-per-step clock never run out in 4 steps: the schedule runs at
    # max(step, the budget's position), which is the step up to the 4/6000 of the budget spent.
    monkeypatch.setattr("time.process_time", _TickClock())
    extra = ("train.steps=4", "train.lr_schedule=cosine", "train.ckpt_every=4")
    plain = train(_cfg(tmp_path / "p", *extra))
    budget = train(_cfg(tmp_path / "b", *extra, "train.budget_minutes=100", "train.budget_clock=cpu"))
    assert _lrs(budget) == pytest.approx(_lrs(plain), rel=1e-6) and _losses(budget) == pytest.approx(_losses(plain), rel=1e-6)
    assert _lrs(plain)[-1] == 0.0


@pytest.mark.parametrize("override,key", [("train.budget_minutes=0", "train.budget_minutes"),
                                          ("train.budget_minutes=-2", "train.budget_minutes"),
                                          ("train.budget_clock=gpu", "train.budget_clock")])
def test_bad_time_budgets_name_their_key(override, key):
    from unidiff.config import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(ROOT / "configs/debug.yaml", [override])
