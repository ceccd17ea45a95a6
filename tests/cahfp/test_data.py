import gzip
import hashlib
import pickle
import socket
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100, FashionMNIST

from cahfp.data import load_dataset, resolve_data_dir
from cahfp.data import sources as src
from cahfp.errors import DatasetCorrupt, DatasetUnavailable, UnknownName


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format: magic (0, 0, type 0x08 = ubyte, ndim), big-endian sizes, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def fake_fmnist(n_train=30, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }


def test_idx_files_in_torchvision_layout(tmp_path, isolated_cache, monkeypatch):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = fake_fmnist()
    sums = {}
    for name, arr in arrays.items():
        (raw / name).write_bytes(idx_bytes(arr))
        sums[name] = md5(raw / name)
    monkeypatch.setattr(src, "FMNIST_RAW_MD5", sums)
    ds = load_dataset("fmnist", "train", tmp_path)
    assert ds.images.shape == (30, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert torch.equal(
        ds.images[:, 0], torch.as_tensor(arrays["train-images-idx3-ubyte"], dtype=torch.uint8)
    )
    assert ds.targets.tolist() == list(np.arange(30) % 10)
    assert ds.classes == FashionMNIST.classes
    assert len(load_dataset("fmnist", "test", tmp_path)) == 10
    x, y = next(ds.batches(8))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (8,)


def test_flat_gz_files_are_verified_and_unpacked_into_the_cache(
    tmp_path, isolated_cache, monkeypatch
):
    flat = tmp_path / "src" / "fashion-mnist"
    flat.mkdir(parents=True)
    sums = {}
    for name, arr in fake_fmnist().items():
        data = idx_bytes(arr)
        sums[name] = hashlib.md5(data).hexdigest()
        (flat / f"{name}.gz").write_bytes(gzip.compress(data))
    monkeypatch.setattr(src, "FMNIST_RAW_MD5", sums)
    ds = load_dataset("fmnist", "train", tmp_path / "src")
    assert len(ds) == 30
    assert (isolated_cache / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    assert not (tmp_path / "src" / "FashionMNIST").exists()  # nothing written beside the source
    assert any("unpacked" in n for n in ds.notes)


def test_corrupt_fmnist_file_is_named(tmp_path, isolated_cache, monkeypatch):
    flat = tmp_path / "fashion-mnist"
    flat.mkdir()
    sums = {}
    for name, arr in fake_fmnist().items():
        data = idx_bytes(arr)
        sums[name] = hashlib.md5(data).hexdigest()
        (flat / f"{name}.gz").write_bytes(gzip.compress(data))
    (flat / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"garbage"))
    monkeypatch.setattr(src, "FMNIST_RAW_MD5", sums)
    with pytest.raises(DatasetCorrupt, match="t10k-labels-idx1-ubyte"):
        load_dataset("fmnist", "train", tmp_path)


def write_cifar(root, cls, n_per_file=6):
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    label_key = "labels" if cls is CIFAR10 else "fine_labels"
    n_classes = 10 if cls is CIFAR10 else 100
    for name, _ in cls.train_list + cls.test_list:
        entry = {
            "data": rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8),
            label_key: list(rng.integers(0, n_classes, n_per_file)),
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {cls.meta["key"]: [f"class{i}" for i in range(n_classes)]}
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps(meta))
    return folder


@pytest.mark.parametrize("cls", [CIFAR10, CIFAR100])
def test_cifar_pickle_batches(tmp_path, isolated_cache, monkeypatch, cls):
    folder = write_cifar(tmp_path, cls)
    monkeypatch.setattr(cls, "train_list", [[n, md5(folder / n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(folder / n)] for n, _ in cls.test_list])
    meta = dict(cls.meta, md5=md5(folder / cls.meta["filename"]))
    monkeypatch.setattr(cls, "meta", meta)
    key = "cifar10" if cls is CIFAR10 else "cifar100"
    train = load_dataset(key, "train", tmp_path)
    assert train.images.shape == (6 * len(cls.train_list), 3, 32, 32)
    assert train.num_classes == (10 if cls is CIFAR10 else 100)
    assert train.augment  # CIFAR training batches get crop+flip
    x, _ = next(train.batches(4, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (4, 3, 32, 32)
    assert len(load_dataset(key, "test", tmp_path)) == 6


def test_cifar_wrong_checksum_is_reported(tmp_path, isolated_cache):
    write_cifar(tmp_path, CIFAR10)  # real md5 table: these small files do not match
    with pytest.raises(DatasetCorrupt, match="data_batch_1"):
        load_dataset("cifar10", "train", tmp_path)


def test_imagefolder(tmp_path, isolated_cache):
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            d = tmp_path / "imgs" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    train = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", "train")
    assert train.images.shape == (6, 3, 32, 32) and train.classes == ["cat", "dog"]
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 1]
    grey = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", "test", image_size=28, channels=1)
    assert grey.images.shape == (4, 1, 28, 28)
    (tmp_path / "imgs" / "train" / "cat" / "bad.png").write_bytes(b"not a png")
    from cahfp.data import datasets

    datasets._CACHE.clear()
    with pytest.raises(DatasetCorrupt, match=r"bad\.png"):
        load_dataset(f"imagefolder:{tmp_path / 'imgs'}", "train")


def test_missing_dataset_lists_expected_files(tmp_path, isolated_cache):
    with pytest.raises(DatasetUnavailable) as err:
        load_dataset("fmnist", "train", tmp_path)
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg and str(tmp_path) in msg and "--download" in msg
    with pytest.raises(DatasetUnavailable, match=r"cifar-10-python\.tar\.gz"):
        load_dataset("cifar10", "train", tmp_path)


@pytest.mark.parametrize("key", ["fmnist", "cifar10"])
def test_offline_download_is_a_clear_error(tmp_path, isolated_cache, monkeypatch, key):
    def refuse(*args, **kwargs):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(DatasetUnavailable, match=f"downloading {key}"):
        load_dataset(key, "train", tmp_path, download=True)


def test_unknown_dataset():
    with pytest.raises(UnknownName, match="cifar10"):
        load_dataset("mnist3d")


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("CAHFP_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "cli") == tmp_path / "cli"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("CAHFP_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir() == tmp_path / "xdg" / "cahfp" / "data"


def test_real_fashion_mnist(fmnist_train, fmnist_test):
    assert len(fmnist_train) == 60000 and len(fmnist_test) == 10000
    assert fmnist_train.targets.bincount().tolist() == [6000] * 10
    assert fmnist_test.targets.bincount().tolist() == [1000] * 10
    assert fmnist_train.images.shape[1:] == (1, 28, 28)


def test_import_fmnist_from_shared_copy(fmnist_root, tmp_path):
    raw = src.import_fmnist(fmnist_root / "fashion-mnist", tmp_path)
    assert sorted(p.name for p in raw.iterdir()) == sorted(src.FMNIST_RAW_MD5)
    ds = load_dataset("fmnist", "test", tmp_path)
    assert len(ds) == 10000
