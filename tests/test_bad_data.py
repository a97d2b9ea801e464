"""Bad data a days-long run meets (issue 13): 16-bit and float images, mixed grey/colour folders,
decompression bombs, truncated files under ``data.on_bad_file`` with and without DataLoader
workers. Every bad file is built here, in a temporary folder.

Oracles: numpy arithmetic on the pixels written (``v / 257`` for 16 bits, ``x * 255`` for float,
ITU-R 601 luma for grey), PIL decoding the good files directly, and the message a run without
workers gives.
"""

import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from unidiff.config import load_config
from unidiff.data import (BadFileError, DataConfig, FolderDataset, InMemoryDataset, bad_files, build_datasets,
                          infinite_batches, iter_batches, read_image, write_bad_files)
from unidiff.errors import ConfigError, DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(path, width, height, bit_depth, color_type, rows):
    """A PNG written byte by byte (Pillow cannot write 48-bit RGB; a huge blank one costs nothing).

    rows: ``rows(y)`` -> the raw bytes of row ``y`` (filter byte 0 is prepended)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj()
    idat = b"".join(z.compress(b"\x00" + rows(y)) for y in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return str(path)


def _gradient16(h=16, w=16):
    """(h, w) uint16 covering 0..65535 (both ends included)."""
    return np.linspace(0, 65535, h * w).round().astype(np.uint16).reshape(h, w)


def _luma(rgb):
    """PIL's RGB -> L (ITU-R 601-2, documented in Image.convert): L = R*299/1000 + G*587/1000 + B*114/1000."""
    r, g, b = (rgb[..., k].astype(np.float64) for k in range(3))
    return r * 299 / 1000 + g * 587 / 1000 + b * 114 / 1000


def _to_unit(item_image):
    """(C, H, W) in [-1, 1] -> pixel values 0..255 (float)."""
    return (item_image.numpy().astype(np.float64) + 1) * 127.5


# ----------------------------------------------------------------------------------------------
# high bit depth and float pixels


def test_16bit_png_decodes_to_the_gradient_over_257(tmp_path):
    g = _gradient16()
    path = str(tmp_path / "g16.png")
    Image.fromarray(g).save(path)
    assert Image.open(path).mode == "I;16"  # what a 16-bit grey PNG is to Pillow
    out = np.asarray(read_image(path, "L")).astype(np.float64)
    assert np.abs(out - g / 257.0).max() <= 0.5  # 65535 -> 255: exact up to rounding
    assert out.max() == 255 and out.min() == 0 and len(np.unique(out)) > 200  # not clipped to near-white
    rgb = np.asarray(read_image(path, "RGB"))
    assert rgb.shape == (16, 16, 3) and all(np.array_equal(rgb[..., k], out) for k in range(3))


def test_16bit_images_through_the_datasets(tmp_path):
    """imagefolder (lazy and in memory) and imagenet items of a 16-bit file at its native size."""
    g = _gradient16()
    for cls in ("a", "b"):
        os.makedirs(tmp_path / "folder" / cls)
        Image.fromarray(g).save(tmp_path / "folder" / cls / "x.png")
    want = g / 257.0
    for in_memory in (True, False):
        train, _, info = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "folder"), image_size=16,
                                                   val_fraction=0.0, in_memory=in_memory))
        assert info.image_shape == (1, 16, 16)
        assert np.abs(_to_unit(train[0]["image"])[0] - want).max() <= 0.5 + 1e-3
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        os.makedirs(root / split / "n01")
        Image.fromarray(g).save(root / split / "n01" / "x.png")
    train, _, info = build_datasets(DataConfig(name="imagenet", root=str(root), image_size=16))
    assert info.image_shape == (3, 16, 16)
    px = _to_unit(train[0]["image"])
    assert np.abs(px - want[None]).max() <= 0.5 + 1e-3


