"""The real-data sources on tiny generated fixtures: the idx reader and Fashion-MNIST, downsampled
ImageNet's npz batches and their memory-mapped cache, ImageNet folders (layouts, ADM preprocessing,
unreadable files). CI never needs the real files; one test reads them where they are installed."""

import gzip
import json
import os
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from unidiff.config import load_config
from unidiff.data import (
    ArrayDataset,
    DataConfig,
    ImageFileDataset,
    InMemoryDataset,
    build_datasets,
    center_crop_arr,
    infinite_batches,
    iter_batches,
    read_idx,
    verify_cache,
)
from unidiff.data.sources import FASHION_ROOT
from unidiff.errors import ConfigError, DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# idx files and Fashion-MNIST


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    """The idx encoding written from the format description (not with the reader under test)."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_idx(path, array, code=0x08, gz=True):
    data = _idx_bytes(array, code)
    with (gzip.open if gz else open)(str(path) + (".gz" if gz else ""), "wb") as f:
        f.write(data)


def test_read_idx_matches_torchvision_on_uncompressed_files(tmp_path):
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    ints = rng.integers(-(2**31), 2**31 - 1, (5, 3), dtype=np.int64).astype(np.int32)
    _write_idx(tmp_path / "images", images, 0x08, gz=False)
    _write_idx(tmp_path / "ints", ints, 0x0C, gz=False)
    for name, arr in (("images", images), ("ints", ints)):
        ours = read_idx(str(tmp_path / name))
        theirs = read_sn3_pascalvincent_tensor(str(tmp_path / name), strict=False).numpy()
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_array_equal(ours, arr)
    _write_idx(tmp_path / "images", images, 0x08, gz=True)  # the gzipped twin reads the same
    np.testing.assert_array_equal(read_idx(str(tmp_path / "images.gz")), images)


def test_read_idx_rejects_malformed_files(tmp_path):
    good = _idx_bytes(np.zeros((3, 4), np.uint8), 0x08)
    cases = {"magic": b"\x01" + good[1:], "type": good[:2] + b"\x42" + good[3:], "short": good[:-1],
             "long": good + b"\x00"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=name):
            read_idx(str(tmp_path / name))


def _fashion_fixture(root, n_train=30, n_val=20, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for split, n, prefix in (("train", n_train, "train"), ("val", n_val, "t10k")):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
        out[split] = (images, labels)
    return out


def test_fashion_mnist_official_split_padding_and_names(tmp_path):
    raw = _fashion_fixture(tmp_path)
    train, val, info = build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    assert info.image_shape == (1, 32, 32) and info.num_classes == 10 and info.class_names[0] == "t-shirt/top"
    assert info.class_names[9] == "ankle boot" and len(set(info.class_names)) == 10
    assert isinstance(train, InMemoryDataset) and train.images.dtype == torch.uint8  # a quarter of float32
    for ds, split in ((train, "train"), (val, "val")):
        images, labels = raw[split]
        assert len(ds) == len(labels)  # the official split, untouched: val = the t10k files
        batch = ds.batch(torch.arange(len(ds)))
        x = batch["image"]
        assert x.dtype == torch.float32 and x.shape == (len(labels), 1, 32, 32)
        # Two pixels of zero padding (black: -1) on every side, the pixels inside.
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert torch.all(x[:, 0][:, border] == -1.0)
        expected = torch.from_numpy(images).float() / 127.5 - 1.0
        torch.testing.assert_close(x[:, 0, 2:30, 2:30], expected, rtol=0, atol=1e-6)
        assert torch.equal(batch["label"], torch.from_numpy(labels.astype(np.int64)))
        torch.testing.assert_close(ds[3]["image"], x[3])


def test_fashion_mnist_options_and_errors(tmp_path):
    _fashion_fixture(tmp_path)
    train, val, _ = build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path), max_items=8, hflip=True))
    assert len(train) == 8 and len(val) == 8 and train.hflip and not val.hflip
    train16, _, info = build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path), image_size=16))
    assert info.image_shape == (1, 16, 16) and train16.images.dtype == torch.float32
    with pytest.raises(DataError, match="num_classes=5"):
        build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path), num_classes=5))
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte" in msg and "apt-get install dataset-fashion-mnist" in msg and "\n" not in msg
    # A labels file that does not match its images.
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="t10k-labels"):
        build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path)))


@pytest.mark.skipif(not os.path.isdir(FASHION_ROOT), reason="the real Fashion-MNIST files are not installed")
def test_real_fashion_mnist_when_installed():
    train, val, info = build_datasets(DataConfig(name="fashion_mnist"))
    assert (len(train), len(val)) == (60000, 10000) and info.image_shape == (1, 32, 32)
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(val.labels), torch.full((10,), 1000))
    assert train.images.element_size() * train.images.numel() == 60000 * 32 * 32  # uint8 in memory


def test_fashion_config_loads_and_is_documented():
    cfg = load_config(os.path.join(REPO, "configs", "fashion_joint_image_label.yaml"))
    assert cfg.data.name == "fashion_mnist" and cfg.model.prediction.value == "sample"
    assert [m.kind for m in cfg.modalities] == ["label"] and cfg.image_head
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert "configs/fashion_joint_image_label.yaml" in readme and "apt-get install dataset-fashion-mnist" in readme
    for key in ("on_bad_file", "cache_dir"):
        assert f"data.{key}" in readme or f"`{key}`" in readme
    with pytest.raises(ConfigError, match="data.on_bad_file"):
        load_config(os.path.join(REPO, "configs", "fashion_joint_image_label.yaml"), ["data.on_bad_file=ignore"])


# ----------------------------------------------------------------------------------------------
# downsampled ImageNet (npz batches) and the memory-mapped cache


def _npz_fixture(root, size=32, counts=(5, 4), n_val=3, seed=0):
    """Official-format batches; returns the (N, S, S, 3) HWC images and 1-based labels of each split."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    out = {"train": ([], []), "val": ([], [])}
    files = [(f"train_data_batch_{k + 1}.npz", "train", n) for k, n in enumerate(counts)] + [("val_data.npz", "val", n_val)]
    for name, split, n in files:
        hwc = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        labels = rng.integers(1, 1001, n)
        # The release stores each image as its red, green then blue plane, row-major.
        data = hwc.transpose(0, 3, 1, 2).reshape(n, -1)
        np.savez(os.path.join(root, name), data=data, labels=labels.tolist(), mean=np.zeros(data.shape[1]))
        out[split][0].append(hwc)
        out[split][1].append(labels)
    return {s: (np.concatenate(x), np.concatenate(y)) for s, (x, y) in out.items()}


