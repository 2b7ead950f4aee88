"""Seeds trained as one stack: each seed's run is its lone run (cnnlab.training.stacked_run)."""

import json
import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnlab.config.compose import compose
from cnnlab.model.build import build
from cnnlab.model.plan import model_plan
from cnnlab.train import train
from cnnlab.training.stacked_run import MASKED_FILE, SeedJob, load_lone_checkpoint, lone_config, train_stacked

# The baseline's layers (conv, bn, relu, maxpool, dropout, flatten, dense, dropout, dense), tiny:
# 256 synthetic images of 16x16, batch 32, so 8 steps an epoch.
# trainer.threads=1: the stack and the lone run must not choose different thread counts (a run with
# none measures the machine's load at start, cnnlab.training.cpu_share), which changes the rounding.
TINY = ["data=synthetic", "model=baseline", "model.widths=[4]", "model.dense=[8]", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "trainer.max_epochs=2", "trainer.threads=1"]
N_TEST = 64  # conf/data/synthetic.yaml: one test image is 1/64 of val/acc
STEPS_PER_EPOCH = 8


def _jobs(runs: Path, seeds, *extra: str) -> list[SeedJob]:
    return [SeedJob(lone_config(compose([*TINY, f"paths.runs={runs}", f"seed={s}", *extra]), s), [f"seed={s}"],
                    runs / "stack" / f"s{s}") for s in seeds]


