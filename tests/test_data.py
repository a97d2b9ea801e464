"""Datasets: the digits split, folder datasets, error messages, deterministic batches, per-item
extras (``data.extra_file``)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from unidiff.data import (
    DataConfig,
    FolderDataset,
    InMemoryDataset,
    build_datasets,
    infinite_batches,
    iter_batches,
    save_extra_file,
)
from unidiff.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def digits_raw():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


@pytest.fixture(scope="module")
def digits():
    return build_datasets(DataConfig(name="digits"))


# ----------------------------------------------------------------------------------------------
# digits


def _sorted_rows(a: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1)
    return a[np.lexsort(a.T[::-1])]


def test_digits_is_a_partition_of_sklearn_digits(digits, digits_raw):
    train, val, info = digits
    images, target = digits_raw
    assert len(train) + len(val) == 1797 == len(images)
    assert len(val) == round(0.2 * 1797)
    assert info.image_shape == (1, 8, 8) and info.num_classes == 10
    assert info.class_names[0] == "zero" and info.class_names[9] == "nine"
    # Undo the [-1, 1] scaling and compare (image, label) rows as multisets with the raw data:
    # equal multisets means train and val are disjoint and together cover everything.
    ours = torch.cat([train.images, val.images]).add(1).mul(8).round().numpy().reshape(1797, -1)
    ours = np.concatenate([ours, torch.cat([train.labels, val.labels]).numpy()[:, None]], 1)
    theirs = np.concatenate([images.reshape(1797, -1), target[:, None]], 1)
    np.testing.assert_array_equal(_sorted_rows(ours), _sorted_rows(theirs))


def test_digits_values_and_dtypes(digits):
    train, val, _ = digits
    item = train[0]
    assert item["image"].dtype == torch.float32 and item["label"].dtype == torch.int64 and item["label"].ndim == 0
    for ds in (train, val):
        assert ds.images.min() == -1.0 and ds.images.max() == 1.0


def test_digits_split_is_stratified(digits, digits_raw):
    train, val, _ = digits
    _, target = digits_raw
    for c in range(10):
        n_val = int((val.labels == c).sum())
        assert abs(n_val - 0.2 * (target == c).sum()) <= 1.0, c


def test_digits_split_is_deterministic_and_seeded(digits):
    train, val, _ = digits
    train2, val2, _ = build_datasets(DataConfig(name="digits"))
    assert torch.equal(train.images, train2.images) and torch.equal(val.labels, val2.labels)
    _, val3, _ = build_datasets(DataConfig(name="digits", split_seed=1))
    assert not torch.equal(val.images, val3.images)


def test_digits_val_fraction_and_max_items():
    train, val, _ = build_datasets(DataConfig(name="digits", val_fraction=0.5, max_items=100))
    assert len(train) == len(val) == 100
    train, val, _ = build_datasets(DataConfig(name="digits", val_fraction=0.1))
    assert len(val) == round(0.1 * 1797) and len(train) == 1797 - len(val)


def test_digits_resize_matches_torchvision(digits):
    from torchvision.transforms.v2 import functional as TF

    train, _, _ = digits
    train16, _, info = build_datasets(DataConfig(name="digits", image_size=16))
    assert info.image_shape == (1, 16, 16) and train16.images.shape[1:] == (1, 16, 16)
    ref = TF.resize(train.images[:32], [16, 16], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    torch.testing.assert_close(train16.images[:32], ref.clamp(-1, 1), atol=1e-5, rtol=0)
    assert train16.images.min() >= -1 and train16.images.max() <= 1


def test_num_classes_mismatch_names_both_numbers():
    with pytest.raises(DataError, match=r"num_classes=5.*10 classes"):
        build_datasets(DataConfig(name="digits", num_classes=5))
    build_datasets(DataConfig(name="digits", num_classes=10, max_items=10))  # agreeing is fine


# ----------------------------------------------------------------------------------------------
# torchvision datasets and folders: errors


def test_mnist_missing_files_asks_for_download(tmp_path):
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(name="mnist", root=str(tmp_path), download=False))
    assert str(tmp_path / "MNIST" / "raw") in str(e.value) and "data.download=true" in str(e.value)
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path), download=False))


def test_missing_root_is_named(tmp_path):
    missing = str(tmp_path / "nowhere")
    for name in ("imagefolder", "paired"):
        with pytest.raises(DataError, match="nowhere"):
            build_datasets(DataConfig(name=name, root=missing, image_size=8))
    with pytest.raises(DataError, match="data.root"):
        build_datasets(DataConfig(name="imagefolder", image_size=8))


# ----------------------------------------------------------------------------------------------
# imagefolder


def _write(path, value, mode="RGB", size=(12, 10)):
    """A uniform image: after any resize its pixels are still ``value``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, value).save(path)


