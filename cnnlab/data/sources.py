"""Find a dataset, decode it once, and hand it over as uint8 tensors.

`load_dataset(cfg, cache_dir, seed)` returns a `TensorData`: the whole train and
test sets as (N, C, H, W) uint8 tensors plus int64 labels. Everything after that
(batching, normalisation, augmentation) happens on tensors, in `cnnlab.data.batches`.

Where the images come from, by `cfg["name"]`:

    synthetic                   made in memory from the seed (tests, smoke runs)
    cifar10 | mnist | fashion_mnist
        0. `archive` when set (explicit beats found)
        1. torchvision's layout under root (cifar-10-batches-py/, MNIST/raw/, FashionMNIST/raw/)
        2. fashion_mnist only: Debian's copy in DEBIAN_FASHION_MNIST
        3. an image tree root/<name>*/ or root itself (train/ and test/), else root/<name>*.tar.gz
        4. torchvision's download into root, when `download` is true
    folder                      an image tree: `archive` (.tar.gz) or root (train/ and test/)

An image tree is train/<class>/<image> and test/<class>/<image>; class names are
the sorted folder names of train/. Decoding 60k JPEGs takes seconds, so decoded
trees are cached in cache_dir, keyed by the source's file list (or the archive's
path, size and mtime). Archives are read in memory, never extracted (unpacking 60k
small files costs more than decoding them), and unsafe members are refused.

The decode cache (`paths.cache`) is the user's, not a run root's: by default
$XDG_CACHE_HOME/cnnlab or ~/.cache/cnnlab (`user_cache_dir`), so a fresh `paths.runs`
does not decode the same archive again. One process decodes an entry while the others
wait for it (a file lock); entries are written to a temporary file and renamed into
place, and carry a sha256 of their tensors: a truncated or corrupt entry is reported in
one warning and decoded again, never used.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import re
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnlab.errors import ConfigError

log = logging.getLogger("cnnlab")

# torch, torchvision, numpy and PIL are imported inside the functions that use them:
# the trainer checks the config (cnnlab.config.schema) before anything heavy, so a typo costs
# milliseconds, not the two seconds `import torchvision` takes.
if TYPE_CHECKING:
    import torch


# Debian's `dataset-fashion-mnist` package; a module constant so tests can point it elsewhere.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# torchvision's dataset class and the folder its layout lives in under root.
_TORCHVISION = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
    "mnist": ("MNIST", "MNIST/raw"),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw"),
}
_IDX_FILES = {  # split -> (images, labels), the names torchvision and Debian share
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".ppm",
                   ".pgm"}
_FAST_SUFFIXES = {".png", ".jpg", ".jpeg"}  # torchvision decodes these ~3x faster than PIL
_CACHE_VERSION = "2"  # bump when the cached layout or decoding changes (2: entries carry a sha256)


def user_cache_dir() -> Path:
    """Where decoded datasets are cached by default (paths.cache): $XDG_CACHE_HOME/cnnlab,
    else ~/.cache/cnnlab. Shared by every paths.runs of this user."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base).expanduser().resolve() / "cnnlab"


@dataclass(frozen=True)
class TensorData:
    """A whole dataset in memory."""

    train_x: torch.Tensor  # (N, C, H, W) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor  # (M, C, H, W) uint8
    test_y: torch.Tensor  # (M,) int64
    classes: list[str]
    source: str  # where it came from, for logs and run metadata

    def fingerprint(self) -> str:
        """First 16 hex digits of a sha256 over the shapes and bytes of the four tensors."""
        return self.sha256()[:16]

    def sha256(self) -> str:
        """The full digest behind `fingerprint`, computed once (the tensors never change)."""
        if "_sha256" not in self.__dict__:
            object.__setattr__(self, "_sha256", _digest(
                (self.train_x, self.train_y, self.test_x, self.test_y)))
        return self.__dict__["_sha256"]


