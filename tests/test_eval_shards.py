"""Sharded, resumable generation: unidiff.shards and a killed-then-resumed ``unidiff evaluate``."""

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from unidiff.cli import main
from unidiff.evaluate import evaluate
from unidiff.io import seed_for
from unidiff.shards import generate_sharded, plan_shards, shard_path

DEBUG = str(Path(__file__).resolve().parents[1] / "configs" / "debug.yaml")


class FakeAccelerator:
    """Rank ``rank`` of a ``world``-process run whose processes are threads of this test: a real
    barrier, and a gather that concatenates every rank's list (accelerate's object gather)."""

    def __init__(self, rank: int, world: int, shared=None):
        self.process_index, self.num_processes = rank, world
        self.is_main_process = rank == 0
        self.shared = shared if shared is not None else {"barrier": threading.Barrier(world), "lists": {}}
        self.finished = []

    def wait_for_everyone(self):
        self.shared["barrier"].wait(timeout=60)

    def gather_for_metrics(self, obj, use_gather_object=False):
        assert use_gather_object
        self.finished = list(obj)
        self.shared["lists"][self.process_index] = list(obj)
        self.wait_for_everyone()
        return [i for r in sorted(self.shared["lists"]) for i in self.shared["lists"][r]]


def run_ranks(world, fn, *args, **kwargs):
    """``generate_sharded`` on ``world`` thread-ranks; returns (each rank's result, the accelerators)."""
    shared = {"barrier": threading.Barrier(world), "lists": {}}
    accs = [FakeAccelerator(r, world, shared) for r in range(world)]
    results = [None] * world

    def target(r):
        results[r] = generate_sharded(fn, *args, accelerator=accs[r], **kwargs)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None for r in results)
    return results, accs


def noise(shard):
    """A shard of draws that depend only on its seed (as the samplers' noise does)."""
    g = torch.Generator().manual_seed(shard.seed)
    return {"x": torch.randn(shard.count, 3, generator=g), "i": torch.arange(shard.start, shard.start + shard.count)}


def test_plan_covers_every_item_once_with_index_seeds():
    shards = plan_shards(10, 4, seed=7)
    assert [(s.start, s.count) for s in shards] == [(0, 4), (4, 4), (8, 2)]
    assert [s.seed for s in shards] == [seed_for(7, i) for i in range(3)]
    with pytest.raises(ValueError):
        plan_shards(0, 4, 7)


def test_result_does_not_depend_on_processes_or_restarts(tmp_path):
    one = generate_sharded(noise, 10, 3, 5, tmp_path / "one", accelerator=FakeAccelerator(0, 1))
    # by hand: shard i's rows come from seed_for(5, i)
    expected = torch.cat([torch.randn(c, 3, generator=torch.Generator().manual_seed(seed_for(5, i)))
                          for i, c in enumerate([3, 3, 3, 1])])
    np.testing.assert_array_equal(one["x"], expected.numpy())
    np.testing.assert_array_equal(one["i"], np.arange(10))

    # three processes: each writes shards i ≡ rank (mod 3), then every one assembles all of them
    results, accs = run_ranks(3, noise, 10, 3, 5, tmp_path / "three")
    assert [a.finished for a in accs] == [[0, 3], [1], [2]]
    for three in results:
        for k in one:
            np.testing.assert_array_equal(three[k], one[k])

    # a crash after the first shard, then a rerun: the kept shard is not regenerated
    class Boom(Exception):
        pass

    def kill(shard):
        raise Boom

    with pytest.raises(Boom):
        generate_sharded(noise, 10, 3, 5, tmp_path / "crash", accelerator=FakeAccelerator(0, 1), on_shard=kill)
    assert sorted(p.name for p in (tmp_path / "crash").glob("shard_*")) == ["shard_00000.npz"]
    calls = []
    again = generate_sharded(lambda s: calls.append(s.index) or noise(s), 10, 3, 5, tmp_path / "crash",
                             accelerator=FakeAccelerator(0, 1))
    assert calls == [1, 2, 3]
    for k in one:
        np.testing.assert_array_equal(again[k], one[k])


