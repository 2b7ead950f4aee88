"""The Lightning Trainer cnnlab trains with, its checkpoints, and the process settings a run needs
(torch threads, one log stream)."""

from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def torch_threads(configured: int | None, busy_since=None, deterministic: bool = False) -> int | None:
    """Torch threads: as configured, else the CPUs the launcher gave this job (cores split
    between joblib's parallel jobs, a Ray task's num_cpus, SLURM's cpus-per-task), else, on a
    machine where other processes keep cores busy (measured since `busy_since`, a
    cnnlab.training.cpu_share sample), the cores they leave free, with one line saying so.
    None keeps torch's default. A deterministic run keeps the default: the same command must
    give the same bits on a quiet machine and a busy one, and the thread count can change them."""
    from hydra.core.hydra_config import HydraConfig

    from cnnlab.training.launchers import available_cores, job_threads

    if configured is not None:  # checked by the trainer group's schema
        return configured
    if HydraConfig.initialized():
        given = job_threads(OmegaConf.select(HydraConfig.get(), "launcher") or {})
        if given:
            return given
    if busy_since is None or deterministic:
        return None
    from cnnlab.training.cpu_share import others_busy_cores, threads_for_share

    others = others_busy_cores(busy_since)
    if others is None:
        return None
    import torch

    threads = threads_for_share(available_cores(), others)
    if threads >= torch.get_num_threads():
        return None
    logging.getLogger("cnnlab").info(
        "the machine is busy: other processes used %.1f of %d cores while this run started; training "
        "with %d torch thread%s instead of %d (trainer.threads=N to choose)", others, available_cores(), threads,
        "" if threads == 1 else "s", torch.get_num_threads())
    return threads


def one_log_stream() -> None:
    """The `lightning` package prints through its own console handler *and* propagates to
    the root logger; under Hydra (which owns the root handlers and the job's log file) every
    Lightning line came out twice. Keep the root's copy, which also reaches the log file."""
    if logging.getLogger().handlers:
        lightning_logger = logging.getLogger("lightning")
        for handler in list(lightning_logger.handlers):
            lightning_logger.removeHandler(handler)


def cheap_cuda_probe() -> None:
    """Drop Lightning's PYTORCH_NVML_BASED_CUDA_CHECK=1 on a machine with no CUDA device.

    `import lightning` sets it so that `torch.cuda.is_available()` asks NVML instead of the CUDA
    runtime and does not "poison" forked workers on a GPU machine. torch then opens the NVML
    library on every call (a dlopen that fails where there is no NVIDIA driver, every time), and
    Adam's step calls it once per step: 0.39 ms of a 2.66 ms training step of the chapter's baseline
    on the CPU, 0.07 ms of the fused Adam step alone (benchmarks/step_parts.py, BENCHMARKS.md).
    Where NVML is missing torch falls back to the runtime's count anyway, and where no device is
    counted there is nothing to poison, so the variable only costs time there."""
    import torch

    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1" and torch.cuda.device_count() == 0:
        del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]


def checkpoints(cfg: DictConfig, run_dir: Path) -> list:
    """The best checkpoint (checkpoint.monitor) and, with checkpoint.save_last, last.ckpt."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    # Saved at the end of the train epoch, after EpochHistory wrote the epoch's row
    # (cnnlab.training.epoch_log says why the order matters).
    found = [ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best", monitor=cfg.checkpoint.monitor,
        mode=cfg.checkpoint.mode, save_top_k=1, auto_insert_metric_name=False,
        save_on_train_epoch_end=True)]
    if cfg.checkpoint.save_last:
        # Not ModelCheckpoint(save_last=True): Lightning 2.6 writes that last.ckpt only in epochs
        # where the monitored value improved, so a run resumed after a plateau went back to its
        # last improvement. A second checkpoint with no monitor is written after every epoch.
        found.append(ModelCheckpoint(
            dirpath=run_dir / "checkpoints", filename="last", monitor=None, save_top_k=1,
            enable_version_counter=False, save_on_train_epoch_end=True))
    return found


def early_stopping(cfg: DictConfig):
    """Lightning's EarlyStopping when early_stopping.patience is set, else None. Checked at the end of
    the train epoch, as the checkpoints are saved, so the epoch it stops after has its last.ckpt."""
    es = cfg.early_stopping
    if es.patience is None:
        return None
    from lightning.pytorch.callbacks import EarlyStopping

    return EarlyStopping(monitor=es.monitor, mode=es.mode, patience=es.patience, min_delta=es.min_delta,
                         check_on_train_epoch_end=True, strict=True, verbose=False)


def durable_checkpoint_io():
    """Lightning's TorchCheckpointIO, writing each checkpoint beside its target and renaming it
    into place only once it is complete and on disk.

    Lightning's own save writes a temporary file in TMPDIR and `shutil.move`s it over the target.
    When TMPDIR is on another file system than the run directory (a tmpfs /tmp, a cluster node's
    local /tmp under a shared runs/), that move is a copy *into* last.ckpt: the previous checkpoint
    is truncated first, and a kill or a full disk during the copy leaves neither the old nor the
    new one. Here the old file stays whole until os.replace swaps in the new one, fsync'd first
    (so a power cut cannot leave a renamed but empty file either)."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class DurableCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
            import torch

            if storage_options is not None:
                raise TypeError("cnnlab's checkpoint writer takes no storage_options")
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.partial")
            buffer = io.BytesIO()  # serialised first, as Lightning does: a failed write is a plain OSError
            torch.save(checkpoint, buffer)
            try:
                with open(partial, "wb") as out:
                    out.write(buffer.getbuffer())
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(partial, path)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)  # the rename itself, on disk
            finally:
                os.close(folder)

    return DurableCheckpointIO()


def make_trainer(cfg: DictConfig, run_dir: Path, callbacks: list):
    import lightning as L

    from cnnlab.training.progress import EpochBar

    t = cfg.trainer
    # A bar only where one can be drawn: stdout (where it and the log lines go) is a terminal. In a log
    # file or a pipe, a bar would be control codes and blank lines; false turns it off on a terminal too.
    bar = t.enable_progress_bar is not False and sys.stdout.isatty()
    return L.Trainer(
        max_epochs=t.max_epochs, accelerator=t.accelerator, devices=t.devices,
        strategy=t.strategy, num_nodes=t.num_nodes, sync_batchnorm=t.sync_batchnorm,
        precision=t.precision, deterministic=t.deterministic, benchmark=t.benchmark,
        limit_train_batches=t.limit_train_batches, limit_val_batches=t.limit_val_batches,
        limit_test_batches=t.limit_test_batches, gradient_clip_val=t.gradient_clip_val,
        # Lightning refuses an algorithm without a value to clip at: null clips nothing either way.
        gradient_clip_algorithm=t.gradient_clip_algorithm if t.gradient_clip_val is not None else None,
        accumulate_grad_batches=t.accumulate_grad_batches,
        enable_progress_bar=bar,
        logger=False,  # cnnlab logs epoch metrics itself (cnnlab.training.epoch_log)
        callbacks=[*callbacks, *([EpochBar()] if bar else [])],
        plugins=[durable_checkpoint_io()],
        num_sanity_val_steps=0,  # Keras validates only after each epoch
        enable_model_summary=False,  # cnnlab prints its own, Keras-style
        default_root_dir=run_dir,
    )
