"""Images per second of one training epoch's batches, no model: three data paths, side by side.

    memory    cnnlab's default: the uint8 dataset as one tensor, batches by randperm,
              crop + flip + normalise as batched tensor ops (data.pipeline=memory)
    loader    cnnlab's DataLoader path over the same uint8 tensors, per-sample
              torchvision.transforms.v2 (data.pipeline=loader), 0 workers
    standard  torchvision's usual recipe: ImageFolder over the JPEG tree (PIL decode per
              sample, every epoch) + transforms + DataLoader with 2 workers

Same images (the CIFAR-10 copy), batch 32, the same augmentation (random crop with
4-pixel padding, horizontal flip) and standardisation; interleaved repeats.

    python benchmarks/data_path.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cnnlab.config.compose import compose  # noqa: E402
from cnnlab.data.batches import TensorDataModule  # noqa: E402
from cnnlab.data.sources import load_dataset  # noqa: E402

ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
AUGMENT = ["data.augment.crop_padding=4", "data.augment.hflip=true", "data.normalize=standardize"]


def images_per_second(batches) -> float:
    start, seen = time.perf_counter(), 0
    for x, _ in batches:
        seen += len(x)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--archive", default=str(ARCHIVE))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not Path(args.archive).is_file():
        sys.exit(f"error: no CIFAR-10 archive at {args.archive}; pass --archive FILE.tar.gz")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose([f"data.archive={args.archive}", *AUGMENT])
        data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
        data = load_dataset(data_cfg, Path(tmp) / "cache", 0)
        paths = {}
        for pipeline in ("memory", "loader"):
            module = TensorDataModule(data, {**data_cfg, "pipeline": pipeline}, seed=0)
            paths[pipeline] = module.train_dataloader
        with tarfile.open(args.archive) as archive:
            archive.extractall(tmp, filter="data")
        train_dir = next(Path(tmp).glob("*/train"))
        standard = v2.Compose([v2.ToImage(), v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                               v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.data.mean, cfg.data.std)])
        folder = datasets.ImageFolder(str(train_dir), transform=standard)
        paths["standard"] = lambda: DataLoader(folder, batch_size=32, shuffle=True, num_workers=2,
                                               persistent_workers=False)
        rates: dict[str, list[float]] = {name: [] for name in paths}
        for repeat in range(args.repeats):
            for name, make in paths.items():
                rates[name].append(images_per_second(make()))
            print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
                f"{k} {v[-1]:,.0f} img/s" for k, v in rates.items()), flush=True)
    memory = statistics.median(rates["memory"])
    print(f"\nCIFAR-10 train set ({len(data.train_y):,} images), batch 32, crop(4) + flip + standardise, "
          f"torch threads {torch.get_num_threads()}, {args.repeats} repeats, interleaved\n")
    print("| data path | median img/s | min-max img/s | memory's speed-up over it |")
    print("|---|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):,.0f} | {min(values):,.0f}-{max(values):,.0f} "
              f"| {memory / statistics.median(values):.1f}x |")


if __name__ == "__main__":
    main()
