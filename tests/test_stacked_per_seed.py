"""What each seed of a stack keeps as its own: early stopping, its log file, its data's folder
(cnnlab.training.stacked_run, issue #17)."""

from pathlib import Path

import pytest
import torch
from test_stacked_run import TINY, _client, _history, _jobs, _runs_by_seed

from cnnlab.config.compose import compose
from cnnlab.train import train
from cnnlab.training.stacked_run import train_stacked

# patience=1 with min_delta=0.08 on val/loss: on TINY's data seed 9 stops after epoch 2, seed 1 after
# 3, seed 8 after 4, of 5 (measured; the smallest margin between a val/loss change and 0.08 is 0.015,
# far above the stack's rounding differences from the lone runs).
STOPPING = ("early_stopping.patience=1", "early_stopping.min_delta=0.08", "trainer.max_epochs=5",
            "tracking.log_model=false")
STOPS = {9: 2, 1: 3, 8: 4}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """Seeds 9, 1 and 8 stacked with early stopping, and each alone (experiment `lone`)."""
    runs = tmp_path_factory.mktemp("runs")
    scores = train_stacked(_jobs(runs, list(STOPS), *STOPPING))
    lone = {s: train(compose([*TINY, f"paths.runs={runs}", f"seed={s}", *STOPPING,
                              "tracking.experiment=lone"])).score for s in STOPS}
    return runs, scores, lone


def test_each_seed_stops_early_as_its_lone_run(stopped):
    runs, scores, lone_scores = stopped
    client = _client(runs)
    ours, theirs = _runs_by_seed(runs), _runs_by_seed(runs, "lone")
    assert len(set(STOPS.values())) == len(STOPS) and max(STOPS.values()) < 5  # the test's premise
    for score, (seed, last) in zip(scores, STOPS.items()):
        mine, lone = ours[seed], theirs[seed]
        assert mine.info.status == lone.info.status == "FINISHED"
        assert mine.data.tags["early_stopping.stopped_epoch"] == lone.data.tags["early_stopping.stopped_epoch"] \
            == str(last)
        rows, lone_rows = _history(runs / "stack" / f"s{seed}"), _history(Path(lone.data.tags["run_dir"]))
        assert [r["epoch"] for r in rows] == [r["epoch"] for r in lone_rows] == list(range(1, last + 1))
        for key in ("train/loss", "train/acc"):
            assert [r[key] for r in rows] == pytest.approx([r[key] for r in lone_rows], rel=1e-5), key
        # Within test_a_stacked_seed_is_its_lone_run's tolerances (the conv bias's rounding noise moves the
        # BatchNorm running mean): val/loss rel 1e-2 (measured: at most 3e-3); val/acc 2 of the 64 test
        # images, not 1: over 9 epochs, seed 9's first flipped two images on the boundary (0.344 vs 0.312).
        assert [r["val/loss"] for r in rows] == pytest.approx([r["val/loss"] for r in lone_rows], rel=1e-2)
        assert [r["val/acc"] for r in rows] == pytest.approx([r["val/acc"] for r in lone_rows], abs=2 / 64 + 1e-9)
        # Tested once, at the lone run's epoch, on the weights it stopped with (checkpoint.test=last).
        for key in ("test/loss", "test/acc"):
            steps = [[m.step for m in client.get_metric_history(run.info.run_id, key)] for run in (mine, lone)]
            assert steps[0] == steps[1] == [last], key
        assert mine.data.metrics["test/loss"] == pytest.approx(lone.data.metrics["test/loss"], rel=1e-2)
        assert score == pytest.approx(lone_scores[seed], rel=1e-2)
        # Frozen after it stopped: its last.ckpt is of its last epoch, with Lightning's callback state.
        last_ckpt = torch.load(runs / "stack" / f"s{seed}" / "checkpoints" / "last.ckpt", weights_only=True)
        lone_ckpt = torch.load(Path(lone.data.tags["run_dir"]) / "checkpoints" / "last.ckpt",
                               weights_only=True)
        assert last_ckpt["epoch"] == lone_ckpt["epoch"] == last - 1
        key = next(k for k in lone_ckpt["callbacks"] if k.startswith("EarlyStopping"))
        mine_es, lone_es = last_ckpt["callbacks"][key], lone_ckpt["callbacks"][key]
        numbers = ("best_score", "stopping_reason_message")  # the message quotes the best score
        assert {k: v for k, v in mine_es.items() if k not in numbers} == \
            {k: v for k, v in lone_es.items() if k not in numbers}
        assert float(mine_es["best_score"]) == pytest.approx(float(lone_es["best_score"]), rel=1e-2)
        assert mine_es["stopping_reason_message"].split(" Best score")[0] == \
            lone_es["stopping_reason_message"].split(" Best score")[0] == \
            "Monitored metric val/loss did not improve in the last 1 records."