def _client(runs: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{runs.resolve()}/mlflow.db")


def _runs_by_seed(runs: Path, experiment: str = "cnnlab") -> dict:
    client = _client(runs)
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {int(r.data.tags["seed"]): r for r in found}


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stacked(tmp_path_factory):
    """Seeds 3 and 5 stacked, and seed 5 alone (another experiment), 2 epochs each."""
    runs = tmp_path_factory.mktemp("runs")
    scores = train_stacked(_jobs(runs, [3, 5]))
    lone_score = train(compose([*TINY, f"paths.runs={runs}", "seed=5", "tracking.experiment=lone",
                                "tracking.log_model=false"])).score
    return runs, scores, lone_score


def test_a_stacked_seed_is_its_lone_run(stacked):
    runs, scores, lone_score = stacked
    runs_by_seed = _runs_by_seed(runs)
    (lone,) = _runs_by_seed(runs, "lone").values()
    mine = runs_by_seed[5]
    assert mine.info.status == "FINISHED" and runs_by_seed[3].info.status == "FINISHED"
    assert mine.data.tags["stacked"] == "3,5" and "stacked" not in lone.data.tags
    # The same params (tracking.experiment is where the lone one was put), the same tag keys.
    differ = {k for k in lone.data.params.keys() | mine.data.params.keys()
              if lone.data.params.get(k) != mine.data.params.get(k)}
    assert differ == {"tracking.experiment", "tracking.log_model"}
    assert set(lone.data.tags) - set(mine.data.tags) <= {"mlflow.source.name", "mlflow.source.type"}
    assert set(mine.data.tags) - set(lone.data.tags) == {"stacked"}
    # Per-epoch metrics: one value per epoch; the training loss is the lone run's (its own data order,
    # dropout masks and BatchNorm statistics; float32 summation order aside).
    client = _client(runs)
    for key in ("train/loss", "train/acc", "val/acc", "time/epoch_s"):
        ours = client.get_metric_history(mine.info.run_id, key)
        theirs = client.get_metric_history(lone.info.run_id, key)
        assert [m.step for m in ours] == [m.step for m in theirs] == [1, 2]
        if key.startswith("train/"):
            assert [m.value for m in ours] == pytest.approx([m.value for m in theirs], rel=1e-5), key
        elif key == "val/acc":  # the weights differ by rounding (below): an image on the boundary may flip
            assert [m.value for m in ours] == pytest.approx([m.value for m in theirs], abs=1 / N_TEST + 1e-9), key
    # val/loss: within 1e-2, not 1e-5: the conv bias before BatchNorm has a gradient that is rounding
    # noise, which Adam scales up (cnnlab.model.stacked's docstring), and it shifts the running mean.
    assert mine.data.metrics["val/loss"] == pytest.approx(lone.data.metrics["val/loss"], rel=1e-2)
    assert scores[1] == pytest.approx(lone_score, rel=1e-2) and math.isfinite(scores[0])
    assert set(mine.data.metrics) == set(lone.data.metrics)
    arts = lambda run, folder=None: {a.path for a in client.list_artifacts(run.info.run_id, folder)}  # noqa: E731
    assert arts(mine) == arts(lone) - {"hydra"}  # no Hydra here: .hydra/ comes with the launcher
    assert len(mine.outputs.model_outputs) == 2  # the model and the classifier (MLflow 3: LoggedModels)
    assert arts(mine, "checkpoints") == arts(lone, "checkpoints") == {"checkpoints/best.ckpt", "checkpoints/last.ckpt"}
    # The seed's checkpoint loads into a lone network, whose weights are the lone run's.
    cfg = compose([*TINY, "seed=5"])
    network = build(model_plan(cfg).analysis, logits=True)
    load_lone_checkpoint(runs / "stack" / "s5" / "checkpoints" / "last.ckpt", network)
    lone_dir = Path(lone.data.tags["run_dir"])
    alone = torch.load(lone_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in network.state_dict().items():
        if "conv0.bias" not in key and "running_mean" not in key:  # the rounding noise above
            assert torch.allclose(value, alone[f"network.{key}"], rtol=1e-4, atol=1e-6), key


def test_a_nan_seed_fails_alone(stacked, tmp_path):
    """Seed 7's weights become NaN after step 3: its run FAILED, seed 3 trains as in the stack of [3, 5]."""
    runs, *_ = stacked

    def poison(network, step):
        if step == 3:
            network.dense6.weight.data[1] = float("nan")  # StackedLinear: (S, in, out), copy 1 is seed 7

    one_epoch = ("tracking.log_model=false", "trainer.max_epochs=1")
    scores = train_stacked(_jobs(tmp_path, [3, 7], *one_epoch), step_hook=poison)
    assert math.isnan(scores[1]) and math.isfinite(scores[0])
    by_seed = _runs_by_seed(tmp_path)
    assert by_seed[7].info.status == "FAILED" and "training loss became nan" in by_seed[7].data.tags["error"]
    assert by_seed[3].info.status == "FINISHED"
    assert not (tmp_path / "stack" / "s7" / "history.jsonl").exists()  # no epoch of it finished
    assert (tmp_path / "stack" / "s7" / MASKED_FILE).is_file()
    ours, theirs = _history(tmp_path / "stack" / "s3"), _history(runs / "stack" / "s3")[:1]
    for key in ("train/loss", "val/loss", "val/acc"):
        assert [r[key] for r in ours] == pytest.approx([r[key] for r in theirs], rel=1e-6), key
    # Running the stack again trains nothing of seed 7 (a lone run retries it) and keeps seed 3.
    assert math.isnan(train_stacked(_jobs(tmp_path, [3, 7], *one_epoch))[1])


class Stop(Exception):
    pass


def test_a_killed_stack_resumes_every_seed_with_every_epoch_once(stacked, tmp_path):
    runs, *_ = stacked

    def stop(network, step):
        if step == STEPS_PER_EPOCH + 3:  # in epoch 2, after epoch 1's checkpoints
            raise Stop

    with pytest.raises(Stop):
        train_stacked(_jobs(tmp_path, [3, 5], "tracking.log_model=false"), step_hook=stop)
    assert {s: r.info.status for s, r in _runs_by_seed(tmp_path).items()} == {3: "FAILED", 5: "FAILED"}
    train_stacked(_jobs(tmp_path, [3, 5], "tracking.log_model=false"))
    by_seed = _runs_by_seed(tmp_path)
    client = _client(tmp_path)
    for seed in (3, 5):
        assert by_seed[seed].info.status == "FINISHED"
        ours = _history(tmp_path / "stack" / f"s{seed}")
        assert [r["epoch"] for r in ours] == [1, 2]
        assert [m.step for m in client.get_metric_history(by_seed[seed].info.run_id, "train/loss")] == [1, 2]
        # Resumed exactly: the uninterrupted stack's numbers (weights, optimizer, dropout generators).
        theirs = _history(runs / "stack" / f"s{seed}")
        for key in ("train/loss", "val/loss"):
            assert [r[key] for r in ours] == pytest.approx([r[key] for r in theirs], rel=1e-6), key


@pytest.mark.slow  # the command line around train_stacked (tested by default above)
def test_cnnlab_train_seeds_is_one_stacked_job_with_a_child_run_per_seed(tmp_path, capsys):
    from cnnlab.cli import main

    args = ["train", *TINY, "trainer.max_epochs=1", "tracking.log_model=false", f"paths.runs={tmp_path}"]
    assert main([*args, "seeds=[0,1]"]) == 0
    client = _client(tmp_path)
    found = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    (parent,) = [r for r in found if r.data.tags.get("sweep") == "parent"]
    children = sorted((r for r in found if r is not parent), key=lambda r: int(r.data.tags["seed"]))
    assert [r.data.tags["seed"] for r in children] == ["0", "1"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id and r.info.status == "FINISHED"
               and r.data.params["seeds"] == "None" and r.data.tags["stacked"] == "0,1" for r in children)
    assert parent.info.status == "FINISHED"
    assert main([*args, "seeds=[0,1]"]) == 0  # the same command again: done, nothing new
    assert len(client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])) == 3
    capsys.readouterr()
    assert main([*args, "seeds=[0,1]", "seed=3"]) == 2
    assert "seeds=[...] trains every seed it lists; remove seed=..." in capsys.readouterr().err