def test_16bit_rgb_and_32bit_integer_files(tmp_path):
    rng = np.random.default_rng(0)
    rgb16 = rng.integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    path = _png(tmp_path / "rgb16.png", 5, 6, 16, 2, lambda y: rgb16[y].astype(">u2").tobytes())
    out = np.asarray(read_image(path, "RGB")).astype(np.float64)
    assert np.abs(out - rgb16 / 257.0).max() <= 1.0  # Pillow keeps each sample's high byte
    # 32-bit integer TIFF ("I"): 0..65535 is 16-bit data (older Pillow reads 16-bit PNGs so).
    g = _gradient16().astype(np.int32)
    Image.fromarray(g, "I").save(tmp_path / "i32.tif")
    assert np.abs(np.asarray(read_image(str(tmp_path / "i32.tif"), "L")) - g / 257.0).max() <= 0.5
    g[0, 0] = 70000
    Image.fromarray(g, "I").save(tmp_path / "i32_big.tif")
    with pytest.raises(BadFileError) as e:
        read_image(str(tmp_path / "i32_big.tif"), "L")
    assert "i32_big.tif" in str(e.value) and "70000" in str(e.value) and "\n" not in str(e.value)


def test_float_tiff_in_unit_range_is_read_as_such_and_out_of_range_refused(tmp_path):
    x = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(x).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    out = np.asarray(read_image(str(tmp_path / "f.tif"), "L")).astype(np.float64)
    assert np.abs(out - x * 255.0).max() <= 0.5  # was all 1.0 (PIL's F -> L clips at 1 of 255)
    for name, bad in (("over.tif", x * 2), ("neg.tif", x - 0.5), ("nan.tif", np.where(x > 0.5, np.nan, x))):
        Image.fromarray(bad.astype(np.float32)).save(tmp_path / name)
        with pytest.raises(BadFileError) as e:
            read_image(str(tmp_path / name), "L")
        assert str(tmp_path / name) in str(e.value) and "[0, 1]" in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# the channel count of a dataset


def _mixed_folder(root, first):
    """Two classes of RGB images plus, sorting first in class a, a grey ('L') or 16-bit file."""
    rng = np.random.default_rng(1)
    colours = {}
    for cls in ("a", "b"):
        os.makedirs(root / cls)
        for i in range(1, 5):
            arr = np.tile(rng.integers(0, 256, 3, dtype=np.uint8), (8, 8, 1))  # uniform: any resize keeps it
            Image.fromarray(arr).save(root / cls / f"{i}.png")
            colours[str(root / cls / f"{i}.png")] = arr[0, 0].astype(np.float64)
    grey = np.full((8, 8), 200, dtype=np.uint8 if first == "L" else np.uint16)
    if first == "I;16":
        grey[:] = 51400  # 200 * 257
    Image.fromarray(grey).save(root / "a" / "0.png")
    return colours, str(root / "a" / "0.png")


@pytest.mark.parametrize("first", ["L", "I;16"])
@pytest.mark.parametrize("in_memory", [True, False])
def test_a_grey_file_sorting_first_does_not_make_an_rgb_dataset_grey(tmp_path, first, in_memory):
    colours, grey_path = _mixed_folder(tmp_path, first)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=8, val_fraction=0.0, in_memory=in_memory)
    train, _, info = build_datasets(cfg)
    assert info.image_shape == (3, 8, 8)
    samples = train.samples if isinstance(train, FolderDataset) else None
    for i in range(len(train)):
        px = _to_unit(train[i]["image"])
        assert px.shape == (3, 8, 8)
        if samples is not None:  # lazy: which file is known; the grey one is repeated into RGB
            want = np.full(3, 200.0) if samples[i][0] == grey_path else colours[samples[i][0]]
            assert np.abs(px.reshape(3, -1).mean(1) - want).max() <= 0.5 + 1e-3
    # data.channels=1 forces grey: colour files through PIL's luma.
    train, _, info = build_datasets(DataConfig(**{**cfg.__dict__, "channels": 1}))
    assert info.image_shape == (1, 8, 8)
    got = sorted(float(_to_unit(train[i]["image"]).mean()) for i in range(len(train)))
    want = sorted([200.0] + [float(_luma(c[None, None])[0, 0]) for c in colours.values()])
    assert np.abs(np.array(got) - np.array(want)).max() <= 0.5 + 1e-3  # PIL rounds the luma


