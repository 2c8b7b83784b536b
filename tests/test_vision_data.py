"""Vision DataModules on tiny data sets written in the real on-disk formats, through the real code path.

MNIST raw IDX (.gz), CIFAR-10 python pickle batches, the Tiny-ImageNet folder
layout with val_annotations.txt; downloads from a 127.0.0.1 http.server; the
synthetic stand-ins; the user errors.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from adashift_pl.data.vision import (CIFAR10DataModule, MNISTDataModule, SyntheticImages, TinyImageNetDataModule,
                                     TinyImageNetFolder)
from adashift_pl.errors import UserError

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test in this module runs on one intra-op thread (see tests/conftest.py)."""


# --------------------------------------------------------------------------- writers of the real formats

def _idx(array: np.ndarray) -> bytes:
    """IDX (LeCun's MNIST format): magic 0x0000 08 <ndim>, big-endian dims, uint8 data."""
    return struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + \
        array.astype(np.uint8).tobytes()


def write_mnist(root: Path, n_train: int = 30, n_test: int = 10) -> dict:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
        (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))
        out[prefix] = (images, labels)
    return out


def write_cifar(root: Path, per_batch: int = 4, n_test: int = 6) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {"train": [], "test": None}

    def batch(n: int, offset: int) -> dict:
        data = RNG.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        return {"batch_label": b"x", "labels": [(offset + i) % 10 for i in range(n)], "data": data,
                "filenames": [f"{i}.png" for i in range(n)]}

    for k in range(1, 6):
        b = batch(per_batch, k)
        out["train"].append(b)
        (folder / f"data_batch_{k}").write_bytes(pickle.dumps(b))
    out["test"] = batch(n_test, 0)
    (folder / "test_batch").write_bytes(pickle.dumps(out["test"]))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return out


WNIDS = ["n02", "n01", "n03"]  # deliberately unsorted: labels are positions in sorted order


