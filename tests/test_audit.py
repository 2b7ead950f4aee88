"""`audit`: two deterministic CPU runs of one config agree bit for bit; the diff helpers find what differs."""

import json
import math
from pathlib import Path

import pytest
import torch

from cnnlab.errors import ConfigError
from cnnlab.results.audit import audit, audit_text, history_difference, verdict, weight_difference

TINY = ["data=synthetic", "model.widths=[4]", "model.dense=[8]", "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false", "seed=3"]


def test_tiny_config_trains_identically_twice(tmp_path):
    before = torch.are_deterministic_algorithms_enabled()
    result = audit(TINY, tmp_path)
    assert result["verdict"] == "identical"
    assert result["metrics"]["max_abs_diff"] == 0.0 and result["weights"]["max_abs_diff"] == 0.0
    assert result["metrics"]["problem"] is None and result["weights"]["problem"] is None
    # Something was compared: 2 epochs x (5 epoch metrics + train/lr), and every tensor of the network.
    assert result["metrics"]["values"] == 12 and result["weights"]["tensors"] >= 8
    assert result["determinism"] == {"trainer.deterministic": True, "torch_threads": torch.get_num_threads(),
                                     "seed": 3, "deterministic_algorithms": True}
    a, b = (Path(p) for p in result["runs"])
    assert a != b and a.name == "audit-a" and b.name == "audit-b"
    assert Path(result["folder"]).parent == (tmp_path / "audit").resolve()
    assert all((p / "checkpoints" / "last.ckpt").is_file() for p in (a, b))
    assert len((a / "history.jsonl").read_text().splitlines()) == 2
    assert torch.are_deterministic_algorithms_enabled() == before  # the process is left as it was
    text = audit_text(result)
    assert "verdict: identical" in text and "max |a - b| = 0 over 12 values" in text
    assert "seed 3" in text and "deterministic algorithms on" in text


def test_audit_owned_keys_cannot_be_overridden(tmp_path):
    with pytest.raises(ConfigError, match="audit sets trainer.accelerator itself; remove the override "
                                          "'trainer.accelerator=gpu'"):
        audit([*TINY, "trainer.accelerator=gpu"], tmp_path)
    assert not (tmp_path / "audit").exists()


def _history(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_difference_helpers_name_what_differs(tmp_path):
    rows = [{"epoch": 1, "seconds": 1.0, "train/loss": 1.2, "val/loss": 1.1, "val/acc": 0.50},
            {"epoch": 2, "seconds": 1.0, "train/loss": 0.9, "val/loss": 0.8, "val/acc": 0.60}]
    changed = [dict(rows[0], seconds=7.5), dict(rows[1], **{"val/loss": 0.55, "val/acc": 0.625})]
    a, b = _history(tmp_path / "a.jsonl", rows), _history(tmp_path / "b.jsonl", changed)
    metrics = history_difference(a, b)
    # val/loss moved by 0.25 at epoch 2 (val/acc by less); the wall time is not a result.
    assert metrics["max_abs_diff"] == pytest.approx(0.25)
    assert (metrics["metric"], metrics["epoch"], metrics["values"]) == ("val/loss", 2, 6)
    same = history_difference(a, a)
    assert same["max_abs_diff"] == 0.0 and same["metric"] is None

    state = {"network.conv0.weight": torch.ones(2, 3), "network.bn1.num_batches_tracked": torch.tensor(8)}
    other = {k: v.clone() for k, v in state.items()}
    other["network.conv0.weight"][1, 2] = 1.5
    weights = weight_difference(state, other)
    assert weights["max_abs_diff"] == pytest.approx(0.5) and weights["tensor"] == "network.conv0.weight"
    assert weights["tensors"] == 2
    assert verdict(metrics, weights) == "differs"
    assert verdict(same, weight_difference(state, state)) == "identical"
    counted = weight_difference(state, {**state, "network.bn1.num_batches_tracked": torch.tensor(9)})
    assert (counted["tensor"], counted["max_abs_diff"]) == ("network.bn1.num_batches_tracked", 1.0)  # int buffers too


def test_difference_helpers_treat_mismatches_as_differences(tmp_path):
    a = _history(tmp_path / "a.jsonl", [{"epoch": 1, "val/loss": 1.0}, {"epoch": 2, "val/loss": 0.5}])
    short = _history(tmp_path / "b.jsonl", [{"epoch": 1, "val/loss": 1.0}])
    result = history_difference(a, short)
    assert result["max_abs_diff"] == math.inf and "different epochs: [1, 2] vs [1]" in result["problem"]
    nan = _history(tmp_path / "c.jsonl", [{"epoch": 1, "val/loss": float("nan")}, {"epoch": 2, "val/loss": 0.5}])
    assert history_difference(nan, nan)["max_abs_diff"] == 0.0  # NaN on both sides is the same result
    assert history_difference(a, nan)["max_abs_diff"] == math.inf
    missing = weight_difference({"w": torch.zeros(2)}, {"w": torch.zeros(2), "extra": torch.zeros(1)})
    assert missing["max_abs_diff"] == math.inf and missing["tensor"] == "extra"
    reshaped = weight_difference({"w": torch.zeros(2)}, {"w": torch.zeros(1, 2)})
    assert reshaped["max_abs_diff"] == math.inf and "shape (2,) vs (1, 2)" in reshaped["problem"]
    assert verdict(history_difference(a, a), reshaped) == "differs"
    text = audit_text({"overrides": [], "folder": "/x", "verdict": "differs", "metrics": result, "weights": reshaped,
                       "determinism": {"trainer.deterministic": True, "torch_threads": 1, "seed": 0,
                                       "deterministic_algorithms": False}})
    assert "problem: the runs logged different epochs" in text and "verdict: differs" in text
