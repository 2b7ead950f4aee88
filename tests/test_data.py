"""Datasets (finding, decoding, caching, checking) and the two batch pipelines; offline, CPU."""

from __future__ import annotations

import copy
import gzip
import io
import math
import tarfile
import urllib.error
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from cnnlab.config.schema import DATA
from cnnlab.data import sources as datasets
from cnnlab.data.batches import TensorBatches, TensorDataModule, random_crop
from cnnlab.data.sources import TensorData, load_dataset
from cnnlab.errors import ConfigError

CONF = Path(__file__).resolve().parent.parent / "conf"


@cache
def _base(name: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=[f"+data={name}", "+paths.data=/nonexistent"])
    return OmegaConf.to_container(cfg.data, resolve=True)


def cfg_for(base: str, **overrides) -> dict:
    """The composed conf/data/<base>.yaml as a plain dict, with overrides (augment__hflip=...)."""
    cfg = copy.deepcopy(_base(base))
    for key, value in overrides.items():
        node, *rest = key.split("__")
        if rest:
            cfg[node][rest[0]] = value
        else:
            cfg[node] = value
    return cfg


def write_tree(root: Path, per_class: dict[str, int] | None = None, size: int = 8,
               test_classes: list[str] | None = None) -> Path:
    """per_class images in train/<class>/, one in test/<class>/; pixel (0,0) = (class, index)."""
    per_class = per_class or {"cat": 3, "dog": 2}
    for split in ("train", "test"):
        for ci, cls in enumerate(test_classes if split == "test" and test_classes else per_class):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class[cls] if split == "train" else 1):
                img = np.full((size, size, 3), 10 * ci, dtype=np.uint8)
                img[0, 0] = (ci, i, 200)
                Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def tar_tree(tree: Path, archive: Path, top: str = "tree") -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname=top)
    return archive


def tree_cfg(tmp_path: Path, **overrides) -> dict:
    return cfg_for("folder", **{"root": str(tmp_path / "tree"), "shape": [3, 8, 8],
                                "num_classes": 2, **overrides})


def load(cfg: dict, tmp_path: Path, seed: int = 0) -> TensorData:
    return load_dataset(cfg, tmp_path / "cache", seed)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_per_seed_and_differs_across_seeds(tmp_path):
    cfg = cfg_for("synthetic")
    a, b, c = load(cfg, tmp_path, 1), load(cfg, tmp_path, 1), load(cfg, tmp_path, 2)
    assert a.train_x.shape == (256, 3, 16, 16) and a.train_x.dtype == torch.uint8
    assert a.test_x.shape == (64, 3, 16, 16) and a.train_y.dtype == torch.int64
    assert a.train_y.bincount().tolist() == [64] * 4  # balanced
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert a.fingerprint() == b.fingerprint()
    assert not torch.equal(a.train_x, c.train_x) and a.fingerprint() != c.fingerprint()
    assert a.train_y[:20].tolist() != sorted(a.train_y[:20].tolist())  # shuffled


