"""Datasets as in-memory uint8 image tensors with batch-wise normalisation and augmentation.

Loading goes through torchvision's dataset classes (standard layouts); the images are then kept
as one ``uint8`` tensor so that partitions are cheap views and batches need no per-sample Python
work, which matters on 2-core boards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cahfp.data.paths import resolve_data_dir
from cahfp.data.sources import prepare
from cahfp.errors import DatasetCorrupt, DatasetUnavailable, UnknownName

STATS = {
    "fmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
DATASETS = ("fmnist", "cifar10", "cifar100", "imagefolder:PATH")
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


@dataclass
class ImageData:
    """Images ``[N, C, H, W]`` (uint8) with integer labels and the normalisation to apply."""

    images: torch.Tensor
    targets: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    augment: bool = False
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetCorrupt(f"{self.name}: images must be uint8 [N, C, H, W]")
        if self.targets.shape != (self.images.shape[0],):
            raise DatasetCorrupt(
                f"{self.name}: {len(self.targets)} labels for {self.images.shape[0]} images"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[2])

    def subset(self, indices) -> ImageData:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return replace(self, images=self.images[idx], targets=self.targets[idx])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (images.float().div_(255.0) - mean) / std

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        augment: bool | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield normalised ``(inputs, targets)`` batches; one pass over the data."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        augment = self.augment if augment is None else augment
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if drop_last and len(idx) < batch_size:
                break
            x = self.images[idx]
            if augment:
                x = random_crop_flip(x, generator)
            yield self.normalize(x), self.targets[idx]

    def example_input(self, batch: int = 2) -> torch.Tensor:
        return torch.zeros(batch, self.in_channels, self.image_size, self.image_size)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None, pad: int = 4):
    """Standard CIFAR augmentation on a uint8 batch: pad-and-crop plus horizontal flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip.view(n, 1, 1, 1), cols.flip(-1), cols)
    batch = torch.arange(n).view(n, 1, 1, 1)
    chan = torch.arange(x.shape[1]).view(1, -1, 1, 1)
    return padded[batch, chan, rows, cols]


_CACHE: dict[tuple, ImageData] = {}


