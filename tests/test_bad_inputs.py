"""A corpus of bad inputs, one row each, through the command line `cnnlab train` runs.

Every row must give: a non-zero exit status (2 for bad input, 1 for a failure that can only
show while training), a short `error: ...` last line on stderr naming the bad value or problem
and what is allowed, no traceback, and no MLflow run (or exactly one FAILED run when the
problem can only show during training). What each row expects is its `outcome`:

    NOTHING   status 2, one stderr line, and nothing written under paths.runs: no MLflow
              store, no run folder (caught before Hydra starts: cnnlab.train.preflight)
    NO_RUN    status 2, no MLflow run; Hydra's run folder may exist (the data itself is bad,
              found while loading it, before the run is opened)
    FAILED    status 1 and exactly one MLflow run, marked FAILED (only training shows it)

Most rows run in this process through `cnnlab.cli.main` (the console script's entry point);
the rows marked `own_process` run `python -m cnnlab.cli train ...` to prove the no-traceback
property end to end, and the full-disk rows need a process of their own for RLIMIT_FSIZE.
"""

from __future__ import annotations

import gzip
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from log_handlers import handlers_restored
from PIL import Image

from cnnlab.cli import main

TINY = ["data=synthetic", "model.widths=[4]", "model.dense=[8]", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "tracking.log_model=false", "trainer.max_epochs=1"]
NOTHING, NO_RUN, FAILED = "nothing written", "no MLflow run", "one FAILED run"
FOLDER = ["data=folder", "data.shape=[3,8,8]", "data.num_classes=2"]


@dataclass(frozen=True)
class Case:
    args: list[str] | Callable[[Path], list[str]]  # a callable makes its files under tmp_path first
    words: tuple[str, ...]  # each must be in the error line: the bad value, the allowed values
    outcome: str = NOTHING
    own_process: bool = False  # python -m cnnlab.cli train ..., not cnnlab.cli.main here
    file_size_limit: int | None = None  # RLIMIT_FSIZE in bytes (a full disk); own process only


def case(name: str, args, *words: str, outcome: str = NOTHING, own_process: bool = False,
         file_size_limit: int | None = None, marks=()):
    return pytest.param(Case(args, words, outcome, own_process or file_size_limit is not None,
                             file_size_limit), id=name, marks=marks)


# --------------------------------------------------------------------------- bad files


def _png(path: Path, size: int = 8, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)
    return path


def _tree(root: Path, size: int = 8, splits: tuple[str, ...] = ("train", "test")) -> Path:
    """Two classes, two images each, in every split."""
    for split in splits:
        for ci, cls in enumerate(("cat", "dog")):
            for i in range(2):
                _png(root / split / cls / f"{i:03d}.png", size, 40 * ci + i)
    return root


def empty_tree(tmp: Path) -> list[str]:
    for split in ("train", "test"):
        (tmp / "tree" / split).mkdir(parents=True)
    return [*FOLDER, f"data.root={tmp / 'tree'}"]


def corrupt_png(tmp: Path) -> list[str]:
    tree = _tree(tmp / "tree")
    (tree / "train" / "dog" / "001.png").write_bytes(os.urandom(300))  # garbage named .png
    return [*FOLDER, f"data.root={tree}"]


def truncated_png(tmp: Path) -> list[str]:
    tree = _tree(tmp / "tree", size=64)
    image = tree / "test" / "cat" / "000.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    image.write_bytes(image.read_bytes()[:400])  # the header survives, the pixels do not
    return ["data=folder", "data.shape=[3,64,64]", "data.num_classes=2", f"data.root={tree}"]


def train_without_test(tmp: Path) -> list[str]:
    return [*FOLDER, f"data.root={_tree(tmp / 'tree', splits=('train',))}"]


def wrong_image_size(tmp: Path) -> list[str]:
    return ["data=folder", "data.shape=[3,9,9]", "data.num_classes=2",
            f"data.root={_tree(tmp / 'tree')}"]


def truncated_archive(tmp: Path) -> list[str]:
    archive = tmp / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(_tree(tmp / "tree", size=32), arcname="tree")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    return ["data=folder", "data.shape=[3,32,32]", "data.num_classes=2", f"data.archive={archive}"]


def empty_archive(tmp: Path) -> list[str]:
    archive = tmp / "empty.tar.gz"
    with tarfile.open(archive, "w:gz"):
        pass
    return [*FOLDER, f"data.archive={archive}"]


def jpeg_as_archive(tmp: Path) -> list[str]:
    image = tmp / "photo.tar.gz"  # a JPEG, whatever its name says
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image, format="JPEG")
    return [*FOLDER, f"data.archive={image}"]


def zip_as_archive(tmp: Path) -> list[str]:
    import zipfile

    archive = tmp / "tree.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(_png(tmp / "tree" / "train" / "cat" / "000.png"), "train/cat/000.png")
    return [*FOLDER, f"data.archive={archive}"]


def empty_file_as_archive(tmp: Path) -> list[str]:
    (tmp / "tree.tar.gz").touch()
    return [*FOLDER, f"data.archive={tmp / 'tree.tar.gz'}"]