@pytest.mark.slow  # the command line around train_stacked (tested by default above)
def test_the_stacked_launcher_trains_each_group_of_seeds_as_one_stack(tmp_path):
    from cnnlab.cli import main

    assert main(["train", "-m", *TINY, "trainer.max_epochs=1", "tracking.log_model=false", f"paths.runs={tmp_path}",
                 "seed=0,1", "hydra/launcher=stacked", "hydra.launcher.stack=force"]) == 0
    client = _client(tmp_path)
    found = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    (parent,) = [r for r in found if r.data.tags.get("sweep") == "parent"]
    children = [r for r in found if r is not parent]
    assert parent.data.tags["sweep.launcher"] == "StackedLauncher"
    assert sorted(r.data.tags["seed"] for r in children) == ["0", "1"]
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.data.tags["stacked"] == "0,1"
        assert run.info.status == "FINISHED" and run.data.tags["knob.seed"] == run.data.tags["seed"]
        run_dir = Path(run.data.tags["run_dir"])  # its own job folder, with Hydra's files, as any sweep job
        assert run_dir.parent == tmp_path / "multirun" / "cnnlab" and (run_dir / ".hydra" / "config.yaml").is_file()
        assert "hydra" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_jobs_that_cannot_be_stacked_run_one_by_one_and_say_why(caplog):
    from cnnlab.training.stacked_launcher import plan_stacks

    def plan(jobs, stack="force", max_stack=64):
        configs = [compose([*TINY, *job]) for job in jobs]
        caplog.clear()
        with caplog.at_level("INFO", logger="cnnlab"):
            return plan_stacks(configs, jobs, max_stack, stack, 0.8), caplog.text

    jobs = [["seed=0", "model.bn=true"], ["seed=1", "model.bn=true"], ["seed=2", "model.bn=true"],
            ["seed=0", "model.bn=false"]]
    assert plan(jobs)[0] == [[0, 1, 2], [3]]
    assert "1 job(s) of model.bn=false run one by one: a single seed" in plan(jobs)[1]
    assert plan(jobs, max_stack=2)[0] == [[0, 1], [2], [3]]
    chunks, said = plan(jobs[:2], stack="auto")  # trainer.accelerator=cpu
    assert chunks == [[0], [1]] and "the CPU gains nothing from stacking" in said
    scaled = [[*job, "trainer.precision=16-mixed"] for job in jobs[:2]]
    chunks, said = plan(scaled)
    assert chunks == [[0], [1]]
    assert "trainer.precision=16-mixed: one GradScaler would scale the whole stack's loss" in said
    assert plan([[*job, "trainer.gradient_clip_val=1.0"] for job in jobs[:2]])[0] == [[0, 1]]  # clipped per seed