def _digest(tensors: Sequence[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{tuple(array.shape)}:{array.dtype};".encode())
        digest.update(array.data)
    return digest.hexdigest()


# --------------------------------------------------------------------------- entry point


def load_dataset(cfg: Mapping[str, Any], cache_dir: Path, seed: int) -> TensorData:
    """Find and decode the dataset of a checked data config (cnnlab.config.schema), apply
    `subset`, and check the result."""
    name = cfg["name"]
    shape = tuple(cfg["shape"])
    cache_dir = Path(cache_dir)
    if name == "synthetic":
        data = _synthetic(shape, cfg["num_classes"], cfg["n_train"], cfg["n_test"],
                          float(cfg["noise"]), seed)
    elif name == "folder":
        data = _folder(cfg, cache_dir)
    else:
        data = _named(cfg, cache_dir)
    _check_data(data, shape, cfg["num_classes"])
    if cfg["subset"] is not None:
        data = _subset(data, cfg["subset"], seed)
    if cfg["validation"] == "split":
        check_split(len(data.train_x), cfg["val_fraction"], data.source)
    return data


def dataset_profile(data: TensorData, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Split sizes as trained: images in train, validation and test, and the classes."""
    n = len(data.train_x)
    n_val = check_split(n, cfg["val_fraction"], data.source) if cfg["validation"] == "split" else 0
    return {"train": n - n_val, "validation": n_val if n_val else "the test set", "test": len(data.test_x),
            "classes": len(data.classes)}


def check_split(n: int, fraction: float, source: str) -> int:
    """The held-out split must leave images on both sides. The DataModule that makes the split
    comes after the MLflow run is opened; this runs before it (from the config for synthetic
    data, else once the data is loaded)."""
    n_val = round(n * fraction)  # the validation images (TensorDataModule holds them out)
    if n < 2:
        raise ConfigError(f"data.validation=split needs at least 2 training images, {source} has "
                          f"{n}; use data.validation=test")
    if not 1 <= n_val < n:
        raise ConfigError(f"data.val_fraction={fraction} of the {n} training images of {source} "
                          f"leaves {n_val} for validation and {n - n_val} for training; both need "
                          f"at least one: use a val_fraction in [{1 / n:.3g}, {1 - 1 / n:.3g}] "
                          f"or data.validation=test")
    return n_val


def _check_data(data: TensorData, shape: tuple[int, ...], num_classes: int) -> None:
    for split, x, y in (("train", data.train_x, data.train_y), ("test", data.test_x, data.test_y)):
        if len(x) == 0:
            raise ConfigError(f"the {split} set from {data.source} is empty")
        if tuple(x.shape[1:]) != shape:
            raise ConfigError(f"{data.source} has {split} images of shape {list(x.shape[1:])} "
                              f"(channels, height, width) but data.shape={list(shape)}")
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            raise ConfigError(f"{data.source} has {split} labels in [{low}, {high}] but "
                              f"data.num_classes={num_classes} allows [0, {num_classes - 1}]")
    if len(data.classes) != num_classes:
        raise ConfigError(f"{data.source} has {len(data.classes)} classes but "
                          f"data.num_classes={num_classes}")


def check_subset(subset: int | None, n: int, source: str) -> None:
    if subset is not None and subset > n:
        raise ConfigError(f"data.subset={subset} is larger than the {n} training images of "
                          f"{source}; use at most {n} or null")


def _subset(data: TensorData, subset: int, seed: int) -> TensorData:
    import torch

    n = len(data.train_x)
    check_subset(subset, n, data.source)
    # A seeded shuffle first, so the kept images mix all classes even when the
    # source is sorted by class (image trees are); sorted back to keep source order.
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:subset].sort().values
    return TensorData(data.train_x[keep], data.train_y[keep], data.test_x, data.test_y,
                      data.classes, f"{data.source} (subset {subset})")


# --------------------------------------------------------------------------- synthetic


def _synthetic(shape: tuple[int, ...], num_classes: int, n_train: int, n_test: int,
               noise: float, seed: int) -> TensorData:
    import torch
    import torch.nn.functional as F

    channels, height, width = shape
    gen = torch.Generator().manual_seed(seed)
    # Smooth patterns (a coarse random grid, upsampled) rather than per-pixel noise,
    # so convolutions and pooling see structure and class colours differ.
    coarse = torch.rand((num_classes, channels, max(1, height // 4), max(1, width // 4)),
                        generator=gen)
    patterns = F.interpolate(coarse, size=(height, width), mode="bilinear",
                             align_corners=False) * 255  # (K, C, H, W) float in [0, 255]
    spread = patterns.flatten(1).std(dim=1).view(-1, 1, 1, 1)  # (K, 1, 1, 1)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]  # (n,) balanced
        images = patterns[labels] + torch.randn((n, *shape), generator=gen) * noise * spread[labels]
        return images.round().clamp(0, 255).to(torch.uint8), labels.to(torch.int64)

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    classes = [f"class{i}" for i in range(num_classes)]
    return TensorData(train_x, train_y, test_x, test_y, classes, f"synthetic (seed {seed})")


# --------------------------------------------------------------------------- named datasets


def _named(cfg: Mapping[str, Any], cache_dir: Path) -> TensorData:
    import torchvision

    name = cfg["name"]
    root = Path(cfg["root"]).expanduser()
    shape = tuple(cfg["shape"])
    # An archive named on the command line is what the user asked for: it wins.
    if cfg["archive"] is not None:
        return _from_archive(Path(cfg["archive"]).expanduser(), name, shape, cache_dir)
    looked: list[str] = []

    # 1. torchvision's own layout.
    class_name, folder = _TORCHVISION[name]
    tv_dir = root / folder
    looked.append(f"{tv_dir} (torchvision's layout)")
    if tv_dir.is_dir():
        if name == "cifar10":
            return _from_torchvision(name, root, download=False)
        # torchvision wants the unpacked IDX files; a raw/ holding only the .gz files
        # (as downloaded, or copied from Debian) is read directly instead.
        if all((tv_dir / f).is_file() for pair in _IDX_FILES.values() for f in pair):
            return _from_torchvision(name, root, download=False)
        if _has_idx_gz(tv_dir):
            return _from_idx_gz(tv_dir, getattr(torchvision.datasets, class_name).classes)

    # 2. Debian's package (fashion_mnist only).
    if name == "fashion_mnist":
        looked.append(f"{DEBIAN_FASHION_MNIST} (Debian's dataset-fashion-mnist)")
        if _has_idx_gz(DEBIAN_FASHION_MNIST):
            return _from_idx_gz(DEBIAN_FASHION_MNIST, torchvision.datasets.FashionMNIST.classes)

    # 3. An image tree, or an archive of one.
    matches = sorted(p for p in root.iterdir() if _matches(p, name)) if root.is_dir() else []
    looked.append(f"{root}/{name}*/ (image tree train/, test/)")
    for path in matches:
        if path.is_dir() and _is_tree(path):
            return _from_tree(path, name, shape, cache_dir)
    looked.append(f"{root}/ (image tree train/, test/)")
    if _is_tree(root):
        return _from_tree(root, name, shape, cache_dir)
    looked.append(f"{root}/{name}*.tar.gz (image tree archive)")
    for path in matches:
        if path.is_file() and path.name.endswith(".tar.gz"):
            return _from_archive(path, name, shape, cache_dir)

    # 4. Download.
    if cfg["download"]:
        return _from_torchvision(name, root, download=True, looked=looked)
    raise ConfigError(
        f"no local copy of {name} found; looked in: {'; '.join(looked)}. Point cnnlab at one "
        "with data.root=DIR (torchvision's layout, or an image tree train/<class>/*, "
        "test/<class>/*) or data.archive=FILE.tar.gz, or set data.download=true")


def _matches(path: Path, name: str) -> bool:
    """root/cifar10-jpg, root/Fashion-MNIST, root/cifar10.tar.gz match; root/cifar100 does not."""
    stem = path.name.lower().removesuffix(".tar.gz")
    pattern = re.escape(name).replace("_", "[-_]?")
    return re.fullmatch(f"{pattern}(?:[-_.].*)?", stem) is not None


def _from_torchvision(name: str, root: Path, download: bool,
                      looked: Sequence[str] = ()) -> TensorData:
    import torchvision

    class_name, folder = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, class_name)  # looked up late so tests can stub it
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        if not download:
            raise ConfigError(f"torchvision could not read {name} from {root / folder}: {err}; "
                              "remove the folder or replace its files") from err
        raise ConfigError(f"no local copy of {name} found (looked in: {'; '.join(looked)}) and "
                          f"torchvision's download into {root} failed: {err}. Point cnnlab at a "
                          "local copy with data.root=DIR or data.archive=FILE.tar.gz") from err
    source = f"torchvision {'download into ' if download else ''}{root / folder}"
    return TensorData(*_tv_tensors(train), *_tv_tensors(test), list(cls.classes), source)


def _tv_tensors(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    x = torch.as_tensor(dataset.data)  # CIFAR: (N, H, W, C) numpy; MNIST: (N, H, W) tensor
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    y = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return x.to(torch.uint8).contiguous(), y  # (N, C, H, W) uint8, (N,) int64


def _has_idx_gz(folder: Path) -> bool:
    return all((folder / f"{f}.gz").is_file() for pair in _IDX_FILES.values() for f in pair)


def _from_idx_gz(folder: Path, classes: Sequence[str]) -> TensorData:
    import torch

    tensors = []
    for images, labels in _IDX_FILES.values():
        x = _read_idx(folder / f"{images}.gz")
        y = _read_idx(folder / f"{labels}.gz")
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ConfigError(f"{folder}: {images}.gz has shape {list(x.shape)} and {labels}.gz "
                              f"{list(y.shape)}; expected (N, H, W) images and N labels")
        tensors += [x.unsqueeze(1).contiguous(), y.to(torch.int64)]  # (N, 1, H, W) uint8, (N,)
    return TensorData(*tensors, list(classes), f"IDX files in {folder}")


def _read_idx(path: Path) -> torch.Tensor:
    """Parse a gzip IDX file of unsigned bytes (the MNIST format)."""
    import numpy as np
    import torch

    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise ConfigError(f"cannot read {path}: {err}; replace the file") from err
    # Header: two zero bytes, a type code (0x08 = unsigned byte), the number of
    # dimensions, then each dimension as a big-endian int32.
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ConfigError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4).tolist() if ndim else []
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ConfigError(f"{path} holds {body.size} bytes but its header says {dims}; "
                          "the file is truncated or corrupt")
    return torch.from_numpy(body.reshape(dims).copy())


# --------------------------------------------------------------------------- image trees


def _folder(cfg: Mapping[str, Any], cache_dir: Path) -> TensorData:
    shape = tuple(cfg["shape"])
    if cfg["archive"] is not None:
        return _from_archive(Path(cfg["archive"]).expanduser(), "folder", shape, cache_dir)
    root = Path(cfg["root"]).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.root={root} is not a folder; data=folder needs a folder holding "
                          "train/<class>/* and test/<class>/*, or data.archive=FILE.tar.gz")
    if not _is_tree(root):
        missing = " and ".join(f"{split}/" for split in ("train", "test") if not (root / split).is_dir())
        raise ConfigError(f"data.root={root} has no {missing} folder; data=folder needs "
                          "train/<class>/* and test/<class>/* there, or data.archive=FILE.tar.gz")
    return _from_tree(root, "folder", shape, cache_dir)


def _is_tree(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "test").is_dir()


# A listing of an image tree: split -> class -> [(name shown in errors, key to read it)].
Listing = dict[str, dict[str, list[tuple[str, str]]]]


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in _IMAGE_SUFFIXES


def _check_listing(listing: Listing, where: str) -> list[str]:
    """Return the classes; raise on a missing or empty class folder."""
    classes = sorted(listing["train"])
    if not classes:
        raise ConfigError(f"{where}/train has no class folders; expected train/<class>/<image>")
    for split in ("train", "test"):
        for cls in classes:
            if cls not in listing[split]:
                raise ConfigError(f"class {cls!r} is in {where}/train but missing from "
                                  f"{where}/{split}; both need the same class folders")
            if not listing[split][cls]:
                raise ConfigError(f"class folder {where}/{split}/{cls} has no images")
        extra = sorted(set(listing[split]) - set(classes))
        if extra:
            raise ConfigError(f"class {extra[0]!r} is in {where}/{split} but missing from "
                              f"{where}/train; both need the same class folders")
    return classes


def _from_tree(root: Path, name: str, shape: tuple[int, ...], cache_dir: Path) -> TensorData:
    listing: Listing = {}
    key = hashlib.sha256(f"{_CACHE_VERSION}:{shape[0]}:{root.resolve()}".encode())
    for split in ("train", "test"):
        listing[split] = {}
        for folder in sorted(p for p in (root / split).iterdir()
                             if p.is_dir() and not p.name.startswith(".")):
            files = []
            with os.scandir(folder) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    if entry.is_file() and _is_image(entry.name):
                        stat = entry.stat()
                        if stat.st_size > max_image_bytes(shape):  # read whole into memory below
                            raise ConfigError(
                                f"image {entry.path} is {stat.st_size:,} bytes, more than an image of "
                                f"data.shape={list(shape)} needs (at most {max_image_bytes(shape):,}); "
                                "remove or replace it")
                        # name, size and mtime: an edited or replaced image invalidates the cache
                        key.update(f"{split}/{folder.name}/{entry.name}:{stat.st_size}:"
                                   f"{stat.st_mtime_ns};".encode())
                        files.append((entry.path, entry.path))
            listing[split][folder.name] = files
    classes = _check_listing(listing, str(root))
    return _cached(cache_dir / f"{name}-{key.hexdigest()[:16]}.pt", str(root), lambda: _decode_listing(
        listing, classes, lambda path: Path(path).read_bytes(), shape, str(root)))


def _from_archive(path: Path, name: str, shape: tuple[int, ...], cache_dir: Path) -> TensorData:
    if not path.is_file():
        raise ConfigError(f"data.archive={path} does not exist; give an image-tree .tar.gz")
    stat = path.stat()
    key = hashlib.sha256(f"{_CACHE_VERSION}:{shape[0]}:{path.resolve()}:{stat.st_size}:"
                         f"{stat.st_mtime_ns}".encode()).hexdigest()[:16]

    def decode() -> TensorData:
        members = _read_archive(path, max_image_bytes(shape))
        prefix = _archive_root(members, path)
        listing = _archive_listing(members, prefix, path)
        classes = _check_listing(listing, f"{path}:{prefix.rstrip('/') or '.'}")
        return _decode_listing(listing, classes, members.__getitem__, shape, str(path))

    return _cached(cache_dir / f"{name}-{key}.pt", str(path), decode)


def max_image_bytes(shape: Sequence[int]) -> int:
    """The largest file an image of `shape` can need: 8 bytes a value (16-bit RGBA, uncompressed,
    row padding) plus 16 MiB of metadata (ICC profiles, EXIF, thumbnails)."""
    channels, height, width = shape
    return 8 * channels * height * width + 16 * 2**20


def _read_archive(path: Path, max_member: int) -> dict[str, bytes]:
    """Every image file in a .tar.gz by member name (other files map to b''); folders appear as
    'name/': b''. A member is read only once its declared size is checked: a sparse member
    declaring 64 GiB used to end in a MemoryError, and the archive's images must fit in memory."""
    import psutil

    members: dict[str, bytes] = {}
    total, available = 0, psutil.virtual_memory().available
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:  # streaming: one pass over the gzip
                # Nothing is extracted, yet a member that extractall(filter="data") would
                # refuse is refused here too (absolute, '..', links, devices), so a tree
                # that loads here also unpacks safely elsewhere.
                if member.name.startswith("/") or ".." in member.name.split("/"):
                    raise ConfigError(f"{path} has an unsafe member {member.name!r} (absolute or "
                                      "with '..'); refusing to read it")
                if member.isdir():
                    members[member.name.rstrip("/") + "/"] = b""
                elif member.isfile() and not _is_image(member.name.rsplit("/", 1)[-1]):
                    members[member.name] = b""  # a README, a labels file: never read
                elif member.isfile():
                    if member.size > max_member:
                        raise ConfigError(
                            f"{path} member {member.name!r} declares {member.size:,} bytes, more than an "
                            f"image of data.shape needs (at most {max_member:,}); refusing to read it")
                    total += member.size
                    if total > available:
                        raise ConfigError(
                            f"{path} holds more image bytes than this machine has memory available "
                            f"({total:,} bytes by member {member.name!r}, {available:,} available); "
                            "use a smaller archive or data.root=FOLDER of a smaller tree")
                    members[member.name] = tar.extractfile(member).read()
                else:
                    raise ConfigError(f"{path} member {member.name!r} is a link or special "
                                      "file; an image tree archive must hold plain files only")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ConfigError(_unreadable_archive(path, err)) from err
    return members


# Files people give as data.archive by mistake, by their first bytes.
_NOT_TAR = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
            (b"PK\x03\x04", "a zip archive"), (b"PK\x05\x06", "a zip archive"), (b"%PDF", "a PDF"),
            (b"7z\xbc\xaf", "a 7-Zip archive"), (b"Rar!", "a RAR archive"))


def _unreadable_archive(path: Path, err: BaseException) -> str:
    """One line saying what the file is instead (tarfile's own message is several lines, one per
    compression it tried)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        head = b""
    if not head:
        return f"data.archive={path} is empty (0 bytes); give an image-tree .tar.gz"
    kind = next((kind for magic, kind in _NOT_TAR if head.startswith(magic)), None)
    if kind:
        return (f"data.archive={path} is {kind}, not a .tar.gz; give an image tree packed with "
                f"`tar czf tree.tar.gz train test` (or data.root=FOLDER for an unpacked tree)")
    reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return f"{path} is not a readable .tar.gz (truncated or corrupt?): {reason[:200]}; replace the file"


def _archive_root(members: Mapping[str, bytes], path: Path) -> str:
    """The folder inside the archive holding train/ and test/: '' or 'top/'."""
    tops = {name.split("/", 1)[0] for name in members}
    if {"train", "test"} <= tops:
        return ""
    if len(tops) == 1:
        top = tops.pop()
        if {"train", "test"} <= {name.split("/")[1] for name in members if name.count("/") > 1}:
            return top + "/"
    raise ConfigError(f"{path} holds no train/ and test/ folders at its top or inside one "
                      "top folder; expected [top/]train/<class>/*, [top/]test/<class>/*")


def _archive_listing(members: Mapping[str, bytes], prefix: str, path: Path) -> Listing:
    listing: Listing = {"train": {}, "test": {}}
    for name in sorted(members):
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix):].rstrip("/").split("/")
        if len(parts) < 2 or parts[0] not in listing or parts[1].startswith("."):
            continue
        files = listing[parts[0]].setdefault(parts[1], [])  # a folder entry alone: empty class
        if len(parts) == 3 and not name.endswith("/") and _is_image(parts[2]):
            files.append((f"{path}:{name}", name))
    return listing


def _decode_listing(listing: Listing, classes: list[str], read: Callable[[str], bytes],
                    shape: tuple[int, ...], source: str) -> TensorData:
    import torch

    if shape[0] not in (1, 3):
        raise ConfigError(f"data.shape={list(shape)} cannot be decoded from images; the first "
                          "entry (channels) must be 1 (grayscale) or 3 (RGB)")
    tensors = []
    with DecoderMessages() as messages:
        for split in ("train", "test"):
            images, labels = [], []
            for label, cls in enumerate(classes):
                for shown, key in listing[split][cls]:
                    image = decode_image(read(key), shown, shape, messages)  # (C, H, W) uint8
                    if tuple(image.shape) != shape:
                        raise ConfigError(f"image {shown} has shape {list(image.shape)} (channels, "
                                          f"height, width) but data.shape={list(shape)}")
                    images.append(image)
                    labels.append(label)
            tensors += [torch.stack(images), torch.tensor(labels, dtype=torch.int64)]
    return TensorData(*tensors, classes, source)


class DecoderMessages:
    """What C decoders print on file descriptor 2 while one image decodes.

    libjpeg (under torchvision) reports a corrupt JPEG it can still decode (40 garbage bytes in
    the middle: every pixel after them wrong) only by printing "Corrupt JPEG data: ..." on
    stderr, and carries on; torchvision returns the pixels without a word (PIL does not even
    print). While the images decode, fd 2 goes to a temporary file, emptied before each image
    and read after it: anything there is a decoder's message about that image. Decoding runs in
    one thread before the trainer starts, Python warnings are recorded rather than printed
    (decode_image) and cnnlab logs nothing in that window."""

    def __enter__(self) -> DecoderMessages:
        import sys
        import warnings

        from PIL import Image

        # Python warnings while decoding are recorded (read with the rest), not printed; those
        # about the libraries themselves (torchvision's image decoding is deprecated) ignored.
        self._warnings = warnings.catch_warnings(record=True)
        self._caught = self._warnings.__enter__()
        warnings.simplefilter("always")
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.simplefilter("ignore", category)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def clear(self) -> None:
        self._caught.clear()
        os.ftruncate(self._file.fileno(), 0)
        os.lseek(self._file.fileno(), 0, os.SEEK_SET)

    def read(self) -> str:
        """The messages since `clear`, on one line."""
        import sys

        sys.stderr.flush()
        said = [str(w.message) for w in self._caught]
        size = os.fstat(self._file.fileno()).st_size
        if size:
            os.lseek(self._file.fileno(), 0, os.SEEK_SET)
            text = os.read(self._file.fileno(), min(size, 4096)).decode("utf-8", "replace")
            said += [line.strip() for line in text.splitlines() if line.strip()]
        return "; ".join(said)

    def __exit__(self, *exc: object) -> None:
        import sys

        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.close()
        self._warnings.__exit__(*exc)


def _header_size(raw: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR or a JPEG's frame header, without decoding; None for other
    formats, or a header too broken to read (the decoder then says why)."""
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR":
        return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    if raw[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 9 <= len(raw):  # markers: FF, code, 2-byte length (which counts itself), payload
        if raw[at] != 0xFF:
            return None
        code = raw[at + 1]
        if code == 0xFF:  # fill byte
            at += 1
            continue
        if 0xC0 <= code <= 0xCF and code not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15: the frame header
            return int.from_bytes(raw[at + 7:at + 9], "big"), int.from_bytes(raw[at + 5:at + 7], "big")
        at += 2 + int.from_bytes(raw[at + 2:at + 4], "big")
    return None


def decode_image(raw: bytes, shown: str, shape: tuple[int, ...], messages: DecoderMessages,
                 wanted: str | None = None) -> torch.Tensor:
    """One encoded image -> (C, H, W) uint8; an unreadable, corrupt or oversized image names its file.

    The size the header declares is checked first: an image whose size is not data.shape's is
    refused before a pixel is decoded, so a small file declaring a huge image (a decompression
    bomb) costs nothing. PNG and JPEG headers are read here, other formats by PIL, which opens
    lazily. Whatever a decoder prints while decoding (libjpeg: "Corrupt JPEG data: ...", and it
    carries on with wrong pixels) or warns refuses the image too. `wanted` says who asks for
    `shape` in that error (data.shape by default)."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError
    from torchvision.io import ImageReadMode, decode_image

    channels, height, width = shape
    messages.clear()
    try:
        size = _header_size(raw)
        fast = size is not None and os.path.splitext(shown)[1].lower() in _FAST_SUFFIXES
        pil = None if fast else Image.open(io.BytesIO(raw))  # PIL reads the header only
        size = size if fast else pil.size
        if size != (width, height):
            raise ConfigError(f"image {shown} declares {size[0]}x{size[1]} pixels (width x height) in its "
                              f"header but {wanted or f'data.shape={list(shape)} asks for {width}x{height}'}; "
                              "cnnlab does not resize images: remove or replace it")
        if fast:  # torchvision: ~3x faster than PIL
            mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
            image = decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=mode)
        else:
            with pil:
                array = np.asarray(pil.convert("RGB" if channels == 3 else "L"))
            array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
            image = torch.from_numpy(array.copy())  # (C, H, W) uint8
    except ConfigError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ConfigError(f"image {shown} declares more pixels than an image may have: "
                          f"{str(err).split(' could be')[0].rstrip(',')}; remove or replace it") from err
    except (RuntimeError, OSError, UnidentifiedImageError, ValueError) as err:
        reason = ("not a recognised image format" if isinstance(err, UnidentifiedImageError)
                  else re.sub(r"^.*?\.cpp:\d+, ", "", str(err).strip().splitlines()[-1]))
        raise ConfigError(f"cannot decode image {shown}: {reason}; remove or replace it") from err
    said = messages.read()
    if said:
        raise ConfigError(f"image {shown} is corrupt: its decoder said {said[:200]!r}, and "
                          "training on it would use wrong pixels; remove or replace it")
    if image.dtype != torch.uint8:  # torchvision keeps 16-bit PNGs 16-bit
        raise ConfigError(f"image {shown} decodes to {image.dtype}; only 8-bit images are "
                          "supported")
    return image


def _cached(cache: Path, source: str, decode: Callable[[], TensorData]) -> TensorData:
    """The decoded entry `cache` if it is there and sound, else `decode()`, saved there.

    One process decodes while others wanting the same entry wait on its lock, then read
    what it saved. A cache folder that cannot be written costs decoding time, never the run."""
    found = _load_cache(cache, source)
    if found is not None:
        return found
    warned = cache.is_file()  # there, yet not used: _load_cache said why
    from filelock import FileLock, Timeout

    lock = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(cache) + ".lock", timeout=3600)
        lock.acquire()
    except Timeout:  # before OSError: filelock's Timeout is a TimeoutError, an OSError
        lock = None
        log.warning("the decoded cache %s stayed locked by another process for an hour; "
                    "decoding without it", cache)
    except OSError:
        lock = None  # a folder that cannot be written: saving the entry will say so
    try:
        if lock is not None:  # another process may have decoded it while this one waited
            found = _load_cache(cache, source, quiet=warned)
            if found is not None:
                return found
        data = decode()
        _save_cache(cache, data)
        return data
    finally:
        if lock is not None:
            lock.release()


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


def _load_cache(cache: Path, source: str, quiet: bool = False) -> TensorData | None:
    """A cache entry whose tensors match the digest saved with them; None when there is none,
    or (after one warning line, unless quiet) when it is truncated, corrupt or of another layout."""
    import pickle
    import zipfile

    import torch

    if not cache.is_file():
        return None
    try:
        saved = torch.load(cache, weights_only=True)
        tensors = tuple(saved[k] for k in ("train_x", "train_y", "test_x", "test_y"))
        if not all(isinstance(t, torch.Tensor) for t in tensors) or _digest(tensors) != saved["sha256"]:
            raise ValueError("its tensors do not match the sha256 saved with them")
        data = TensorData(*tensors, list(saved["classes"]), f"{source} (decoded cache {cache.name})")
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, IndexError,
            pickle.UnpicklingError, zipfile.BadZipFile) as error:
        if not quiet:
            reason = _reason(error).split(". ")[0][:160]  # torch's own messages go on for lines
            log.warning("decoded cache %s is unreadable or corrupt (%s); decoding %s again", cache,
                        reason, source)
        return None
    object.__setattr__(data, "_sha256", saved["sha256"])  # just checked: the run's fingerprint
    return data


def _save_cache(cache: Path, data: TensorData) -> None:
    import torch

    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        # Temp file + rename: a crash or a parallel run never leaves a half-written cache.
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=cache.name, suffix=".tmp")
        os.close(fd)
        torch.save({"train_x": data.train_x, "train_y": data.train_y, "test_x": data.test_x,
                    "test_y": data.test_y, "classes": list(data.classes), "sha256": data.sha256()}, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; other runs and users read it too
        os.replace(tmp, cache)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as RuntimeError
        # The cache only saves decoding time: a full or read-only cache folder costs the next
        # run a decode, not this run its data.
        log.warning("could not write the decoded cache %s (%s); the next run decodes again", cache,
                    _reason(error))
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