def test_channels_key_is_validated_at_load():
    debug = os.path.join(REPO, "configs", "debug.yaml")
    with pytest.raises(ConfigError, match="data.channels"):
        load_config(debug, ["data.name=imagefolder", "data.channels=2"])
    with pytest.raises(ConfigError, match="data.channels.*digits"):  # digits: its channels are its own
        load_config(debug, ["data.channels=3"])
    assert load_config(debug, ["data.name=imagefolder", "data.channels=3"]).data.channels == 3


# ----------------------------------------------------------------------------------------------
# decompression bombs


def test_a_15000_square_png_is_a_bad_file_not_a_traceback(tmp_path):
    root = tmp_path / "folder"
    for cls in ("a", "b"):
        os.makedirs(root / cls)
        for i in range(3):
            Image.new("RGB", (8, 8), (10 * i, 20, 30)).save(root / cls / f"{i}.png")
    # 15000 x 15000 1-bit, all zero: 225e6 pixels, over twice PIL's 89.5e6 limit; a 30 kB file.
    huge = _png(root / "a" / "1.png", 15000, 15000, 1, 0, lambda y: bytes(1875))
    cfg = dict(name="imagefolder", root=str(root), image_size=8, val_fraction=0.0)
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(in_memory=True, **cfg))
    msg = str(e.value)
    assert huge in msg and "225000000 pixels" in msg and "data.on_bad_file=skip" in msg and "\n" not in msg
    with pytest.warns(UserWarning, match="skipped unreadable image file"):
        train, _, _ = build_datasets(DataConfig(in_memory=True, on_bad_file="skip", **cfg))
    assert len(train) == 5 and [p for p, _ in bad_files(train)] == [huge]  # dropped, counted


def test_the_bomb_limit_is_pils_own(tmp_path, monkeypatch):
    """Lowering PIL.Image.MAX_IMAGE_PIXELS lowers ours: a 64x64 file over 2 * 1000 pixels is refused."""
    Image.new("L", (64, 64), 7).save(tmp_path / "x.png")
    assert np.asarray(read_image(str(tmp_path / "x.png"), "L")).max() == 7
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadFileError, match="4096 pixels"):
        read_image(str(tmp_path / "x.png"), "L")


# ----------------------------------------------------------------------------------------------
# truncated and corrupt files under data.on_bad_file, with and without workers


@pytest.fixture
def folder_with_bad_files(tmp_path):
    """10 JPEGs in 2 classes (one colour per file); a.2 truncated, b.3 not an image at all."""
    rng = np.random.default_rng(2)
    for cls in ("a", "b"):
        os.makedirs(tmp_path / cls)
        for i in range(5):
            arr = np.tile(rng.integers(0, 256, 3, dtype=np.uint8), (16, 16, 1))
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.jpg", quality=95)
    truncated, garbage = str(tmp_path / "a" / "2.jpg"), str(tmp_path / "b" / "3.jpg")
    data = open(truncated, "rb").read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    with open(garbage, "wb") as f:
        f.write(b"\xff\xd8 not really a jpeg")
    return tmp_path, [truncated, garbage]


def _lazy(root, **kw):
    train, _, _ = build_datasets(DataConfig(name="imagefolder", root=str(root), image_size=16, val_fraction=0.0,
                                            in_memory=False, **kw))
    return train


