"""MNIST, CIFAR-10 and Tiny-ImageNet-200 as LightningDataModules, each with a synthetic stand-in.

    dm = CIFAR10DataModule(dir="data", source="auto", download=False, batch_size=128)
    dm.data_source            # "real" or "synthetic", fixed in __init__ (resolve_source)
    dm.prepare_data()         # downloads (one process): checksummed, atomic
    dm.setup("fit")           # splits: train / val (held out of train, by seed) / test

On-disk layouts (under `dir`):
    MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]   torchvision's MNIST layout
    cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}  torchvision's CIFAR10 layout
    tiny-imagenet-200/{wnids.txt,train/<wnid>/images/*.JPEG,val/images/*.JPEG,val/val_annotations.txt}
                                                                    the official zip, unchanged

Splits: `val_size` images are held out of the official training set (a
permutation fixed by `seed`) and the official test set is the test split; for
Tiny-ImageNet, whose test labels are not public, the official val set is the
test split. `val_size: 0` validates on the test split instead, which is how the
paper's "test accuracy" curves are drawn.

Synthetic stand-ins have the real shapes and classes, split sizes scaled down
(`synthetic_sizes`), and are learnable: every class has a smooth random
prototype image, each sample is its prototype (shifted by up to 1/8 of the
image) mixed with a smooth random distractor and pixel noise; a linear model
reaches roughly 85-100 % on them, a conv net more. Deterministic by `seed`.

Training batches come from `adashift_pl.data.resumable`: the order of each epoch and every
random crop/flip are functions of (seed, epoch, image), so a run resumed at any step, with any
number of workers, sees exactly the images an uninterrupted run would.

Downloads go through `adashift_pl.data.download` (a temporary name, checksum,
then rename) with the URLs and md5 sums of torchvision's own MNIST / CIFAR10
classes, so an interrupted download leaves nothing half-written; loading goes
through torchvision's MNIST and CIFAR10 classes.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.transforms import v2

from adashift_pl.data.download import check_file, download_url, extract_archive, temporary_sibling
from adashift_pl.data.resumable import ResumableDataModule, seeded_call
from adashift_pl.data.source import resolve_source
from adashift_pl.errors import UserError

__all__ = [
    "MNISTDataModule", "CIFAR10DataModule", "TinyImageNetDataModule",
    "SyntheticImages", "TinyImageNetFolder", "TransformSubset", "ToNormalizedTensor",
    "TINY_IMAGENET_URL", "TINY_IMAGENET_MD5",
]

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
# No sha256 is published; this md5 is the one every common loader checks (248,100,043 bytes).
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


# --------------------------------------------------------------------------- datasets

class SyntheticImages(Dataset):
    """Learnable class-structured uint8 images (N, C, H, W), deterministic by `seed`.

    The class prototypes depend only on `seed` (shared by all splits); the
    samples of a split depend on (`seed`, `split`). `sparse` thresholds the
    images into bright blobs on a dark background, like MNIST digits.
    """

    def __init__(self, n: int, num_classes: int, shape: Sequence[int], seed: int, split: int,
                 sparse: bool = False):
        c, h, w = shape
        proto_gen = torch.Generator().manual_seed(int(seed))
        protos = _smooth_noise(num_classes, c, h, w, proto_gen)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7 * split + 1)
        self.targets = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
        chunks = []
        for start in range(0, n, 512):  # chunked: 64x64 float buffers for thousands of images are large
            y = self.targets[start:start + 512]
            # each sample: its class prototype moved by up to 1/8 of the image (so a linear model
            # cannot simply memorise templates), a smooth distractor and pixel noise
            shift = torch.randint(-(h // 8), h // 8 + 1, (len(y), 2), generator=gen)
            rows = (torch.arange(h)[None, :] - shift[:, :1]) % h  # a circular shift (torch.roll) per sample
            cols = (torch.arange(w)[None, :] - shift[:, 1:]) % w
            proto = protos[y[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
            distractor = _smooth_noise(len(y), c, h, w, gen)
            pixel = torch.rand((len(y), c, h, w), generator=gen)
            img = 0.45 * proto + 0.35 * distractor + 0.20 * pixel
            if sparse:  # MNIST-like: dark background, bright blobs (pixel mean ~0.1 like real MNIST)
                img = (img - 0.55) / 0.2
            chunks.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
        self.data = torch.cat(chunks) if chunks else torch.zeros((0, c, h, w), dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.data[i], int(self.targets[i])


def _smooth_noise(n: int, c: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """Low-frequency random images in [0, 1]: uniform noise at 1/4 resolution, upsampled."""
    low = torch.rand((n, c, max(2, h // 4), max(2, w // 4)), generator=gen)
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)


class TinyImageNetFolder(Dataset):
    """Tiny-ImageNet-200 from the official layout, indexed without moving a file.

    split "train": train/<wnid>/images/*.JPEG; split "val": val/images/*.JPEG with
    labels from val/val_annotations.txt (the "reorganisation" is this index).
    Labels are positions in sorted(wnids.txt).
    """

    def __init__(self, root: str | os.PathLike, split: str):
        self.root = Path(root)
        wnids_file = self.root / "wnids.txt"
        if not wnids_file.is_file():
            raise UserError(f"Tiny-ImageNet class list {wnids_file} is missing: the data set at {self.root} is "
                            f"incomplete (delete it and use --data.download true)")
        self.classes = sorted(wnids_file.read_text().split())
        index = {wnid: i for i, wnid in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        if split == "train":
            for wnid in self.classes:
                folder = self.root / "train" / wnid / "images"
                if not folder.is_dir():
                    raise UserError(f"Tiny-ImageNet training folder {folder} is missing (class {wnid} of "
                                    f"{wnids_file}); the data set is incomplete")
                self.samples += [(folder / name, index[wnid]) for name in sorted(os.listdir(folder))
                                 if name.lower().endswith((".jpeg", ".jpg", ".png"))]
        elif split == "val":
            ann = self.root / "val" / "val_annotations.txt"
            if not ann.is_file():
                raise UserError(f"Tiny-ImageNet validation labels {ann} are missing; the data set is incomplete")
            for line_no, line in enumerate(ann.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                fields = line.split("\t")
                if len(fields) < 2 or fields[1] not in index:
                    raise UserError(f"{ann} line {line_no} is malformed or names a class not in wnids.txt: {line!r}")
                self.samples.append((self.root / "val" / "images" / fields[0], index[fields[1]]))
        else:
            raise ValueError(f"Invalid split: {split!r} (allowed: train, val)")
        if not self.samples:
            raise UserError(f"no Tiny-ImageNet {split} images found under {self.root}")
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")  # a few Tiny-ImageNet JPEGs are greyscale
        except (OSError, ValueError) as err:
            raise UserError(f"unreadable image {path}: {err}") from err
        if img.size != (64, 64):
            raise UserError(f"image {path} is {img.size[0]}x{img.size[1]}, Tiny-ImageNet images are 64x64")
        return img, label


class ToNormalizedTensor:
    """PIL image or uint8 CHW tensor -> float32 CHW tensor, (x / 255 - mean) / std.

    The same result as v2.Compose([ToImage(), ToDtype(float32, scale=True), Normalize(mean, std)])
    at about 1/8 of the per-image cost (measured: 45 vs 375 us for a 28x28 image), which matters
    because the MNIST models are faster than their data pipeline.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(img, Image.Image):
            array = torch.as_tensor(np.array(img))
            img = array[None] if array.ndim == 2 else array.permute(2, 0, 1)
        return img.float().div_(255).sub_(self.mean).div_(self.std)


class TransformSubset(Dataset):
    """`base[indices[i]]` with `transform` applied to the image: one copy of the data, two pipelines.

    `augment` (random, e.g. crop + flip) runs before `transform` with torch's RNG seeded by
    (seed, epoch, image index): the key is (i, epoch) as ResumableSampler(yield_epoch=True) yields
    it; a plain index i draws epoch 0's augmentation.
    """

    def __init__(self, base: Dataset, indices: Sequence[int] | None, transform: Callable,
                 augment: Callable | None = None, seed: int = 0):
        self.base, self.indices, self.transform = base, indices, transform
        self.augment, self.seed = augment, seed

    def __len__(self) -> int:
        return len(self.base) if self.indices is None else len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        index = i if self.indices is None else int(self.indices[i])
        img, label = self.base[index]
        if self.augment is not None:
            img = seeded_call(self.augment, img, self.seed, epoch, index)
        return self.transform(img), label


# --------------------------------------------------------------------------- data modules

class _ImageDataModule(ResumableDataModule):
    """Everything the three data sets share; a subclass fills in the class attributes and the real-data hooks."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    synthetic_default: tuple[int, int, int]  # train, val, test sizes of the stand-in
    synthetic_sparse = False
    single_folder = True  # the download creates expected_path in one rename (MNIST: file by file)

    def __init__(self, dir: str = "data", source: str = "auto", download: bool = False, batch_size: int = 128,
                 num_workers: int = 0, seed: int = 0, val_size: int = 5000, augment: bool = True,
                 eval_batch_size: int | None = None, pin_memory: bool | None = None,
                 persistent_workers: bool = True, synthetic_sizes: Sequence[int] | None = None):
        super().__init__()
        for key, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                ("val_size", val_size, 0), ("eval_batch_size", eval_batch_size or 1, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"invalid data.{key} {value!r} for {self.name}: an integer >= {low}")
        sizes = tuple(synthetic_sizes or self.synthetic_default)
        if len(sizes) != 3 or any(not isinstance(s, int) or s < 1 for s in sizes):
            raise UserError(f"invalid data.synthetic_sizes {synthetic_sizes!r}: three positive integers "
                            f"[train, val, test]")
        self.dir = Path(dir).expanduser()
        self.download = bool(download)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed, self.val_size, self.augment = num_workers, int(seed), val_size, augment
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.synthetic_sizes = sizes
        self.data_source = resolve_source(source, available=self._real_available(), dataset=self.name,
                                          expected=str(self.expected_path), download=self.download)
        self.train_set = self.val_set = self.test_set = None

    # -- subclass hooks
    @property
    def expected_path(self) -> Path:
        raise NotImplementedError

    def _real_available(self) -> bool:
        raise NotImplementedError

    def _download(self) -> None:
        raise NotImplementedError

    def _prepare_real(self) -> None:
        """One-process work on downloaded files before loading (e.g. unpacking); default none."""

    def _download_archive(self, url: str, filename: str, md5: str | None, member: str) -> None:
        """Fetch `url` to `dir/filename` (md5-checked, atomic), unpack it in a private staging
        directory and move its top folder (the first part of `member`, which must be in the
        archive) to `expected_path` in one rename; the staging directory never outlives the call."""
        archive = download_url(url, self.dir / filename, md5=md5)
        folder = member.split("/", 1)[0]
        # unique per call: two processes (nodes sharing `dir`) never unpack into the same place
        staging = Path(tempfile.mkdtemp(prefix=f".{folder}.staging-", dir=self.dir))
        try:
            unpacked = extract_archive(archive, staging / "x")
            if not (unpacked / member).exists():
                raise UserError(f"{archive} does not have the {self.name} layout (no {member} in it); "
                                f"delete it and use --data.download true")
            try:
                os.replace(unpacked / folder, self.expected_path)
            except OSError:
                if not self._real_available():
                    raise
                # another process sharing `dir` finished the same download first: use its copy
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _load_real(self) -> tuple[Dataset, Dataset]:
        """(official train set, test set), images as PIL or uint8 CHW tensors, no transform."""
        raise NotImplementedError

    def augmentation(self) -> Callable | None:
        """The random part of the training pipeline, applied before eval_transform (None: no augmentation)."""
        return None

    def eval_transform(self) -> Callable:
        return ToNormalizedTensor(self.mean, self.std)

    # -- LightningDataModule
    def prepare_data(self) -> None:
        if self.data_source == "real":
            if not self._real_available():
                if self.single_folder and self.expected_path.exists():  # never merge into a broken tree
                    raise UserError(f"{self.name} at {self.expected_path} is incomplete: delete that folder and "
                                    f"run again with --data.download true")
                self._download()
            self._prepare_real()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.data_source == "real":
            train_full, test = self._load_real()
        else:
            n_train, n_val, n_test = self.synthetic_sizes
            args = (self.num_classes, self.image_shape, self.seed)
            train_full = SyntheticImages(n_train + n_val, *args, split=0, sparse=self.synthetic_sparse)
            test = SyntheticImages(n_test, *args, split=1, sparse=self.synthetic_sparse)
        n = len(train_full)
        val_size = self.val_size if self.data_source == "real" else self.synthetic_sizes[1]
        if self.val_size == 0:
            val_size = 0
        if val_size >= n:
            raise UserError(f"invalid data.val_size {self.val_size} for {self.name}: the training set has only "
                            f"{n} images")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.train_set = TransformSubset(train_full, perm[val_size:], self.eval_transform(),
                                         augment=self.augmentation() if self.augment else None, seed=self.seed)
        self.test_set = TransformSubset(test, None, self.eval_transform())
        self.val_set = (TransformSubset(train_full, perm[:val_size], self.eval_transform()) if val_size
                        else self.test_set)

    def loader_kwargs(self) -> dict:
        """DataLoader settings shared by every split (workers, pinning)."""
        pin = self.pin_memory
        if pin is None:  # pin only when the trainer moves batches to a GPU
            trainer = getattr(self, "trainer", None)
            pin = bool(trainer is not None and trainer.strategy.root_device.type == "cuda")
        return dict(num_workers=self.num_workers, pin_memory=pin,
                    persistent_workers=self.persistent_workers and self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self.resumable_loader(self.train_set, seed=self.seed, yield_epoch=True, batch_size=self.batch_size,
                                     **self.loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, **self.loader_kwargs())

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.eval_batch_size, **self.loader_kwargs())


class MNISTDataModule(_ImageDataModule):
    """MNIST (LeCun et al.), 60k train / 10k test, 28x28 greyscale; normalised, no augmentation."""

    name = "MNIST"
    num_classes = 10
    image_shape = (1, 28, 28)
    mean, std = (0.1307,), (0.3081,)
    synthetic_default = (5000, 1000, 1000)
    synthetic_sparse = True
    single_folder = False
    FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

    @property
    def expected_path(self) -> Path:
        return self.dir / "MNIST" / "raw"

    def _real_available(self) -> bool:
        raw = self.expected_path
        return all((raw / f).is_file() or (raw / f"{f}.gz").is_file() for f in self.FILES)

    def _download(self) -> None:
        raw = self.expected_path
        for filename, md5 in datasets.MNIST.resources:
            if (raw / filename).is_file() or (raw / filename[:-3]).is_file():
                continue
            errors = []
            for mirror in datasets.MNIST.mirrors:
                try:
                    download_url(f"{mirror}{filename}", raw / filename, md5=md5)
                    break
                except UserError as err:
                    errors.append(str(err))
            else:
                raise UserError(f"could not download MNIST file {filename} from any mirror: {'; '.join(errors)}")

    def _prepare_real(self) -> None:
        raw = self.expected_path
        for f in self.FILES:  # torchvision reads the uncompressed IDX files; unpack the .gz ones atomically
            if not (raw / f).is_file():
                _gunzip(raw / f"{f}.gz", raw / f)

    def _load_real(self) -> tuple[Dataset, Dataset]:
        raw = self.expected_path
        self._prepare_real()  # no-op after prepare_data; covers setup() called on its own
        out = []
        for train in (True, False):
            try:
                ds = datasets.MNIST(str(self.dir), train=train, download=False)
            except (AssertionError, ValueError, TypeError, RuntimeError, KeyError, IndexError) as err:
                prefix = "train" if train else "t10k"
                raise UserError(f"MNIST files {raw}/{prefix}-*-ubyte are corrupt or truncated ({err!r}); "
                                f"delete them and use --data.download true") from err
            images, labels = ds.data, ds.targets
            if images.shape[1:] != (28, 28) or len(images) != len(labels):
                prefix = "train" if train else "t10k"
                raise UserError(f"MNIST files {raw}/{prefix}-*-ubyte have the wrong shape: images "
                                f"{tuple(images.shape)}, labels {tuple(labels.shape)} (expected N x 28 x 28, N)")
            out.append(ds)
        return out[0], out[1]


def _gunzip(src: Path, dest: Path) -> None:
    part = temporary_sibling(dest)  # private to this process: concurrent runs may unpack the same file
    try:
        with gzip.open(src, "rb") as fin, open(part, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(part, dest)
    except (OSError, EOFError) as err:
        part.unlink(missing_ok=True)
        raise UserError(f"{src} is corrupt or truncated ({err}); delete it and use --data.download true") from err
    except BaseException:
        part.unlink(missing_ok=True)
        raise


class _CIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR10 with the checksum check done by the data module (so it can name the file)."""

    def _check_integrity(self) -> bool:
        return True

    def _load_meta(self) -> None:
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class CIFAR10DataModule(_ImageDataModule):
    """CIFAR-10, 50k train / 10k test, 32x32 RGB; random crop (pad 4) + horizontal flip + per-channel normalisation.

    verify_checksums: check every batch file against torchvision's md5 list in setup
    (about a second); turn off only for hand-made files.
    """

    name = "CIFAR-10"
    num_classes = 10
    image_shape = (3, 32, 32)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    synthetic_default = (5000, 1000, 1000)

    # The full signature is spelled out (no **kwargs) so that a mistyped key is reported with the valid ones.
    def __init__(self, dir: str = "data", source: str = "auto", download: bool = False, batch_size: int = 128,
                 num_workers: int = 0, seed: int = 0, val_size: int = 5000, augment: bool = True,
                 eval_batch_size: int | None = None, pin_memory: bool | None = None,
                 persistent_workers: bool = True, synthetic_sizes: Sequence[int] | None = None, verify_checksums: bool = True):
        self.verify_checksums = verify_checksums
        super().__init__(dir=dir, source=source, download=download, batch_size=batch_size, num_workers=num_workers,
                         seed=seed, val_size=val_size, augment=augment, eval_batch_size=eval_batch_size,
                         pin_memory=pin_memory, persistent_workers=persistent_workers,
                         synthetic_sizes=synthetic_sizes)

    @property
    def expected_path(self) -> Path:
        return self.dir / datasets.CIFAR10.base_folder

    def _files(self) -> list[tuple[str, str]]:
        c = datasets.CIFAR10
        return [*map(tuple, c.train_list), *map(tuple, c.test_list), (c.meta["filename"], c.meta["md5"])]

    def _real_available(self) -> bool:
        return all((self.expected_path / name).is_file() for name, _ in self._files())

    def _download(self) -> None:
        c = datasets.CIFAR10
        self._download_archive(c.url, c.filename, c.tgz_md5, c.base_folder)

    def _load_real(self) -> tuple[Dataset, Dataset]:
        if self.verify_checksums:
            for name, md5 in self._files():
                check_file(self.expected_path / name, md5=md5)
        out = []
        for train in (True, False):
            try:
                out.append(_CIFAR10(str(self.dir), train=train, download=False))
            except Exception as err:  # noqa: BLE001 - find and name the bad file
                raise UserError(_name_bad_cifar_file(self.expected_path, err)) from err
        return out[0], out[1]

    def augmentation(self) -> Callable:
        return v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])


def _name_bad_cifar_file(folder: Path, err: Exception) -> str:
    c = datasets.CIFAR10
    for name in [n for n, _ in c.train_list + c.test_list]:
        path = folder / name
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            data, labels = entry["data"], entry["labels"]
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != data.shape[0]:
                return (f"CIFAR-10 file {path} has the wrong shape: data {data.shape}, {len(labels)} labels "
                        f"(expected N x 3072 and N)")
        except Exception as file_err:  # noqa: BLE001
            return (f"CIFAR-10 file {path} is corrupt or truncated ({type(file_err).__name__}: {file_err}); "
                    f"delete {folder} and use --data.download true")
    return f"could not read CIFAR-10 from {folder}: {type(err).__name__}: {err}"


class TinyImageNetDataModule(_ImageDataModule):
    """Tiny-ImageNet-200: 100k train (500/class) / 10k official val used as the test split, 64x64 RGB.

    Train pipeline: random crop (pad `crop_padding`) + horizontal flip + normalisation.
    `url` / `md5` default to the official zip and its md5 (override for a mirror).
    """

    name = "Tiny-ImageNet-200"
    num_classes = 200
    image_shape = (3, 64, 64)
    mean, std = (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)
    synthetic_default = (4000, 1000, 1000)

    def __init__(self, dir: str = "data", source: str = "auto", download: bool = False, batch_size: int = 128,
                 num_workers: int = 0, seed: int = 0, val_size: int = 5000, augment: bool = True,
                 eval_batch_size: int | None = None, pin_memory: bool | None = None,
                 persistent_workers: bool = True, synthetic_sizes: Sequence[int] | None = None, url: str = TINY_IMAGENET_URL,
                 md5: str | None = TINY_IMAGENET_MD5, crop_padding: int = 8):
        self.url, self.md5, self.crop_padding = url, md5, crop_padding
        super().__init__(dir=dir, source=source, download=download, batch_size=batch_size, num_workers=num_workers,
                         seed=seed, val_size=val_size, augment=augment, eval_batch_size=eval_batch_size,
                         pin_memory=pin_memory, persistent_workers=persistent_workers,
                         synthetic_sizes=synthetic_sizes)

    @property
    def expected_path(self) -> Path:
        return self.dir / "tiny-imagenet-200"

    def _real_available(self) -> bool:
        root = self.expected_path
        return (root / "wnids.txt").is_file() and (root / "train").is_dir() and \
            (root / "val" / "val_annotations.txt").is_file()

    def _download(self) -> None:
        self._download_archive(self.url, "tiny-imagenet-200.zip", self.md5, "tiny-imagenet-200/wnids.txt")

    def _load_real(self) -> tuple[Dataset, Dataset]:
        return TinyImageNetFolder(self.expected_path, "train"), TinyImageNetFolder(self.expected_path, "val")

    def augmentation(self) -> Callable:
        return v2.Compose([v2.RandomCrop(64, padding=self.crop_padding), v2.RandomHorizontalFlip()])
