"""One tracked training run, top to bottom: check -> data -> open or resume the MLflow run ->
fit (resuming if this run directory has a checkpoint) -> test -> artifacts -> a Result (the MLflow
run, the run folder, the epochs, the final metrics and the monitored value a sweeper gets)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cnnlab.config.compose import config_hash, container, flatten
from cnnlab.training import collector
from cnnlab.training.checks import check_batch_limits, checked
from cnnlab.training.naming import DESCRIPTION_TAG, overrides, run_description, run_directory, run_name, sweep_tags
from cnnlab.training.result import Result, run_result
from cnnlab.vocabulary import TEST_METRICS, TORCH_THREADS_TAG

log = logging.getLogger("cnnlab")


def train(cfg: DictConfig, tags: Mapping[str, str] | None = None) -> Result:
    """Train, test and track one run; return its Result (`.score`: the best value of
    `checkpoint.monitor`, what the Hydra app returns to a sweeper).

    `tags` are added to a new MLflow run (`cnnlab reproduce` links runs this way). The run
    directory is locked for the whole run: a second process on it stops with RunInUse.
    """
    checked(cfg)  # bad input fails before a folder or a lock exists
    if cfg.seeds is not None:  # seeds=[...]: one stacked job, one run per seed
        from cnnlab.training.stacked_run import train_seeds

        return train_seeds(cfg, tags)
    from cnnlab.training.console import quiet_third_parties
    from cnnlab.training.distributed import process_rank
    from cnnlab.training.resume import run_directory_lock
    from cnnlab.training.signals import handled

    run_dir = run_directory(cfg, run_name(cfg, overrides()))  # once: with run.fresh=true each call is a new one
    with ExitStack() as held:
        held.enter_context(run_directory_lock(run_dir, held=process_rank() == 0))
        held.enter_context(handled())
        held.enter_context(quiet_third_parties())
        return _train(cfg, tags, run_dir, held)


def _train(cfg: DictConfig, tags: Mapping[str, str] | None, run_dir: Path, held: ExitStack) -> Result:
    plan, data_cfg = checked(cfg)
    from cnnlab.data.sources import dataset_profile, load_dataset
    from cnnlab.training.cpu_share import sample
    from cnnlab.training.distributed import process_rank
    from cnnlab.training.resume import run_directory_for_data, run_directory_lock

    started = sample()  # other processes' CPU use while this run starts: torch_threads

    runs = Path(cfg.paths.runs).resolve()
    data = load_dataset(data_cfg, Path(cfg.paths.cache), cfg.seed)
    check_batch_limits(cfg.trainer, data_cfg, len(data.train_x), len(data.test_x))  # needs the data's size
    fingerprint = data.fingerprint()  # hashes every pixel: once per run
    # Run names leave out where the data lives (data.root, data.archive), so other pixels under the
    # same command would find this folder: such a run never resumes here, nor counts as done.
    other_data_dir = run_directory_for_data(run_dir, fingerprint)
    if other_data_dir != run_dir:
        run_dir = other_data_dir
        held.enter_context(run_directory_lock(run_dir, held=process_rank() == 0))

    import lightning as L
    import torch

    from cnnlab.data.batches import TensorDataModule
    from cnnlab.model.summary import summary_text
    from cnnlab.training.artifacts import log_pytorch_model, log_run_files, wants_weights_txt, write_run_files
    from cnnlab.training.distributed import prepare_strategy
    from cnnlab.training.epoch_log import EpochHistory
    from cnnlab.training.module import Classifier
    from cnnlab.training.resume import open_run, resume_point
    from cnnlab.training.signals import preemption_callback, record_stop, watch
    from cnnlab.training.trainer import (cheap_cuda_probe, checkpoints, early_stopping, make_trainer, one_log_stream,
                                         torch_threads)

    job_overrides = overrides()
    name = run_name(cfg, job_overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = resume_point(cfg, run_dir)

    one_log_stream()
    cheap_cuda_probe()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    network = plan.build()  # the layer language's build() or an opaque module's factory (cnnlab.model.plan)
    if cfg.trainer.channels_last:
        network = network.to(memory_format=torch.channels_last)
    if cfg.trainer.compile:
        network.compile(mode=cfg.trainer.compile)  # in place: parameter names stay the same
    prepare_strategy(str(cfg.trainer.strategy))
    threads = torch_threads(cfg.trainer.threads, started, cfg.trainer.deterministic)
    if threads:
        torch.set_num_threads(threads)

    tracker = None
    # Under DDP, Lightning runs this function again in one process per extra rank; only
    # rank zero opens (or resumes) the MLflow run and writes the run's files.
    rank_zero = process_rank() == 0
    if cfg.tracking.enabled and rank_zero:
        tracker, done = open_run(cfg, runs, run_dir, name, {
            **run_tags(cfg, plan, data_cfg, job_overrides, run_dir, fingerprint),
            **sweep_tags(job_overrides), **(tags or {})}, resume_from)
        if done is not None:  # a finished run: what it left behind, nothing trained again
            stored = tracker.run_metrics()
            result = run_result(tracker.run_id, run_dir, cfg.checkpoint.monitor, cfg.checkpoint.mode, done,
                                {k: stored[k] for k in TEST_METRICS})
            log.info("%s", _outcome(cfg, result, tracker))  # where it is, as when it was trained
            return result
        watch(tracker)  # marked KILLED by the signal watchdog if a step holds off a signal too long
    log.info("run %s in %s%s, %d torch threads", name, run_dir,
             f" (MLflow run {tracker.run_id})" if tracker else " (tracking off)", torch.get_num_threads())
    log.info("\n%s", summary_text(plan))

    # trainer.deterministic=true switches deterministic algorithms on for the whole process
    # (at Trainer construction); callers that train again in this process get it back as it was.
    deterministic_before = {"mode": torch.are_deterministic_algorithms_enabled(),
                            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled()}
    preemption = preemption_callback(run_dir / "checkpoints" / "last.ckpt", exact=data_cfg["pipeline"] == "memory")
    try:
        if tracker and cfg.tracking.system_metrics:
            tracker.watch_system()
        module = Classifier(network, container(cfg.optim), data_cfg["num_classes"],
                            channels_last=cfg.trainer.channels_last)
        datamodule = TensorDataModule(data, data_cfg, cfg.seed)
        saved = checkpoints(cfg, run_dir)
        history = EpochHistory(run_dir / "history.jsonl", tracker,
                               cfg.tracking.step_every if cfg.tracking.step_metrics else 0)
        stopper = early_stopping(cfg)
        trainer = make_trainer(cfg, run_dir, [history, *saved, *([stopper] if stopper else []), preemption])
        if tracker and not tracker.has_params():  # a resumed run has its params already
            log_first_params(tracker, cfg, plan, data, fingerprint, trainer.strategy.root_device)
            tracker.log_dataset(data_cfg["name"], fingerprint, data.source, dataset_profile(data, data_cfg))
        collector.resume()  # start-up's imports are done (cnnlab.training.collector)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        if stopper is not None and stopper.stopped_epoch > 0:
            # Lightning's stopped_epoch is 0-based; the tag is the last epoch trained, 1-based as history.jsonl.
            log.info("early stopping: %s did not improve for %d epochs; stopped after epoch %d",
                     cfg.early_stopping.monitor, cfg.early_stopping.patience, stopper.stopped_epoch + 1)
            if tracker:
                tracker.set_tags({"early_stopping.stopped_epoch": stopper.stopped_epoch + 1})
        # checkpoint.test=best: score the checkpoint selected on validation, once (its weights are
        # then the run's model); last: the weights after the last epoch, as the chapter does.
        trainer.test(module, datamodule=datamodule, verbose=False, weights_only=True,
                     ckpt_path="best" if cfg.checkpoint.test == "best" else None)
        tested = {k: float(trainer.callback_metrics[k]) for k in TEST_METRICS}
        if tracker:
            tracker.log_metrics(tested, step=trainer.current_epoch)
        config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        if rank_zero:
            write_run_files(run_dir, plan, network, config_yaml, data.classes,
                            wants_weights_txt(cfg.tracking.weights_txt, container(cfg.model)))
        if tracker:
            log_run_files(tracker, run_dir)
            if cfg.tracking.log_model:
                tracker.patiently(lambda: log_pytorch_model(tracker, network, datamodule, plan),
                                  "logging the model")
                from cnnlab.serving.pyfunc import log_pyfunc_model

                example = data.test_x[:2].permute(0, 2, 3, 1).numpy()  # (2, H, W, C) uint8, as served
                tracker.patiently(lambda: log_pyfunc_model(tracker, network, config_yaml, data.classes, example),
                                  "logging the classifier")
    except BaseException as error:
        instead = record_stop(error, tracker, preemption)  # KILLED by a signal (then Interrupted), or FAILED
        if instead is not None:
            raise instead from error
        raise
    finally:
        torch.use_deterministic_algorithms(**deterministic_before)
    if tracker:
        tracker.finish("FINISHED")
    score = saved[0].best_model_score
    best = float(score) if score is not None else float(trainer.callback_metrics[cfg.checkpoint.monitor])
    result = run_result(tracker.run_id if tracker else None, run_dir, cfg.checkpoint.monitor, cfg.checkpoint.mode,
                        best, tested)
    if rank_zero:
        log.info("%s", _outcome(cfg, result, tracker))
    return result


def _outcome(cfg: DictConfig, result, tracker) -> str:
    """The final block: best epoch, the tested checkpoint's scores, the MLflow run and its dashboard."""
    from cnnlab.tracking.dashboard import dashboard
    from cnnlab.training.run_text import outcome_text

    where = None
    if tracker:
        run = tracker.patiently(lambda: tracker.client.get_run(tracker.run_id), "reading the run")
        where = dashboard(tracker.uri, run.info.experiment_id, tracker.run_id)
    return outcome_text(result, cfg.checkpoint.monitor, cfg.checkpoint.mode, cfg.checkpoint.test, where)


