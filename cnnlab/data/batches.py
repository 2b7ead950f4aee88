"""Batches for Lightning from a `TensorData`, by two pipelines with the same numbers.

memory (default, airbench-style): the uint8 dataset sits on the training device
    once; each epoch draws a permutation and the augmentation parameters from a
    generator seeded by (seed, epoch), then cuts batches and augments and
    normalises them with batched tensor ops. No workers, no per-sample Python.
    The order depends only on (seed, epoch), so a run resumed from a checkpoint
    sees the same batches as an uninterrupted one, and the DataModule has no
    state to save.
loader (the standard path): a torch DataLoader over per-sample
    torchvision.transforms.v2 transforms, with `num_workers` workers.

Both scale with torchvision's ToDtype and standardise with its Normalize, so
val/test batches are identical across pipelines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from cnnlab.data.normalize import normalization, scale_and_normalize
from cnnlab.data.sources import TensorData, check_split

# Independent random streams derived from the run seed.
_BATCHES, _SPLIT, _LOADER = 0, 1, 2

Batch = tuple[torch.Tensor, torch.Tensor]


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream (seed, *keys); nearby inputs give unrelated streams."""
    state = np.random.SeedSequence([seed % 2**64, *keys]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def random_crop(x: torch.Tensor, shifts: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop each image of x, zero-padded by `padding`, at its own offset shifts[i] in [0, 2p]^2."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)  # (B, C, H+2p, W+2p), zeros around
    device = x.device
    rows = shifts[:, 0, None] + torch.arange(h, device=device)  # (B, H)
    cols = shifts[:, 1, None] + torch.arange(w, device=device)  # (B, W)
    # One gather for the whole batch: the four index tensors broadcast to (B, C, H, W).
    return padded[torch.arange(b, device=device)[:, None, None, None],
                  torch.arange(c, device=device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


class TensorBatches:
    """An epoch of (x, y) batches cut from tensors already on the device; iterate once per epoch.

    `epoch` returns the epoch number a pass belongs to (the trainer's current
    epoch); without it, passes are numbered 0, 1, 2, ... as they start.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *,
                 shuffle: bool = False, seed: int = 0, epoch: Callable[[], int] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 crop_padding: int = 0, hflip: bool = False, rank: int = 0, world_size: int = 1,
                 position: Callable[[], int] | None = None) -> None:
        self.x, self.y = x, y  # (N, C, H, W) uint8, (N,) int64 on one device
        self.batch_size = batch_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        self.mean, self.std = mean, std
        self.crop_padding, self.hflip = crop_padding, hflip
        self.rank, self.world_size = rank, world_size
        self.position = position  # batches of this epoch the trainer has completed
        self._passes = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches done) to continue mid-epoch

    # Lightning saves and restores a train loader that has state_dict/load_state_dict, so a
    # checkpoint written mid-epoch (on SIGTERM: cnnlab.training.signals) resumes at the next batch
    # of the same epoch's order instead of starting the epoch over.
    def state_dict(self) -> dict[str, int]:
        if self.epoch is None or self.position is None:
            return {}
        return {"epoch": int(self.epoch()), "batches": int(self.position())}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if state:
            self._resume = (state["epoch"], state["batches"])

    def _samples(self) -> int:
        """Samples this rank sees an epoch. Under DDP every rank gets ceil(N / world) of them
        (DistributedSampler's rule: the order wraps around to fill the last ones), so every rank
        runs the same number of steps and no collective waits forever."""
        return math.ceil(len(self.x) / self.world_size)

    def __len__(self) -> int:
        return math.ceil(self._samples() / self.batch_size)  # the last batch may be short

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch() if self.epoch is not None else self._passes
        self._passes += 1
        # Resuming the epoch a checkpoint was written in (every pass of that epoch: Lightning may
        # start one and drop it); any other epoch starts at its first batch.
        skip = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        n, device, bs = len(self.x), self.x.device, self.batch_size
        # Drawn on the CPU and moved once per epoch: the same order and augmentation on
        # any device (and on every rank), and no host sync per batch.
        gen = torch.Generator().manual_seed(derive_seed(self.seed, _BATCHES, epoch))
        order = torch.randperm(n, generator=gen) if self.shuffle else None
        pad = self.crop_padding
        shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen) if pad else None
        flips = (torch.rand(n, generator=gen) < 0.5) if self.hflip else None
        if self.world_size > 1:  # this rank's share: positions rank, rank + world, ...
            mine = torch.arange(self.rank, self._samples() * self.world_size, self.world_size) % n
            order = (order if order is not None else torch.arange(n))[mine]
            shifts = shifts[mine] if shifts is not None else None
            flips = flips[mine] if flips is not None else None
        order, shifts, flips = (t.to(device) if t is not None else None for t in (order, shifts, flips))
        for start in range(skip * bs, len(order) if order is not None else n, bs):
            if order is None:
                x, y = self.x[start:start + bs], self.y[start:start + bs]
            else:
                idx = order[start:start + bs]
                x, y = self.x[idx], self.y[idx]  # (B, C, H, W) uint8, (B,)
            if shifts is not None:
                x = random_crop(x, shifts[start:start + bs], pad)
            if flips is not None:
                x = torch.where(flips[start:start + bs, None, None, None], x.flip(3), x)
            yield scale_and_normalize(x, self.mean, self.std), y


class StackedBatches:
    """The batches of S seeds' TensorBatches at once, as (S, B, C, H, W), (S, B): copy s's batch is
    exactly the one TensorBatches(seed=seeds[s], same settings) gives at that position (the same
    generator draws, the same gather, crop, flip and normalisation, bitwise), cut with one gather per
    step for the whole stack instead of S (on a GPU, S small launches per step would undo stacking).

    `data[s]` is seed s's (x, y) on the device; seeds that pass the same tensors share them.
    Every seed must have the same number of samples. Single process (no DDP sharding)."""

    def __init__(self, data: Sequence[Batch], seeds: Sequence[int], batch_size: int, *, shuffle: bool = False,
                 epoch: int = 0, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 crop_padding: int = 0, hflip: bool = False) -> None:
        sizes = {len(x) for x, _ in data}
        if len(sizes) != 1 or len(data) != len(seeds):
            raise ValueError(f"{len(data)} data sets of sizes {sorted(sizes)} for {len(seeds)} seeds")
        self.n = sizes.pop()
        unique: dict[int, int] = {}  # id of a seed's x -> its block in the joined tensors
        for x, _ in data:
            unique.setdefault(id(x), len(unique))
        blocks = [next(pair for pair in data if id(pair[0]) == key) for key in unique]
        self.x = blocks[0][0] if len(blocks) == 1 else torch.cat([x for x, _ in blocks])  # (U*N, C, H, W)
        self.y = blocks[0][1] if len(blocks) == 1 else torch.cat([y for _, y in blocks])
        self.offsets = torch.tensor([unique[id(x)] * self.n for x, _ in data])  # (S,)
        self.seeds, self.batch_size, self.shuffle, self.epoch = list(seeds), batch_size, shuffle, epoch
        self.mean, self.std, self.crop_padding, self.hflip = mean, std, crop_padding, hflip

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n, pad, device = self.n, self.crop_padding, self.x.device
        orders, shifts, flips = [], [], []
        for seed in self.seeds:  # TensorBatches.__iter__'s draws, in its order
            gen = torch.Generator().manual_seed(derive_seed(seed, _BATCHES, self.epoch))
            orders.append(torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n))
            if pad:
                shifts.append(torch.randint(0, 2 * pad + 1, (n, 2), generator=gen))
            if self.hflip:
                flips.append(torch.rand(n, generator=gen) < 0.5)
        order = (torch.stack(orders) + self.offsets[:, None]).to(device)  # (S, N) rows of the joined data
        shift = torch.stack(shifts).to(device) if pad else None  # (S, N, 2)
        flip = torch.stack(flips).to(device) if self.hflip else None  # (S, N)
        s = len(self.seeds)
        for start in range(0, n, self.batch_size):
            idx = order[:, start:start + self.batch_size].reshape(-1)  # (S*B,)
            x, y = self.x[idx], self.y[idx]  # (S*B, C, H, W) uint8, (S*B,)
            if shift is not None:
                x = random_crop(x, shift[:, start:start + self.batch_size].reshape(-1, 2), pad)
            if flip is not None:
                x = torch.where(flip[:, start:start + self.batch_size].reshape(-1, 1, 1, 1), x.flip(3), x)
            x = scale_and_normalize(x, self.mean, self.std)
            yield x.view(s, -1, *x.shape[1:]), y.view(s, -1)


class _Samples(Dataset):
    """Per-sample view for the DataLoader pipeline."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Callable) -> None:
        self.x, self.y, self.transform = x, y, transform  # (N, C, H, W) uint8, (N,) int64

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Batch:
        return self.transform(self.x[i]), self.y[i]


class TensorDataModule(L.LightningDataModule):
    """train/val/test batches over a TensorData, as `cfg` (a data config) says."""

    def __init__(self, data: TensorData, cfg: Mapping[str, Any], seed: int) -> None:
        super().__init__()
        self.data, self.cfg, self.seed = data, dict(cfg), seed
        self.classes = list(data.classes)
        self.num_classes = len(self.classes)
        self._mean, self._std = normalization(cfg)
        test = (data.test_x, data.test_y)
        if cfg["validation"] == "test":
            # The chapter's protocol: validate on the test set, so val/* == test/*.
            train, val = (data.train_x, data.train_y), test
        else:
            n = len(data.train_x)
            n_val = check_split(n, cfg["val_fraction"], data.source)  # one rule for the split's size
            gen = torch.Generator().manual_seed(derive_seed(seed, _SPLIT))
            perm = torch.randperm(n, generator=gen)
            val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
            train = (data.train_x[train_idx], data.train_y[train_idx])
            val = (data.train_x[val_idx], data.train_y[val_idx])
        self._sets: dict[str, Batch] = {"train": train, "val": val, "test": test}
        self._device = torch.device("cpu")
        self._resume: Mapping[str, int] = {}  # where a checkpoint written mid-epoch left the train batches

    def split(self, name: str) -> Batch:
        """The (x, y) tensors of "train", "val" or "test", as this seed's run sees them (its own
        validation split); the stacked path (cnnlab.training.stacked_run) batches them itself."""
        return self._sets[name]

    # The train batches' place in their epoch, in every checkpoint. Lightning restores it into the
    # DataModule before it asks for the train loader (its own restore of a stateful loader comes
    # too late: estimated_stepping_batches has built the loader by then), so a checkpoint written
    # mid-epoch (on SIGTERM, cnnlab.training.signals) resumes at the batch after it.
    def state_dict(self) -> dict[str, int]:
        if self.trainer is None or self.cfg["pipeline"] != "memory":
            return {}
        return {"epoch": int(self.trainer.current_epoch),
                "batches": int(self.trainer.fit_loop.epoch_loop.batch_progress.current.completed)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self._resume = dict(state)

    def _root_device(self) -> torch.device:
        if self.trainer is None:
            return torch.device("cpu")
        return self.trainer.strategy.root_device

    def setup(self, stage: str) -> None:
        device = self._root_device()
        if self.cfg["pipeline"] != "memory" or device == self._device:
            return
        # Move each distinct tensor once (val and test share tensors under validation=test).
        moved: dict[int, torch.Tensor] = {}
        for pair in self._sets.values():
            for t in pair:
                if id(t) not in moved:
                    moved[id(t)] = t.to(device)
        self._sets = {name: (moved[id(x)], moved[id(y)]) for name, (x, y) in self._sets.items()}
        self._device = device

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # The memory pipeline's batches are born on the device: skip Lightning's generic walk
        # over the batch (about 0.1 ms a step at batch 32 on CPU), which would move nothing.
        if self.cfg["pipeline"] == "memory" and self._device == device:
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self) -> TensorBatches | DataLoader:
        augment = self.cfg["augment"]
        if self.cfg["pipeline"] == "memory":
            # The trainer's epoch, not a pass counter: a resumed run sees the same order.
            epoch = (lambda: self.trainer.current_epoch) if self.trainer is not None else None
            position = ((lambda: self.trainer.fit_loop.epoch_loop.batch_progress.current.completed)
                        if self.trainer is not None else None)
            batches = TensorBatches(*self._sets["train"], self.cfg["batch_size"], shuffle=True,
                                    seed=self.seed, epoch=epoch, mean=self._mean, std=self._std,
                                    crop_padding=augment["crop_padding"], hflip=augment["hflip"],
                                    position=position, **self._shard())
            batches.load_state_dict(self._resume)
            return batches
        steps: list[Any] = [v2.ToDtype(torch.float32, scale=True)]
        if augment["crop_padding"]:
            steps.append(v2.RandomCrop(self.cfg["shape"][1:], padding=augment["crop_padding"]))
        if augment["hflip"]:
            steps.append(v2.RandomHorizontalFlip())
        if self._mean is not None:
            steps.append(v2.Normalize(self._mean, self._std))
        gen = torch.Generator().manual_seed(derive_seed(self.seed, _LOADER))
        return self._loader("train", v2.Compose(steps), self.cfg["batch_size"], gen)

    def val_dataloader(self) -> TensorBatches | DataLoader:
        return self._eval("val")

    def test_dataloader(self) -> TensorBatches | DataLoader:
        return self._eval("test")

    def _eval(self, name: str) -> TensorBatches | DataLoader:
        bs = self.cfg["eval_batch_size"]
        if self.cfg["pipeline"] == "memory":
            return TensorBatches(*self._sets[name], bs, mean=self._mean, std=self._std, **self._shard())
        # A partial, not a lambda: workers started by spawn/forkserver must pickle it.
        transform = partial(scale_and_normalize, mean=self._mean, std=self._std)
        return self._loader(name, transform, bs)

    def _shard(self) -> dict[str, int]:
        """This process's part under DDP (the loader pipeline gets Lightning's DistributedSampler)."""
        if self.trainer is None:
            return {"rank": 0, "world_size": 1}
        return {"rank": self.trainer.global_rank, "world_size": self.trainer.world_size}

    def _loader(self, name: str, transform: Callable, batch_size: int,
                generator: torch.Generator | None = None) -> DataLoader:
        workers = self.cfg["num_workers"]
        return DataLoader(_Samples(*self._sets[name], transform), batch_size=batch_size,
                          shuffle=generator is not None, generator=generator,
                          num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=self._root_device().type == "cuda")