@pytest.mark.parametrize("workers", [0, 1])
def test_a_truncated_file_is_one_line_naming_it_with_or_without_workers(folder_with_bad_files, workers):
    root, bad = folder_with_bad_files
    Image.new("RGB", (16, 16)).save(bad[1], format="JPEG")  # only the truncated JPEG is bad here
    train = _lazy(root, num_workers=workers)
    messages = []
    for _ in range(2):  # the rerun stops again, with the same line
        with pytest.raises(DataError) as e:
            list(iter_batches(train, 4, num_workers=workers))
        messages.append(str(e.value))
    msg = messages[0]
    assert messages[1] == msg and "\n" not in msg and "Traceback" not in msg and "worker" not in msg
    assert bad[0] in msg and "truncated" in msg and "data.on_bad_file=skip" in msg
    # What a worker reports is what the main process reports itself.
    with pytest.raises(DataError) as direct:
        list(iter_batches(_lazy(root), 4))
    assert str(direct.value) == msg
    with pytest.raises(DataError) as e:
        next(infinite_batches(train, 10, seed=0, num_workers=workers))
    assert str(e.value) == msg


@pytest.mark.parametrize("workers", [0, 1])
def test_skipped_files_give_their_slot_to_the_next_readable_item(folder_with_bad_files, workers, tmp_path_factory):
    root, bad = folder_with_bad_files
    train = _lazy(root, num_workers=workers, on_bad_file="skip")
    with pytest.warns(UserWarning, match="skipped unreadable image file") as record:
        batches = list(iter_batches(train, 4, num_workers=workers))
    assert len(record) == 2  # warnings at 1 and 2 skipped files
    images = torch.cat([b["image"] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    assert images.shape == (10, 3, 16, 16) and all("bad_files" not in b for b in batches)
    paths = [p for p, _, _ in train.samples]
    for i, (path, label, _) in enumerate(train.samples):
        j = i
        while paths[j] in bad:  # the next readable file takes the slot
            j = (j + 1) % len(paths)
        with Image.open(paths[j]) as im:  # oracle: PIL on the good file (native size, no resize)
            want = np.asarray(im.convert("RGB")).transpose(2, 0, 1).astype(np.float64)
        assert np.abs(_to_unit(images[i]) - want).max() <= 1e-3
        assert labels[i] == train.samples[j][1]
    assert sorted(train.skipped) == sorted(bad)
    # Training batches too; the count does not grow for files already seen.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _, b in zip(range(4), infinite_batches(train, 5, seed=0, num_workers=workers)):
            assert b["image"].shape == (5, 3, 16, 16)
    assert len(train.skipped) == 2
    # The list for the run folder: written atomically, one line per file; nothing when none skipped.
    run_dir = tmp_path_factory.mktemp("run")
    path = write_bad_files(run_dir, train)
    lines = open(path).read().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == sorted(bad) and os.listdir(run_dir) == ["bad_files.txt"]
    assert write_bad_files(tmp_path_factory.mktemp("clean"), _lazy(root)) is None


def test_in_memory_folders_follow_the_policy(folder_with_bad_files):
    root, bad = folder_with_bad_files
    cfg = dict(name="imagefolder", root=str(root), image_size=16, val_fraction=0.2, in_memory=True)
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(**cfg))
    assert any(b in str(e.value) for b in bad) and "\n" not in str(e.value)
    with pytest.warns(UserWarning, match="skipped unreadable image file"):
        train, val, _ = build_datasets(DataConfig(on_bad_file="skip", **cfg))
    assert isinstance(train, InMemoryDataset) and len(train) + len(val) == 8  # the two dropped
    assert [p for p, _ in bad_files(train, val)] == sorted(bad)


def test_warnings_at_powers_of_two(tmp_path):
    """Seven bad files warn at 1, 2 and 4 of them, not seven times; all seven are listed."""
    os.makedirs(tmp_path / "a")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a" / "good.png")
    for i in range(7):
        (tmp_path / "a" / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.warns(UserWarning) as record:
        train, _, _ = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=8,
                                                val_fraction=0.0, in_memory=True, on_bad_file="skip"))
    counts = [int(str(w.message).split("); ")[1].split(" skipped")[0]) for w in record
              if "skipped unreadable" in str(w.message)]
    assert counts == [1, 2, 4] and len(bad_files(train)) == 7 and len(train) == 1