def test_synthetic_is_learnable(tmp_path):
    torch.manual_seed(0)
    d = load(cfg_for("synthetic"), tmp_path)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                              torch.nn.Linear(32, 4))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _epoch in range(5):
        for x, y in TensorBatches(d.train_x, d.train_y, 32, shuffle=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    x, y = next(iter(TensorBatches(d.test_x, d.test_y, 64)))
    assert (net(x).argmax(1) == y).float().mean() > 0.6  # chance is 0.25


def test_fingerprint_changes_with_one_pixel(tmp_path):
    d = load(cfg_for("synthetic"), tmp_path)
    x = d.test_x.clone()
    x[5, 1, 2, 3] ^= 1
    changed = TensorData(d.train_x, d.train_y, x, d.test_y, d.classes, d.source)
    assert changed.fingerprint() != d.fingerprint()
    assert len(d.fingerprint()) == 16


def test_subset_keeps_a_seeded_mixed_sample(tmp_path):
    full = load(cfg_for("synthetic"), tmp_path)
    a = load(cfg_for("synthetic", subset=40), tmp_path)
    b = load(cfg_for("synthetic", subset=40), tmp_path, seed=1)
    assert len(a.train_x) == 40 and len(a.test_x) == len(full.test_x)
    assert not torch.equal(a.train_x, full.train_x[:40])  # not just the head
    assert len(a.train_y.unique()) == 4
    assert not torch.equal(a.train_x, b.train_x[:40])
    with pytest.raises(ConfigError, match="subset=999 is larger than the 256"):
        load(cfg_for("synthetic", subset=999), tmp_path)


# --------------------------------------------------------------------------- image trees


def test_image_tree_loads_classes_shapes_and_labels(tmp_path):
    write_tree(tmp_path / "tree")
    d = load(tree_cfg(tmp_path), tmp_path)
    assert d.classes == ["cat", "dog"]
    assert d.train_x.shape == (5, 3, 8, 8) and d.test_x.shape == (2, 3, 8, 8)
    assert d.train_y.tolist() == [0, 0, 0, 1, 1] and d.test_y.tolist() == [0, 1]
    # Pixel (0, 0) holds (class, image index, 200): the right file went to the right row.
    assert d.train_x[:, :, 0, 0].tolist() == [[0, 0, 200], [0, 1, 200], [0, 2, 200],
                                             [1, 0, 200], [1, 1, 200]]
    assert str(tmp_path / "tree") in d.source


def test_grayscale_tree_decodes_one_channel(tmp_path):
    write_tree(tmp_path / "tree")
    d = load(tree_cfg(tmp_path, shape=[1, 8, 8]), tmp_path)
    assert d.train_x.shape == (5, 1, 8, 8)


def test_archive_loads_the_same_tensors_and_caches(tmp_path, monkeypatch):
    tree = write_tree(tmp_path / "tree")
    archive = tar_tree(tree, tmp_path / "tree.tar.gz")
    from_tree = load(tree_cfg(tmp_path), tmp_path)
    from_tar = load(tree_cfg(tmp_path, archive=str(archive)), tmp_path)
    assert from_tar.fingerprint() == from_tree.fingerprint()
    assert from_tar.classes == from_tree.classes
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2

    def boom(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(datasets, "decode_image", boom)
    again = load(tree_cfg(tmp_path, archive=str(archive)), tmp_path)
    assert again.fingerprint() == from_tar.fingerprint() and "decoded cache" in again.source
    assert load(tree_cfg(tmp_path), tmp_path).fingerprint() == from_tree.fingerprint()


def test_changed_image_invalidates_the_tree_cache(tmp_path):
    tree = write_tree(tmp_path / "tree")
    first = load(tree_cfg(tmp_path), tmp_path)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tree / "train" / "dog" / "001.png")
    second = load(tree_cfg(tmp_path), tmp_path)
    assert second.fingerprint() != first.fingerprint()
    assert second.train_x[4, :, 3, 3].tolist() == [255, 0, 0]


def _count_decodes(monkeypatch) -> list[str]:
    decoded: list[str] = []
    real = datasets.decode_image

    def counting(raw, shown, *rest):
        decoded.append(shown)
        return real(raw, shown, *rest)

    monkeypatch.setattr(datasets, "decode_image", counting)
    return decoded


def _archive_cfg(runs: Path, archive: Path) -> tuple[dict, Path]:
    """The data config and decode cache a run under paths.runs=runs gets by default."""
    from cnnlab.config.compose import compose as compose_train

    cfg = compose_train(["data=folder", f"data.archive={archive}", "data.shape=[3,8,8]",
                         "data.num_classes=2", f"paths.runs={runs}"])
    return OmegaConf.to_container(cfg.data, resolve=True), Path(cfg.paths.cache)


def test_decode_cache_is_shared_by_runs_roots_and_rebuilt_when_the_archive_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    tree = write_tree(tmp_path / "tree")
    archive = tar_tree(tree, tmp_path / "tree.tar.gz")
    decoded = _count_decodes(monkeypatch)
    cfg_a, cache_a = _archive_cfg(tmp_path / "runs-a", archive)
    cfg_b, cache_b = _archive_cfg(tmp_path / "runs-b", archive)
    assert cache_a == cache_b == tmp_path / "xdg" / "cnnlab"  # not under either paths.runs
    first = load_dataset(cfg_a, cache_a, 0)
    assert len(decoded) == 7  # 5 train + 2 test images
    second = load_dataset(cfg_b, cache_b, 0)  # another runs root: no decoding
    assert len(decoded) == 7 and "decoded cache" in second.source
    assert second.fingerprint() == first.fingerprint()
    # The archive changes (another image, so another size and mtime): decoded again.
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tree / "train" / "dog" / "001.png")
    tar_tree(tree, archive)
    third = load_dataset(cfg_b, cache_b, 0)
    assert len(decoded) == 14 and "decoded cache" not in third.source
    assert third.fingerprint() != first.fingerprint()
    assert third.train_x[4, :, 3, 3].tolist() == [255, 0, 0]
    assert len(list(cache_a.glob("*.pt"))) == 2  # one entry per archive version