def test_bad_shards_are_regenerated_with_a_warning(tmp_path):
    folder = tmp_path / "s"
    clean = generate_sharded(noise, 7, 3, 1, folder, accelerator=FakeAccelerator(0, 1))
    shard_path(folder, 0).write_bytes(b"truncated")  # unreadable
    np.savez(shard_path(folder, 1), x=np.zeros((2, 3)), __shard__=np.array([1, 3, 3, seed_for(1, 1)]))  # 2 rows, not 3
    calls = []
    with pytest.warns(UserWarning, match="shard_0000[01]"):
        again = generate_sharded(lambda s: calls.append(s.index) or noise(s), 7, 3, 1, folder,
                                 accelerator=FakeAccelerator(0, 1), spec={"x": ("float32", (3,))})
    assert calls == [0, 1]
    for k in clean:
        np.testing.assert_array_equal(again[k], clean[k])
    # a spec the kept shards do not match (here: the dtype) regenerates them too
    with pytest.warns(UserWarning, match="float64"):
        generate_sharded(noise, 7, 3, 1, folder, accelerator=FakeAccelerator(0, 1), spec={"x": ("float64", (3,))})


def test_another_plan_in_the_folder_is_not_mixed_in(tmp_path):
    generate_sharded(noise, 6, 3, 1, tmp_path, accelerator=FakeAccelerator(0, 1))
    with pytest.warns(UserWarning, match="another plan"):
        other = generate_sharded(noise, 6, 3, 2, tmp_path, accelerator=FakeAccelerator(0, 1))  # another seed
    expected = generate_sharded(noise, 6, 3, 2, tmp_path / "fresh", accelerator=FakeAccelerator(0, 1))
    np.testing.assert_array_equal(other["x"], expected["x"])


# --- unidiff evaluate ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rc = main(["train", DEBUG, f"run.dir={root / 'run'}", f"eval.cache_dir={root / 'cache'}", "train.sample_every=0"])
    assert rc == 0
    return root / "run"


def test_killed_evaluate_resumes_to_the_same_metrics(run):
    cache = f"eval.cache_dir={run.parent / 'cache'}"
    # 16 joint samples and 16 class->image samples in shards of 5: 4 + 4 shards
    overrides = [cache, "eval.shard_size=5"]
    clean = evaluate(run, overrides)
    shutil.rmtree(run / "eval_shards")
    (run / "metrics.json").unlink()

    class Killed(Exception):
        pass

    written = []

    def kill_after_five(shard):
        written.append(shard.index)
        if len(written) == 5:  # inside the second (conditional) stream
            raise Killed

    with pytest.raises(Killed):
        evaluate(run, overrides, on_shard=kill_after_five)
    assert not (run / "metrics.json").exists()
    folders = sorted((run / "eval_shards").iterdir())
    assert sorted(len(list(f.glob("shard_*.npz"))) for f in folders) == [1, 4]

    resumed_writes = []
    resumed = evaluate(run, overrides, on_shard=lambda s: resumed_writes.append(s.index))
    assert resumed_writes == [1, 2, 3]  # only the conditional stream's missing shards
    assert resumed == clean
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk.pop("provenance")["seed"] == 0  # what produced it (unidiff.provenance); the numbers:
    assert on_disk == json.loads(json.dumps(clean))

    # the shard size is part of the plan: one batch per shard gives the same kind of numbers,
    # in its own folder
    other = evaluate(run, [cache])
    assert set(other) == set(clean) and len(list((run / "eval_shards").iterdir())) == 4


def test_unknown_drift_is_part_of_the_conditional_streams_plan(run):
    # eval.unknown_drift changes what class->image samples are, so it is in that stream's plan (its
    # folder); the joint stream has every drift from its head whatever the key says, and is reused.
    cache = f"eval.cache_dir={run.parent / 'cache'}"
    evaluate(run, [cache])
    before = {f.name for f in (run / "eval_shards").iterdir()}
    written = []
    evaluate(run, [cache, "eval.unknown_drift=null_encoding"], on_shard=lambda s: written.append(s.index))
    after = {f.name for f in (run / "eval_shards").iterdir()}
    new = after - before
    assert len(new) == 1 and written == [0]  # one new folder, one shard (16 samples in one batch)
    from unidiff.shards import MANIFEST
    plan = json.loads((run / "eval_shards" / next(iter(new)) / MANIFEST).read_text())["settings"]
    assert plan["unknown_drift"] == "null_encoding" and plan["task"] != "joint"
    # and back to the default: every stream is found again, nothing generated
    written.clear()
    evaluate(run, [cache, "eval.unknown_drift=predicted"], on_shard=lambda s: written.append(s.index))
    assert written == [] and {f.name for f in (run / "eval_shards").iterdir()} == after