def _declare_png_size(path: Path, width: int, height: int) -> None:
    """Rewrite a PNG's IHDR to declare another size (its CRC too): an 8 KB file 'of' any size."""
    import zlib

    raw = bytearray(path.read_bytes())
    raw[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")  # over 'IHDR' and its 13 bytes
    path.write_bytes(bytes(raw))


def png_bomb_in_tree(tmp: Path) -> list[str]:
    tree = _tree(tmp / "tree")
    _declare_png_size(tree / "train" / "dog" / "001.png", 100_000, 100_000)  # 30 GB of pixels
    return [*FOLDER, f"data.root={tree}"]


def png_bomb_in_archive(tmp: Path) -> list[str]:
    tree = _tree(tmp / "tree")
    _declare_png_size(tree / "test" / "cat" / "000.png", 100_000, 100_000)
    archive = tmp / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="tree")
    return [*FOLDER, f"data.archive={archive}"]


def bmp_400_megapixels(tmp: Path) -> list[str]:
    tree = _tree(tmp / "tree")
    bmp = tree / "train" / "cat" / "big.bmp"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(bmp)
    raw = bytearray(bmp.read_bytes())
    raw[18:26] = (20_000).to_bytes(4, "little") * 2  # BITMAPINFOHEADER width, height: 400 megapixels
    bmp.write_bytes(bytes(raw))
    return [*FOLDER, f"data.root={tree}"]


def sparse_64_gib_member(tmp: Path) -> list[str]:
    tree = _tree(tmp / "tree")
    with open(tree / "train" / "cat" / "big.png", "wb") as big:
        big.truncate(64 * 2**30)  # a hole: no disk used; GNU tar's --sparse stores it in a few bytes
    archive = tmp / "sparse.tar.gz"
    subprocess.run(["tar", "--sparse", "-czf", str(archive), "-C", str(tmp), "tree"], check=True)
    (tree / "train" / "cat" / "big.png").unlink()
    return [*FOLDER, f"data.archive={archive}"]


def corrupt_jpeg(tmp: Path) -> list[str]:
    """40 garbage bytes in the middle of a JPEG: libjpeg decodes it anyway, every pixel after them wrong."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            for i in range(2):
                path = tmp / "tree" / split / cls / f"{i:03d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    bad = tmp / "tree" / "train" / "dog" / "001.jpg"
    raw = bad.read_bytes()
    bad.write_bytes(raw[:len(raw) // 2] + bytes(rng.integers(0, 256, 40, dtype=np.uint8)) + raw[len(raw) // 2:])
    return ["data=folder", "data.shape=[3,64,64]", "data.num_classes=2", f"data.root={tmp / 'tree'}"]


def labels_outside_classes(tmp: Path) -> list[str]:
    """MNIST's IDX files whose labels run 0..10, with 10 classes (0..9) allowed."""
    raw = tmp / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 11), ("t10k", 4)):
        for kind, array in (("images-idx3", np.zeros((n, 28, 28))), ("labels-idx1", np.arange(n))):
            header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
            with gzip.open(raw / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + array.astype(np.uint8).tobytes())
    return ["data=mnist", f"data.root={tmp / 'data'}", "data.download=false"]


def garbage_checkpoint(tmp: Path) -> list[str]:
    path = tmp / "last.ckpt"
    path.write_bytes(os.urandom(2048))
    return [f"ckpt_path={path}"]


def another_models_checkpoint(tmp: Path) -> list[str]:
    import torch

    path = tmp / "other.ckpt"
    torch.save({"epoch": 0, "state_dict": {"network.conv0.weight": torch.zeros(16, 3, 3, 3)}}, path)
    return [f"ckpt_path={path}"]


def tiny_checkpoint(edit: Callable[[dict], object]) -> Callable[[Path], list[str]]:
    """A checkpoint of TINY's network as Lightning lays one out, changed by `edit` (which may
    also return something else to save instead)."""
    def make(tmp: Path) -> list[str]:
        import torch

        from cnnlab.config.compose import compose
        from cnnlab.model.build import build
        from cnnlab.model.plan import model_plan

        network = build(model_plan(compose(TINY)).analysis, "keras", 0.99, 1e-3, logits=True)
        state = {"epoch": 0, "global_step": 8, "pytorch-lightning_version": "2.6.0", "loops": {},
                 "optimizer_states": [], "lr_schedulers": [], "callbacks": {},
                 "state_dict": {f"network.{k}": v for k, v in network.state_dict().items()}}
        saved = edit(state)
        path = tmp / "given.ckpt"
        torch.save(state if saved is None else saved, path)
        return [f"ckpt_path={path}"]

    return make


def _nan_weights(state: dict) -> None:
    state["state_dict"]["network.conv0.weight"][0, 0, 0, 0] = float("nan")


def _extra_tensor(state: dict) -> None:
    import torch

    state["state_dict"]["extra.weight"] = torch.zeros(3)  # outside the network: Lightning's strict load fails


def closed_port(tmp: Path) -> list[str]:
    with socket.socket() as s:  # a port nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [f"tracking.uri=http://127.0.0.1:{port}", "tracking.timeout_s=3"]