@pytest.mark.parametrize("damage", ["truncated", "flipped bytes", "not a cache entry"])
def test_a_corrupt_cache_entry_is_reported_in_one_line_and_decoded_again(tmp_path, monkeypatch, caplog, damage):
    write_tree(tmp_path / "tree")
    first = load(tree_cfg(tmp_path), tmp_path)
    (entry,) = (tmp_path / "cache").glob("*.pt")
    raw = entry.read_bytes()
    if damage == "truncated":
        entry.write_bytes(raw[: len(raw) // 2])
    elif damage == "flipped bytes":  # still a readable file: only the saved sha256 can tell
        buffer = io.BytesIO()
        saved = torch.load(entry, weights_only=True)
        saved["train_x"][0, 0, 0, 0] ^= 1
        torch.save(saved, buffer)
        entry.write_bytes(buffer.getvalue())
    else:
        torch.save({"train_x": torch.zeros(1)}, entry)
    decoded = _count_decodes(monkeypatch)
    with caplog.at_level("WARNING", logger="cnnlab"):
        again = load(tree_cfg(tmp_path), tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert str(entry) in warnings[0] and "decoding" in warnings[0]
    assert decoded and torch.equal(again.train_x, first.train_x)
    assert again.fingerprint() == first.fingerprint()
    decoded.clear()
    assert "decoded cache" in load(tree_cfg(tmp_path), tmp_path).source and not decoded  # rebuilt


def test_parallel_loads_decode_once(tmp_path, monkeypatch):
    """Two loaders wanting the same entry at once: one decodes, the other waits and reads it."""
    import threading

    write_tree(tmp_path / "tree")
    decoded = _count_decodes(monkeypatch)
    results: list[TensorData] = []
    threads = [threading.Thread(target=lambda: results.append(load(tree_cfg(tmp_path), tmp_path)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0].fingerprint() == results[1].fingerprint()
    assert len(decoded) == 7  # the 7 images once, not twice


def test_named_dataset_finds_a_matching_tree_and_skips_lookalikes(tmp_path):
    write_tree(tmp_path / "cifar100", per_class={"a": 1, "b": 1})  # must not match cifar10
    write_tree(tmp_path / "cifar10-png")
    cfg = cfg_for("cifar10", root=str(tmp_path), shape=[3, 8, 8], num_classes=2, download=False)
    d = load(cfg, tmp_path)
    assert d.classes == ["cat", "dog"] and "cifar10-png" in d.source


def test_named_dataset_finds_an_archive_under_root(tmp_path):
    (tmp_path / "root").mkdir()
    tar_tree(write_tree(tmp_path / "src"), tmp_path / "root" / "mnist.tar.gz", top="mnist")
    cfg = cfg_for("mnist", root=str(tmp_path / "root"), shape=[1, 8, 8], num_classes=2,
                  download=False)
    d = load(cfg, tmp_path)
    assert d.train_x.shape == (5, 1, 8, 8) and "mnist.tar.gz" in d.source


# --------------------------------------------------------------------------- torchvision, IDX


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _write_fashion(folder: Path, n_train: int = 6, n_test: int = 4) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_fashion_mnist_from_debian_idx_files(tmp_path, monkeypatch):
    _write_fashion(tmp_path / "debian")
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    d = load(cfg_for("fashion_mnist", root=str(tmp_path / "empty"), download=False), tmp_path)
    assert d.train_x.shape == (6, 1, 28, 28) and d.test_x.shape == (4, 1, 28, 28)
    assert d.train_y.tolist() == [0, 1, 2, 3, 4, 5]
    assert d.classes == torchvision.datasets.FashionMNIST.classes
    assert "debian" in d.source


def test_truncated_idx_file_is_named(tmp_path, monkeypatch):
    _write_fashion(tmp_path / "debian")
    bad = tmp_path / "debian" / "t10k-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + np.array([4, 28, 28], dtype=">i4").tobytes() + b"x" * 10)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    with pytest.raises(ConfigError, match="t10k-images-idx3-ubyte.gz.*truncated"):
        load(cfg_for("fashion_mnist", root=str(tmp_path), download=False), tmp_path)


def test_mnist_raw_gz_in_torchvision_layout(tmp_path):
    _write_fashion(tmp_path / "MNIST" / "raw")
    d = load(cfg_for("mnist", root=str(tmp_path), download=False), tmp_path)
    assert d.train_x.shape == (6, 1, 28, 28) and d.classes == torchvision.datasets.MNIST.classes


def test_unreadable_torchvision_layout_is_an_error(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(ConfigError, match="cifar-10-batches-py"):
        load(cfg_for("cifar10", root=str(tmp_path), download=False), tmp_path)


def test_nothing_found_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    with pytest.raises(ConfigError) as err:
        load(cfg_for("cifar10", root=str(tmp_path), download=False), tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert f"{tmp_path}/cifar10*/" in msg and f"{tmp_path}/cifar10*.tar.gz" in msg
    assert "data.root=" in msg and "data.archive=" in msg
    with pytest.raises(ConfigError, match="no-debian"):
        load(cfg_for("fashion_mnist", root=str(tmp_path), download=False), tmp_path)


def test_failed_download_is_a_config_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(ConfigError, match="download.*no network"):
        load(cfg_for("cifar10", root=str(tmp_path), download=True), tmp_path)


# --------------------------------------------------------------------------- bad inputs


def test_missing_class_in_test_names_class_and_folder(tmp_path):
    write_tree(tmp_path / "tree", test_classes=["cat"])
    with pytest.raises(ConfigError, match=f"'dog'.*{tmp_path / 'tree'}/test"):
        load(tree_cfg(tmp_path), tmp_path)


def test_empty_class_folder_is_named(tmp_path):
    write_tree(tmp_path / "tree")
    (tmp_path / "tree" / "train" / "emu").mkdir()
    (tmp_path / "tree" / "test" / "emu").mkdir()
    with pytest.raises(ConfigError, match="train/emu has no images"):
        load(tree_cfg(tmp_path), tmp_path)


def test_corrupt_image_names_the_file(tmp_path):
    write_tree(tmp_path / "tree")
    (tmp_path / "tree" / "train" / "dog" / "001.png").write_bytes(b"\x89PNG garbage" * 5)
    with pytest.raises(ConfigError, match="dog/001.png"):
        load(tree_cfg(tmp_path), tmp_path)
    assert not list((tmp_path / "cache").glob("*.pt"))  # nothing half-decoded cached


def test_truncated_archive_is_named(tmp_path):
    archive = tar_tree(write_tree(tmp_path / "tree"), tmp_path / "t.tar.gz")
    archive.write_bytes(archive.read_bytes()[:300])
    with pytest.raises(ConfigError, match="t.tar.gz is not a readable"):
        load(tree_cfg(tmp_path, archive=str(archive)), tmp_path)


def test_archive_with_parent_member_is_refused(tmp_path):
    archive = tar_tree(write_tree(tmp_path / "tree"), tmp_path / "evil.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../evil")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(ConfigError, match=r"unsafe member '\.\./evil'"):
        load(tree_cfg(tmp_path, archive=str(archive)), tmp_path)
    assert not (tmp_path / "evil").exists()


def test_wrong_image_size_names_both(tmp_path):
    write_tree(tmp_path / "tree")
    with pytest.raises(ConfigError, match=r"declares 8x8 pixels.*data.shape=\[3, 9, 9\]"):
        load(tree_cfg(tmp_path, shape=[3, 9, 9]), tmp_path)


def test_class_count_and_label_range_are_checked(tmp_path):
    write_tree(tmp_path / "tree", per_class={"a": 1, "b": 1, "c": 1})
    with pytest.raises(ConfigError, match=r"labels in \[0, 2\].*num_classes=2"):
        load(tree_cfg(tmp_path), tmp_path)
    with pytest.raises(ConfigError, match="has 3 classes but data.num_classes=4"):
        load(tree_cfg(tmp_path, num_classes=4), tmp_path)


@pytest.mark.parametrize(("override", "expected"), [
    ({"name": "imagenet"}, "data.name must be one of synthetic, cifar10.*got 'imagenet'"),
    ({"shape": [3, 32]}, r"data.shape must be \[channels, height, width\].*got \[3, 32\]"),
    ({"shape": [3, 0, 32]}, r"data.shape must be .*got \[3, 0, 32\]"),
    ({"num_classes": 1}, "data.num_classes must be an integer >= 2, got 1"),
    ({"batch_size": 0}, "data.batch_size must be an integer >= 1, got 0"),
    ({"eval_batch_size": 2.5}, "data.eval_batch_size must be an integer >= 1, got 2.5"),
    ({"validation": "train"}, "data.validation must be one of test, split, got 'train'"),
    ({"val_fraction": 1.0}, r"data.val_fraction must be a number in \(0, 1\), got 1.0"),
    ({"subset": 0}, "data.subset must be null or an integer >= 1, got 0"),
    ({"normalize": "minmax"}, "data.normalize must be one of scale, standardize, got 'minmax'"),
    ({"normalize": "standardize", "mean": [0.5]}, r"data.mean must be 3 numbers.*got \[0.5\]"),
    ({"normalize": "standardize", "std": [0.2, 0, 0.2]}, "data.std must be numbers > 0"),
    ({"augment__crop_padding": -1}, "data.augment.crop_padding must be an integer >= 0, got -1"),
    ({"augment__hflip": "yes"}, "data.augment.hflip must be true or false, got 'yes'"),
    ({"pipeline": "dali"}, "data.pipeline must be one of memory, loader, got 'dali'"),
    ({"num_workers": -2}, "data.num_workers must be an integer >= 0, got -2"),
    ({"noise": -1}, r"data.noise must be a finite number in \[0, inf\), got -1"),
])
def test_bad_config_values_are_named(override, expected):
    with pytest.raises(ConfigError, match=expected):
        DATA.check(cfg_for("synthetic", **override))


def test_missing_key_is_named():
    cfg = cfg_for("synthetic")
    del cfg["pipeline"]
    with pytest.raises(ConfigError, match="data.pipeline is missing"):
        DATA.check(cfg)


# --------------------------------------------------------------------------- memory pipeline


def _indexed(n: int = 50, shape=(3, 6, 6)) -> TensorData:
    """Image i has every pixel of channel 0 equal to i, so a batch tells which images it holds."""
    x = torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(0),
                      dtype=torch.uint8)
    x[:, 0] = torch.arange(n, dtype=torch.uint8)[:, None, None]
    y = torch.arange(n) % 4
    return TensorData(x, y, x[:20].clone(), y[:20].clone(), [f"c{i}" for i in range(4)], "test")


def _ids(batches) -> list[int]:
    return [int(v) for x, _ in batches for v in (x[:, 0, 0, 0] * 255).round()]


def test_memory_batches_cover_an_epoch_once_in_a_seeded_order():
    d = _indexed(50)
    make = lambda epoch, seed=0: TensorBatches(d.train_x, d.train_y, 8, shuffle=True,  # noqa: E731
                                               seed=seed, epoch=lambda: epoch)
    assert len(make(0)) == math.ceil(50 / 8) == len(list(make(0)))
    assert sorted(_ids(make(0))) == list(range(50))
    assert [len(x) for x, _ in make(0)][-1] == 2  # no drop_last
    assert _ids(make(3)) == _ids(make(3))
    assert _ids(make(3)) != _ids(make(4)) and _ids(make(3)) != _ids(make(3, seed=1))
    for x, y in make(0):  # labels travel with their images
        assert torch.equal(y, d.train_y[(x[:, 0, 0, 0] * 255).round().long()])
    counting = TensorBatches(d.train_x, d.train_y, 8, shuffle=True)  # no epoch: counts passes
    assert _ids(counting) == _ids(make(0)) and _ids(counting) == _ids(make(1))


def test_scale_and_standardize_values():
    d = _indexed(10)
    (x, _), = TensorBatches(d.train_x, d.train_y, 10)
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.allclose(x, d.train_x.float() / 255)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    (z, _), = TensorBatches(d.train_x, d.train_y, 10, mean=mean, std=std)
    expected = (d.train_x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        std).view(1, 3, 1, 1)
    assert torch.allclose(z, expected, atol=1e-6)


def test_augmentation_changes_images_keeps_shapes_and_is_a_crop_or_flip():
    d = _indexed(64, shape=(3, 8, 8))
    plain = torch.cat([x for x, _ in TensorBatches(d.train_x, d.train_y, 16)])
    flipped = torch.cat([x for x, _ in TensorBatches(d.train_x, d.train_y, 16, hflip=True)])
    assert flipped.shape == plain.shape
    same = (flipped == plain).flatten(1).all(1)
    mirrored = (flipped == plain.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and 10 < mirrored.sum() < 54  # about half flipped
    cropped = torch.cat([x for x, _ in TensorBatches(d.train_x, d.train_y, 16, crop_padding=2)])
    assert cropped.shape == plain.shape and not torch.equal(cropped, plain)


def test_random_crop_matches_a_per_sample_reference():
    x = torch.randint(0, 256, (5, 2, 6, 7), dtype=torch.uint8)
    shifts = torch.tensor([[0, 0], [4, 4], [2, 2], [1, 3], [4, 0]])
    out = random_crop(x, shifts, 2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i, (dy, dx) in enumerate(shifts.tolist()):
        assert torch.equal(out[i], padded[i, :, dy:dy + 6, dx:dx + 7])
    assert torch.equal(out[2], x[2])  # offset (p, p) is the identity


# --------------------------------------------------------------------------- DataModule


def test_split_validation_is_disjoint_and_complete():
    d = _indexed(50)
    cfg = cfg_for("synthetic", validation="split", val_fraction=0.2, eval_batch_size=7)
    dm = TensorDataModule(d, cfg, seed=0)
    dm.setup("fit")
    train, val = _ids(dm.train_dataloader()), _ids(dm.val_dataloader())
    assert len(val) == 10 and len(train) == 40
    assert sorted(train + val) == list(range(50))
    assert _ids(dm.test_dataloader()) == list(range(20))
    assert _ids(TensorDataModule(d, cfg, seed=1).val_dataloader()) != val
    assert dm.classes == d.classes and dm.num_classes == 4 and dm.data is d


def test_test_validation_uses_the_test_set():
    d = _indexed(50)
    dm = TensorDataModule(d, cfg_for("synthetic"), seed=0)
    assert _ids(dm.val_dataloader()) == _ids(dm.test_dataloader()) == list(range(20))


def test_setup_moves_the_memory_sets_to_the_trainer_device_once():
    dm = TensorDataModule(_indexed(50), cfg_for("synthetic"), seed=0)
    device = torch.device("meta")  # stands in for a GPU: tensors move, no data is copied
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=device), current_epoch=0,
                                 global_rank=0, world_size=1)
    dm.setup("fit")
    val, test, train = dm.val_dataloader(), dm.test_dataloader(), dm.train_dataloader()
    assert train.x.device == device and train.y.device == device
    assert val.x is test.x  # validation=test shares one copy on the device


def test_loader_and_memory_pipelines_give_identical_eval_batches():
    d = load_dataset(cfg_for("synthetic"), Path("/nonexistent"), 0)
    common = dict(normalize="standardize", eval_batch_size=24, augment__crop_padding=2,
                  augment__hflip=True)
    memory = TensorDataModule(d, cfg_for("synthetic", pipeline="memory", **common), 0)
    loader = TensorDataModule(d, cfg_for("synthetic", pipeline="loader", **common), 0)
    for name in ("val_dataloader", "test_dataloader"):
        pairs = list(zip(getattr(memory, name)(), getattr(loader, name)(), strict=True))
        assert len(pairs) == 3
        for (xm, ym), (xl, yl) in pairs:
            assert torch.equal(xm, xl) and torch.equal(ym, yl)
    xs, ys = next(iter(loader.train_dataloader()))
    assert xs.shape == (32, 3, 16, 16) and xs.dtype == torch.float32 and ys.dtype == torch.int64


class _Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
        self.first_labels: list[list[int]] = []
        self.val_seen = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx == 0:
            self.first_labels.append(y.tolist())
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.val_seen += len(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_trainer_epochs_follow_seed_and_epoch(tmp_path):
    cfg = cfg_for("synthetic", augment__hflip=True)
    d = load(cfg, tmp_path)
    dm, model = TensorDataModule(d, cfg, seed=3), _Recorder()
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    for epoch in (0, 1):
        (_, y), *_ = TensorBatches(d.train_x, d.train_y, 32, shuffle=True, seed=3,
                                   epoch=lambda e=epoch: e)
        assert model.first_labels[epoch] == y.tolist()
    assert model.first_labels[0] != model.first_labels[1]
    assert model.val_seen == 2 * len(d.test_x)  # val = test, every epoch


# --------------------------------------------------------------------------- hostile image files


def _jpeg_tree(root: Path, size: int = 64) -> list[Path]:
    rng = np.random.default_rng(1)
    paths = []
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            path = root / split / cls / "000.jpg"
            path.parent.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)
            paths.append(path)
    return paths


def test_a_jpeg_with_garbage_in_the_middle_is_refused_and_nothing_is_cached(tmp_path):
    paths = _jpeg_tree(tmp_path / "tree")
    cfg = tree_cfg(tmp_path, shape=[3, 64, 64])
    good = load(cfg, tmp_path)  # the intact tree decodes (and is cached) without complaint
    assert len(good.train_x) == 2 and len(list((tmp_path / "cache").glob("*.pt"))) == 1
    raw = paths[1].read_bytes()
    paths[1].write_bytes(raw[:len(raw) // 2] + bytes(range(100, 140)) + raw[len(raw) // 2:])
    with pytest.raises(ConfigError, match=r"train/dog/000\.jpg is corrupt: its decoder said 'Corrupt JPEG data"):
        load(cfg, tmp_path)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # only the intact tree's entry


def test_declared_sizes_are_read_from_headers_as_pil_reads_them():
    rng = np.random.default_rng(2)
    for fmt, size, mode in (("PNG", (17, 5), "RGB"), ("JPEG", (33, 12), "RGB"), ("JPEG", (9, 40), "L"),
                            ("PNG", (1, 300), "L")):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(buffer, format=fmt, progressive=fmt == "JPEG" and mode == "L")
        raw = buffer.getvalue()
        assert datasets._header_size(raw) == Image.open(io.BytesIO(raw)).size == size
    assert datasets._header_size(b"GIF89a...") is None
    assert datasets._header_size(b"\xff\xd8\xff") is None  # a JPEG cut before its frame header


def test_a_tree_image_larger_than_an_image_of_the_shape_can_be_is_not_read(tmp_path):
    write_tree(tmp_path / "tree")
    big = tmp_path / "tree" / "train" / "cat" / "huge.png"
    with open(big, "wb") as f:
        f.truncate(datasets.max_image_bytes((3, 8, 8)) + 1)  # sparse: nothing on disk
    with pytest.raises(ConfigError, match=r"huge\.png is 16,778,753 bytes, more than an image of "
                                          r"data.shape=\[3, 8, 8\] needs \(at most 16,778,752\)"):
        load(tree_cfg(tmp_path), tmp_path)
    assert datasets.max_image_bytes((3, 8, 8)) == 8 * 3 * 8 * 8 + 16 * 2**20
