"""`cnnlab train`: one tracked training run (or one job of a Hydra sweep).

Reads top to bottom: check everything -> load data -> open the MLflow run ->
fit (resuming if this run directory has a checkpoint) -> test -> artifacts
-> return the monitored metric to the caller (a sweeper, a test).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from cnnlab.config import CONF_DIR, ModelPlan, config_hash, model_plan, slug
from cnnlab.errors import ConfigError, TrainingError

log = logging.getLogger("cnnlab")

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune")
PRECISIONS = ("32", "32-true", "64", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
# Overrides that do not change what is trained, left out of run names.
NOT_IN_NAME = ("paths.", "ckpt_path", "tracking.", "trainer.enable_progress_bar", "hydra",
               "trainer.max_epochs", "data.root", "data.archive", "data.download")


def check_trainer_config(cfg: Mapping[str, Any]) -> None:
    epochs = cfg.get("max_epochs")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"trainer.max_epochs must be an integer >= 1, got {epochs!r}")
    if cfg.get("accelerator") not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator must be one of {', '.join(ACCELERATORS)}, "
                          f"got {cfg.get('accelerator')!r}")
    if str(cfg.get("precision")) not in PRECISIONS:
        raise ConfigError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, "
                          f"got {cfg.get('precision')!r}")
    if cfg.get("compile") not in COMPILE_MODES:
        raise ConfigError(f"trainer.compile must be one of null, {', '.join(COMPILE_MODES[1:])}, "
                          f"got {cfg.get('compile')!r}")
    if cfg.get("benchmark") not in (None, True, False):
        raise ConfigError(f"trainer.benchmark must be null, true or false, got {cfg.get('benchmark')!r}")
    if not isinstance(cfg.get("sync_batchnorm"), bool):
        raise ConfigError(f"trainer.sync_batchnorm must be true or false, got {cfg.get('sync_batchnorm')!r}")
    nodes = cfg.get("num_nodes")
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ConfigError(f"trainer.num_nodes must be an integer >= 1, got {nodes!r}")
    if not isinstance(cfg.get("channels_last"), bool):
        raise ConfigError(f"trainer.channels_last must be true or false, got {cfg.get('channels_last')!r}")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value <= 0 or (isinstance(value, float) and value > 1)):
            raise ConfigError(f"trainer.{key} must be null, a batch count >= 1 or a fraction "
                              f"in (0, 1], got {value!r}")
    # Lightning checks the rest only when the Trainer is built, after the MLflow run exists.
    devices = cfg.get("devices")
    if not _devices_ok(devices):
        raise ConfigError(f"trainer.devices must be auto, a count >= 1, -1 (all), or device indices "
                          f"such as [0, 1] or '0,1', got {devices!r}")
    _check_strategy_name(cfg.get("strategy"))
    clip = cfg.get("gradient_clip_val")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                             or not 0 <= clip < float("inf")):
        raise ConfigError(f"trainer.gradient_clip_val must be null or a finite number >= 0, got {clip!r}")
    if cfg.get("deterministic") not in (True, False, "warn"):
        raise ConfigError(f"trainer.deterministic must be true, false or warn, got {cfg.get('deterministic')!r}")
    if cfg.get("enable_progress_bar") not in (None, True, False):
        raise ConfigError(f"trainer.enable_progress_bar must be null (a bar on a terminal), true or "
                          f"false, got {cfg.get('enable_progress_bar')!r}")
    threads = cfg.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"trainer.threads must be null or an integer >= 1, got {threads!r}")


def _devices_ok(devices: Any) -> bool:
    """Lightning's forms: auto, a count, -1 for all, a list of indices, or '0,1'."""
    if devices == "auto" or devices == -1:
        return True
    if isinstance(devices, str):
        parts = devices.split(",")
        if len(parts) == 1:  # '2' is a count, as 2 is
            return parts[0].strip().isdigit() and int(parts[0]) >= 1
        return all(p.strip().isdigit() for p in parts if p.strip()) and any(p.strip() for p in parts)
    if isinstance(devices, int) and not isinstance(devices, bool):
        return devices >= 1
    return (isinstance(devices, list) and bool(devices) and len(set(devices)) == len(devices)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices))