def test_a_bad_paired_source_is_named(tmp_path):
    for d in ("A", "B"):
        os.makedirs(tmp_path / d)
        for i in range(3):
            Image.new("L" if d == "A" else "RGB", (8, 8), 9 * i).save(tmp_path / d / f"{i}.png")
    (tmp_path / "A" / "1.png").write_bytes(b"")  # an empty source file
    cfg = dict(name="paired", root=str(tmp_path), image_size=8, val_fraction=0.0, in_memory=False)
    with pytest.raises(DataError) as e:  # at the build (the first item read) or in the batches
        train, _, _ = build_datasets(DataConfig(**cfg))
        list(iter_batches(train, 3, num_workers=1))
    assert str(tmp_path / "A" / "1.png") in str(e.value) and "\n" not in str(e.value)
    with pytest.warns(UserWarning, match="1.png"):  # at the build if item 0 is the bad one, else in the batches
        train, _, info = build_datasets(DataConfig(on_bad_file="skip", **cfg))
        (batch,) = list(iter_batches(train, 3, num_workers=1))
    assert info.image_shape == (3, 8, 8) and info.source_shape == (1, 8, 8)  # grey sources stay grey
    assert batch["source"].shape == (3, 1, 8, 8) and [p for p, _ in bad_files(train)] == [str(tmp_path / "A" / "1.png")]


def test_a_worker_bad_file_error_is_rebuilt_as_its_one_line():
    """torch re-raises a worker's exception as ``type(msg)``, msg the whole worker traceback
    (ExceptionWrapper.reraise): BadFileError takes its own line back from it."""
    from torch._utils import ExceptionWrapper

    original = "cannot read image file /x/y.jpg (OSError: image file is truncated); set data.on_bad_file=skip"
    try:
        try:
            raise OSError("inner")
        except OSError:
            raise BadFileError(original)  # a chained traceback: the last line is still ours
    except BadFileError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(BadFileError) as e:
        wrapper.reraise()
    assert str(e.value) == original


def test_image_file_datasets_read_through_any_dataloader(tmp_path):
    """Item by item, so torch's own Subset + default_collate (the latent-cache writer's loader) reads
    them too; an ImageNet folder used to hand default_collate a whole dict and fail (KeyError 0)."""
    from torch.utils.data import DataLoader, Subset

    for split in ("train", "val"):
        for k in range(3):
            os.makedirs(tmp_path / split / f"n0{k}")
            Image.new("RGB", (20, 16), (40 * k, 7, 99)).save(tmp_path / split / f"n0{k}" / "x.png")
    train, _, _ = build_datasets(DataConfig(name="imagenet", root=str(tmp_path), image_size=8))
    (batch,) = list(DataLoader(Subset(train, range(3)), batch_size=3))
    assert batch["image"].shape == (3, 3, 8, 8)
    for i in range(3):
        assert torch.equal(batch["image"][i], train[i]["image"]) and batch["label"][i] == train.samples[i][1]
        assert np.abs(_to_unit(batch["image"][i]).reshape(3, -1).mean(1) - [40 * i, 7, 99]).max() <= 0.5 + 1e-3


def test_training_lists_the_files_it_skipped_in_the_run_folder(folder_with_bad_files, tmp_path_factory):
    # 10 files (2 bad), lazy loading, 4 steps of batch 8: every item is drawn at least once per epoch.
    from pathlib import Path

    from unidiff.train import train

    root, bad = folder_with_bad_files
    run = tmp_path_factory.mktemp("run")
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/debug.yaml",
                      ["data.name=imagefolder", f"data.root={root}", "data.image_size=8", "data.max_items=null",
                       "data.in_memory=false", "data.val_fraction=0.0", "data.on_bad_file=skip",
                       f"run.dir={run}", "train.sample_every=0"])
    train(cfg)
    listed = [line.split("\t")[0] for line in (run / "bad_files.txt").read_text().splitlines()]
    assert listed and set(listed) <= set(bad), listed
    assert len(listed) == len(set(listed))  # each skipped file once, however often it was drawn
