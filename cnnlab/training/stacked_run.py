"""Several seeds of one config trained as one StackedNetwork in one process, each seed tracked as
the run it would have been alone (issue #17).

Each seed is a `SeedJob`: its own config (seed=s, seeds=null: the lone run's config), overrides,
run directory (where a run on other data was, the lone run's sibling `<dir>-data-<fp12>`:
resume.run_directory_for_data) and MLflow run, with the lone run's tags and params plus a `stacked` tag, its own
history.jsonl, per-epoch metrics, artifacts and model. What each copy of the stack sees is what
its lone run sees: its own data (load_dataset and the validation split are seeded by the seed),
its own batch order and augmentation (StackedBatches: each seed's TensorBatches, bitwise), its
own dropout masks (StackedDropout's per-copy generators) and BatchNorm statistics (per-copy
channels).

Why a plain loop and not Lightning's Trainer: a Trainer is one run. Its ModelCheckpoint,
EarlyStopping, logging and resume all follow one monitored value and write one checkpoint,
while here S runs share one step and each needs its own best checkpoint, its own history and
its own failure. The loop below is what Classifier + Trainer do for a lone run with the memory
pipeline (train epoch, validation, checkpoints after the history row, test), written once for S.

Checkpoints, per seed, in the seed's run directory: checkpoints/last.ckpt and best.ckpt hold the
lone network's state dict (keys `network.*`, as a Lightning checkpoint of Classifier), the lone
optimizer state, the epoch and the best score (so `already_complete` reads them), and the
copy's dropout generator under "stacked". A lone network loads them (`load_lone_checkpoint`).
last.ckpt's previous version stays as last.prev.ckpt: seeds are written one after another, so a
kill between two writes leaves seeds one epoch apart, and the stack resumes all of them from the
oldest common epoch.

Failure isolation: a copy whose training loss is not finite is masked (CopyGuard) from that
step on; at the end of the epoch its run is marked FAILED with the lone run's message, its last
good checkpoint stays, and a `stack_masked.json` in its run directory keeps a resumed stack from
training it again (train it alone to retry). The other seeds finish.

Early stopping, per seed: each seed has the EarlyStopping callback its lone run would have
(cnnlab.training.trainer.early_stopping) and Lightning's own rule decides at the end of each of its
epochs, on its own value. A seed that stops is frozen as CopyGuard freezes a NaN copy, but it is no
failure: its last.ckpt (with the callback's state, as in a lone checkpoint) is of the epoch it
stopped after, its run gets the lone run's `early_stopping.stopped_epoch` tag and test metrics and
ends FINISHED, and a resumed stack loads it from that checkpoint and trains it no more. The stack
ends when every seed has stopped or failed, or at max_epochs.

Precision and clipping as the lone run: `trainer.precision` picks Lightning's own precision plugin
(`precision_plugin`), whose convert_module, convert_input and forward_context the loop applies where
Lightning's does (bf16-mixed: torch.autocast around forward and loss, float32 weights and optimizer;
bf16-true and 64-true: weights and inputs in that dtype). `trainer.gradient_clip_val` clips each copy
as its lone run clips (`clip_copy_gradients_`): by value element-wise, by norm with each copy's own
norm over its own slots.

Stacking changes nothing that is element-wise per copy; what would mix copies is refused
(`stacking_problem`): 16-mixed's loss scaling (one GradScaler for the stack: one copy's overflow
would skip every copy's step), DDP, the DataLoader pipeline (its order is not the memory
pipeline's); so is what is not implemented for stacks: 16-true, accumulate_grad_batches,
trainer.compile, limit_*_batches.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from cnnlab.config.compose import container
from cnnlab.errors import ConfigError, TrainingError
from cnnlab.training.checks import check_batch_limits, checked
from cnnlab.training.naming import overrides, run_directory, run_name, sweep_tags

log = logging.getLogger("cnnlab")

STACKED_TAG = "stacked"  # on every seed's run: the seeds of its stack
MASKED_FILE = "stack_masked.json"  # in a seed's run dir: the stack masked it (NaN); not trained again
PREVIOUS = "last.prev.ckpt"
# What stacking does on the CPU (benchmarks/stacked_seeds.py, BENCHMARKS.md): said wherever a stack
# would train on the CPU.
CPU_STACKING = ("the CPU gains nothing from stacking (measured 0.94-1.01x the time of the same seeds one "
                "after another on 2 cores: it is compute-bound); it pays on an accelerator")
# trainer.precision values a stack trains as the lone run does ("32" and "64" are Lightning's aliases).
STACKED_PRECISIONS = ("32", "32-true", "64", "64-true", "bf16-mixed", "bf16-true")


@dataclass
class SeedJob:
    """One seed of a stack: what a lone run of it would have as config, overrides, folder and tags."""

    cfg: DictConfig  # seed=s, seeds=null
    overrides: list[str]
    run_dir: Path
    tags: dict[str, str] = field(default_factory=dict)  # the sweep's (parent run, knob.*), the caller's

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    @property
    def name(self) -> str:
        return run_name(self.cfg, self.overrides)

    @classmethod
    def current(cls, cfg: DictConfig) -> SeedJob:
        """This Hydra job as a seed of a stack (the stacked launcher calls it inside each job)."""
        job_overrides = overrides()
        return cls(lone_config(cfg, int(cfg.seed)), job_overrides, run_directory(cfg, run_name(cfg, job_overrides)),
                   sweep_tags(job_overrides))


def lone_config(cfg: DictConfig, seed: int) -> DictConfig:
    """The config of the lone run of `seed` (seeds=null: it never reaches a run's params)."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(out):
        out.seed = seed
        out.seeds = None
    return out


def stacking_problem(cfg: DictConfig) -> str | None:
    """Why this config cannot be trained stacked, in words; None when it can."""
    from cnnlab.model.plan import model_plan
    from cnnlab.model.stacked import supports_stacking

    t, data = cfg.trainer, cfg.data
    plan = model_plan(cfg)
    if plan.analysis is None:
        return f"model {plan.name} is an opaque module ({plan.kind}): only the layer language has a stacked form"
    ok, reason = supports_stacking(plan.analysis)
    if not ok:
        return reason
    settings = {
        "data.pipeline": (data.pipeline != "memory", "its DataLoader order is not the memory pipeline's"),
        "trainer.precision": (str(t.precision) not in STACKED_PRECISIONS,
                              "one GradScaler would scale the whole stack's loss: one seed's overflow would skip "
                              "every seed's step" if str(t.precision) == "16-mixed" else
                              f"not implemented for stacks (they train in {', '.join(STACKED_PRECISIONS)})"),
        "trainer.accumulate_grad_batches": (t.accumulate_grad_batches != 1, "not implemented for stacks"),
        "trainer.strategy": (str(t.strategy) not in ("auto", "single_device") or t.num_nodes != 1,
                             "a stack trains in one process on one device"),
        "trainer.compile": (t.compile is not None, "not implemented for stacks"),
        "ckpt_path": (cfg.ckpt_path is not None, "each seed resumes from its own run directory"),
        "limit_*_batches": (any(t[k] is not None for k in ("limit_train_batches", "limit_val_batches",
                                                           "limit_test_batches")), "not implemented for stacks"),
    }
    for key, (bad, why) in settings.items():
        if bad:
            return f"{key}={OmegaConf.select(cfg, key) if '*' not in key else 'set'}: {why}"
    return None


def stack_device(trainer: Mapping) -> str:
    """The torch device a stack trains on: cuda when asked for (or auto and present), else cpu."""
    import torch

    accelerator = str(trainer["accelerator"])
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    if accelerator == "mps" or (accelerator == "auto" and torch.backends.mps.is_available()):
        return "mps"
    return "cpu"


def precision_plugin(precision: str, device_type: str):
    """Lightning's precision plugin for `precision` (one of STACKED_PRECISIONS), as its Trainer picks it for
    a lone run on one device (AcceleratorConnector._check_and_init_precision)."""
    from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision

    flag = {"32": "32-true", "64": "64-true"}.get(str(precision), str(precision))
    if flag not in STACKED_PRECISIONS:
        raise ConfigError(f"trainer.precision={precision} cannot be trained stacked; "
                          f"stacks train in {', '.join(STACKED_PRECISIONS)}")
    if flag == "bf16-mixed":
        return MixedPrecision("bf16-mixed", device_type if device_type in ("cpu", "mps") else "cuda")
    return {"32-true": Precision, "64-true": DoublePrecision}.get(flag, lambda: HalfPrecision(flag))()


# ---------------------------------------------------------------------------------------------
# Per-seed checkpoints.


def lone_optimizer_state(network, optimizer, s: int) -> dict:
    """Copy s's optimizer state in the layout of a lone network's optimizer (param indices in
    build()'s parameter order, which is the stack's)."""
    names = [name for name, _ in network.named_parameters()]
    full = optimizer.state_dict()
    state = {}
    for index, per_param in full["state"].items():
        state[index] = {k: network.slot(names[index], v, s).clone() if _per_copy(v) else v
                        for k, v in per_param.items()}
    return {"state": state, "param_groups": full["param_groups"]}


def _per_copy(value) -> bool:
    import torch

    return torch.is_tensor(value) and value.dim() > 0


def load_lone_optimizer_states(network, optimizer, states: Sequence[Mapping], shared: int = 0) -> None:
    """The stack's optimizer state from each copy's lone one (shared scalars such as the step count,
    and the param groups: copy `shared`'s)."""
    import torch

    names = [name for name, _ in network.named_parameters()]
    params = list(network.parameters())
    merged = {}
    for index in states[shared]["state"]:
        entry = {}
        for key, value in states[shared]["state"][index].items():
            if _per_copy(value):
                full = torch.zeros_like(params[index])
                for s, state in enumerate(states):
                    network.slot(names[index], full, s).copy_(state["state"][index][key])
                entry[key] = full
            else:
                entry[key] = value
        merged[index] = entry
    optimizer.load_state_dict({"state": merged, "param_groups": states[shared]["param_groups"]})


def load_lone_checkpoint(path: Path, network) -> dict:
    """Load a seed's checkpoint (stacked or lone) into a lone build() network; returns the checkpoint."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    network.load_state_dict({k.removeprefix("network."): v for k, v in state["state_dict"].items()})
    return state


def _checkpoint_epoch(path: Path) -> int | None:
    import torch

    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # cut short by a kill: RuntimeError, EOFError, UnpicklingError ...
        log.warning("%s cannot be read (%s); not resuming from it", path, str(error).splitlines()[0][:200])
        return None
    return state.get("epoch") if isinstance(state, Mapping) and "stacked" in state else None


# ---------------------------------------------------------------------------------------------
# The stack.


@dataclass
class _Seed:
    """What the loop keeps for one seed."""

    job: SeedJob
    data: object  # TensorData
    module: object  # TensorDataModule (its split, its test batches for the model's example)
    tracker: object | None
    history: object  # EpochHistory
    best: float | None = None
    val_acc_best: float = 0.0
    failed: bool = False
    stopper: object | None = None  # Lightning's EarlyStopping of the lone run (early_stopping.patience set)
    stopped: int | None = None  # the last epoch trained (1-based) once early stopping ended the seed


def train_stacked(jobs: Sequence[SeedJob], step_hook: Callable[[object, int], None] | None = None,
                  dropout_mode: str = "exact") -> list[float]:
    """Train `jobs` (one config, several seeds) as one stack; each seed's best `checkpoint.monitor`,
    NaN for a seed that failed. `step_hook(network, step)` runs after every optimizer step (tests
    inject a NaN or a stop with it). dropout_mode="fast" draws one dropout mask for the whole stack
    (the same distribution, not the lone runs' masks; on a GPU exact masks cost S small launches per
    dropout layer): the runs get a `stacked.dropout=fast` tag."""
    if not jobs:
        return []
    cfg = jobs[0].cfg
    for job in jobs:
        checked(job.cfg)
        if OmegaConf.to_container(job.cfg, resolve=True) != OmegaConf.to_container(
                lone_config(cfg, job.seed), resolve=True):
            raise ConfigError(f"a stack's seeds must differ only in seed; seed {job.seed} differs from "
                              f"seed {jobs[0].seed} in another key")
    seeds = [job.seed for job in jobs]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"a stack's seeds must be distinct, got {seeds}")
    problem = stacking_problem(cfg)
    if problem:
        raise ConfigError(f"cannot train seeds {seeds} stacked: {problem}")
    from cnnlab.training.resume import run_directory_lock
    from cnnlab.training.signals import handled

    with ExitStack() as locks:
        for job in jobs:
            locks.enter_context(run_directory_lock(job.run_dir))
        locks.enter_context(handled())
        return _train_stacked(jobs, step_hook, dropout_mode, locks)


def _train_stacked(jobs: Sequence[SeedJob], step_hook, dropout_mode: str, locks: ExitStack) -> list[float]:
    import torch

    from cnnlab.data.batches import StackedBatches, TensorDataModule
    from cnnlab.data.sources import load_dataset
    from cnnlab.model.stacked import CopyGuard, StackedNetwork, clip_copy_gradients_, stacked_loss
    from cnnlab.training.cpu_share import sample
    from cnnlab.training.epoch_log import EpochHistory
    from cnnlab.training.optim import make_optimizer, make_scheduler
    from cnnlab.training.resume import open_run, run_directory_for_data, run_directory_lock
    from cnnlab.training.run import log_first_params, run_tags
    from cnnlab.training.signals import record_stop, watch
    from cnnlab.training.trainer import cheap_cuda_probe, early_stopping, one_log_stream, torch_threads

    started = sample()  # other processes' CPU use while this job starts: torch_threads
    cfg = jobs[0].cfg
    plan, data_cfg = checked(cfg)
    runs = Path(cfg.paths.runs).resolve()
    device = torch.device(stack_device(container(cfg.trainer)))
    one_log_stream()
    cheap_cuda_probe()
    threads = torch_threads(cfg.trainer.threads, started, cfg.trainer.deterministic)
    if threads:
        torch.set_num_threads(threads)
    if cfg.trainer.benchmark is not None:  # as Lightning's Trainer(benchmark=...) does for a lone run
        torch.backends.cudnn.benchmark = bool(cfg.trainer.benchmark)
    stack_tag = ",".join(str(job.seed) for job in jobs)
    results: dict[int, float] = {}

    # Each seed: its data, its MLflow run (opened or resumed), or its stored result when done.
    seeds: list[_Seed] = []
    for job in jobs:
        data = load_dataset(data_cfg, Path(cfg.paths.cache), job.seed)
        check_batch_limits(cfg.trainer, data_cfg, len(data.train_x), len(data.test_x))
        fingerprint = data.fingerprint()
        # As a lone run (run.py): a folder whose run trained on other pixels is never resumed here.
        other_data_dir = run_directory_for_data(job.run_dir, fingerprint)
        if other_data_dir != job.run_dir:
            job.run_dir = other_data_dir
            locks.enter_context(run_directory_lock(job.run_dir))
        if (job.run_dir / MASKED_FILE).is_file():
            log.warning("seed %d was masked in its stack (%s); skipped: train it alone to retry it",
                        job.seed, json.loads((job.run_dir / MASKED_FILE).read_text())["why"])
            results[job.seed] = math.nan
            continue
        tracker = None
        if cfg.tracking.enabled:
            last = job.run_dir / "checkpoints" / "last.ckpt"
            tracker, done = open_run(job.cfg, runs, job.run_dir, job.name, {
                **run_tags(job.cfg, plan, data_cfg, job.overrides, job.run_dir, fingerprint),
                **job.tags, STACKED_TAG: stack_tag}, last if _checkpoint_epoch(last) is not None else None)
            if done is not None:
                results[job.seed] = done
                continue
            if not tracker.has_params():
                log_first_params(tracker, job.cfg, plan, data, fingerprint, device)
            tracker.set_tags({STACKED_TAG: stack_tag, **({"stacked.dropout": dropout_mode}
                                                         if dropout_mode != "exact" else {})})
        module = TensorDataModule(data, data_cfg, job.seed)
        history = EpochHistory(job.run_dir / "history.jsonl", tracker,
                               0)  # step metrics: one loss for the stack, not logged per seed
        seeds.append(_Seed(job, data, module, tracker, history, stopper=early_stopping(job.cfg)))
    watch(*(seed.tracker for seed in seeds))  # the signal watchdog marks them KILLED if a step hangs
    if not seeds:
        return [results[job.seed] for job in jobs]

    live_seeds = [seed.job.seed for seed in seeds]
    log.info("training seeds %s stacked on %s (%d threads)", live_seeds, device, torch.get_num_threads())
    network = StackedNetwork(plan.analysis, live_seeds, cfg.model.init, cfg.model.bn_momentum, cfg.model.bn_eps,
                             dropout_mode=dropout_mode,
                             channels_last=cfg.trainer.channels_last or (device.type == "cpu" and len(seeds) > 1))
    precision = precision_plugin(cfg.trainer.precision, device.type)
    network = precision.convert_module(network)  # bf16-true, 64-true: the lone run's dtype (Lightning converts
    # its network before making the optimizer, as here)
    network.to(device)
    optimizer = make_optimizer(network.parameters(), container(cfg.optim))
    n_train = len(seeds[0].module.split("train")[0])
    batch_size = int(data_cfg["batch_size"])
    steps_per_epoch = math.ceil(n_train / batch_size)
    max_epochs = int(cfg.trainer.max_epochs)
    schedule = make_scheduler(optimizer, container(cfg.optim), max_epochs, steps_per_epoch * max_epochs)
    start = _resume(seeds, network, optimizer, schedule, device)
    guard = CopyGuard(network, optimizer)
    for s, seed in enumerate(seeds):
        if seed.stopped is not None:  # early stopping ended it before the kill: frozen, not trained again
            guard.alive[s] = False

    # Each seed's images on the device once. Seeds whose data is the same (a named dataset with
    # validation=test; not synthetic data or a subset, which the seed draws) share one copy.
    on_device: dict[tuple, tuple] = {}
    fingerprints = {seed.job.seed: seed.data.fingerprint() for seed in seeds}

    def tensors(seed: _Seed, split: str):
        own = split != "test" and data_cfg["validation"] != "test"  # the seed's own validation split
        key = (fingerprints[seed.job.seed], split, seed.job.seed if own else None)
        if key not in on_device:
            on_device[key] = tuple(t.to(device) for t in seed.module.split(split))
        return on_device[key]

    def batches(split: str, epoch: int, train: bool) -> StackedBatches:
        """Every seed's batches of `split` at once: (S, B, C, H, W), (S, B), copy s's as its lone run's."""
        augment = data_cfg["augment"]
        return StackedBatches([tensors(seed, split) for seed in seeds], [seed.job.seed for seed in seeds],
                              batch_size if train else data_cfg["eval_batch_size"], shuffle=train, epoch=epoch,
                              mean=seeds[0].module._mean, std=seeds[0].module._std,
                              crop_padding=augment["crop_padding"] if train else 0,
                              hflip=augment["hflip"] if train else False)

    def evaluate(split: str) -> tuple[list[float], list[float]]:
        """Each copy's mean loss (over samples) and accuracy on `split`, in eval mode."""
        network.eval()
        loss_sum = torch.zeros(len(seeds), device=device)
        correct = torch.zeros(len(seeds), device=device)
        seen = 0
        with torch.no_grad():
            for x, y in batches(split, 0, False):  # (S, B, C, H, W), (S, B)
                with precision.forward_context():  # as Lightning's validation_step/test_step
                    logits = network(precision.convert_input(x))
                    losses = torch.nn.functional.cross_entropy(
                        logits.flatten(0, 1), y.flatten(), reduction="none",
                        label_smoothing=cfg.optim.label_smoothing).view(y.shape)
                loss_sum += losses.sum(dim=1)
                correct += (logits.argmax(dim=2) == y).sum(dim=1)
                seen += y.shape[1]
        return (loss_sum / max(seen, 1)).tolist(), (correct / max(seen, 1)).tolist()

    monitor, mode = cfg.checkpoint.monitor, cfg.checkpoint.mode
    step = start * steps_per_epoch
    try:
        for epoch in range(start, max_epochs):
            if all(seed.failed or seed.stopped is not None for seed in seeds):
                break
            for seed in seeds:
                seed.history.flush(up_to=epoch)  # what a killed run wrote and a checkpoint covers
            lr = float(optimizer.param_groups[0]["lr"])
            started = time.perf_counter()
            network.train()
            loss_sum = torch.zeros(len(seeds), device=device)
            correct = torch.zeros(len(seeds), device=device)
            seen = 0
            for x, y in batches("train", epoch, True):  # (S, B, C, H, W), (S, B): copy s's own batch
                with precision.forward_context():  # bf16-mixed: autocast over forward and loss, as training_step
                    logits = network(precision.convert_input(x))
                    loss, per_copy = stacked_loss(logits, y, guard.alive, cfg.optim.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                guard.mask_gradients()
                clip_copy_gradients_(network, cfg.trainer.gradient_clip_val, cfg.trainer.gradient_clip_algorithm)
                optimizer.step()
                guard.commit()
                if schedule is not None and schedule["interval"] == "step":
                    schedule["scheduler"].step()
                loss_sum += per_copy * y.shape[1]
                correct += (logits.detach().argmax(dim=2) == y).sum(dim=1)
                seen += y.shape[1]
                step += 1
                if step_hook is not None:
                    step_hook(network, step)
            if schedule is not None and schedule["interval"] == "epoch":
                schedule["scheduler"].step()
            train_loss, train_acc = (loss_sum / seen).tolist(), (correct / seen).tolist()
            val_loss, val_acc = evaluate("val")
            seconds = time.perf_counter() - started
            alive = guard.alive.tolist()
            for s, seed in enumerate(seeds):
                if seed.failed or seed.stopped is not None:
                    continue
                if not alive[s] or not math.isfinite(train_loss[s]):
                    _mask(seed, epoch + 1, train_loss[s])
                    continue
                seed.val_acc_best = max(seed.val_acc_best, val_acc[s])
                metrics = {"train/loss": train_loss[s], "train/acc": train_acc[s], "val/loss": val_loss[s],
                           "val/acc": val_acc[s], "val/acc_best": seed.val_acc_best}
                seed.history.lr = lr
                seed.history.record(epoch + 1, max_epochs, metrics, seconds, label=f"seed {seed.job.seed}: ")
                value = metrics[monitor]
                improved = seed.best is None or (value < seed.best if mode == "min" else value > seed.best)
                if improved:
                    seed.best = value
                if seed.stopper is not None and _early_stop(seed.stopper, metrics, epoch):
                    seed.stopped = epoch + 1  # saved below (in its checkpoint, as Lightning saves its callback)
                _save(seed, s, network, optimizer, schedule, epoch, step, best=improved)
                if seed.stopped is not None:
                    guard.alive[s] = False  # frozen from the next step on, as a masked copy, but not failed
                    log.info("seed %d: early stopping: %s did not improve for %d epochs; stopped after epoch %d; "
                             "the stack's other seeds go on", seed.job.seed, seed.stopper.monitor,
                             seed.stopper.patience, epoch + 1)
            for seed in seeds:  # after every checkpoint of the epoch (epoch_log's order)
                if not seed.failed:
                    seed.history.flush(up_to=epoch + 1)
        _finish(seeds, network, evaluate, plan, max_epochs, monitor, results)
    except BaseException as error:
        # Every live seed's run: KILLED (a signal) or FAILED, as run.py marks a lone run.
        stops = [record_stop(error, seed.tracker, None) for seed in seeds if not seed.failed]
        instead = next((stop for stop in stops if stop is not None), None)
        if instead is not None:
            raise instead from error
        raise
    return [results[job.seed] for job in jobs]


def _early_stop(stopper, metrics: Mapping[str, float], epoch: int) -> bool:
    """Lightning's EarlyStopping check at the end of train epoch `epoch` (0-based), as the lone run's
    callback makes it (check_on_train_epoch_end): its own rule (min_delta, wait_count, a non-finite
    value), on the float32 value the lone run logs. True when it stops the seed."""
    import torch

    should_stop, reason = stopper._evaluate_stopping_criteria(
        torch.tensor(metrics[stopper.monitor], dtype=torch.float32))
    if should_stop:  # as EarlyStopping._run_early_stopping_check, whose stopped_epoch is trainer.current_epoch
        stopper.stopped_epoch, stopper.stopping_reason_message = epoch, reason
    return should_stop


def _mask(seed: _Seed, epoch: int, loss: float) -> None:
    """A copy whose loss went non-finite: FAILED, as a lone run stops; its last good checkpoint stays."""
    seed.failed = True
    error = TrainingError(
        f"the training loss became {loss} in epoch {epoch}; lower optim.lr, check the data, or clip "
        f"gradients (trainer.gradient_clip_val). The last good checkpoint is kept")
    log.error("seed %d: %s; the stack's other seeds go on", seed.job.seed, error)
    (seed.job.run_dir / MASKED_FILE).write_text(json.dumps({"epoch": epoch, "why": str(error)}) + "\n")
    if seed.tracker:
        seed.tracker.mark_failed(error, "FAILED")


def _save(seed: _Seed, s: int, network, optimizer, schedule, epoch: int, step: int, best: bool) -> None:
    """last.ckpt (the one before kept as last.prev.ckpt) and, if improved, best.ckpt of copy s."""
    import os

    import lightning as L
    import torch

    from cnnlab.training.trainer import durable_checkpoint_io

    cfg = seed.job.cfg
    gens = network.generators.get_states(next(network.parameters()).device)
    checkpoint = {
        "epoch": epoch, "global_step": step, "pytorch-lightning_version": L.__version__,
        "state_dict": {f"network.{k}": v.cpu() for k, v in network.lone_state_dict(s).items()},
        "optimizer_states": [lone_optimizer_state(network, optimizer, s)],
        "lr_schedulers": [schedule["scheduler"].state_dict()] if schedule else [],
        "callbacks": {f"ModelCheckpoint{{'monitor': '{cfg.checkpoint.monitor}', 'mode': '{cfg.checkpoint.mode}'}}": {
            "best_model_score": torch.tensor(seed.best), "best_model_path": str(
                seed.job.run_dir / "checkpoints" / "best.ckpt")},
            **({seed.stopper.state_key: seed.stopper.state_dict()} if seed.stopper is not None else {})},
        "val_acc_best": seed.val_acc_best,
        "stacked": {"generator": gens[s].cpu(), "seeds": network.seeds, "stopped": seed.stopped},
    }
    folder = seed.job.run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    writer = durable_checkpoint_io()
    if best:
        writer.save_checkpoint(checkpoint, folder / "best.ckpt")
    if cfg.checkpoint.save_last:
        if (folder / "last.ckpt").is_file():
            os.replace(folder / "last.ckpt", folder / PREVIOUS)
        writer.save_checkpoint(checkpoint, folder / "last.ckpt")


def _resume(seeds: list[_Seed], network, optimizer, schedule, device) -> int:
    """Load every seed's checkpoint of the oldest epoch they all have; the epoch to start from."""
    import torch

    folders = [seed.job.run_dir / "checkpoints" for seed in seeds]
    found = [{e: p for p in (f / "last.ckpt", f / PREVIOUS) if (e := _checkpoint_epoch(p)) is not None}
             for f in folders]
    if not any(found):
        return 0
    # A seed early stopping ended stays where it stopped (its last.ckpt); the others go on together.
    ended = [bool(f) and _stopped_at(f[max(f)]) is not None for f in found]
    training = [f for f, e in zip(found, ended) if not e]
    common = min((max(f) if f else -1) for f in training) if training else max(max(f) for f in found)
    if common < 0 or not all(common in f for f in training):
        behind = [seed.job.seed for seed, f, e in zip(seeds, found, ended) if common not in f and not e]
        log.warning("seeds %s have no checkpoint of epoch %d; the whole stack trains from its first epoch",
                    behind, common + 1)
        return 0
    states = [torch.load(f[max(f)] if e else f[common], map_location="cpu", weights_only=True)
              for f, e in zip(found, ended)]
    for s, state in enumerate(states):
        network.load_lone_state_dict(s, {k.removeprefix("network."): v for k, v in state["state_dict"].items()})
        seeds[s].val_acc_best = float(state["val_acc_best"])
        callbacks = state["callbacks"]
        score = next(v for k, v in callbacks.items() if k.startswith("ModelCheckpoint"))["best_model_score"]
        seeds[s].best = float(score)
        if seeds[s].stopper is not None and seeds[s].stopper.state_key in callbacks:
            seeds[s].stopper.load_state_dict(callbacks[seeds[s].stopper.state_key])
        seeds[s].stopped = state["stacked"].get("stopped")
    network.generators.set_states([state["stacked"]["generator"] for state in states], device)
    # Shared values (Adam's step count, the learning rate, the schedule) from a seed still training.
    shared = ended.index(False) if training else 0
    load_lone_optimizer_states(network, optimizer, [state["optimizer_states"][0] for state in states], shared)
    if schedule is not None and states[shared]["lr_schedulers"]:
        schedule["scheduler"].load_state_dict(states[shared]["lr_schedulers"][0])
    stopped = {seed.job.seed: seed.stopped for seed in seeds if seed.stopped is not None}
    log.info("stack resumes after epoch %d (seeds %s)%s", common + 1, [seed.job.seed for seed in seeds],
             f"; early stopping ended seed(s) {stopped} after those epochs: not trained again" if stopped else "")
    return common + 1


def _stopped_at(path: Path) -> int | None:
    """The last epoch (1-based) of a seed early stopping ended, from its checkpoint; None if it goes on."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["stacked"].get("stopped")


def _finish(seeds: list[_Seed], network, evaluate, plan, max_epochs: int, monitor: str,
            results: dict[int, float]) -> None:
    """Test (last or best weights), run files, artifacts, the model, FINISHED: as run.py does."""
    import torch

    from cnnlab.model.build import build
    from cnnlab.training.artifacts import log_pytorch_model, log_run_files, wants_weights_txt, write_run_files

    live = [s for s, seed in enumerate(seeds) if not seed.failed]
    for s in live:
        seeds[s].history.flush(up_to=max_epochs, wait=True)
    if seeds[0].job.cfg.checkpoint.test == "best":
        for s in live:
            state = torch.load(seeds[s].job.run_dir / "checkpoints" / "best.ckpt", map_location="cpu",
                               weights_only=True)
            network.load_lone_state_dict(s, {k.removeprefix("network."): v for k, v in state["state_dict"].items()})
    test_loss, test_acc = evaluate("test")
    cfg = seeds[0].job.cfg
    for s in live:
        seed = seeds[s]
        lone = build(plan.analysis, cfg.model.init, cfg.model.bn_momentum, cfg.model.bn_eps, logits=True)
        lone.to(next(network.parameters()).dtype)  # the trained dtype, as the lone run's network (bf16-true)
        lone.load_state_dict(network.lone_state_dict(s))
        config_yaml = OmegaConf.to_yaml(seed.job.cfg, resolve=True)
        write_run_files(seed.job.run_dir, plan, lone, config_yaml, seed.data.classes,
                        wants_weights_txt(cfg.tracking.weights_txt, container(cfg.model)))
        if seed.tracker:
            if seed.stopper is not None and seed.stopper.stopped_epoch > 0:  # run.py's tag: the last epoch, 1-based
                seed.tracker.set_tags({"early_stopping.stopped_epoch": seed.stopped})
            # At the lone run's trainer.current_epoch: the epochs it trained.
            seed.tracker.log_metrics({"test/loss": test_loss[s], "test/acc": test_acc[s]},
                                     step=seed.stopped or max_epochs)
            log_run_files(seed.tracker, seed.job.run_dir)
            if cfg.tracking.log_model:
                seed.tracker.patiently(lambda seed=seed, lone=lone: log_pytorch_model(
                    seed.tracker, lone, seed.module, plan), "logging the model")
                from cnnlab.serving.pyfunc import log_pyfunc_model

                example = seed.data.test_x[:2].permute(0, 2, 3, 1).numpy()  # (2, H, W, C) uint8, as served
                seed.tracker.patiently(lambda seed=seed, lone=lone, config_yaml=config_yaml, example=example:
                                       log_pyfunc_model(seed.tracker, lone, config_yaml, seed.data.classes, example),
                                       "logging the classifier")
            seed.tracker.finish("FINISHED")
        results[seed.job.seed] = float(seed.best)
        log.info("seed %d done: best %s = %.4f; test/acc = %.4f", seed.job.seed, monitor, seed.best, test_acc[s])
    for seed in seeds:
        if seed.failed:
            results[seed.job.seed] = math.nan


# ---------------------------------------------------------------------------------------------
# `cnnlab train seeds=[0,1,2,3]`: one stacked job, one child run per seed under a parent run.


def refuse_seed_with_seeds(args: Sequence[str]) -> None:
    """seeds=[...] lists the seeds itself: a seed=... beside it (or a sweep over seed) is a mistake."""
    keys = {arg.lstrip("+~").split("=", 1)[0] for arg in args if "=" in arg}
    if "seeds" in keys and "seed" in keys:
        raise ConfigError("seeds=[...] trains every seed it lists; remove seed=... (to sweep seeds with -m, "
                          "use seed=0,1,2 hydra/launcher=stacked, or seeds=[0,1,2] without -m)")


def check_seeds(cfg: DictConfig) -> None:
    """seeds=[...] only for a config that stacks (cnnlab train's preflight asks before Hydra starts)."""
    problem = stacking_problem(cfg)
    if problem:
        seeds = ",".join(str(s) for s in cfg.seeds)
        raise ConfigError(f"seeds=[{seeds}] cannot be trained stacked: {problem}; train them as separate "
                          f"runs instead: cnnlab train -m seed={seeds}")


def train_seeds(cfg: DictConfig, tags: Mapping[str, str] | None = None):
    """Train cfg.seeds as one stack. Returns a Result of the group: the parent run (None in a sweep or
    with tracking off), the folder of the seeds' runs, and as score the mean over seeds of the best
    `checkpoint.monitor` (NaN if every seed failed); each seed's own results are in its run.
    Each seed's run lives in <this command's run dir>/s<seed> (on other pixels than that folder's
    runs: <run dir>-data-<fp12>/s<seed>); outside a sweep they are the children of a parent run that
    this folder remembers, so running the same command again resumes them all."""
    from cnnlab.training.naming import in_multirun
    from cnnlab.training.resume import RUN_ID_FILE

    job_overrides = overrides()
    refuse_seed_with_seeds(job_overrides)
    checked(cfg)
    check_seeds(cfg)
    seeds = [int(s) for s in cfg.seeds]
    if stack_device(container(cfg.trainer)) == "cpu":
        log.warning("stacking %d seeds on the CPU: %s", len(seeds), CPU_STACKING)
    base = [o for o in job_overrides if o.lstrip("+~").split("=", 1)[0] != "seeds"]
    folder = _group_directory(cfg, run_directory(cfg, run_name(cfg, job_overrides)), seeds[0])
    jobs = []
    for seed in seeds:
        seed_overrides = [*base, f"seed={seed}"]
        seed_cfg = lone_config(cfg, seed)
        jobs.append(SeedJob(seed_cfg, seed_overrides, folder / f"s{seed}",
                            {**sweep_tags(seed_overrides), **(tags or {})}))
    parent = None
    if cfg.tracking.enabled and not in_multirun():  # in a sweep the sweep's parent is theirs
        parent = _open_parent(cfg, folder / RUN_ID_FILE, seeds, base)
        for job in jobs:
            job.tags["mlflow.parentRunId"] = parent.run_id
    try:
        results = train_stacked(jobs)
    except BaseException as error:
        if parent is not None:
            parent.mark_failed(error, "FAILED")
        raise
    if parent is not None:
        parent.finish("FINISHED")
    from cnnlab.training.result import Result

    finite = [r for r in results if math.isfinite(r)]
    return Result(parent.run_id if parent else None, folder, [], {},
                  sum(finite) / len(finite) if finite else math.nan)


def _group_directory(cfg: DictConfig, folder: Path, first_seed: int) -> Path:
    """The folder of a seeds=[...] command's runs and parent run, by the lone run's data rule
    (resume.run_directory_for_data): the same command on other pixels (another data.root or
    data.archive, which run names leave out) is another group, with its own parent run, beside the
    first. The group's data is known by its first seed's (a named dataset's is every seed's; any
    change of where the pixels come from changes the first seed's too); it is read again for training,
    from the decode cache."""
    from cnnlab.data.sources import load_dataset
    from cnnlab.training.resume import run_directory_for_data

    _, data_cfg = checked(cfg)
    data = load_dataset(data_cfg, Path(cfg.paths.cache), first_seed)
    return run_directory_for_data(folder, data.fingerprint())


def _open_parent(cfg: DictConfig, id_file: Path, seeds: list[int], base: list[str]):
    """The parent run of a seeds=[...] command: resumed when its run dir remembers one, else new."""
    from cnnlab.tracking.provenance import provenance_tags
    from cnnlab.tracking.store import artifact_location, check_tracking, tracking_uri
    from cnnlab.tracking.writer import Tracker

    runs = Path(cfg.paths.runs).resolve()
    uri = tracking_uri(cfg.tracking.uri, runs)
    check_tracking(uri, cfg.tracking.timeout_s)
    tracker = Tracker(uri, runs, outage_wait_s=cfg.tracking.outage_wait_s, probe_timeout_s=cfg.tracking.timeout_s)
    previous = id_file.read_text().strip() if id_file.is_file() else None
    if previous and tracker.resume(previous):
        return tracker
    seed_list = ",".join(map(str, seeds))
    tracker.start(cfg.tracking.experiment, f"seeds {' '.join(base) or cfg.model.name} seed={seed_list}",
                  artifact_location=artifact_location(uri, runs, cfg.tracking.experiment), tags={
                      **provenance_tags(), "sweep": "parent", "sweep.keys": "seed", "sweep.launcher": "stacked",
                      STACKED_TAG: seed_list})
    tracker.log_params({"sweep.overrides": " ".join([*base, f"seeds=[{seed_list}]"]),
                        "sweep.launcher": "stacked", "sweep.grid.seed": seed_list})
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(tracker.run_id)
    return tracker