def _jpeg(color: tuple[int, int, int], size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


def tiny_files(per_class: int = 4) -> dict[str, bytes]:
    """relative path -> bytes of a miniature tiny-imagenet-200 tree (the official zip's layout)."""
    files = {"tiny-imagenet-200/wnids.txt": "\n".join(WNIDS).encode() + b"\n",
             "tiny-imagenet-200/words.txt": b"n01\tone\nn02\ttwo\nn03\tthree\n"}
    ann = []
    for c, wnid in enumerate(WNIDS):
        for i in range(per_class):
            files[f"tiny-imagenet-200/train/{wnid}/images/{wnid}_{i}.JPEG"] = _jpeg((80 * c, 10 * i, 0))
        files[f"tiny-imagenet-200/train/{wnid}/{wnid}_boxes.txt"] = b""
        files[f"tiny-imagenet-200/val/images/val_{c}.JPEG"] = _jpeg((0, 80 * c, 0))
        ann.append(f"val_{c}.JPEG\t{wnid}\t0\t0\t63\t63")
    files["tiny-imagenet-200/val/val_annotations.txt"] = ("\n".join(ann) + "\n").encode()
    files["tiny-imagenet-200/test/images/test_0.JPEG"] = _jpeg((1, 2, 3))
    return files


def write_tiny(root: Path) -> Path:
    for rel, data in tiny_files().items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root / "tiny-imagenet-200"


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for rel, data in files.items():
            zf.writestr(rel, data)
    return buf.getvalue()


def _all_labels(ds) -> list[int]:
    return sorted(int(ds[i][1]) for i in range(len(ds)))


# --------------------------------------------------------------------------- MNIST

def test_mnist_idx_gz_loads_through_torchvision(tmp_path):
    written = write_mnist(tmp_path)
    dm = MNISTDataModule(dir=str(tmp_path), source="real", val_size=5, batch_size=8, seed=3)
    assert dm.data_source == "real"
    dm.prepare_data()  # unpacks the .gz files atomically
    assert (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    assert not list((tmp_path / "MNIST" / "raw").glob("*.part"))
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (25, 5, 10)
    assert sorted(_all_labels(dm.train_set) + _all_labels(dm.val_set)) == sorted(written["train"][1].tolist())
    x, y = dm.test_set[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == written["t10k"][1][3]
    expected = (torch.from_numpy(written["t10k"][0][3]).float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(x[0], expected, atol=1e-5)  # MNIST normalisation
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (8, 1, 28, 28) and yb.shape == (8,)
    # Same seed, same split; another seed, another split.
    dm2 = MNISTDataModule(dir=str(tmp_path), source="real", val_size=5, seed=3)
    dm2.setup("fit")
    assert dm2.val_set.indices == dm.val_set.indices
    dm3 = MNISTDataModule(dir=str(tmp_path), source="real", val_size=5, seed=4)
    dm3.setup("fit")
    assert dm3.val_set.indices != dm.val_set.indices
    paper_style = MNISTDataModule(dir=str(tmp_path), source="real", val_size=0)
    paper_style.setup("fit")
    assert paper_style.val_set is paper_style.test_set and len(paper_style.train_set) == 30


def test_mnist_unpacking_uses_a_private_temporary_file(tmp_path):
    """Two runs of a sweep unpacking the same .gz at once must not share one temporary file: a
    `train-images-idx3-ubyte.part` that is not ours is neither overwritten nor moved into place."""
    write_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    theirs = raw / "train-images-idx3-ubyte.part"
    theirs.write_bytes(b"another process's half-written file")
    dm = MNISTDataModule(dir=str(tmp_path), source="real", val_size=5)
    dm.prepare_data()
    assert theirs.read_bytes() == b"another process's half-written file"
    dm.setup("fit")
    assert len(dm.train_set) == 25
    assert sorted(p.name for p in raw.iterdir() if p.name.endswith(".part")) == [theirs.name]


def test_mnist_corrupt_files_are_named(tmp_path):
    write_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    gz = raw / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:40])  # truncated download
    dm = MNISTDataModule(dir=str(tmp_path), source="real", val_size=5)
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte\.gz is corrupt or truncated"):
        dm.prepare_data()
    assert not list(raw.glob("*.part")) and not (raw / "train-images-idx3-ubyte").exists()
    # An IDX file with the wrong shape (28x27 images).
    (raw / "train-images-idx3-ubyte").write_bytes(_idx(np.zeros((30, 28, 27), np.uint8)))
    with pytest.raises(UserError, match=r"MNIST files .*train-\*-ubyte have the wrong shape"):
        dm.setup("fit")


def test_mnist_download_uses_mirrors_checksums_atomically(tmp_path, serve, monkeypatch):
    files = {}
    src = tmp_path / "src"
    write_mnist(src)
    for f in sorted((src / "MNIST" / "raw").iterdir()):
        files[f"/mnist/{f.name}"] = f.read_bytes()
    base = serve(files)
    resources = [(name.split("/")[-1], hashlib.md5(data).hexdigest()) for name, data in files.items()]
    monkeypatch.setattr(datasets.MNIST, "mirrors", ["http://127.0.0.1:9/dead/", f"{base}/mnist/"])  # 1st fails
    monkeypatch.setattr(datasets.MNIST, "resources", resources)
    dm = MNISTDataModule(dir=str(tmp_path / "data"), source="real", download=True, val_size=5)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.test_set) == 10
    # A wrong checksum on every mirror: a UserError, and nothing half-written.
    monkeypatch.setattr(datasets.MNIST, "resources", [(n, "0" * 32) for n, _ in resources])
    dm = MNISTDataModule(dir=str(tmp_path / "data2"), source="real", download=True)
    with pytest.raises(UserError, match="could not download MNIST file"):
        dm.prepare_data()
    assert not list((tmp_path / "data2").rglob("*.*"))


# --------------------------------------------------------------------------- CIFAR-10

def test_cifar_pickle_batches_load(tmp_path):
    written = write_cifar(tmp_path)
    dm = CIFAR10DataModule(dir=str(tmp_path), source="real", val_size=4, batch_size=4, verify_checksums=False)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (16, 4, 6)
    x, y = dm.test_set[2]
    assert x.shape == (3, 32, 32) and y == written["test"]["labels"][2]
    img = torch.from_numpy(written["test"]["data"][2].reshape(3, 32, 32)).float() / 255
    mean, std = torch.tensor(dm.mean)[:, None, None], torch.tensor(dm.std)[:, None, None]
    assert torch.allclose(x, (img - mean) / std, atol=1e-5)  # eval pipeline: normalisation only
    all_train = sorted(lab for b in written["train"] for lab in b["labels"])
    assert sorted(_all_labels(dm.train_set) + _all_labels(dm.val_set)) == all_train
    xb, _ = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 3, 32, 32)  # train pipeline: crop + flip keep the shape


