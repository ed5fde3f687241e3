"""Datasets: Fashion-MNIST (the default) from the standard IDX files.

The IDX files come from Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``), or any directory holding the four standard files
(``.gz`` or not). Where none exists, torchvision's downloader fetches them (network needed).
"""

from __future__ import annotations

import gzip
import os
import typing
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from ..errors import ConfigError, DataError, UsnetValueError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        # gzip says "Compressed file ended before the end-of-stream marker was reached" and
        # names no file; a download cut short or a damaged copy are the usual causes.
        raise DataError(f"{str(path)!r} is a truncated or corrupt gzip file ({err}); "
                        "download or copy it again") from None  # fmt: skip
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{str(path)!r} is not an IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise DataError(f"{str(path)!r} is truncated: expected {dims}, found {array.size} values")
    return array.reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


class FashionMNIST(Dataset):
    """Fashion-MNIST held in memory as uint8; items are normalized ``(1, 28, 28)`` float tensors.

    Args:
        root: directory with the IDX files (default: Debian's package directory, else
            torchvision's download into ``~/.cache/usnet/data``); a root without the files is an
            error, never a download.
        train: the 60k training split, else the 10k test split.
        limit: keep only the first ``limit`` images (quick runs).
        transform: optional callable applied to each normalized image tensor.
        download: allow torchvision's downloader when no files are found.
    """

    def __init__(self, root: str | os.PathLike | None = None, train: bool = True,
                 limit: int | None = None, transform=None, download: bool = True):  # fmt: skip
        split = "train" if train else "t10k"
        images_path, labels_path = self._locate(root, split, download)
        images = read_idx(images_path)
        labels = read_idx(labels_path)
        if images.ndim != 3 or labels.shape != (images.shape[0],):
            raise UsnetValueError(
                f"unexpected Fashion-MNIST shapes {images.shape} / {labels.shape}"
            )
        if limit is not None:
            if limit < 1:
                raise UsnetValueError(f"limit must be a positive number of images, got {limit}")
            images, labels = images[:limit], labels[:limit]
        self.images = torch.from_numpy(images.copy())
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform
        self.classes = FASHION_MNIST_CLASSES

    @staticmethod
    def _locate(root, split: str, download: bool) -> tuple[Path, Path]:
        directory = Path(root) if root is not None else DEBIAN_FASHION_MNIST
        images = _find(directory, f"{split}-images-idx3-ubyte")
        labels = _find(directory, f"{split}-labels-idx1-ubyte")
        if images and labels:
            return images, labels
        if root is not None:
            raise FileNotFoundError(
                f"no Fashion-MNIST IDX files ({split}-images-idx3-ubyte[.gz] and "
                f"{split}-labels-idx1-ubyte[.gz]) in {str(root)!r}"
            )
        if not download:
            raise FileNotFoundError(
                f"Fashion-MNIST not found in {DEBIAN_FASHION_MNIST}; install Debian's "
                "dataset-fashion-mnist (scripts/setup.sh does) or pass root="
            )
        from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

        cache = Path.home() / ".cache" / "usnet" / "data"
        tv = TorchvisionFashionMNIST(str(cache), train=split == "train", download=True)
        raw = Path(tv.raw_folder)
        return raw / f"{split}-images-idx3-ubyte", raw / f"{split}-labels-idx1-ubyte"

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index].unsqueeze(0).float().div_(255.0)
        image = (image - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def tensors(self) -> tuple[Tensor, Tensor]:
        """All images, normalized, as one ``(N, 1, 28, 28)`` tensor, and the labels."""
        images = self.images.unsqueeze(1).float().div_(255.0)
        return (images - FASHION_MNIST_MEAN) / FASHION_MNIST_STD, self.targets


class TensorBatches:
    """The batches a ``DataLoader(dataset, batch_size, sampler=order, drop_last=True)`` would give,
    sliced from the whole dataset held as two tensors (already on the training device).

    Why: small in-memory datasets (Fashion-MNIST: 188 MB as float32) fit on any GPU, and a GPU
    step of a small network takes a few milliseconds, about what collating 128 images one
    ``__getitem__`` at a time costs on the host. Indexing one device tensor per batch makes
    loading free and needs no worker processes; the batches are bit-identical to the loader's.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, order: typing.Sequence[int], batch_size: int
    ):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.order = torch.as_tensor(list(order), dtype=torch.long, device=images.device)

    def __len__(self) -> int:
        return len(self.order) // self.batch_size

    def __iter__(self) -> typing.Iterator[tuple[Tensor, Tensor]]:
        for i in range(len(self)):
            index = self.order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.images[index], self.labels[index]


def as_tensors(dataset: Dataset) -> tuple[Tensor, Tensor] | None:
    """All items of ``dataset`` as (images, labels) tensors if it holds them in memory and applies
    no per-item transform (random augmentation must stay per item); else None. A ``Subset`` of
    such a dataset (a validation split) gives its items, in its order."""
    if isinstance(dataset, Subset):
        whole = as_tensors(dataset.dataset)
        if whole is None:
            return None
        index = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        return whole[0][index], whole[1][index]
    tensors = getattr(dataset, "tensors", None)
    if not callable(tensors) or getattr(dataset, "transform", None) is not None:
        return None
    return tensors()


# --- datasets by name (the trainer's `data` config section) --------------------------------------
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class DataInfo(typing.NamedTuple):
    num_classes: int
    in_channels: int
    small_input: bool
    input_size: tuple[int, int, int, int]


def dataset_input_size(name: str, image_size: int = 224) -> tuple[int, int, int, int]:
    """The ``(1, C, H, W)`` input of a dataset by name (what its models are profiled and exported at)."""
    if name == "fashion_mnist":
        return (1, 1, 28, 28)
    if name in ("cifar10", "cifar100"):
        return (1, 3, 32, 32)
    if name == "imagefolder":
        return (1, 3, image_size, image_size)
    raise UsnetValueError(
        f"unknown dataset {name!r}; valid: fashion_mnist, imagefolder, cifar10, cifar100"
    )


def checkpoint_input_size(model: nn.Module, payload: Mapping[str, typing.Any]) -> tuple[int, ...]:
    """The ``(1, C, H, W)`` a checkpoint's model is profiled, exported and served at: its run's
    dataset size if the checkpoint records its config, else the model's own.

    Only ``data.name``/``data.image_size`` are read (not the whole config, validated), so a
    checkpoint whose config has keys this version does not know still exports."""
    from ..models import model_input_size

    data = ((payload.get("extra") or {}).get("config") or {}).get("data") or {}
    if isinstance(data, dict) and data.get("name"):
        return dataset_input_size(str(data["name"]), int(data.get("image_size", 224)))
    return model_input_size(model)


def build_datasets(name: str, root: str | None = None, *, limit_train: int | None = None,
                   limit_test: int | None = None, image_size: int = 224,
                   augment: bool = False) -> tuple[Dataset, Dataset, Dataset, DataInfo]:  # fmt: skip
    """(train, calibration, test) datasets and their shape info, by name.

    The calibration set holds the training images with evaluation-time transforms.
    """
    from torchvision.transforms import v2 as T

    if name == "fashion_mnist":
        train_tf = (
            T.Compose([T.RandomCrop(28, padding=2), T.RandomHorizontalFlip()]) if augment else None
        )
        train = FashionMNIST(root, train=True, limit=limit_train, transform=train_tf)
        calib = FashionMNIST(root, train=True, limit=limit_train)
        test = FashionMNIST(root, train=False, limit=limit_test)
        return train, calib, test, DataInfo(10, 1, True, dataset_input_size(name))
    if name in ("cifar10", "cifar100"):
        from torchvision import datasets

        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        root = root or str(Path.home() / ".cache" / "usnet" / "data")
        norm = [
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(CIFAR_MEAN, CIFAR_STD),
        ]
        aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
        try:
            train = cls(root, train=True, transform=T.Compose(aug + norm))
            calib = cls(root, train=True, transform=T.Compose(norm))
            test = cls(root, train=False, transform=T.Compose(norm))
        except RuntimeError as err:
            raise FileNotFoundError(f"{name} not found under {root!r} ({err})") from None
        train, calib, test = (
            _limit(d, n)
            for d, n in ((train, limit_train), (calib, limit_train), (test, limit_test))
        )
        return (
            train,
            calib,
            test,
            DataInfo(10 if name == "cifar10" else 100, 3, True, dataset_input_size(name)),
        )
    if name == "imagefolder":
        from torchvision import datasets

        if root is None:
            raise UsnetValueError("imagefolder needs a root directory holding train/ and val/")
        for split in ("train", "val"):
            if not (Path(root) / split).is_dir():
                raise FileNotFoundError(f"imagefolder root {root!r} has no {split}/ directory")
        norm = [
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
        resize = [T.Resize(int(round(image_size / 0.875))), T.CenterCrop(image_size)]
        train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *norm])
        folders = {split: _image_folder(Path(root) / split) for split in ("train", "val")}
        train = datasets.ImageFolder(folders["train"], transform=train_tf, loader=load_image)
        calib = datasets.ImageFolder(
            folders["train"], transform=T.Compose(resize + norm), loader=load_image
        )
        test = datasets.ImageFolder(
            folders["val"], transform=T.Compose(resize + norm), loader=load_image
        )
        if train.classes != test.classes:
            raise DataError(
                f"imagefolder {root!r}: train/ holds classes {_names(train.classes)} but val/ holds "
                f"{_names(test.classes)}; both need the same class subdirectories"
            )
        train, calib, test = (
            _limit(d, n)
            for d, n in ((train, limit_train), (calib, limit_train), (test, limit_test))
        )
        return train, calib, test, DataInfo(len(test.dataset.classes if isinstance(test, Subset) else test.classes),
                                            3, False, dataset_input_size(name, image_size))  # fmt: skip
    raise UsnetValueError(
        f"unknown dataset {name!r}; valid: fashion_mnist, imagefolder, cifar10, cifar100"
    )


def _image_folder(directory: Path) -> str:
    """``directory`` if it holds at least two class subdirectories with images (torchvision's
    own error for an empty class names no fix; one class would train to a meaningless 100%)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = sorted(d.name for d in directory.iterdir() if d.is_dir())
    empty = [c for c in classes if not any(f.name.lower().endswith(IMG_EXTENSIONS)
                                           for f in (directory / c).rglob("*") if f.is_file())]  # fmt: skip
    if empty:
        raise DataError(
            f"{str(directory / empty[0])!r} holds no image files ({', '.join(IMG_EXTENSIONS)})"
        )
    if len(classes) < 2:
        raise DataError(
            f"{str(directory)!r} holds {len(classes)} class subdirectories {_names(classes)}; "
            "a classifier needs at least 2 (one subdirectory of images per class)"
        )
    return str(directory)


def _names(classes: list[str]) -> str:
    return "[" + ", ".join(classes[:5]) + (", ...]" if len(classes) > 5 else "]")


def load_image(path: str):
    """torchvision's image loader, naming the file that cannot be read. Unreadable images are not
    skipped: that would silently change the dataset (and every run's data order)."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except (OSError, SyntaxError, ValueError) as err:  # PIL: UnidentifiedImageError, truncated data
        raise DataError(f"image {path!r} cannot be read ({type(err).__name__}: {err}); remove or "
                        "replace it (usnet does not skip images: that would change the dataset)") from None  # fmt: skip


def split_validation(train: Dataset, calib: Dataset, size: int, seed: int = 0
                     ) -> tuple[Dataset, Dataset, Dataset]:  # fmt: skip
    """Hold ``size`` training images out as a validation set: (train, calibration, validation).

    The held-out images are a random subset drawn by a permutation seeded with ``seed`` alone
    (not the run's seed: every recipe is then scored on the same images). Training and
    calibration keep the other images; the validation set shows the held-out ones with the
    calibration set's evaluation-time transforms. ``train`` and ``calib`` must hold the same
    images in the same order (as :func:`build_datasets` returns them).
    """
    n = len(train)
    if len(calib) != n:
        raise ValueError(f"train and calibration sets differ in length ({n} != {len(calib)})")
    if not 0 < size < n:
        raise ValueError(f"data.val_split must be between 1 and {n - 1} (the training set holds {n} "
                         f"images), got {size}")  # fmt: skip
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held, kept = sorted(order[:size]), sorted(order[size:])
    return Subset(train, kept), Subset(calib, kept), Subset(calib, held)


def _limit(dataset: Dataset, limit: int | None) -> Dataset:
    if limit is None or limit >= len(dataset):
        return dataset
    return Subset(dataset, range(limit))


def datasets_for(config) -> tuple[Dataset, Dataset, Dataset, DataInfo]:
    """(train, calibration, test) datasets of a run config's ``data`` section (a
    :class:`~usnet.train.config.TrainConfig`; augmentation, if on, applies to the training set only).
    With ``data.val_split`` the third is the validation set held out from the training images,
    and the first two hold the rest."""
    d = config.data
    train, calib, test, info = build_datasets(d.name, d.root, limit_train=d.limit_train,
                                              limit_test=d.limit_test, image_size=d.image_size,
                                              augment=d.augment)  # fmt: skip
    if d.val_split:  # score on images held out from training; the test set is not used
        try:
            train, calib, test = split_validation(train, calib, d.val_split, d.val_seed)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return train, calib, test, info