@pytest.mark.parametrize("size", [32, 64])
def test_downsampled_imagenet_labels_order_and_cache(tmp_path, size):
    raw = _npz_fixture(tmp_path / "npz", size=size)
    cfg = DataConfig(name=f"imagenet{size}", root=str(tmp_path / "npz"), cache_dir=str(tmp_path / "cache"))
    train, val, info = build_datasets(cfg)
    assert info.image_shape == (3, size, size) and info.num_classes == 1000
    assert isinstance(train, ArrayDataset) and isinstance(train.array(), np.memmap)
    for ds, split in ((train, "train"), (val, "val")):
        hwc, labels = raw[split]
        assert len(ds) == len(labels)
        batch = ds.__getitems__(list(range(len(ds)))[::-1])  # any order, one read
        expected = torch.from_numpy(hwc[::-1].copy()).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        torch.testing.assert_close(batch["image"], expected, rtol=0, atol=1e-6)
        assert torch.equal(batch["label"], torch.from_numpy(labels[::-1] - 1))  # 1-based -> 0-based
        torch.testing.assert_close(ds[1]["image"], expected[len(ds) - 2])
    # The cache: one folder with a manifest; a second build reuses it; checksums verify.
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["splits"]["train"]["n"] == 9 and len(manifest["sources"]) == 3
    stamp = os.stat(folder / "train_images.npy").st_mtime_ns
    train2, _, _ = build_datasets(cfg)
    assert os.stat(folder / "train_images.npy").st_mtime_ns == stamp and train2.fingerprint() == train.fingerprint()
    verify_cache(str(folder))
    # Damaged bytes fail the checksum; damaged labels make the next build convert again.
    arr = np.load(folder / "train_images.npy", mmap_mode="r+")
    arr[0, 0, 0, 0] ^= 1
    arr.flush()
    del arr
    with pytest.raises(DataError, match="train_images.npy"):
        verify_cache(str(folder))
    np.save(folder / "val_labels.npy", np.zeros(3, np.int64))
    _, val3, _ = build_datasets(cfg)
    verify_cache(str(folder))  # rebuilt from the npz files
    assert torch.equal(val3.__getitems__([0, 1, 2])["label"], torch.from_numpy(raw["val"][1] - 1))


