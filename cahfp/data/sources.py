"""Finding, verifying, extracting and (when allowed) downloading the public datasets.

Each dataset is read by torchvision's own class from torchvision's standard on-disk layout, so
an existing download is reused. Fashion-MNIST is also found as the four official ``.gz`` files
in a flat folder (``<root>/``, ``<root>/fashion-mnist/``, or Debian's
``/usr/share/datasets/fashion-mnist/``): they are md5-verified and unpacked once into the
torchvision layout in the user cache (``~/.cache/cahfp/data``), never beside the source.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import socket
import urllib.error
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets import CIFAR10, CIFAR100, FashionMNIST

from cahfp.data.paths import default_data_dir, writable_dir
from cahfp.errors import DatasetCorrupt, DatasetUnavailable

# md5 of the uncompressed Fashion-MNIST files (the .gz md5s are torchvision's
# ``FashionMNIST.resources``; Debian's package re-gzips them, so its .gz md5s differ).
FMNIST_RAW_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
FMNIST_FLAT_DIRS = ("", "fashion-mnist", "fashion_mnist", "FashionMNIST")
FMNIST_SYSTEM_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)

NETWORK_ERRORS = (urllib.error.URLError, socket.gaierror, TimeoutError, ConnectionError)


@dataclass(frozen=True)
class Prepared:
    """A root directory that torchvision's class for the dataset can open with download=False."""

    root: Path
    note: str = ""


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def md5sum_gz(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with gzip.open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- Fashion-MNIST


def _fmnist_raw_ok(raw: Path) -> bool:
    return all((raw / name).is_file() for name in FMNIST_RAW_MD5)


def _fmnist_verify_raw(raw: Path) -> None:
    for name, md5 in FMNIST_RAW_MD5.items():
        got = md5sum(raw / name)
        if got != md5:
            raise DatasetCorrupt(
                f"Fashion-MNIST file {raw / name} has md5 {got}, expected {md5}; delete it and "
                "import the official files again (cahfp data import fmnist DIR)"
            )


def _fmnist_gz_source(folder: Path) -> dict[str, Path] | None:
    files = {name: folder / f"{name}.gz" for name in FMNIST_RAW_MD5}
    return files if all(p.is_file() for p in files.values()) else None


def _verify_fmnist_gz(files: dict[str, Path]) -> None:
    official = {name.removesuffix(".gz"): md5 for name, md5 in FashionMNIST.resources}
    for name, path in files.items():
        if md5sum(path) == official.get(name):
            continue
        try:
            got = md5sum_gz(path)
        except (OSError, EOFError) as exc:
            raise DatasetCorrupt(f"{path} is not a readable gzip file: {exc}") from exc
        if got != FMNIST_RAW_MD5[name]:
            raise DatasetCorrupt(
                f"{path} does not hold the official Fashion-MNIST {name} (content md5 {got}, "
                f"expected {FMNIST_RAW_MD5[name]})"
            )


def import_fmnist(source: Path, root: Path) -> Path:
    """Verify the four official ``.gz`` files in ``source`` and unpack them into
    ``root/FashionMNIST/raw``. Returns the raw folder."""
    files = _fmnist_gz_source(source)
    if files is None:
        raise DatasetUnavailable(
            f"{source} does not contain the four Fashion-MNIST files "
            f"({', '.join(n + '.gz' for n in FMNIST_RAW_MD5)})"
        )
    _verify_fmnist_gz(files)
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        tmp = raw / f".{name}.tmp"
        with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tmp.replace(raw / name)
    _fmnist_verify_raw(raw)
    return raw


def prepare_fmnist(root: Path, download: bool) -> Prepared:
    cache = default_data_dir()
    for base in dict.fromkeys([root, cache]):
        raw = base / "FashionMNIST" / "raw"
        if _fmnist_raw_ok(raw):
            _fmnist_verify_raw(raw)
            return Prepared(base)
    sources = [root / d for d in FMNIST_FLAT_DIRS] + [root / "FashionMNIST" / "raw"]
    sources += list(FMNIST_SYSTEM_DIRS)
    for source in sources:
        if _fmnist_gz_source(source) is not None:
            # Never write beside a source (it may be a shared, read-only copy): unpack into the
            # data root only when the files already sit in its torchvision layout.
            target = root if source == root / "FashionMNIST" / "raw" else cache
            import_fmnist(source, target)
            return Prepared(target, note=f"unpacked Fashion-MNIST from {source} into {target}")
    if download:
        _download(lambda: FashionMNIST(str(root), train=True, download=True), "fmnist", root)
        return Prepared(root)
    raise _missing("fmnist", root, sources)


# ---------------------------------------------------------------- CIFAR


def _cifar_files(cls: type[CIFAR10]) -> list[tuple[str, str]]:
    return [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]


def _cifar_state(cls: type[CIFAR10], base: Path) -> str:
    """'ok', 'missing' or a description of the first corrupt file."""
    folder = base / cls.base_folder
    if not folder.is_dir():
        return "missing"
    for name, md5 in _cifar_files(cls):
        path = folder / name
        if not path.is_file():
            return "missing"
        if md5sum(path) != md5:
            return f"{path} has the wrong md5 (expected {md5})"
    return "ok"


def prepare_cifar(cls: type[CIFAR10], key: str, root: Path, download: bool) -> Prepared:
    cache = default_data_dir()
    for base in dict.fromkeys([root, cache]):
        state = _cifar_state(cls, base)
        if state == "ok":
            return Prepared(base)
        if state != "missing":
            raise DatasetCorrupt(f"{key}: {state}; delete the folder and fetch the dataset again")
    for base in dict.fromkeys([root, cache]):
        archive = base / cls.filename
        if archive.is_file():
            if md5sum(archive) != cls.tgz_md5:
                raise DatasetCorrupt(f"{archive} has the wrong md5 (expected {cls.tgz_md5})")
            from torchvision.datasets.utils import extract_archive

            target = base if writable_dir(base) else cache
            extract_archive(str(archive), str(target))
            return Prepared(target, note=f"extracted {archive} into {target}")
    if download:
        _download(lambda: cls(str(root), train=True, download=True), key, root)
        return Prepared(root)
    expected = [root / cls.base_folder / n for n, _ in _cifar_files(cls)] + [root / cls.filename]
    raise _missing(key, root, [root / cls.base_folder], expected)


# ---------------------------------------------------------------- shared


def _download(fetch, key: str, root: Path) -> None:
    if not writable_dir(root):
        raise DatasetUnavailable(f"cannot download {key}: data directory {root} is not writable")
    try:
        fetch()
    except NETWORK_ERRORS as exc:
        raise DatasetUnavailable(
            f"downloading {key} into {root} failed ({type(exc).__name__}: {exc}); this machine "
            f"may be offline. {_where_hint(key)}"
        ) from None
    except RuntimeError as exc:  # torchvision wraps mirror failures and checksum mismatches
        raise DatasetUnavailable(f"downloading {key} into {root} failed: {exc}") from None


def _where_hint(key: str) -> str:
    return {
        "fmnist": "Put the four official .gz files in DATA_DIR/fashion-mnist/ "
        "(or run: cahfp data import fmnist DIR)",
        "cifar10": "Put cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/) in DATA_DIR",
        "cifar100": "Put cifar-100-python.tar.gz (or its extracted cifar-100-python/) in DATA_DIR",
    }[key]


def _missing(key: str, root: Path, searched: list[Path], expected: list[Path] | None = None):
    if expected is None:
        expected = [root / "fashion-mnist" / f"{n}.gz" for n in FMNIST_RAW_MD5]
    lines = "\n  ".join(str(p) for p in expected)
    where = "\n  ".join(str(p) for p in dict.fromkeys(searched))
    return DatasetUnavailable(
        f"dataset {key!r} not found under data directory {root} and download is not allowed.\n"
        f"Expected files:\n  {lines}\nSearched:\n  {where}\n{_where_hint(key)}, set "
        "--data-dir / CAHFP_DATA_DIR to where they are, or allow downloading (--download)."
    )


def prepare(key: str, root: Path, download: bool = False) -> Prepared:
    """Make ``key`` readable by torchvision under the returned root, or raise a clear error."""
    if key == "fmnist":
        return prepare_fmnist(root, download)
    if key == "cifar10":
        return prepare_cifar(CIFAR10, key, root, download)
    if key == "cifar100":
        return prepare_cifar(CIFAR100, key, root, download)
    raise KeyError(key)