def _expected(value) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32).reshape(-1) / 255 * 2 - 1


@pytest.fixture
def image_folder(tmp_path):
    # class "dark" and class "light"; the colour of each image says its class.
    for i in range(5):
        _write(str(tmp_path / "dark" / f"{i}.png"), (10 * i, 0, 40))
        _write(str(tmp_path / "light" / f"{i}.png"), (200, 255 - i, 220))
    return tmp_path


@pytest.mark.parametrize("in_memory", [True, False])
def test_imagefolder(image_folder, in_memory):
    cfg = DataConfig(name="imagefolder", root=str(image_folder), image_size=8, val_fraction=0.2, in_memory=in_memory)
    train, val, info = build_datasets(cfg)
    assert isinstance(train, InMemoryDataset if in_memory else FolderDataset)
    assert info.class_names == ["dark", "light"] and info.num_classes == 2 and info.image_shape == (3, 8, 8)
    assert len(train) == 8 and len(val) == 2
    assert sorted(int(val[i]["label"]) for i in range(2)) == [0, 1]  # stratified: one of each
    for ds in (train, val):
        for i in range(len(ds)):
            item = ds[i]
            assert item["image"].shape == (3, 8, 8)
            # dark images have red <= 40 of 255, light ones red = 200
            assert int(item["label"]) == int(item["image"][0].mean() > 0)
            blue = _expected(40 if item["label"] == 0 else 220).item()
            assert item["image"][2].mean().item() == pytest.approx(blue, abs=1e-6)


def test_imagefolder_grey_and_missing_size(tmp_path):
    for c in ("a", "b"):
        for i in range(3):
            _write(str(tmp_path / c / f"{i}.png"), 100, mode="L")
    _, _, info = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=4))
    assert info.image_shape == (1, 4, 4)
    with pytest.raises(DataError, match="image_size"):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path)))


def test_folder_batches_match_in_memory_batches(image_folder):
    """The DataLoader path and the in-memory path serve the same batches for the same (seed, step)."""
    common = dict(name="imagefolder", root=str(image_folder), image_size=8, hflip=True)
    lazy, _, _ = build_datasets(DataConfig(in_memory=False, **common))
    eager, _, _ = build_datasets(DataConfig(in_memory=True, **common))
    a, b = infinite_batches(lazy, 3, seed=5, start_step=2), infinite_batches(eager, 3, seed=5, start_step=2)
    for _ in range(4):
        x, y = next(a), next(b)
        torch.testing.assert_close(x["image"], y["image"])
        assert torch.equal(x["label"], y["label"])


# ----------------------------------------------------------------------------------------------
# paired


@pytest.fixture
def paired_folder(tmp_path):
    for i in range(6):
        _write(str(tmp_path / "A" / f"img{i}.png"), 20 * i, mode="L")  # grey source
        _write(str(tmp_path / "B" / f"img{i}.jpg" if i == 0 else tmp_path / "B" / f"img{i}.png"), (255 - 20 * i, 0, 0))
    return tmp_path


def test_paired_happy_path(paired_folder):
    train, val, info = build_datasets(DataConfig(name="paired", root=str(paired_folder), image_size=4, val_fraction=0.5))
    assert info.num_classes == 1 and info.image_shape == (3, 4, 4) and info.source_shape == (1, 4, 4)
    assert len(train) == len(val) == 3
    seen = []
    for ds in (train, val):
        for i in range(len(ds)):
            item = ds[i]
            assert int(item["label"]) == 0
            # source value v, target red 255 - v: the pairing is by file name (extension aside)
            src = (item["source"].mean().item() + 1) / 2 * 255
            tgt = (item["image"][0].mean().item() + 1) / 2 * 255
            assert src + tgt == pytest.approx(255, abs=3)  # jpeg is lossy
            seen.append(round(src / 20))
    assert sorted(seen) == list(range(6))