STRATEGY_EXAMPLES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "fsdp", "deepspeed", "single_device")


def _check_strategy_name(strategy: Any) -> None:
    if strategy == "auto":
        return  # no Lightning import for the common case
    from lightning.pytorch.strategies import StrategyRegistry

    if not isinstance(strategy, str) or strategy.lower() not in StrategyRegistry.available_strategies():
        raise ConfigError(f"trainer.strategy must be one of {', '.join(STRATEGY_EXAMPLES)} or another "
                          f"name in Lightning's StrategyRegistry, got {strategy!r}")


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def run_name(cfg: DictConfig, overrides: list[str]) -> str:
    """Readable and unique within a sweep: model, the overrides that matter, seed."""
    if cfg.tracking.run_name:
        return str(cfg.tracking.run_name)
    parts = [str(cfg.model.name)]
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in ("seed", "model") or key.startswith(NOT_IN_NAME):
            continue
        parts.append(f"{key.removeprefix('model.')}={value}")
    parts.append(f"s{cfg.seed}")
    return "-".join(parts)[:250]


def run_directory(cfg: DictConfig, name: str) -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.runs) / "outputs" / slug(cfg.tracking.experiment) / slug(name)


def _sweep_tags(overrides: list[str]) -> dict[str, str]:
    """In a multirun: the parent run, and this job's overrides as knob.* tags."""
    from hydra.core.hydra_config import HydraConfig

    from cnnlab.sweep import parent_run_id

    if not _in_multirun():
        return {}
    tags = {f"knob.{k.lstrip('+~')}": v for k, _, v in (o.partition("=") for o in overrides)}
    # The job's output dir is <sweep dir>/<subdir>, resolved by the launcher in the
    # launching process; re-resolving sweep.dir in a worker process could differ.
    parent = parent_run_id(Path(HydraConfig.get().runtime.output_dir).parent)
    return {**tags, "mlflow.parentRunId": parent} if parent else tags


def _threads(configured: int | None) -> int | None:
    """Torch threads: as configured, else the CPUs the launcher gave this job (cores split
    between joblib's parallel jobs, a Ray task's num_cpus, SLURM's cpus-per-task)."""
    from hydra.core.hydra_config import HydraConfig

    from cnnlab.launchers import job_threads

    if configured is not None:
        if isinstance(configured, bool) or not isinstance(configured, int) or configured < 1:
            raise ConfigError(f"trainer.threads must be null or an integer >= 1, got {configured!r}")
        return configured
    if not HydraConfig.initialized():
        return None
    return job_threads(OmegaConf.select(HydraConfig.get(), "launcher") or {})


def _check_strategy(strategy: str) -> None:
    """DDP starts one process per extra rank by running the command again: make that command
    `python -m cnnlab.train <the same overrides>`, and refuse it inside a multirun."""
    if not (strategy.startswith("ddp") and "spawn" not in strategy and "notebook" not in strategy):
        return
    if _in_multirun():
        raise ConfigError(f"trainer.strategy={strategy} cannot run inside a multirun: Lightning's DDP "
                          f"launcher would start the whole sweep again for each rank. Sweep "
                          f"single-process jobs (trainer.devices=1), or train each variant on its own")
    import importlib.util

    import __main__

    # Lightning's launcher runs `python -m <__main__'s module> <sys.argv[1:]>` for every extra
    # rank; under `cnnlab train` (a subcommand) that module is the one taking exactly these args.
    __main__.__spec__ = importlib.util.find_spec("cnnlab.train")