def test_seeds_that_cannot_stack_are_one_line_before_anything_is_written(tmp_path, capsys):
    from cnnlab.cli import main

    assert main(["train", *TINY, f"paths.runs={tmp_path}", "seeds=[0,1]", "data.pipeline=loader"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: seeds=[0,1] cannot be trained stacked: data.pipeline=loader: its DataLoader order is not the "
        "memory pipeline's; train them as separate runs instead: cnnlab train -m seed=0,1")
    assert not any(tmp_path.iterdir())
    assert main(["train", *TINY, f"paths.runs={tmp_path}", "seeds=[0,0]"]) == 2
    assert "seeds must be null or a list of distinct integers" in capsys.readouterr().err


def test_stacked_batches_are_each_seeds_tensor_batches():
    from cnnlab.data.batches import StackedBatches, TensorBatches

    g = torch.Generator().manual_seed(0)
    shared = (torch.randint(0, 256, (21, 3, 6, 6), dtype=torch.uint8, generator=g), torch.arange(21))
    own = (torch.randint(0, 256, (21, 3, 6, 6), dtype=torch.uint8, generator=g), torch.arange(21) + 100)
    data, seeds = [shared, own, shared], [4, 9, 2]
    settings = dict(mean=[0.5] * 3, std=[0.25] * 3, crop_padding=2, hflip=True)
    for shuffle, epoch in ((True, 0), (True, 3), (False, 0)):
        stacked = list(StackedBatches(data, seeds, 8, shuffle=shuffle, epoch=epoch, **settings))
        assert len(stacked) == 3 and stacked[-1][0].shape == (3, 5, 3, 6, 6)  # 8 + 8 + 5
        for s, ((x, y), seed) in enumerate(zip(data, seeds)):
            lone = list(TensorBatches(x, y, 8, shuffle=shuffle, seed=seed, epoch=lambda epoch=epoch: epoch,
                                      **settings))
            assert all(torch.equal(a[0][s], b[0]) and torch.equal(a[1][s], b[1]) for a, b in zip(stacked, lone))


@pytest.mark.slow
def test_reproduce_trains_a_stacked_seed_alone(stacked):
    from cnnlab.results.reproduce import reproduce

    runs, *_ = stacked
    run = _runs_by_seed(runs)[3]
    result = reproduce(f"sqlite:///{runs.resolve()}/mlflow.db", run.info.run_id, runs, ["tracking.log_model=false"])
    assert not result.differs, result.verdicts
    new = _client(runs).get_run(result.new)
    assert "stacked" not in new.data.tags and new.data.tags["seed"] == "3"


@pytest.mark.slow  # the default kill-and-resume test above covers a kill between epochs
def test_a_kill_between_two_seeds_checkpoints_resumes_both_from_the_older_epoch(stacked, tmp_path, caplog):
    """Seed 3 wrote epoch 2's last.ckpt, seed 5 was killed before writing its own: both go on from epoch 1."""
    import shutil

    runs, *_ = stacked
    for seed in (3, 5):
        shutil.copytree(runs / "stack" / f"s{seed}", tmp_path / "stack" / f"s{seed}",
                        ignore=shutil.ignore_patterns(".cnnlab.*", "mlflow_run_id"))
    folder = tmp_path / "stack" / "s5" / "checkpoints"
    shutil.copy(folder / "last.prev.ckpt", folder / "last.ckpt")  # as before epoch 2's write
    with caplog.at_level("INFO", logger="cnnlab"):
        train_stacked(_jobs(tmp_path, [3, 5], "tracking.enabled=false"))
    assert "stack resumes after epoch 1 (seeds [3, 5])" in caplog.text  # not from scratch, not epoch 2
    for seed in (3, 5):
        ours, theirs = _history(tmp_path / "stack" / f"s{seed}"), _history(runs / "stack" / f"s{seed}")
        assert [r["epoch"] for r in ours] == [1, 2]
        assert [r["train/loss"] for r in ours] == pytest.approx([r["train/loss"] for r in theirs], rel=1e-6)
        last = torch.load(tmp_path / "stack" / f"s{seed}" / "checkpoints" / "last.ckpt", weights_only=True)
        assert last["epoch"] == 1  # epoch 2, 0-based, trained again for seed 3 too


# ---------------------------------------------------------------------------------------------
# Precision and gradient clipping: each seed as its lone run.

# n_train is 256: with batch 256 an epoch is one step, so each epoch's train/loss is that step's loss.
ONE_STEP_EPOCHS = ["data.batch_size=256", "trainer.max_epochs=3", "tracking.enabled=false"]
PRECISION_SEEDS = [3, 5, 8]


def _losses(history: list[dict]) -> list[float]:
    return [row["train/loss"] for row in history]


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def precisions(tmp_path_factory):
    """Seeds 3, 5, 8 stacked in bf16-mixed, bf16-true and 32-true, and alone in the two bf16 ones: for
    each, {seed: (the first 3 steps' losses, the run dir)}."""
    root = tmp_path_factory.mktemp("precisions")
    out = {}
    for precision in ("bf16-mixed", "bf16-true", "32-true"):
        runs, extra = root / precision, [*ONE_STEP_EPOCHS, f"trainer.precision={precision}"]
        jobs = _jobs(runs, PRECISION_SEEDS, *extra)
        train_stacked(jobs)
        out["stacked", precision] = {job.seed: (_losses(_history(job.run_dir)), job.run_dir) for job in jobs}
        if precision != "32-true":
            lone = {s: train(compose([*TINY, f"paths.runs={runs}", f"seed={s}", *extra])) for s in PRECISION_SEEDS}
            out["lone", precision] = {s: (_losses(r.history), r.run_dir) for s, r in lone.items()}
    return out


def _gap(ours: list[float], theirs: list[float]) -> float:
    """The mean relative difference of two runs' losses."""
    return sum(abs(a - b) / abs(b) for a, b in zip(ours, theirs, strict=True)) / len(theirs)


# The mean relative gap of the first 3 steps' losses, per seed, measured on this machine (1 thread):
# stacked bf16-mixed vs lone bf16-mixed 2e-5 to 5.4e-5; stacked float32 vs lone bf16-mixed (autocast
# left out of one of the two) 5.1e-4 to 8.3e-4. Why the stack is not bitwise the lone run in bf16: on
# the CPU its convolutions run channels-last (the lone run's NCHW), where oneDNN sums in another order,
# so a few outputs (3.5e-5 of the first conv's) round to the neighbouring bf16 value, and BatchNorm's
# batch statistics spread that to ~5% of the logits by one bf16 step; with NCHW the stacked bf16
# forward is bitwise the lone one. 2e-4 sits 3.7x above the first and 2.5x below the second.
BF16_MIXED_GAP = 2e-4


def test_bf16_mixed_stacked_seeds_are_their_lone_bf16_mixed_runs(precisions):
    for seed in PRECISION_SEEDS:
        lone, lone_dir = precisions["lone", "bf16-mixed"][seed]
        ours, run_dir = precisions["stacked", "bf16-mixed"][seed]
        assert _gap(ours, lone) < BF16_MIXED_GAP, (seed, ours, lone)
        # ... which a stack without autocast would not be
        assert _gap(precisions["stacked", "32-true"][seed][0], lone) > BF16_MIXED_GAP, seed
        # float32 weights (and optimizer) in both: autocast only casts inside forward and loss
        assert {v.dtype for v in _state(run_dir).values() if v.is_floating_point()} == {torch.float32}
        assert {v.dtype for v in _state(lone_dir).values() if v.is_floating_point()} == {torch.float32}


def _is_bf16(value: float) -> bool:
    return float(torch.tensor(value).bfloat16()) == value


def test_bf16_true_stacked_seeds_train_in_bf16_as_their_lone_runs(precisions):
    for seed in PRECISION_SEEDS:
        lone, lone_dir = precisions["lone", "bf16-true"][seed]
        ours, run_dir = precisions["stacked", "bf16-true"][seed]
        # The loss itself was computed in bf16 (one step an epoch, so train/loss is that step's loss and
        # the epoch's sum is exact): a float32 loss is not a bf16 number.
        assert all(_is_bf16(v) for v in ours + lone), (ours, lone)
        assert not any(_is_bf16(v) for v in precisions["stacked", "32-true"][seed][0])
        # Measured 0 to 2 bf16 steps apart (as far as the lone bf16-true run is from the float32 one):
        # within 4 steps of the lone loss.
        for a, b in zip(ours, lone, strict=True):
            assert abs(a - b) <= 4 * 2.0 ** (math.floor(math.log2(abs(b))) - 7), (seed, ours, lone)
        assert {v.dtype for v in _state(run_dir).values() if v.is_floating_point()} == {torch.bfloat16}
        assert {v.dtype for v in _state(lone_dir).values() if v.is_floating_point()} == {torch.bfloat16}


@pytest.mark.parametrize("algorithm,clip_val", [("norm", 0.05), ("value", 0.001)])
def test_clipped_stacked_seeds_are_their_lone_clipped_runs(algorithm, clip_val, tmp_path):
    """Float64 (64-true), one epoch of 8 steps. Measured: train/loss equal, val/loss 4e-8 relative apart,
    weights 2e-13 (norm) and 5e-10 (value) apart."""
    extra = ["trainer.precision=64-true", "trainer.max_epochs=1", "tracking.enabled=false",
             f"trainer.gradient_clip_val={clip_val}", f"trainer.gradient_clip_algorithm={algorithm}"]
    clipped = []  # after each step, each copy's gradient norm (norm) or largest element (value) as clipped

    def measure(network, step):
        grads = [p.grad.unflatten(0, (2, -1)) for p in network.parameters()]  # (S, ...): copy s's slot
        if algorithm == "norm":
            clipped.append(torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0).tolist())
        else:
            clipped.append(torch.stack([g.flatten(1).abs().amax(dim=1) for g in grads]).amax(dim=0).tolist())

    jobs = _jobs(tmp_path, [3, 5], *extra)
    train_stacked(jobs, step_hook=measure)
    lone = train(compose([*TINY, f"paths.runs={tmp_path}", "seed=5", *extra]))
    # Clipping bit on every step of both seeds: what is left is the clip value itself (norm: times
    # norm / (norm + 1e-6), torch's eps); an unclipped gradient would be below it.
    assert len(clipped) == STEPS_PER_EPOCH
    assert all(v == pytest.approx(clip_val, rel=1e-4) for step in clipped for v in step), clipped
    ours, theirs = _history(jobs[1].run_dir)[0], lone.history[0]
    assert ours["train/loss"] == pytest.approx(theirs["train/loss"], rel=1e-5)
    assert ours["val/loss"] == pytest.approx(theirs["val/loss"], rel=1e-5)
    mine, alone = _state(jobs[1].run_dir), _state(lone.run_dir)
    assert mine.keys() == alone.keys() and all(mine[k].dtype == torch.float64 for k in mine if "num_batches" not in k)
    for key in mine:
        assert torch.allclose(mine[key].double(), alone[key].double(), rtol=0, atol=1e-4), key


def test_a_float64_stack_is_sized_for_8_byte_tensors(monkeypatch):
    from cnnlab.model.stacked import stacked_memory_bytes
    from cnnlab.training import stacked_launcher

    cfg = compose(TINY)
    data_bytes = 3 * 16 * 16 * (256 + 10000)  # stack_size's bound on a seed's images on the device
    fits_8 = stacked_memory_bytes(model_plan(cfg).analysis, 32, 8, "adam") + 8 * data_bytes  # 8 float32 copies
    monkeypatch.setattr(stacked_launcher, "free_device_bytes", lambda device: fits_8 / 0.8)
    assert stacked_launcher.stack_size(cfg, 16, 64, 0.8, "cuda") == 8
    assert stacked_launcher.stack_size(compose([*TINY, "trainer.precision=64-true"]), 16, 64, 0.8, "cuda") < 8