def test_paired_mismatched_names(paired_folder):
    _write(str(paired_folder / "B" / "extra.png"), (0, 0, 0))
    os.remove(paired_folder / "A" / "img3.png")
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(name="paired", root=str(paired_folder), image_size=4))
    assert "extra" in str(e.value) and "img3" in str(e.value)


def test_paired_missing_target_folder(tmp_path):
    _write(str(tmp_path / "A" / "x.png"), 0, mode="L")
    with pytest.raises(DataError, match=str(tmp_path / "B")):
        build_datasets(DataConfig(name="paired", root=str(tmp_path), image_size=4))


# ----------------------------------------------------------------------------------------------
# batches


def _toy(n=10, hflip=False):
    images = torch.arange(n * 4, dtype=torch.float32).reshape(n, 1, 2, 2)
    return InMemoryDataset(images, torch.arange(n), hflip=hflip)


def test_batches_are_a_function_of_seed_and_step():
    ds = _toy()
    a = [next(infinite_batches(ds, 4, seed=3, start_step=s))["label"] for s in range(6)]
    it = infinite_batches(ds, 4, seed=3)
    b = [next(it)["label"] for _ in range(6)]
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    other = infinite_batches(ds, 4, seed=4)
    assert any(not torch.equal(next(other)["label"], x) for x in b)


def test_resume_equals_skipping():
    ds = _toy(hflip=True)
    full = infinite_batches(ds, 3, seed=0)
    for _ in range(7):
        next(full)
    resumed = infinite_batches(ds, 3, seed=0, start_step=7)
    for _ in range(5):
        x, y = next(full), next(resumed)
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])


def test_every_item_once_per_epoch():
    ds = _toy(n=10)
    it = infinite_batches(ds, 4, seed=0)
    labels = torch.cat([next(it)["label"] for _ in range(5)])  # 20 draws = exactly 2 epochs
    assert torch.equal(labels[:10].sort().values, torch.arange(10))
    assert torch.equal(labels[10:].sort().values, torch.arange(10))
    big = next(infinite_batches(ds, 25, seed=0))["label"]  # a batch larger than the dataset
    counts = big.bincount(minlength=10)  # two full epochs and half of a third
    assert counts.sum() == 25 and counts.min() == 2 and (counts == 3).sum() == 5


def test_hflip_flips_whole_items():
    ds = _toy(n=10, hflip=True)
    batch = next(infinite_batches(ds, 10, seed=1))
    original = ds.images[batch["label"]]
    flipped = batch["image"].eq(original.flip(-1)).flatten(1).all(1)
    kept = batch["image"].eq(original).flatten(1).all(1)
    assert torch.all(flipped | kept) and flipped.any() and kept.any()


# ----------------------------------------------------------------------------------------------
# each process's share of a batch (data parallelism)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(params=["in_memory", "folder"])
def sharded_data(request, image_folder):
    """A flipped training split with something per item to compare: in memory with an extra that
    identifies the item, or lazy files read by 2 DataLoader workers."""
    if request.param == "in_memory":
        ds = _toy(n=10, hflip=True)
        return InMemoryDataset(ds.images, ds.labels, hflip=True, extras={"id": torch.arange(10) * 7}), 0
    lazy, _, _ = build_datasets(DataConfig(name="imagefolder", root=str(image_folder), image_size=8, hflip=True,
                                           in_memory=False))
    assert isinstance(lazy, FolderDataset)
    return lazy, 2