def test_cifar_checksum_and_corruption_name_the_file(tmp_path):
    write_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    dm = CIFAR10DataModule(dir=str(tmp_path), source="real", val_size=4)  # verify_checksums on
    with pytest.raises(UserError, match=r"checksum mismatch for .*data_batch_1: expected md5 c99cafc1"):
        dm.setup("fit")
    (folder / "data_batch_3").write_bytes((folder / "data_batch_3").read_bytes()[:100])
    dm = CIFAR10DataModule(dir=str(tmp_path), source="real", val_size=4, verify_checksums=False)
    with pytest.raises(UserError, match=r"CIFAR-10 file .*data_batch_3 is corrupt or truncated"):
        dm.setup("fit")


def test_cifar_download_extracts_atomically(tmp_path, serve, monkeypatch):
    src = tmp_path / "src"
    write_cifar(src)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    archive = buf.getvalue()
    base = serve({"/cifar.tar.gz": archive, "/cut.tar.gz": archive[: len(archive) // 2]})
    monkeypatch.setattr(datasets.CIFAR10, "url", f"{base}/cut.tar.gz")
    monkeypatch.setattr(datasets.CIFAR10, "tgz_md5", None)
    data = tmp_path / "data"
    dm = CIFAR10DataModule(dir=str(data), source="real", download=True, verify_checksums=False, val_size=4)
    with pytest.raises(UserError, match=r"cifar-10-python\.tar\.gz is corrupt or truncated"):
        dm.prepare_data()
    assert sorted(p.name for p in data.iterdir()) == ["cifar-10-python.tar.gz"]  # no half-extracted tree
    (data / "cifar-10-python.tar.gz").unlink()
    monkeypatch.setattr(datasets.CIFAR10, "url", f"{base}/cifar.tar.gz")
    monkeypatch.setattr(datasets.CIFAR10, "tgz_md5", hashlib.md5(archive).hexdigest())
    dm.prepare_data()
    assert sorted(p.name for p in data.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    dm.setup("fit")
    assert len(dm.test_set) == 6


def test_cifar_download_of_a_wrong_archive_is_named_and_leaves_no_staging(tmp_path, serve, monkeypatch):
    """An archive without cifar-10-batches-py/ is a UserError naming it (it was a FileNotFoundError
    traceback), and no staging directory stays behind."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("something-else/readme.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    archive = buf.getvalue()
    monkeypatch.setattr(datasets.CIFAR10, "url", f"{serve({'/other.tar.gz': archive})}/other.tar.gz")
    monkeypatch.setattr(datasets.CIFAR10, "tgz_md5", hashlib.md5(archive).hexdigest())
    data = tmp_path / "data"
    dm = CIFAR10DataModule(dir=str(data), source="real", download=True, verify_checksums=False, val_size=4)
    with pytest.raises(UserError, match=r"cifar-10-python\.tar\.gz does not have the CIFAR-10 layout"):
        dm.prepare_data()
    assert sorted(p.name for p in data.iterdir()) == ["cifar-10-python.tar.gz"]


# --------------------------------------------------------------------------- Tiny-ImageNet

def test_tiny_imagenet_layout_and_val_annotations(tmp_path):
    root = write_tiny(tmp_path)
    val = TinyImageNetFolder(root, "val")
    assert val.classes == ["n01", "n02", "n03"]
    assert [label for _, label in val.samples] == [1, 0, 2]  # val_c has class WNIDS[c]
    dm = TinyImageNetDataModule(dir=str(tmp_path), source="real", val_size=3, batch_size=4)
    assert dm.data_source == "real"
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (9, 3, 3)
    x, y = dm.test_set[0]
    assert x.shape == (3, 64, 64) and y == 1
    assert sorted(_all_labels(dm.train_set) + _all_labels(dm.val_set)) == [0] * 4 + [1] * 4 + [2] * 4
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 3, 64, 64)


def test_tiny_imagenet_bad_images_and_missing_files_are_named(tmp_path):
    root = write_tiny(tmp_path)
    bad = root / "val" / "images" / "val_1.JPEG"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match=r"unreadable image .*val_1\.JPEG"):
        TinyImageNetFolder(root, "val")[1]
    bad.write_bytes(_jpeg((0, 0, 0), size=32))
    with pytest.raises(UserError, match=r"val_1\.JPEG is 32x32"):
        TinyImageNetFolder(root, "val")[1]
    (root / "val" / "val_annotations.txt").unlink()
    with pytest.raises(UserError, match=r"val_annotations\.txt"):
        TinyImageNetFolder(root, "val")


def test_tiny_imagenet_download(tmp_path, serve):
    archive = _zip(tiny_files())
    base = serve({"/tiny.zip": archive, "/cut.zip": archive[: len(archive) // 2]})
    data = tmp_path / "data"
    md5 = hashlib.md5(archive).hexdigest()
    # Bad checksum: nothing is left behind.
    dm = TinyImageNetDataModule(dir=str(data), source="real", download=True, url=f"{base}/tiny.zip", md5="0" * 32)
    with pytest.raises(UserError, match="checksum mismatch"):
        dm.prepare_data()
    assert not data.exists() or not list(data.iterdir())
    # Truncated archive (no checksum to catch it): extraction fails, no data set appears.
    dm = TinyImageNetDataModule(dir=str(data), source="real", download=True, url=f"{base}/cut.zip", md5=None)
    with pytest.raises(UserError, match=r"tiny-imagenet-200\.zip is corrupt or truncated"):
        dm.prepare_data()
    assert sorted(p.name for p in data.iterdir()) == ["tiny-imagenet-200.zip"]
    (data / "tiny-imagenet-200.zip").unlink()
    # Success.
    dm = TinyImageNetDataModule(dir=str(data), source="real", download=True, url=f"{base}/tiny.zip", md5=md5,
                                val_size=3)
    dm.prepare_data()
    assert sorted(p.name for p in data.iterdir()) == ["tiny-imagenet-200", "tiny-imagenet-200.zip"]
    dm.setup("fit")
    assert len(dm.test_set) == 3 and dm.test_set[2][0].shape == (3, 64, 64)
    # A half-deleted data set is not silently merged with a new download.
    (data / "tiny-imagenet-200" / "wnids.txt").unlink()
    with pytest.raises(UserError, match=r"tiny-imagenet-200 is incomplete: delete that folder"):
        TinyImageNetDataModule(dir=str(data), source="real", download=True, url=f"{base}/tiny.zip").prepare_data()


# --------------------------------------------------------------------------- sources, stand-ins, errors

@pytest.mark.parametrize("cls,folder", [(MNISTDataModule, "MNIST"), (CIFAR10DataModule, "cifar-10-batches-py"),
                                        (TinyImageNetDataModule, "tiny-imagenet-200")])
def test_missing_real_data_is_a_user_error(tmp_path, cls, folder, capsys):
    with pytest.raises(UserError, match=rf"not found at .*{folder}.*--data\.download true"):
        cls(dir=str(tmp_path), source="real")
    dm = cls(dir=str(tmp_path), source="auto")
    assert dm.data_source == "synthetic"
    assert "SYNTHETIC STAND-IN" in capsys.readouterr().err


@pytest.mark.parametrize("cls,shape,classes", [(MNISTDataModule, (1, 28, 28), 10),
                                               (CIFAR10DataModule, (3, 32, 32), 10),
                                               (TinyImageNetDataModule, (3, 64, 64), 200)])
def test_synthetic_stand_ins(tmp_path, cls, shape, classes):
    make = partial(cls, dir=str(tmp_path), source="synthetic", synthetic_sizes=[200, 20, 20], batch_size=16)
    dm = make(seed=1)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (200, 20, 20)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, *shape) and x.dtype == torch.float32 and 0 <= int(y.min()) and int(y.max()) < classes
    again = make(seed=1)
    again.setup("fit")
    assert torch.equal(dm.test_set[5][0], again.test_set[5][0])  # deterministic by seed
    other = make(seed=2)
    other.setup("fit")
    assert not torch.equal(dm.test_set[5][0], other.test_set[5][0])


def test_synthetic_has_class_structure():
    # Nearest class mean on raw pixels beats chance by far: the stand-in is learnable, not noise.
    train = SyntheticImages(600, 10, (3, 32, 32), seed=0, split=0)
    test = SyntheticImages(200, 10, (3, 32, 32), seed=0, split=1)
    x = train.data.float().flatten(1)
    means = torch.stack([x[train.targets == k].mean(0) for k in range(10)])
    pred = torch.cdist(test.data.float().flatten(1), means).argmin(1)
    assert (pred == test.targets).float().mean() > 0.5


@pytest.mark.parametrize("kwargs,match", [({"batch_size": 0}, "batch_size"), ({"num_workers": -1}, "num_workers"),
                                          ({"source": "imagenet"}, "auto, real, synthetic"),
                                          ({"synthetic_sizes": [1, 2]}, "synthetic_sizes")])
def test_bad_settings_are_user_errors(tmp_path, kwargs, match):
    with pytest.raises(UserError, match=match):
        MNISTDataModule(dir=str(tmp_path), **{"source": "synthetic", **kwargs})