def load_dataset(
    spec: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
    channels: int | None = None,
) -> ImageData:
    """Load ``fmnist``, ``cifar10``, ``cifar100`` or ``imagefolder:PATH`` (split: train|test)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = resolve_data_dir(data_dir)
    key = (spec, split, str(root), image_size, channels)
    if key not in _CACHE:
        _CACHE[key] = _load(spec, split, root, download, image_size, channels)
    return _CACHE[key]


def _load(spec, split, root: Path, download, image_size, channels) -> ImageData:
    if spec.startswith("imagefolder:"):
        return load_imagefolder(Path(spec.split(":", 1)[1]), split, image_size, channels)
    if spec not in STATS:
        raise UnknownName(f"unknown dataset {spec!r}; known: {', '.join(DATASETS)}")
    from torchvision.datasets import CIFAR10, CIFAR100, FashionMNIST

    prepared = prepare(spec, root, download)
    cls = {"fmnist": FashionMNIST, "cifar10": CIFAR10, "cifar100": CIFAR100}[spec]
    try:
        ds = cls(str(prepared.root), train=(split == "train"), download=False)
    except (RuntimeError, ValueError, TypeError, AssertionError, KeyError) as exc:
        raise DatasetCorrupt(f"{spec} under {prepared.root} could not be read: {exc}") from exc
    data = torch.as_tensor(np.asarray(ds.data))
    images = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)
    targets = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)
    mean, std = STATS[spec]
    return ImageData(
        images=images.contiguous(),
        targets=targets,
        classes=list(ds.classes),
        mean=mean,
        std=std,
        name=spec,
        augment=(spec != "fmnist" and split == "train"),
        notes=[prepared.note] if prepared.note else [],
    )


def _native_format(files: list[str]) -> tuple[int, int]:
    """(image size, channels) that a folder's images share: their own side when all are square
    of one size (else 32) and 1 channel when all are grey (else 3). Reads headers only."""
    from PIL import Image, UnidentifiedImageError

    sizes, grey = set(), True
    for file in files:
        try:
            with Image.open(file) as img:
                sizes.add(img.size)
                grey = grey and img.mode in ("L", "1", "I;16", "I")
        except (UnidentifiedImageError, OSError) as exc:
            raise DatasetCorrupt(f"cannot read image {file}: {exc}") from None
    (w, h), *others = sorted(sizes) or [(32, 32)]
    size = w if not others and w == h else 32
    return size, 1 if grey and files else 3


def load_imagefolder(
    path: Path, split: str, image_size: int | None = None, channels: int | None = None
) -> ImageData:
    """Labelled images in class sub-folders (torchvision ``ImageFolder`` layout). If ``path`` has
    ``train/`` and ``test/`` (or ``val/``) sub-folders they are the splits; otherwise the whole
    folder is the training split. Without ``image_size`` / ``channels`` the images keep the
    size and colour mode they all share (28x28 grey PNGs stay 1x28x28); images of mixed or
    non-square sizes are resized to 32x32, colour ones or mixed ones read as RGB."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets import ImageFolder

    if channels not in (None, 1, 3):
        raise ValueError(f"imagefolder channels must be 1 or 3, got {channels}")
    folder = path
    subdirs = {"train": ["train"], "test": ["test", "val"]}[split]
    for sub in subdirs:
        if (path / sub).is_dir():
            folder = path / sub
            break
    else:
        if split == "test":
            raise DatasetUnavailable(f"imagefolder {path} has no test/ or val/ sub-folder")
    if not folder.is_dir():
        raise DatasetUnavailable(f"imagefolder {folder} does not exist")
    try:
        ds = ImageFolder(str(folder))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DatasetUnavailable(f"imagefolder {folder}: {exc}") from None
    if image_size is None or channels is None:
        size, grey = _native_format([file for file, _ in ds.samples])
        image_size, channels = image_size or size, channels or grey
    mode = "L" if channels == 1 else "RGB"
    images = torch.empty(len(ds.samples), channels, image_size, image_size, dtype=torch.uint8)
    for i, (file, _) in enumerate(ds.samples):
        try:
            with Image.open(file) as img:
                img = img.convert(mode).resize((image_size, image_size), Image.BILINEAR)
                arr = np.array(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise DatasetCorrupt(f"cannot read image {file}: {exc}") from None
        images[i] = torch.from_numpy(arr.reshape(image_size, image_size, channels)).permute(2, 0, 1)
    targets = torch.tensor([t for _, t in ds.samples], dtype=torch.long)
    return ImageData(
        images=images,
        targets=targets,
        classes=list(ds.classes),
        mean=(0.5,) * channels,
        std=(0.5,) * channels,
        name=f"imagefolder:{path}",
        augment=False,
    )


@dataclass(frozen=True)
class DatasetInfo:
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    image_size: int


def dataset_info(spec: str, data_dir=None) -> DatasetInfo:
    """Class names, normalisation and input shape, without loading the images where the
    dataset is a known one (CIFAR-100's class names need its meta file; without it they are
    numbered)."""
    if spec == "fmnist":
        from torchvision.datasets import FashionMNIST

        return DatasetInfo(list(FashionMNIST.classes), *STATS["fmnist"], 1, 28)
    if spec == "cifar10":
        return DatasetInfo(CIFAR10_CLASSES, *STATS["cifar10"], 3, 32)
    if spec == "cifar100":
        try:
            classes = load_dataset("cifar100", "test", data_dir).classes
        except (DatasetUnavailable, DatasetCorrupt):
            classes = [f"class_{i}" for i in range(100)]
        return DatasetInfo(classes, *STATS["cifar100"], 3, 32)
    ds = load_dataset(spec, "train", data_dir)
    return DatasetInfo(ds.classes, ds.mean, ds.std, ds.in_channels, ds.image_size)