@pytest.mark.parametrize("world", [2, 3])
def test_rank_batches_concatenate_to_the_one_process_batch(sharded_data, world):
    ds, workers = sharded_data
    steps, batch = 5, 6  # 30 draws: several epochs of the 8 or 10 items, epoch boundaries inside batches
    whole = _take(infinite_batches(ds, batch, seed=4, num_workers=workers), steps)
    shards = [_take(infinite_batches(ds, batch, seed=4, num_workers=workers, rank=r, world_size=world), steps)
              for r in range(world)]
    for step in range(steps):
        assert all(len(s[step]["label"]) == batch // world for s in shards)
        union = {k: torch.cat([s[step][k] for s in shards]) for k in whole[step]}
        _assert_batches_equal(union, whole[step])
    # A resumed rank sees what the uninterrupted rank saw from that step on.
    for r in range(world):
        resumed = _take(infinite_batches(ds, batch, seed=4, start_step=2, num_workers=workers, rank=r, world_size=world), 3)
        for x, y in zip(resumed, shards[r][2:]):
            _assert_batches_equal(x, y)


class _CountingFolder(FolderDataset):
    """Records which items were decoded (num_workers=0: the main process decodes)."""

    def __getitem__(self, i):
        self.read.append(i)
        return super().__getitem__(i)


def test_each_rank_decodes_only_its_rows(image_folder):
    lazy, _, _ = build_datasets(DataConfig(name="imagefolder", root=str(image_folder), image_size=8, in_memory=False))
    reads = []
    for rank in range(-1, 3):  # -1: one process
        ds = _CountingFolder(lazy.samples, lazy.image_size, lazy.mode)
        ds.read = []
        it = infinite_batches(ds, 6, seed=1) if rank < 0 else infinite_batches(ds, 6, seed=1, rank=rank, world_size=3)
        _take(it, 4)
        reads.append(ds.read)
    whole, per_rank = reads[0], reads[1:]
    assert len(whole) == 24 and all(len(r) == 8 for r in per_rank)  # 2 of the 6 items per step each
    assert sorted(sum(per_rank, [])) == sorted(whole)


def test_rank_split_rejects_what_does_not_divide():
    ds = _toy()
    with pytest.raises(ConfigError, match=r"7.*3 processes"):
        next(infinite_batches(ds, 7, seed=0, rank=0, world_size=3))
    with pytest.raises(ConfigError, match="rank 3"):
        next(infinite_batches(ds, 6, seed=0, rank=3, world_size=3))


def test_iter_batches_covers_in_order():
    ds = _toy(n=10)
    labels = torch.cat([b["label"] for b in iter_batches(ds, 4)])
    assert torch.equal(labels, torch.arange(10))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_in_memory_batches_on_the_gpu_match_the_cpu():
    ds = _toy(n=10, hflip=True)
    ds = InMemoryDataset(ds.images, ds.labels, hflip=True, extras={"r": torch.randn(10, 3)})
    cpu, gpu = infinite_batches(ds, 4, seed=2), infinite_batches(ds.to("cuda"), 4, seed=2)
    for _ in range(4):
        x, y = next(cpu), next(gpu)
        assert y["image"].is_cuda and torch.equal(x["image"], y["image"].cpu())
        assert y["r"].is_cuda and torch.equal(x["r"], y["r"].cpu())


# ----------------------------------------------------------------------------------------------
# per-item extras (data.extra_file)

SMALL = dict(name="digits", max_items=30, hflip=True)
SIGNS = torch.tensor([1.0, 2.0, -1.0])


def _from_images(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 3): a vector made from each item's own pixels, so a row that lands on
    the wrong item shows (digits images have distinct means). Flip-invariant, like the extras."""
    return images.mean((1, 2, 3))[:, None] * SIGNS


def _write_extras(path, tensors, metadata=None):
    """The file written by hand with safetensors (not through save_extra_file): the format itself."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return str(path)


@pytest.fixture(scope="module")
def small():
    return build_datasets(DataConfig(**SMALL))


@pytest.fixture
def extra_file(small, tmp_path):
    train, val, _ = small
    return _write_extras(tmp_path / "extras.safetensors", {
        "train.vec": _from_images(train.images), "val.vec": _from_images(val.images),
        "train.index": torch.arange(len(train)), "val.index": torch.arange(len(val)),
    })


def test_extra_file_rows_follow_their_items(small, extra_file):
    plain_train, plain_val, _ = small
    train, val, info = build_datasets(DataConfig(extra_file=extra_file, **SMALL))
    assert info.image_shape == (1, 8, 8) and len(train) == len(plain_train) == 30
    assert torch.equal(train.images, plain_train.images) and torch.equal(val.labels, plain_val.labels)
    for ds in (train, val):
        for i in range(len(ds)):
            item = ds[i]
            torch.testing.assert_close(item["vec"], _from_images(item["image"][None])[0])
            assert int(item["index"]) == i and item["index"].dtype == torch.int64
    # training batches: shuffled, several epochs, flipped images; the rows stay with their items
    batches = infinite_batches(train, 8, seed=1)
    for _ in range(6):
        b = next(batches)
        torch.testing.assert_close(b["vec"], _from_images(b["image"]))
        flipped = b["image"].ne(train.images[b["index"]]).flatten(1).any(1)
        assert torch.equal(b["label"], train.labels[b["index"]])
        torch.testing.assert_close(b["image"][flipped], train.images[b["index"][flipped]].flip(-1))
    b = torch.cat([b["index"] for b in iter_batches(val, 7)])
    assert torch.equal(b, torch.arange(len(val)))


def test_subset_and_to_keep_the_extras(extra_file):
    train, _, _ = build_datasets(DataConfig(extra_file=extra_file, **SMALL))
    sub = train.to("cpu").subset([7, 3, 0, 11]).subset(torch.tensor([1, 3]))  # items 3 and 11
    assert sorted(sub.extras) == ["index", "vec"] and len(sub) == 2
    assert torch.equal(sub.batch(torch.tensor([0, 1]))["index"], torch.tensor([3, 11]))
    torch.testing.assert_close(sub[1]["vec"], _from_images(train.images[11:12])[0])
    # the fingerprint keys caches of what depends on images and labels only (its docstring)
    plain = InMemoryDataset(train.images, train.labels)
    assert train.fingerprint() == plain.fingerprint()


def test_save_extra_file_round_trip_and_fingerprint_guard(small, tmp_path):
    train, val, _ = small
    path = tmp_path / "made.safetensors"
    save_extra_file(path, {s: {"vec": _from_images(ds.images)} for s, ds in (("train", train), ("val", val))},
                    {"train": train.fingerprint(), "val": val.fingerprint()})
    assert sorted(os.listdir(tmp_path)) == ["made.safetensors"]  # no temporary file left behind
    t2, v2, _ = build_datasets(DataConfig(extra_file=str(path), **SMALL))
    torch.testing.assert_close(v2.batch(torch.arange(len(v2)))["vec"], _from_images(val.images))
    # same sizes, other items: only the fingerprint can tell
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(extra_file=str(path), **{**SMALL, "split_seed": 1}))
    assert str(path) in str(e.value) and "vec" in str(e.value)