def test_downsampled_imagenet_batches_workers_and_subsets(tmp_path):
    _npz_fixture(tmp_path / "npz", counts=(6, 6))
    cfg = DataConfig(name="imagenet32", root=str(tmp_path / "npz"), cache_dir=str(tmp_path / "cache"), hflip=True)
    train, _, _ = build_datasets(cfg)
    one = [b for _, b in zip(range(4), infinite_batches(train, 5, seed=3))]
    two = [b for _, b in zip(range(4), infinite_batches(train, 5, seed=3, num_workers=2))]
    resumed = [b for _, b in zip(range(2), infinite_batches(train, 5, seed=3, start_step=2))]
    for a, b in zip(one, two):  # workers decode only: the batches do not depend on their number
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    for a, b in zip(one[2:], resumed):
        assert torch.equal(a["image"], b["image"])
    small, _, _ = build_datasets(DataConfig(name="imagenet32", root=str(tmp_path / "npz"),
                                            cache_dir=str(tmp_path / "cache"), max_items=4))
    assert len(small) == 4 and len(list(iter_batches(small, 3))) == 2


def test_downsampled_imagenet_errors(tmp_path):
    raw_root = tmp_path / "npz"
    _npz_fixture(raw_root, counts=(2, 2, 2))
    common = dict(root=str(raw_root), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="image_size=64"):
        build_datasets(DataConfig(name="imagenet32", image_size=64, **common))
    with pytest.raises(DataError, match=r"expected uint8 \(N, 12288\)"):  # 32x32 files read as 64x64
        build_datasets(DataConfig(name="imagenet64", **common))
    os.remove(raw_root / "train_data_batch_2.npz")
    with pytest.raises(DataError, match="train_data_batch_2.npz is missing"):
        build_datasets(DataConfig(name="imagenet32", **common))
    os.remove(raw_root / "val_data.npz")
    os.remove(raw_root / "train_data_batch_3.npz")
    with pytest.raises(DataError, match="val_data.npz"):
        build_datasets(DataConfig(name="imagenet32", **common))
    np.savez(raw_root / "val_data.npz", data=np.zeros((2, 3072), np.uint8), labels=[0, 1])
    with pytest.raises(DataError, match="1-based"):
        build_datasets(DataConfig(name="imagenet32", **common))


# ----------------------------------------------------------------------------------------------
# ImageNet folders


WNIDS = ["n01440764", "n01443537", "n01484850"]


def _jpeg(path, rng, size=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    w, h = size or (int(rng.integers(20, 40)), int(rng.integers(20, 40)))
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, "JPEG")


@pytest.fixture
def imagenet_root(tmp_path):
    """train/<wnid>/ (3 classes, 3 images each) and a flat val/ labelled by LOC_val_solution.csv."""
    rng = np.random.default_rng(0)
    root = tmp_path / "ilsvrc"
    for w in WNIDS:
        for k in range(3):
            _jpeg(str(root / "train" / w / f"{w}_{k}.JPEG"), rng)
    rows = ["ImageId,PredictionString"]
    for k, w in enumerate([WNIDS[2], WNIDS[0], WNIDS[1], WNIDS[2]]):
        _jpeg(str(root / "val" / f"ILSVRC2012_val_{k:08d}.JPEG"), rng)
        rows.append(f"ILSVRC2012_val_{k:08d},{w} 1 2 30 30 {w} 3 4 20 20")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (root / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn01484850 great white shark\n")
    return root


def test_imagenet_layouts_labels_and_names(imagenet_root):
    cfg = DataConfig(name="imagenet", root=str(imagenet_root), image_size=16)
    train, val, info = build_datasets(cfg)
    assert info.class_names == ["tench", "goldfish", "great white shark"] and info.image_shape == (3, 16, 16)
    assert isinstance(train, ImageFileDataset) and len(train) == 9 and len(val) == 4
    assert [os.path.basename(os.path.dirname(p)) for p, _ in train.samples] == [w for w in WNIDS for _ in range(3)]
    assert [y for _, y in train.samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [y for _, y in val.samples] == [2, 0, 1, 2]  # from the csv's first wnid
    batch = next(iter_batches(val, 4))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert set(batch) == {"image", "label"} and torch.equal(batch["label"], torch.tensor([2, 0, 1, 2]))
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    # val/<wnid>/ folders instead of the csv; no mapping file: the names are the wnids.
    for k, (p, y) in enumerate(val.samples):
        os.makedirs(imagenet_root / "val" / WNIDS[y], exist_ok=True)
        os.replace(p, imagenet_root / "val" / WNIDS[y] / os.path.basename(p))
    os.remove(imagenet_root / "LOC_val_solution.csv")
    os.remove(imagenet_root / "LOC_synset_mapping.txt")
    _, val2, info2 = build_datasets(cfg)
    assert info2.class_names == WNIDS and sorted(y for _, y in val2.samples) == [0, 1, 2, 2]


def test_imagenet_layout_errors(imagenet_root):
    cfg = DataConfig(name="imagenet", root=str(imagenet_root), image_size=16)
    os.remove(imagenet_root / "LOC_val_solution.csv")
    with pytest.raises(DataError, match="LOC_val_solution.csv"):
        build_datasets(cfg)
    with pytest.raises(DataError, match="image_size"):
        build_datasets(DataConfig(name="imagenet", root=str(imagenet_root)))


def test_center_crop_arr_box_halving_and_crop():
    """A 32x48 image at size 16: one 2x2 box halving (to 16x24; numpy block means), no bicubic
    change (the size is already right), then the centre 16 columns."""
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    out = center_crop_arr(Image.fromarray(arr), 16)
    halved = arr.reshape(16, 2, 24, 2, 3).astype(np.float64).mean(axis=(1, 3))
    expected = halved[:, 4:20]
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(np.float64) - expected).max() <= 1.0  # PIL rounds its box sums
    # An image of the target size is returned as it is; a small one is upsampled to the size.
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(arr[:16, :16]), 16), arr[:16, :16])
    assert center_crop_arr(Image.fromarray(arr[:10, :13]), 16).shape == (16, 16, 3)