def not_mlflow_server(tmp: Path) -> list[str]:
    """A web server on 127.0.0.1 that answers /health with 200 and is not MLflow (it serves files)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    (tmp / "site").mkdir()
    (tmp / "site" / "health").write_text("OK")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp / "site")))
    threading.Thread(target=server.serve_forever, daemon=True).start()  # ends with the test process
    return [f"tracking.uri=http://127.0.0.1:{server.server_address[1]}", "tracking.timeout_s=3"]


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def runs_under_a_file(tmp: Path) -> list[str]:
    (tmp / "file").write_text("a regular file, not a folder")
    return [f"paths.runs={tmp / 'file' / 'runs'}"]


def read_only_runs(tmp: Path) -> list[str]:
    parent = tmp / "read-only"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        (parent / "probe").mkdir()
    except OSError:
        return [f"paths.runs={parent / 'runs'}"]
    # Root ignores permission bits; a read-only file system blocks root too.
    fallback = Path("/sys/cnnlab-bad-input-test")
    try:
        fallback.mkdir()
    except OSError:
        return [f"paths.runs={fallback / 'runs'}"]
    fallback.rmdir()
    pytest.skip("writes succeed under a chmod 0o500 folder (running as root) and /sys is writable; "
                "runs-under-a-file covers an unwritable paths.runs")


def huge_dense(tmp: Path) -> list[str]:
    # A ~12 MB checkpoint (a 256x4096 dense layer and Adam's two moments): the 4 MiB file size
    # limit lets the MLflow store (~1 MB) and every small file through, and stops the checkpoint.
    return ["model.dense=[4096]"]


# --------------------------------------------------------------------------- the corpus

CASES = [
    # model: family knobs
    case("model-unknown-config", ["model=densenet"], "model/densenet",
         "baseline, custom, lenet, registered, resnet, torchvision, vgg"),
    case("model-blocks-zero", ["model.blocks=0"], "model.blocks", ">= 1", "got 0"),
    case("model-blocks-not-a-number", ["model.blocks=two"], "model.blocks", ">= 1", "'two'"),
    case("model-widths-zero", ["model.widths=[0]"], "model.widths", "positive integers", "[0]"),
    case("model-widths-per-block", ["model.blocks=2", "model.widths=[4,8,16]"], "3 entries for 2 blocks"),
    case("model-kernel-zero", ["model.kernels=[0]"], "kernel must be a positive integer, got 0"),
    case("model-padding", ["model.padding=full"], "model.padding", "same, valid", "'full'"),
    case("model-activation", ["model.activation=gelu"], "model.activation",
         "relu, sigmoid, tanh, softmax, linear", "'gelu'"),
    case("model-pool", ["model.pool=min"], "model.pool", "max, avg, none", "'min'"),
    case("model-head", ["model.head=attention"], "model.head", "flatten, gap", "'attention'"),
    case("model-dropout-one-and-a-half", ["model.dropout=1.5"], "model.dropout", "[0, 1)", "1.5"),
    case("model-dropout-negative", ["model.dropout=-0.1"], "model.dropout", "[0, 1)", "-0.1"),
    case("model-bn-not-a-bool", ["model.bn=maybe"], "model.bn", "true or false", "'maybe'"),
    case("model-unknown-knob", ["+model.depth=3"], "unknown key 'model.depth'", "allowed in model:", "blocks"),
    case("model-layers-on-a-family", ["model.layers=[conv:4:3,gap,dense:4]"],
         "Could not override 'model.layers'", "model has no key 'layers'", "allowed:", "blocks"),
    case("model-init", ["model.init=xavier"], "model.init", "keras, torch", "'xavier'"),
    case("model-bn-momentum", ["model.bn_momentum=1.5"], "model.bn_momentum", "[0, 1)", "1.5"),
    case("model-bn-eps-zero", ["model.bn_eps=0"], "model.bn_eps", "(0, inf)", "got 0"),
    case("model-kernel-larger-than-input", ["model.kernels=[40]", "model.padding=valid"],
         "layer 0 (conv 4 40x40, valid)", "needs at least 40x40 input, got 16x16"),
    case("model-lenet-does-not-fit", ["model=lenet"], "layer 4 (conv 6 5x5, valid, sigmoid)",
         "needs at least 5x5 input, got 1x1"),
    # model: resource bombs, refused before anything is allocated (cnnlab.training.budget)
    case("budget-model-widths", ["model.widths=[1000000]"], "the run needs about", "activations at batch size 32",
         "memory available", "model.widths"),
    case("budget-dense-1e9-units", ["model=custom", "model.layers=[flatten,dense:1000000000,dense:4:softmax]"],
         "the run needs about", "parameters, gradients and adam state", "TiB", "memory available"),
    case("budget-synthetic-1e9-images", ["data.n_train=1000000000"], "the run needs about", "(data ",
         "memory available", "data.n_train"),
    case("budget-synthetic-20000x20000", ["data.shape=[3,20000,20000]"], "the run needs about", "TiB",
         "memory available", "data.shape"),
    case("budget-kernel-2001-compute", ["model=custom", "model.layers=[conv:8:2001:same,gap,dense:4:softmax]"],
         "2.46e+10 multiply-accumulates per image", "trainer.max_macs=1e+10"),
    # model: custom layer tokens
    case("layers-unknown-token", ["model=custom", "model.layers=[conv:4:3,pool,flatten,dense:4]"],
         "unknown layer 'pool'", "allowed: conv,", "maxpool, avgpool"),
    case("layers-zero-filters", ["model=custom", "model.layers=[conv:0:3,flatten,dense:4]"],
         "filters must be a positive integer, got 0"),
    case("layers-zero-stride", ["model=custom", "model.layers=[conv:4:3:s0,flatten,dense:4]"],
         "stride must be a positive integer, got 0"),
    case("layers-unknown-option", ["model=custom", "model.layers=[conv:4:3:full,flatten,dense:4]"],
         "unknown option 'full'", "same|valid"),
    case("layers-dropout-rate", ["model=custom", "model.layers=[conv:4:3,dropout:1.2,flatten,dense:4]"],
         "dropout rate must be in [0, 1), got 1.2"),
    case("layers-dense-on-a-map", ["model=custom", "model.layers=[conv:4:3:same,dense:4]"],
         "needs a flat input", "add 'flatten' or 'gap'"),
    case("layers-wrong-class-count", ["model=custom", "model.layers=[conv:4:3,gap,dense:7]"],
         "ends in 7", "4 classes", "dense:4"),
    case("layers-empty", ["model=custom", "model.layers=[]"], "the layer list is empty"),
    # data: config values
    case("data-unknown-config", ["data=imagenet"], "data/imagenet", "cifar10, fashion_mnist, folder"),
    case("data-unknown-name", ["data.name=imagenet"], "data.name must be one of", "synthetic, cifar10", "'imagenet'"),
    case("data-unknown-key", ["+data.bogus=1"], "unknown key 'data.bogus'", "allowed in data", "batch_size"),
    case("data-batch-size-zero", ["data.batch_size=0"], "data.batch_size must be", ">= 1", "got 0"),
    case("data-batch-size-negative", ["data.batch_size=-4"], "data.batch_size must be", ">= 1", "got -4"),
    case("data-batch-size-text", ["data.batch_size=big"], "data.batch_size must be", "integer >= 1", "got 'big'"),
    case("data-val-fraction-above-one", ["data.validation=split", "data.val_fraction=1.5"],
         "data.val_fraction must be", "(0, 1)", "got 1.5"),
    case("data-validation-unknown", ["data.validation=train"],
         "data.validation must be one of", "test, split", "'train'"),
    case("data-normalize-unknown", ["data.normalize=minmax"],
         "data.normalize must be one of", "scale, standardize", "'minmax'"),
    case("data-std-zero", ["data.normalize=standardize", "data.std=[0.25,0,0.25]"],
         "data.std must be", "> 0", "[0.25, 0, 0.25]"),
    case("data-mean-wrong-length", ["data.normalize=standardize", "data.mean=[0.5]"], "data.mean must be",
         "3 numbers", "got [0.5]"),
    case("data-one-class", ["data.num_classes=1"], "data.num_classes must be", ">= 2", "got 1"),
    case("data-shape-two-dims", ["data.shape=[3,16]"],
         "data.shape must be", "[channels, height, width]", "got [3, 16]"),
    case("data-pipeline-unknown", ["data.pipeline=dali"], "data.pipeline must be one of", "memory, loader", "'dali'"),
    case("data-crop-padding-negative", ["data.augment.crop_padding=-1"], "data.augment.crop_padding must be",
         ">= 0", "got -1"),
    case("data-split-leaves-no-validation", ["data.validation=split", "data.n_train=4", "data.val_fraction=0.05"],
         "data.val_fraction=0.05", "leaves 0 for validation", "data.validation=test"),
    case("data-subset-larger-than-train", ["data.subset=999"], "data.subset=999", "256 training images",
         "at most 256"),
    # data: found only with the data (before the MLflow run is opened)
    case("folder-empty-tree", empty_tree, "train has no class folders", "train/<class>/<image>",
         outcome=NO_RUN),
    case("folder-garbage-png", corrupt_png, "cannot decode image", "dog/001.png", "remove or replace it",
         outcome=NO_RUN),
    case("folder-truncated-png", truncated_png, "cannot decode image", "cat/000.png", outcome=NO_RUN),
    case("folder-train-without-test", train_without_test, "has no test/ folder", "test/<class>/*",
         outcome=NO_RUN),
    case("folder-root-missing", lambda tmp: [*FOLDER, f"data.root={tmp / 'nowhere'}"], "nowhere",
         "is not a folder", outcome=NO_RUN),
    case("folder-image-size", wrong_image_size, "declares 8x8 pixels (width x height) in its header",
         "data.shape=[3, 9, 9]",
         outcome=NO_RUN),
    case("archive-truncated", truncated_archive, "tree.tar.gz is not a readable .tar.gz", "truncated",
         outcome=NO_RUN),
    case("archive-empty", empty_archive, "empty.tar.gz holds no train/ and test/", outcome=NO_RUN),
    case("archive-is-a-jpeg", jpeg_as_archive, "photo.tar.gz is a JPEG image, not a .tar.gz", "tar czf",
         outcome=NO_RUN),
    case("archive-is-a-zip", zip_as_archive, "tree.zip is a zip archive, not a .tar.gz", outcome=NO_RUN),
    case("archive-empty-file", empty_file_as_archive, "tree.tar.gz is empty (0 bytes)", outcome=NO_RUN),
    case("archive-missing", lambda tmp: [*FOLDER, f"data.archive={tmp / 'none.tar.gz'}"],
         "none.tar.gz does not exist", outcome=NO_RUN),
    # hostile image files: the declared size is checked before decoding, decoder messages are errors
    case("folder-png-declaring-100000x100000", png_bomb_in_tree, "dog/001.png declares 100000x100000 pixels",
         "data.shape=[3, 8, 8] asks for 8x8", outcome=NO_RUN),
    case("archive-png-declaring-100000x100000", png_bomb_in_archive, "cat/000.png declares 100000x100000 pixels",
         "tree.tar.gz:tree/test", outcome=NO_RUN),
    case("folder-bmp-declaring-400-megapixels", bmp_400_megapixels, "cat/big.bmp declares more pixels than",
         "400000000 pixels", outcome=NO_RUN),
    case("archive-sparse-member-of-64-gib", sparse_64_gib_member, "'tree/train/cat/big.png' declares "
         "68,719,476,736 bytes", "refusing to read it", outcome=NO_RUN),
    case("folder-corrupt-jpeg", corrupt_jpeg, "dog/001.jpg is corrupt", "Corrupt JPEG data", outcome=NO_RUN),
    case("labels-outside-the-classes", labels_outside_classes, "labels in [0, 10]",
         "data.num_classes=10 allows [0, 9]", outcome=NO_RUN),
    # optim
    case("optim-unknown-config", ["optim=rmsprop"], "optim/rmsprop", "adam, adamw, sgd"),
    case("optim-unknown-name", ["optim.name=rmsprop"], "optim.name", "adam, adamw, sgd", "'rmsprop'"),
    case("optim-unknown-schedule", ["optim.schedule=linear"], "optim.schedule",
         "none, step, cosine, onecycle", "'linear'"),
    case("lr-nan", ["optim.lr=nan"], "optim.lr", "finite number in (0, inf)", "got nan"),
    case("lr-negative", ["optim.lr=-0.001"], "optim.lr", "finite number in (0, inf)", "got -0.001"),
    case("lr-zero", ["optim.lr=0"], "optim.lr", "finite number in (0, inf)", "got 0"),
    case("lr-infinite", ["optim.lr=inf"], "optim.lr", "finite number in (0, inf)", "got inf"),
    case("lr-text", ["optim.lr=fast"], "optim.lr", "finite number", "'fast'"),
    case("momentum-above-one", ["optim=sgd", "optim.momentum=1.5"], "optim.momentum", "[0, 1]", "1.5"),
    case("weight-decay-negative", ["optim.weight_decay=-0.01"], "optim.weight_decay", "[0, inf)", "-0.01"),
    case("optim-unknown-impl", ["optim.impl=turbo"], "optim.impl", "loop, foreach, fused", "'turbo'"),
    case("betas-one-value", ["optim.betas=[0.9]"], "optim.betas", "two numbers in [0, 1)"),
    # Trains in this process (the first import of Lightning and MLflow here: seconds), so it is
    # left to `make test-slow`; disk-full-during-training keeps a FAILED row in the fast suite.
    case("lr-so-large-the-loss-diverges", ["optim.lr=1e30", "trainer.max_epochs=2"],
         "the training loss became", "lower optim.lr", outcome=FAILED, marks=pytest.mark.slow),
    # trainer
    case("epochs-zero", ["trainer.max_epochs=0"], "trainer.max_epochs", "integer >= 1", "got 0"),
    case("epochs-negative", ["trainer.max_epochs=-3"], "trainer.max_epochs", "integer >= 1", "got -3"),
    case("epochs-text", ["trainer.max_epochs=ten"], "trainer.max_epochs", "integer >= 1", "'ten'"),
    case("accelerator-unknown", ["trainer.accelerator=quantum"], "trainer.accelerator",
         "auto, cpu, gpu, cuda, mps, tpu", "'quantum'"),
    case("accelerator-absent", ["trainer.accelerator=mps"], "trainer.accelerator=mps", "no such device",
         "auto or cpu", marks=pytest.mark.skipif(sys.platform == "darwin", reason="Macs may have MPS")),
    case("precision-unknown", ["trainer.precision=8"], "trainer.precision", "32-true", "bf16-mixed", "got 8"),
    case("devices-zero", ["trainer.devices=0"], "trainer.devices", "auto, a count >= 1", "got 0"),
    case("devices-negative", ["trainer.devices=-2"], "trainer.devices", "-1 (all)", "got -2"),
    case("strategy-unknown", ["trainer.strategy=bogus"], "trainer.strategy", "auto, ddp", "'bogus'"),
    case("gradient-clip-negative", ["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val", ">= 0"),
    case("deterministic-not-a-bool", ["trainer.deterministic=maybe"], "trainer.deterministic",
         "true, false or warn"),
    case("limit-batches-zero", ["trainer.limit_train_batches=0"], "trainer.limit_train_batches",
         "a batch count >= 1 or a fraction in (0, 1]"),
    case("limit-batches-fraction-of-no-batch", ["trainer.limit_train_batches=1e-6"],
         "trainer.limit_train_batches=1e-06 of the 8 train batches", "no batch at all", "at least 0.125",
         outcome=NO_RUN),
    case("limit-val-batches-fraction-of-no-batch", ["trainer.limit_val_batches=0.5", "data.eval_batch_size=64"],
         "trainer.limit_val_batches=0.5 of the 1 val batches", outcome=NO_RUN),
    case("trainer-unknown-key", ["+trainer.max_epoch=3"], "unknown key 'trainer.max_epoch'", "max_epochs"),
    case("accumulate-zero", ["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches",
         "integer >= 1", "got 0"),
    case("gradient-clip-fused-mixed-precision", ["trainer.precision=bf16-mixed", "trainer.gradient_clip_val=0.5"],
         "trainer.gradient_clip_val=0.5", "trainer.precision=bf16-mixed", "optim.impl=foreach or loop"),
    case("gradient-clip-algorithm-unknown", ["trainer.gradient_clip_algorithm=l3"],
         "trainer.gradient_clip_algorithm", "norm, value", "'l3'"),
    # early_stopping
    case("early-stopping-patience-zero", ["early_stopping.patience=0"], "early_stopping.patience",
         "null or an integer >= 1", "got 0"),
    case("early-stopping-monitor-unknown", ["early_stopping.monitor=loss"], "early_stopping.monitor",
         "train/loss", "val/loss", "'loss'"),
    # tracking
    case("tracking-experiment-parent-path", ["tracking.experiment=../../escaped"], "tracking.experiment",
         "not a path", "'../../escaped'"),
    case("tracking-experiment-absolute-path", ["tracking.experiment=/tmp/absolute-escape"], "tracking.experiment",
         "no leading '/'", "'/tmp/absolute-escape'"),
    case("tracking-run-name-dot-dot", ["tracking.run_name=.."], "tracking.run_name", "not a path", "'..'"),
    case("tracking-uri-scheme", ["tracking.uri=ftp://host/store"], "scheme 'ftp'", "sqlite:///PATH",
         "http://HOST:PORT"),
    case("tracking-server-unreachable", closed_port, "did not answer within 3 s", "tracking.uri=null"),
    case("tracking-experiment-empty", ["tracking.experiment="], "tracking.experiment", "non-empty string"),
    case("tracking-uri-in-memory", ["tracking.uri=sqlite:///:memory:"], "'sqlite:///:memory:' is an in-memory store",
         "keep nothing", "sqlite:///PATH/mlflow.db"),
    case("tracking-uri-sqlite-without-slashes", ["tracking.uri=sqlite:"], "'sqlite:' is not a SQLite file URI",
         "sqlite:///relative/path.db"),
    case("tracking-uri-file-store", lambda tmp: [f"tracking.uri={(tmp / 'store').as_uri()}"], "is a folder",
         "MLflow's file store", "sqlite:///PATH/mlflow.db"),
    case("tracking-uri-relative-path", ["tracking.uri=mlruns"], "'mlruns' is a folder", "MLFLOW_ALLOW_FILE_STORE"),
    case("tracking-uri-databricks", ["tracking.uri=databricks"], "does not support Databricks",
         "sqlite:///PATH/mlflow.db"),
    case("tracking-uri-postgresql-without-driver", ["tracking.uri=postgresql://u:secret@127.0.0.1:1/db"],
         "postgresql://u:***@127.0.0.1:1/db", "needs the database driver", "pip install",
         marks=pytest.mark.skipif(_importable("psycopg") or _importable("psycopg2"), reason="a driver is installed")),
    case("tracking-uri-not-mlflow", not_mlflow_server, "answers /health but is not an MLflow tracking server",
         "HTTP 404", "check the host and port"),
    case("tracking-step-every-zero", ["tracking.step_every=0"], "tracking.step_every", "integer >= 1"),
    case("tracking-timeout-negative", ["tracking.timeout_s=-1"], "tracking.timeout_s", "> 0", "got -1"),
    case("tracking-enabled-not-a-bool", ["tracking.enabled=sometimes"], "tracking.enabled", "true or false"),
    # names: a value echoed in the error line is escaped (one line, nothing reaches the terminal) and cut
    case("tracking-experiment-newline", ["tracking.experiment='a\nb'"], "tracking.experiment",
         "without control characters", r"got 'a\nb'"),
    case("tracking-experiment-newline-unquoted", ["tracking.experiment=a\nb"], "cannot parse the override",
         r"tracking.experiment=a\nb", r"character 21 ('\n')"),
    case("tracking-run-name-ansi-escape", ["tracking.run_name='\x1b[2J\x1b[31mred'"], "tracking.run_name",
         "without control characters", r"\x1b[2J\x1b[31mred"),
    case("tracking-experiment-5000-characters", [f"tracking.experiment='{'é' * 5000}'"], "tracking.experiment",
         "at most 500 characters", "(cut: 5002 characters)"),
    case("tracking-experiment-5000-characters-unquoted", [f"tracking.experiment={'日' * 5000}"],
         "cannot parse the override", "(cut: ", "character 20 ('日')"),
    # checkpoint
    case("checkpoint-monitor-unknown", ["checkpoint.monitor=val/accuracy"], "checkpoint.monitor",
         "val/loss, val/acc, val/acc_best", "'val/accuracy'"),
    case("checkpoint-mode-unknown", ["checkpoint.mode=up"], "checkpoint.mode", "min, max", "'up'"),
    case("checkpoint-save-last-not-a-bool", ["checkpoint.save_last=maybe"], "checkpoint.save_last",
         "true or false"),
    # seed
    case("seed-text", ["seed=abc"], "seed", "integer in [0, 2**32)", "'abc'"),
    case("seed-negative", ["seed=-1"], "seed", "integer in [0, 2**32)", "got -1"),
    case("seed-fraction", ["seed=1.5"], "seed", "integer in [0, 2**32)", "got 1.5"),
    case("seed-2-to-the-32", ["seed=4294967296"], "seed", "integer in [0, 2**32)", "got 4294967296"),
    case("seed-2-to-the-64", [f"seed={2**64}"], "seed", "integer in [0, 2**32)", f"got {2**64}"),
    # the config as a whole
    case("top-level-unknown-key", ["epochs=3"], "no top-level key 'epochs'", "allowed: ablation, checkpoint",
         own_process=True),
    case("top-level-appended-unknown-key", ["+epochs=3"], "unknown key 'epochs'", "allowed at the top level"),
    case("group-removed", ["~optim"], "the config has no optim", "a run needs all of"),
    case("bad-interpolation", ["data.shape=${nope}"], "Interpolation key 'nope' not found", "data.shape"),
    case("unparsable-override", ["model.widths=[4"], "cannot parse the override 'model.widths=[4'"),
    case("sweep-syntax-without-multirun", ["seed=0,1"], "Ambiguous value", "--multirun"),
    # overrides that would run code (tests/test_reliability.py shows that nothing ran)
    case("override-target-in-a-dict-value", ["+hydra.callbacks.x={_target_:builtins.open,file:x,mode:w}"],
         "changes hydra.callbacks, which runs code"),
    case("override-target-in-a-dict-value-elsewhere", ["+model.extra={_target_:builtins.open,file:x,mode:w}"],
         "sets a Hydra instantiation key"),
    case("override-removes-a-callback", ["~hydra.callbacks.mlflow_sweep"], "changes hydra.callbacks"),
    case("override-logging-handler", ["+hydra.job_logging.handlers.x={class:logging.FileHandler,filename:x}"],
         "changes hydra.job_logging.handlers, which runs code"),
    case("override-env-set-git-config", ["+hydra.job.env_set.GIT_CONFIG_COUNT=1"],
         "environment variable GIT_CONFIG_COUNT", "only CUDA_VISIBLE_DEVICES, MKL_NUM_THREADS, OMP_NUM_THREADS"),
    case("override-env-set-in-a-dict", ["hydra.job={env_set:{LD_PRELOAD:/tmp/x.so}}"],
         "environment variable LD_PRELOAD"),
    case("override-env-set-safe-name-odd-value", ["+hydra.job.env_set.OMP_NUM_THREADS='1; rm -rf x'"],
         "environment variable OMP_NUM_THREADS"),
    # ckpt_path
    case("ckpt-missing", lambda tmp: [f"ckpt_path={tmp / 'gone.ckpt'}"], "gone.ckpt does not exist",
         "or null"),
    case("ckpt-is-a-folder", lambda tmp: [f"ckpt_path={tmp}"], "is not a file"),
    case("ckpt-garbage", garbage_checkpoint, "last.ckpt is not a readable checkpoint",
         "a .ckpt written by cnnlab train"),
    case("ckpt-of-another-model", another_models_checkpoint, "other.ckpt holds another network",
         "network.conv0.weight is [16, 3, 3, 3] there but [4, 3, 5, 5]"),
    case("ckpt-bare-state-dict", tiny_checkpoint(lambda s: {k[8:]: v for k, v in s["state_dict"].items()}),
         "given.ckpt is a bare state dict", "conv0.weight", "not a training checkpoint"),
    case("ckpt-weights-and-epoch-only", tiny_checkpoint(lambda s: {"state_dict": s["state_dict"], "epoch": 0}),
         "holds weights but no pytorch-lightning_version", "not a checkpoint Lightning's Trainer wrote"),
    case("ckpt-extra-state-key", tiny_checkpoint(_extra_tensor), "holds another network",
         "extra.weight is [3] there but absent"),
    case("ckpt-huge-epoch", tiny_checkpoint(lambda s: s.update(epoch=10**12)), "says epoch 1000000000000",
         "integers in [0, 2**31)"),
    case("ckpt-epoch-is-text", tiny_checkpoint(lambda s: s.update(epoch="ten")), "says epoch 'ten'"),
    case("ckpt-more-epochs-than-asked", tiny_checkpoint(lambda s: s.update(epoch=5)),
         "has trained 6 epochs, more than trainer.max_epochs=1", "at least 6"),
    case("ckpt-nan-weights", tiny_checkpoint(_nan_weights), "non-finite weights (nan in network.conv0.weight)"),
    # the output folder
    case("runs-under-a-file", runs_under_a_file, "is not a folder cnnlab can write to", "Not a directory",
         own_process=True),
    case("runs-read-only", read_only_runs, "is not a folder cnnlab can write to",
         "point paths.runs at a writable folder"),
    case("disk-full-before-the-run", [], "is not a folder cnnlab can write to", "File too large",
         file_size_limit=32 * 1024),
    case("disk-full-during-training", huge_dense, "a write failed", "File too large (EFBIG)",
         "run the same command again", outcome=FAILED, file_size_limit=4 * 1024 * 1024),
]


# --------------------------------------------------------------------------- running a case


def _key(arg: str) -> str:
    return arg.lstrip("+~").split("=", 1)[0]


def _command(args: list[str], tmp: Path) -> tuple[list[str], Path]:
    """TINY, less what the case sets itself (Hydra refuses a group chosen twice, and a custom
    layer list has no family knobs), then the case; paths.runs under tmp unless it sets one."""
    keys = {_key(a) for a in args}
    groups = {k for k in keys if "." not in k and k in ("model", "data", "optim")}
    base = [a for a in TINY if _key(a) not in keys and _key(a).split(".")[0] not in groups]
    runs = next((Path(a.split("=", 1)[1]) for a in args if a.startswith("paths.runs=")), tmp / "runs")
    extra = [] if any(a.startswith("paths.runs=") for a in args) else [f"paths.runs={runs}"]
    return [*base, *extra, *args], runs


def _in_process(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # `cnnlab train` rewrites argv for Hydra
    # Hydra's app configures logging for its job (handlers on this test's captured streams and
    # on a log file under tmp_path); put it back, or later tests log into closed streams.
    with handlers_restored():
        try:
            code = main(["train", *args])
        except SystemExit as exit_:  # raised inside Hydra's app for errors found while training
            code = exit_.code
    return code, capsys.readouterr().err


def _in_subprocess(args: list[str], cwd: Path, file_size_limit: int | None) -> tuple[int, str]:
    def limit_file_size() -> None:  # a full disk: writes past the limit fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    done = subprocess.run([sys.executable, "-m", "cnnlab.cli", "train", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300,
                          preexec_fn=limit_file_size if file_size_limit else None)
    return done.returncode, done.stderr


def _mlflow_runs(runs: Path) -> list:
    store = runs / "mlflow.db"
    if not store.exists():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_one_clear_error_and_no_run(bad: Case, tmp_path, capsys, monkeypatch):
    args = bad.args(tmp_path) if callable(bad.args) else bad.args
    command, runs = _command(args, tmp_path)
    started = time.monotonic()
    if bad.own_process:
        code, err = _in_subprocess(command, tmp_path, bad.file_size_limit)
    else:
        code, err = _in_process(command, capsys, monkeypatch)
    seconds = time.monotonic() - started

    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines, f"exit {code} with nothing on stderr"
    line = lines[-1]
    assert line.startswith("error: ") and len(line) < 500, err
    assert not re.search(r"[\x00-\x1f\x7f-\x9f]", line), line  # no control character reaches the terminal
    for word in bad.words:
        assert word in line, f"{word!r} not in {line!r}"
    assert code == (1 if bad.outcome == FAILED else 2), err

    found = _mlflow_runs(runs)
    if bad.outcome == FAILED:
        assert [run.info.status for run in found] == ["FAILED"]
    else:
        assert found == []
    if bad.outcome == NOTHING:
        assert len(lines) == 1, err  # nothing else was printed: Hydra never started
        assert not (runs / "mlflow.db").exists() and not (runs / "outputs").exists()
        assert seconds < 20  # a config check (or an unanswered tracking server), not a run


def test_the_corpus_covers_every_config_group():
    ids = [param.id for param in CASES]
    assert len(ids) == len(set(ids)) >= 45
    for prefix in ("model-", "layers-", "data-", "folder-", "archive-", "optim-", "lr-", "epochs-",
                   "accelerator-", "tracking-", "checkpoint-", "early-stopping-", "seed-", "top-level-", "ckpt-",
                   "runs-", "disk-full-", "override-"):
        assert any(i.startswith(prefix) for i in ids), prefix
    assert {param.values[0].outcome for param in CASES} == {NOTHING, NO_RUN, FAILED}


def test_a_refused_write_anywhere_in_the_cause_chain_is_one_line():
    """The rows above reach a full disk through a checkpoint (an OSError); MLflow's SQLite store
    reports one in words, wrapped twice (sqlite3 -> SQLAlchemy -> MlflowException)."""
    import errno
    import sqlite3

    from cnnlab.cli import _failed_write

    def chained(outer: Exception, inner: BaseException) -> Exception:
        outer.__cause__ = inner
        return outer

    store = chained(RuntimeError("API request failed"),
                    chained(RuntimeError("(sqlite3.OperationalError) database or disk is full"),
                            sqlite3.OperationalError("database or disk is full")))
    assert _failed_write(store) == "the MLflow store could not be written (SQLite: database or disk is full)"
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/last.ckpt.partial")
    assert _failed_write(chained(RuntimeError("saving failed"), full)) == (
        "cannot use /runs/last.ckpt.partial: No space left on device (ENOSPC)")
    assert _failed_write(KeyError("val/loss")) is None  # a bug keeps its traceback
    assert _failed_write(FileNotFoundError(errno.ENOENT, "No such file", "x")) is None  # a read