def _bad_files(train, val):
    n, m = len(train), len(val)
    ok = {"train.r": torch.zeros(n, 2), "val.r": torch.zeros(m, 2)}
    return {
        "one-split": ({**ok, "train.extra_key": torch.zeros(n)}, "extra_key"),
        "train-rows": ({**ok, "train.r": torch.zeros(n + 1, 2)}, "train.r"),
        "val-rows": ({**ok, "val.r": torch.zeros(m - 1, 2)}, "val.r"),
        "reserved": ({**ok, "train.label": torch.zeros(n), "val.label": torch.zeros(m)}, "'label'"),
        "bad-name": ({**ok, "test.r": torch.zeros(m, 2)}, "test.r"),
    }


@pytest.mark.parametrize("case", ["one-split", "train-rows", "val-rows", "reserved", "bad-name"])
def test_bad_extra_files_name_file_and_key(small, tmp_path, case):
    tensors, needle = _bad_files(*small[:2])[case]
    path = _write_extras(tmp_path / f"{case}.safetensors", tensors)
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(extra_file=path, **SMALL))
    assert path in str(e.value) and needle in str(e.value)


def test_extra_file_rows_are_counted_after_max_items(digits, tmp_path):
    full_train, full_val, _ = digits  # no max_items: 1438 / 359 rows
    path = _write_extras(tmp_path / "full.safetensors", {"train.r": _from_images(full_train.images),
                                                         "val.r": _from_images(full_val.images)})
    build_datasets(DataConfig(name="digits", extra_file=path))  # agreeing is fine
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(extra_file=path, **SMALL))
    assert path in str(e.value) and "train.r" in str(e.value) and "max_items" in str(e.value)


def test_missing_extra_file_and_lazy_data(tmp_path, image_folder):
    missing = str(tmp_path / "nowhere.safetensors")
    with pytest.raises(DataError, match="nowhere.safetensors"):
        build_datasets(DataConfig(extra_file=missing, **SMALL))
    common = dict(name="imagefolder", root=str(image_folder), image_size=8)
    train, val, _ = build_datasets(DataConfig(in_memory=True, **common))
    path = _write_extras(tmp_path / "f.safetensors", {"train.r": torch.zeros(len(train)),
                                                      "val.r": torch.zeros(len(val))})
    build_datasets(DataConfig(in_memory=True, extra_file=path, **common))
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(in_memory=False, extra_file=path, **common))
    assert path in str(e.value) and "data.in_memory" in str(e.value)