def test_imagenet_preprocessing_is_adm_and_flips(imagenet_root):
    path = str(imagenet_root / "train" / WNIDS[0] / "big.png")
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    ds = ImageFileDataset([(path, 0)], 16, hflip=True)
    expected = torch.from_numpy(center_crop_arr(Image.fromarray(arr), 16)).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(ds[0]["image"], expected, rtol=0, atol=1e-6)
    flipped = [b["image"][0] for _, b in zip(range(16), infinite_batches(ds, 1, seed=0))]
    assert any(torch.equal(x, expected.flip(-1)) for x in flipped) and any(torch.equal(x, expected) for x in flipped)


def _break(imagenet_root):
    """Make train image 1 garbage and train image 4 a truncated JPEG."""
    train, _, _ = build_datasets(DataConfig(name="imagenet", root=str(imagenet_root), image_size=16))
    bad = [train.samples[1][0], train.samples[4][0]]
    with open(bad[0], "wb") as f:
        f.write(b"not a jpeg at all")
    data = open(bad[1], "rb").read()
    with open(bad[1], "wb") as f:
        f.write(data[: len(data) // 3])
    return bad


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_are_a_one_line_error_naming_the_file(imagenet_root, workers):
    bad = _break(imagenet_root)
    train, _, _ = build_datasets(DataConfig(name="imagenet", root=str(imagenet_root), image_size=16, num_workers=workers))
    with pytest.raises(DataError) as e:
        list(iter_batches(train, 3, num_workers=workers))
    assert bad[0] in str(e.value) and "data.on_bad_file=skip" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_skipped_and_counted(imagenet_root, workers):
    bad = _break(imagenet_root)
    train, _, _ = build_datasets(DataConfig(name="imagenet", root=str(imagenet_root), image_size=16, on_bad_file="skip"))
    good = ImageFileDataset(train.samples, 16)  # a reference reader on the readable files
    with pytest.warns(UserWarning, match="skipped unreadable image file") as record:
        batches = list(iter_batches(train, 3, num_workers=workers))
    assert sorted(train.skipped) == sorted(bad) and len(record) == 2
    images = torch.cat([b["image"] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    assert images.shape[0] == 9  # batches keep their size: a bad file's slot holds the next readable item
    for i, j in ((1, 2), (4, 5), (0, 0), (8, 8)):
        torch.testing.assert_close(images[i], good[j]["image"])
        assert labels[i] == good.samples[j][1]
    # Training batches: the same substitution, and the count does not grow for files already seen.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _, b in zip(range(6), infinite_batches(train, 3, seed=0, num_workers=workers)):
            assert b["image"].shape == (3, 3, 16, 16)
    assert len(train.skipped) == 2