def test_a_killed_stack_does_not_train_a_stopped_seed_again(stopped, tmp_path):
    """Killed in epoch 4, after seeds 9 and 1 stopped (epochs 2 and 3): the resumed stack trains seed 8
    from its epoch 3 checkpoint, seeds 9 and 1 not at all (copy 0, seed 9, is not where the shared
    optimizer step count comes from), and every seed ends as in the uninterrupted stack."""
    runs, *_ = stopped
    steps_per_epoch = 8

    class Stop(Exception):
        pass

    def stop(network, step):
        if step == 3 * steps_per_epoch + 3:
            raise Stop

    with pytest.raises(Stop):
        train_stacked(_jobs(tmp_path, list(STOPS), *STOPPING), step_hook=stop)
    frozen = [tmp_path / "stack" / f"s{seed}" / "checkpoints" / "last.ckpt" for seed in (9, 1)]
    before = [path.read_bytes() for path in frozen]
    seen = []
    train_stacked(_jobs(tmp_path, list(STOPS), *STOPPING), step_hook=lambda network, step: seen.append(step))
    assert seen[0] == 3 * steps_per_epoch + 1 and len(seen) == steps_per_epoch  # epoch 4 only
    assert [path.read_bytes() for path in frozen] == before
    by_seed = _runs_by_seed(tmp_path)
    for seed, last in STOPS.items():
        assert by_seed[seed].info.status == "FINISHED"
        assert by_seed[seed].data.tags["early_stopping.stopped_epoch"] == str(last)
        ours, theirs = _history(tmp_path / "stack" / f"s{seed}"), _history(runs / "stack" / f"s{seed}")
        assert [r["epoch"] for r in ours] == list(range(1, last + 1))
        for key in ("train/loss", "val/loss"):
            assert [r[key] for r in ours] == pytest.approx([r[key] for r in theirs], rel=1e-6), key
    # Finished: the same command again trains nothing.
    seen.clear()
    train_stacked(_jobs(tmp_path, list(STOPS), *STOPPING), step_hook=lambda network, step: seen.append(step))
    assert seen == []


def test_each_job_log_file_gets_its_seeds_lines_and_the_shared_ones(tmp_path):
    import logging

    from cnnlab.training.stacked_launcher import each_job_logs

    root, log = logging.getLogger(), logging.getLogger("cnnlab")
    files = {seed: tmp_path / f"job{seed}" / "train.log" for seed in (1, 10)}
    formatter = logging.Formatter("[%(name)s] %(message)s")
    hydras = {}
    for seed, path in files.items():  # what Hydra's job_logging gave each job while it was prepared
        path.parent.mkdir()
        hydras[seed] = logging.FileHandler(path)
        hydras[seed].setFormatter(formatter)
    root.addHandler(hydras[10])  # the last prepared job's file is the root's
    before, level = list(root.handlers), root.level
    root.setLevel(logging.INFO)  # as Hydra's job_logging sets it
    try:
        with each_job_logs([(seed, [handler]) for seed, handler in hydras.items()]):
            # The others (console, pytest's) stay; the last job's file handler is replaced by one per job.
            assert [h for h in root.handlers if h in before] == before[:-1] and len(root.handlers) == len(before) + 1
            for line in ("training seeds [1, 10] stacked", "seed 1: epoch 1/2", "seed 10: epoch 1/2",
                         "seed 10 done"):
                log.info(line)
        assert root.handlers == before
        log.info("after the stack")  # the last job's own handler again
    finally:
        root.setLevel(level)
        root.removeHandler(hydras[10])
        for handler in hydras.values():
            handler.close()
    text = {seed: path.read_text().splitlines() for seed, path in files.items()}
    assert text[1] == ["[cnnlab] training seeds [1, 10] stacked", "[cnnlab] seed 1: epoch 1/2"]
    assert text[10] == ["[cnnlab] training seeds [1, 10] stacked", "[cnnlab] seed 10: epoch 1/2",
                        "[cnnlab] seed 10 done", "[cnnlab] after the stack"]


def test_the_stacked_launcher_logs_each_seed_into_its_job_log(tmp_path, capsys, monkeypatch):
    from test_bad_inputs import _in_process

    code, err = _in_process(["-m", *TINY, "trainer.max_epochs=1", "tracking.log_model=false", f"paths.runs={tmp_path}",
                             "seed=0,1", "hydra/launcher=stacked", "hydra.launcher.stack=force"],
                            capsys, monkeypatch)
    assert code == 0, err
    logs = {}
    for path in (tmp_path / "multirun" / "cnnlab").glob("*/train.log"):
        seed = int(next(line for line in (path.parent / ".hydra" / "overrides.yaml").read_text().splitlines()
                        if "seed=" in line).split("seed=")[1])
        logs[seed] = path.read_text()
    assert sorted(logs) == [0, 1]
    for seed, other in ((0, 1), (1, 0)):
        assert "training seeds [0, 1] stacked" in logs[seed]
        assert f"seed {seed}: epoch 1/1" in logs[seed] and f"seed {seed} done" in logs[seed]
        assert f"seed {other}: epoch" not in logs[seed] and f"seed {other} done" not in logs[seed]