def run_tags(cfg: DictConfig, plan, data_cfg: Mapping, job_overrides: list[str], run_dir: Path,
             fingerprint: str) -> dict:
    """The tags a new run starts with (the sweep's and the caller's are added to them)."""
    import torch

    from cnnlab.tracking.provenance import provenance_tags

    # The thread count is part of the arithmetic on the CPU (how sums are split): chosen by the
    # machine's load when trainer.threads is null, so recorded for reproduce to use again.
    return {**provenance_tags(), "overrides": " ".join(job_overrides) or "(none)", "seed": cfg.seed,
            TORCH_THREADS_TAG: torch.get_num_threads(),
            "model": plan.name, "data": data_cfg["name"], "run_dir": str(run_dir),
            "config.hash": config_hash(cfg), "data.fingerprint": fingerprint, **source_tags(plan),
            DESCRIPTION_TAG: run_description(cfg, run_name(cfg, job_overrides), job_overrides)}


def log_first_params(tracker, cfg: DictConfig, plan, data, fingerprint: str, device) -> None:
    """A new run's params (the config and what the model plan derives), provenance and device."""
    from cnnlab.tracking.provenance import log_provenance

    log_provenance(tracker)
    tracker.log_params({
        **flatten(container(cfg)),
        "model.total_params": plan.total_params,
        "model.trainable_params": plan.trainable,
        "model.macs": plan.macs,
        # An opaque module's receptive field is not known: the param is left out (compare shows n/a).
        **({"model.receptive_field": plan.receptive_field} if plan.receptive_field is not None else {}),
        "model.layers_expanded": plan.description,
        "data.fingerprint": fingerprint,
        "data.source": data.source,
    })
    tracker.set_tags({"device": str(device)})


def source_tags(plan) -> dict[str, str]:
    """A registered factory's source file and its sha256, which `cnnlab reproduce` checks."""
    if plan.source is None:
        return {}
    from cnnlab.vocabulary import MODEL_SOURCE_HASH_TAG, MODEL_SOURCE_TAG

    path, digest = plan.source
    return {MODEL_SOURCE_TAG: path, MODEL_SOURCE_HASH_TAG: digest}


def record_failure(cfg: DictConfig, error: BaseException) -> None:
    """A sweep job that failed before its run existed still leaves a FAILED child run."""
    from cnnlab.tracking.store import tracking_uri
    from cnnlab.tracking.writer import Tracker

    job_overrides = overrides()
    runs = Path(cfg.paths.runs).resolve()
    tracker = Tracker(tracking_uri(cfg.tracking.uri, runs), runs)
    tracker.start(cfg.tracking.experiment, run_name(cfg, job_overrides), tags={
        "error": f"{type(error).__name__}: {error}", "seed": cfg.seed,
        "overrides": " ".join(job_overrides), **sweep_tags(job_overrides)})
    tracker.log_params(flatten(container(cfg)))  # compare groups it with its variant
    tracker.finish("FAILED")
