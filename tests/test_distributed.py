"""Multi-process training: Lightning DDP on CPU (gloo), two ranks, one tracked run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from cnnlab.config.compose import compose
from cnnlab.data.batches import TensorBatches, TensorDataModule
from cnnlab.data.sources import load_dataset
from cnnlab.model.build import build
from cnnlab.model.plan import model_plan

DDP = ["data=synthetic", "model.widths=[4]", "model.dense=[8]", "trainer.accelerator=cpu", "trainer.devices=2",
       "trainer.strategy=ddp", "trainer.enable_progress_bar=false", "tracking.log_model=false", "seed=3"]


@pytest.mark.parametrize("n", [8, 9])
def test_ranks_share_an_epoch_without_overlap_and_with_equal_step_counts(n):
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    y = torch.arange(n)
    shards = [TensorBatches(x, y, 2, shuffle=True, seed=1, rank=r, world_size=2) for r in (0, 1)]
    seen = [torch.cat([b[1] for b in s]) for s in shards]
    assert len(shards[0]) == len(shards[1]) and len(seen[0]) == len(seen[1]) == (n + 1) // 2
    union = torch.cat(seen)
    assert sorted(set(union.tolist())) == list(range(n))  # every sample, each rank its own part
    assert len(union) - n == n % 2  # DistributedSampler's rule: wrap around to fill the last rank
    whole = torch.cat([b[1] for b in TensorBatches(x, y, 2, shuffle=True, seed=1)])
    assert torch.equal(seen[0], whole[0::2][:len(seen[0])])  # a slice of the one-process order


def _evaluate(checkpoint: Path, overrides: list[str]) -> tuple[float, float]:
    """Loss and accuracy of a checkpoint's weights on the whole validation set, in one process."""
    cfg = compose(overrides)
    network = build(model_plan(cfg).analysis, logits=True)
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    network.load_state_dict({k.removeprefix("network."): v for k, v in state.items()})
    network.eval()
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    module = TensorDataModule(load_dataset(data_cfg, Path("unused"), cfg.seed), data_cfg, cfg.seed)
    losses, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in module.val_dataloader():
            logits = network(x)
            losses += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
    return losses / n, correct / n


def test_ddp_on_cpu_trains_one_tracked_run_with_metrics_over_all_ranks_and_resumes(tmp_path):
    command = [sys.executable, "-m", "cnnlab.cli", "train", *DDP, f"paths.runs={tmp_path}"]
    done = subprocess.run([*command, "trainer.max_epochs=2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs").glob("*/*")  # one Hydra output directory for both ranks
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.params["trainer.devices"] == "2"
    # Validation is split between the ranks: the logged numbers must be those of the whole set.
    loss, acc = _evaluate(run_dir / "checkpoints" / "last.ckpt", DDP)
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2]
    assert history[-1]["val/acc"] == pytest.approx(acc, abs=1e-6)
    assert history[-1]["val/loss"] == pytest.approx(loss, rel=1e-5)
    assert history[-1]["train/acc"] * 256 == pytest.approx(round(history[-1]["train/acc"] * 256))

    again = subprocess.run([*command, "trainer.max_epochs=3"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    (same,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert same.info.run_id == run.info.run_id and same.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [1, 2, 3]


def test_ddp_inside_a_multirun_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cnnlab.cli", "train", "-m", *DDP, f"paths.runs={tmp_path}",
                           "trainer.max_epochs=1"], capture_output=True, text=True, timeout=300)
    assert "trainer.strategy=ddp cannot run inside a multirun" in done.stdout + done.stderr
    assert not list(tmp_path.glob("multirun/*/*/checkpoints/*.ckpt"))  # refused before training


@pytest.mark.parametrize("preset, expected", [
    ("ddp_cpu", {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "sync_batchnorm": False, "num_nodes": 1}),
    ("multi_gpu", {"accelerator": "gpu", "devices": -1, "strategy": "ddp", "sync_batchnorm": True,
                   "precision": "bf16-mixed"}),
    ("multi_node", {"accelerator": "gpu", "devices": 4, "num_nodes": 2, "sync_batchnorm": True}),
])
def test_scale_out_trainer_presets_compose_on_top_of_the_default(preset, expected):
    trainer = OmegaConf.to_container(compose([f"trainer={preset}"]).trainer)
    assert {k: trainer[k] for k in expected} == expected
    assert trainer["max_epochs"] == 5 and trainer["threads"] is None  # the rest from trainer/default