def test_a_seed_on_other_data_trains_beside_the_first_never_resuming_it(tmp_path, caplog):
    """The same folders (run names leave out where the data lives), other pixels (data.noise here):
    each seed trains in its own `s<seed>-data-<fp12>` folder, the first runs stay as they were."""
    from cnnlab.training.resume import DATA_FILE

    one_epoch = ("trainer.max_epochs=1", "tracking.log_model=false")
    train_stacked(_jobs(tmp_path, [0, 1], *one_epoch))
    first = {s: (tmp_path / "stack" / f"s{s}" / "checkpoints" / "last.ckpt").read_bytes() for s in (0, 1)}
    with caplog.at_level("WARNING", logger="cnnlab"):
        jobs = _jobs(tmp_path, [0, 1], *one_epoch, "data.noise=0.8")
        train_stacked(jobs)
    assert caplog.text.count("trained on other data") == 2  # one line per seed
    for job in jobs:
        fingerprint = (job.run_dir / DATA_FILE).read_text().strip()
        assert job.run_dir == tmp_path / "stack" / f"s{job.seed}-data-{fingerprint[:12]}"
        assert fingerprint != (tmp_path / "stack" / f"s{job.seed}" / DATA_FILE).read_text().strip()
        assert [r["epoch"] for r in _history(job.run_dir)] == [1]
        assert (tmp_path / "stack" / f"s{job.seed}" / "checkpoints" / "last.ckpt").read_bytes() == first[job.seed]
    by_run_dir = {r.data.tags["run_dir"]: r for r in _client(tmp_path).search_runs(
        [_client(tmp_path).get_experiment_by_name("cnnlab").experiment_id])}
    assert len(by_run_dir) == 4 and all(r.info.status == "FINISHED" for r in by_run_dir.values())
    assert all(str(job.run_dir) in by_run_dir for job in jobs)
    # The first data again: its own folders, already done (nothing trained, no other run).
    seen = []
    again = _jobs(tmp_path, [0, 1], *one_epoch)
    train_stacked(again, step_hook=lambda network, step: seen.append(step))
    assert seen == [] and [job.run_dir for job in again] == [tmp_path / "stack" / f"s{s}" for s in (0, 1)]


def test_seeds_on_other_pixels_are_another_group_with_its_own_parent_run(tmp_path):
    """`cnnlab train seeds=[...]` on another image tree (data.root is left out of run names): its seeds
    and its parent run live beside the first group's, in `<run dir>-data-<fp12>`, never resuming them."""
    from test_train import _tree

    from cnnlab.cli import main
    from cnnlab.training.resume import DATA_FILE

    first, second = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    from PIL import Image

    Image.new("RGB", (16, 16), (7, 7, 7)).save(second / "train" / "cat" / "0.png")  # other pixels

    def command(tree: Path) -> list[str]:
        return ["train", "data=folder", f"data.root={tree}", "data.shape=[3,16,16]", "data.num_classes=2",
                f"paths.runs={tmp_path / 'runs'}", "trainer.max_epochs=1", "tracking.log_model=false",
                "model.widths=[2]", "model.dense=[4]", "trainer.enable_progress_bar=false", "seeds=[0,1]"]

    assert main(command(first)) == 0
    assert main(command(second)) == 0
    client = _client(tmp_path / "runs")
    found = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    parents = [r for r in found if r.data.tags.get("sweep") == "parent"]
    assert len(parents) == 2 and len(found) == 6
    children = {}
    for run in found:
        if run not in parents:
            children.setdefault(run.data.tags["mlflow.parentRunId"], []).append(Path(run.data.tags["run_dir"]))
    folders = {parent.info.run_id: {d.parent for d in children[parent.info.run_id]} for parent in parents}
    assert all(len(f) == 1 for f in folders.values())  # each group's seeds in one folder
    (one,), (two,) = folders.values()
    new, old = (one, two) if "-data-" in one.name else (two, one)
    assert new == old.with_name(f"{old.name}-data-{(new / DATA_FILE).read_text().strip()[:12]}")
    assert main(command(first)) == 0  # the first tree again: its own group, done, nothing new
    assert len(client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])) == 6