def _process_rank() -> int:
    """This process's global rank: 0 unless Lightning's DDP launcher started it for another rank."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank


def _one_log_stream() -> None:
    """The `lightning` package prints through its own console handler *and* propagates to
    the root logger; under Hydra (which owns the root handlers and the job's log file) every
    Lightning line came out twice. Keep the root's copy, which also reaches the log file."""
    if logging.getLogger().handlers:
        lightning_logger = logging.getLogger("lightning")
        for handler in list(lightning_logger.handlers):
            lightning_logger.removeHandler(handler)


def _container(node: Any) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def _checked(cfg: DictConfig) -> tuple[ModelPlan, dict]:
    """Every check that needs no data: fail in milliseconds, before anything is written."""
    from cnnlab.config import check_checkpoint, check_run_config
    from cnnlab.datasets import check_data_config
    from cnnlab.optim import check_optim_config
    from cnnlab.tracking import check_tracking_config

    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {cfg.seed!r}")
    # Resolving the whole config once makes a broken ${...} interpolation fail here, and
    # unknown keys (`+trainer.max_epoch=3` would otherwise do nothing) fail by name.
    check_run_config(_container(cfg))
    data = _container(cfg.data)
    check_data_config(data)
    check_optim_config(_container(cfg.optim))
    check_trainer_config(_container(cfg.trainer))
    check_tracking_config(_container(cfg.tracking))
    _check_accelerator(_container(cfg.trainer))
    plan = model_plan(cfg)
    if cfg.ckpt_path:  # a garbage file or another model's checkpoint would fail inside fit()
        check_checkpoint(Path(cfg.ckpt_path), plan, _container(cfg.model))
    return plan, data


def _check_accelerator(trainer: Mapping[str, Any]) -> None:
    """The accelerator asked for is on this machine (Lightning finds out only after the MLflow
    run exists). Imports torch only when a device other than the CPU is asked for."""
    accelerator, devices = trainer["accelerator"], trainer["devices"]
    if accelerator in ("auto", "cpu"):
        return
    import torch

    if accelerator == "tpu":
        from lightning.pytorch.accelerators import XLAAccelerator

        available, count = XLAAccelerator.is_available(), None
    elif accelerator == "mps" or (accelerator == "gpu" and not torch.cuda.is_available()):
        available, count = torch.backends.mps.is_available(), 1
    else:  # gpu, cuda
        available, count = torch.cuda.is_available(), torch.cuda.device_count()
    if not available:
        raise ConfigError(f"trainer.accelerator={accelerator} but this machine has no such device; "
                          f"use trainer.accelerator=auto or cpu")
    wanted = (max(devices) + 1 if isinstance(devices, list) and devices
              else devices if isinstance(devices, int) and devices > 0 else None)
    if count is not None and wanted is not None and wanted > count:
        raise ConfigError(f"trainer.devices={devices!r} asks for more {accelerator} devices than the "
                          f"{count} this machine has; use at most {count}, -1 (all) or auto")


def preflight(argv: list[str]) -> None:
    """`cnnlab train`'s checks before Hydra starts. Hydra reports a bad override in several
    lines with status 1, and creates the run folder before train() sees the config; composing
    the same config here turns every bad input into one `error:` line (status 2) with nothing
    written. It also tries the output folder and the tracking store, which train() meets only
    after loading the data. Skipped with Hydra's own flags (-m, --cfg ...: a sweep checks each
    job as it runs it) and for ${hydra:...} values, which resolve only inside Hydra's app."""
    from cnnlab.config import check_writable, compose
    from cnnlab.tracking import check_tracking, tracking_uri

    if any(arg.startswith(("-", "hydra.mode")) or "${hydra:" in arg for arg in argv):
        return
    cfg = compose(argv)
    _checked(cfg)
    runs = Path(cfg.paths.runs)
    check_writable(runs, "paths.runs")
    uri = tracking_uri(cfg.tracking.uri, runs.resolve())
    # A server or database now; the embedded store's folder was just tried, and train() creates
    # the store itself (only once the data has loaded).
    if cfg.tracking.enabled and not uri.startswith("sqlite:"):
        check_tracking(uri, cfg.tracking.timeout_s)


def _trainer(cfg: DictConfig, run_dir: Path, history, checkpoints: list):
    import lightning as L

    t = cfg.trainer
    progress = t.enable_progress_bar
    return L.Trainer(
        max_epochs=t.max_epochs, accelerator=t.accelerator, devices=t.devices,
        strategy=t.strategy, num_nodes=t.num_nodes, sync_batchnorm=t.sync_batchnorm,
        precision=t.precision, deterministic=t.deterministic, benchmark=t.benchmark,
        limit_train_batches=t.limit_train_batches, limit_val_batches=t.limit_val_batches,
        limit_test_batches=t.limit_test_batches, gradient_clip_val=t.gradient_clip_val,
        enable_progress_bar=sys.stderr.isatty() if progress is None else progress,
        logger=False,  # cnnlab logs epoch metrics itself (callbacks.EpochHistory)
        callbacks=[history, *checkpoints],
        num_sanity_val_steps=0,  # Keras validates only after each epoch
        enable_model_summary=False,  # cnnlab prints its own, Keras-style
        default_root_dir=run_dir,
    )


def _open_run(cfg: DictConfig, runs: Path, run_dir: Path, name: str, tags: dict,
              resume_from: Path | None):
    """The MLflow run this job logs to, and the stored result when nothing is left to do.

    A run directory remembers its MLflow run: running the same command again continues
    that run (from last.ckpt, or from scratch if it died before its first checkpoint)
    instead of leaving a second one; a finished run that already has its epochs is done.
    """
    from cnnlab.tracking import Tracker, check_tracking, tracking_uri

    uri = tracking_uri(cfg.tracking.uri, runs)
    check_tracking(uri, cfg.tracking.timeout_s)
    # From here on a tracking server that goes away is waited for (then a clear error), and
    # training itself keeps going through an outage (callbacks.EpochHistory).
    tracker = Tracker(uri, runs, outage_wait_s=cfg.tracking.outage_wait_s, probe_timeout_s=cfg.tracking.timeout_s)
    id_file = run_dir / "mlflow_run_id"
    previous = id_file.read_text().strip() if id_file.is_file() else None
    status = tracker.run_status(previous) if previous else None
    done = _already_complete(resume_from, cfg.trainer.max_epochs) if status == "FINISHED" else None
    if done is not None:
        log.info("run %s already trained %d epochs (MLflow run %s); raise trainer.max_epochs "
                 "to continue it", name, cfg.trainer.max_epochs, previous)
        return tracker, done
    if status is None or not tracker.resume(previous):
        # The embedded store keeps artifacts beside it; a server decides for itself.
        artifacts = ((runs / "mlartifacts" / slug(cfg.tracking.experiment)).as_uri()
                     if uri.startswith("sqlite:") else None)
        tracker.start(cfg.tracking.experiment, name, artifact_location=artifacts, tags=tags)
        id_file.write_text(tracker.run_id)
    return tracker, None


def _already_complete(checkpoint: Path | None, max_epochs: int) -> float | None:
    """The best monitored value, if this checkpoint already finished max_epochs; else None."""
    import torch

    if checkpoint is None:
        return None
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if state["epoch"] + 1 < max_epochs:  # "epoch" is the 0-based index of the last one trained
        return None
    scores = [s["best_model_score"] for k, s in state.get("callbacks", {}).items()
              if k.startswith("ModelCheckpoint") and s.get("best_model_score") is not None]
    return float(scores[0]) if scores else None


def _resume_point(cfg: DictConfig, run_dir: Path) -> Path | None:
    if cfg.ckpt_path:
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise ConfigError(f"ckpt_path {path} is not a file")
        return path
    last = run_dir / "checkpoints" / "last.ckpt"
    return last if last.is_file() else None


def train(cfg: DictConfig, tags: Mapping[str, str] | None = None) -> float:
    """Train, test and track one run; return the best value of `checkpoint.monitor`.

    `tags` are added to a new MLflow run (`cnnlab reproduce` links runs this way).
    """
    plan, data_cfg = _checked(cfg)
    from cnnlab.datasets import load_dataset

    runs = Path(cfg.paths.runs).resolve()
    data = load_dataset(data_cfg, Path(cfg.paths.cache), cfg.seed)

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from cnnlab.artifacts import log_pytorch_model, log_run_files, write_run_files
    from cnnlab.build import build
    from cnnlab.callbacks import EpochHistory
    from cnnlab.data import TensorDataModule
    from cnnlab.module import Classifier
    from cnnlab.summary import summary_text
    from cnnlab.tracking import flatten, log_provenance, provenance_tags

    overrides = _overrides()
    name = run_name(cfg, overrides)
    run_dir = run_directory(cfg, name)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = _resume_point(cfg, run_dir)

    _one_log_stream()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    network = build(plan.analysis, cfg.model.init, cfg.model.bn_momentum, cfg.model.bn_eps,
                    logits=True)
    if cfg.trainer.channels_last:
        network = network.to(memory_format=torch.channels_last)
    if cfg.trainer.compile:
        network.compile(mode=cfg.trainer.compile)  # in place: parameter names stay the same
    _check_strategy(str(cfg.trainer.strategy))
    threads = _threads(cfg.trainer.threads)
    if threads:
        torch.set_num_threads(threads)

    fingerprint = data.fingerprint()  # hashes every pixel: once per run
    tracker = None
    # Under DDP, Lightning runs this function again in one process per extra rank; only
    # rank zero opens (or resumes) the MLflow run and writes the run's files.
    rank_zero = _process_rank() == 0
    if cfg.tracking.enabled and rank_zero:
        tracker, done = _open_run(cfg, runs, run_dir, name, {
            **provenance_tags(), "overrides": " ".join(overrides) or "(none)", "seed": cfg.seed,
            "model": plan.name, "data": data_cfg["name"], "run_dir": str(run_dir),
            "config.hash": config_hash(cfg), "data.fingerprint": fingerprint,
            **_sweep_tags(overrides), **(tags or {})}, resume_from)
        if done is not None:
            return done
    log.info("run %s in %s%s, %d torch threads", name, run_dir,
             f" (MLflow run {tracker.run_id})" if tracker else " (tracking off)",
             torch.get_num_threads())
    log.info("\n%s", summary_text(plan))

    # trainer.deterministic=true switches deterministic algorithms on for the whole process
    # (at Trainer construction); callers that train again in this process get it back as it was.
    deterministic_before = {"mode": torch.are_deterministic_algorithms_enabled(),
                            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled()}
    try:
        module = Classifier(network, _container(cfg.optim), data_cfg["num_classes"],
                            channels_last=cfg.trainer.channels_last)
        datamodule = TensorDataModule(data, data_cfg, cfg.seed)
        # Saved at the end of the train epoch, after EpochHistory wrote the epoch's row
        # (callbacks.py says why the order matters).
        checkpoint = ModelCheckpoint(
            dirpath=run_dir / "checkpoints", filename="best", monitor=cfg.checkpoint.monitor,
            mode=cfg.checkpoint.mode, save_top_k=1, auto_insert_metric_name=False,
            save_on_train_epoch_end=True)
        checkpoints = [checkpoint]
        if cfg.checkpoint.save_last:
            # Not ModelCheckpoint(save_last=True): Lightning 2.6 writes that last.ckpt only in epochs
            # where the monitored value improved, so a run resumed after a plateau went back to its
            # last improvement. A second checkpoint with no monitor is written after every epoch.
            checkpoints.append(ModelCheckpoint(
                dirpath=run_dir / "checkpoints", filename="last", monitor=None, save_top_k=1,
                enable_version_counter=False, save_on_train_epoch_end=True))
        history = EpochHistory(run_dir / "history.jsonl", tracker,
                               cfg.tracking.step_every if cfg.tracking.step_metrics else 0)
        trainer = _trainer(cfg, run_dir, history, checkpoints)
        if tracker and not tracker.has_params():  # a resumed run has its params already
            log_provenance(tracker)
            tracker.log_params({
                **flatten(_container(cfg)),
                "model.total_params": plan.analysis.total_params,
                "model.trainable_params": plan.analysis.trainable,
                "model.macs": plan.analysis.macs,
                "model.receptive_field": plan.analysis.receptive_field.size[0],
                "model.layers_expanded": " ".join(plan.tokens),
                "data.fingerprint": fingerprint,
                "data.source": data.source,
            })
            tracker.set_tags({"device": str(trainer.strategy.root_device)})
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        trainer.test(module, datamodule=datamodule, verbose=False)
        if tracker:
            tracker.log_metrics({k: float(trainer.callback_metrics[k]) for k in ("test/loss", "test/acc")},
                                step=trainer.current_epoch)
        if rank_zero:
            write_run_files(run_dir, plan, network, OmegaConf.to_yaml(cfg, resolve=True))
        if tracker:
            log_run_files(tracker, run_dir)
            if cfg.tracking.log_model:
                tracker.patiently(lambda: log_pytorch_model(tracker, network, datamodule, plan),
                                  "logging the model")
    except BaseException as error:
        if tracker:  # with the tracking server away, it warns and leaves the run to resume
            tracker.mark_failed(error, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        torch.use_deterministic_algorithms(**deterministic_before)
    if tracker:
        tracker.finish("FINISHED")
    score = checkpoint.best_model_score
    result = float(score) if score is not None else float(trainer.callback_metrics[
        cfg.checkpoint.monitor])
    log.info("done: best %s = %.4f; test/acc = %.4f", cfg.checkpoint.monitor, result,
             float(trainer.callback_metrics["test/acc"]))
    return result


def record_failure(cfg: DictConfig, error: BaseException) -> None:
    """A sweep job that failed before its run existed still leaves a FAILED child run."""
    from cnnlab.tracking import Tracker, flatten, tracking_uri

    overrides = _overrides()
    runs = Path(cfg.paths.runs).resolve()
    tracker = Tracker(tracking_uri(cfg.tracking.uri, runs), runs)
    tracker.start(cfg.tracking.experiment, run_name(cfg, overrides), tags={
        "error": f"{type(error).__name__}: {error}", "seed": cfg.seed,
        "overrides": " ".join(overrides), **_sweep_tags(overrides)})
    tracker.log_params(flatten(_container(cfg)))  # compare groups it with its variant
    tracker.finish("FAILED")


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Single run: bad input exits 2 with one line. Sweep job: a failure is recorded as a
    FAILED child run and the sweep goes on (the job returns NaN to the sweeper)."""
    sweeping = _in_multirun()
    try:
        return train(cfg)
    except TrainingError as error:
        if not sweeping:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        log.error("job failed: %s", error)  # its run is already marked FAILED
        return float("nan")
    except ConfigError as error:
        if not sweeping:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        log.error("job failed: %s", error)
        if cfg.tracking.enabled:
            record_failure(cfg, error)
    except Exception:
        if not sweeping:
            raise
        log.exception("job failed; its MLflow run is marked FAILED and the sweep goes on")
    return float("nan")


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# Hydra's instantiation keys: an override that sets one could make Hydra import and call any
# object (hydra.callbacks are instantiated before cnnlab's code runs). cnnlab chooses objects by
# short names looked up in its own registries, so no command line needs them.
INSTANTIATION_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")


def refuse_object_overrides(argv: list[str]) -> None:
    for arg in argv:
        key = arg.split("=", 1)[0]
        if any(k in key for k in INSTANTIATION_KEYS):
            raise ConfigError(f"override '{arg}' sets a Hydra instantiation key; cnnlab does not let "
                              f"the command line import or call objects. Choose by name instead "
                              f"(optim.name=adam, model=vgg, hydra/launcher=joblib)")


def cli_main() -> None:
    """`cnnlab train` and `python -m cnnlab.train`: refuse object overrides, then run Hydra."""
    try:
        refuse_object_overrides(sys.argv[1:])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli_main()
