"""The memory and compute estimate that refuses a run before anything is allocated."""

from __future__ import annotations

import pytest

from cnnlab.config.compose import compose, container
from cnnlab.errors import ConfigError
from cnnlab.model.plan import model_plan
from cnnlab.training import budget

TINY = ["data=synthetic", "data.shape=[3,8,8]", "data.n_train=100", "data.n_test=20", "data.batch_size=10",
        "model=custom", "model.layers=[conv:4:3:same:relu,flatten,dense:2:softmax]", "data.num_classes=2"]


def _parts(args: list[str]):
    cfg = compose([*TINY, *args])
    return model_plan(cfg), container(cfg.data), container(cfg.optim), container(cfg.trainer)


def test_the_estimate_counts_data_weights_state_and_activations_by_hand():
    plan, data, optim, trainer = _parts(["optim=adam"])
    estimate = budget.estimate_memory(plan, data, optim)
    conv = 3 * 3 * 3 * 4 + 4  # 3x3 kernels from 3 to 4 channels, biases
    dense = 4 * 8 * 8 * 2 + 2
    assert plan.analysis.trainable == conv + dense
    assert estimate.weights == 4 * (conv + dense) * (1 + 1 + 2)  # weights, gradients, Adam's two moments
    image = 3 * 8 * 8
    # uint8 train + test, and three float32 temporaries of the 100 training images while they are drawn
    assert estimate.data == 120 * image + 100 * image * 12
    # per image: the input, 3 x (conv and dense outputs kept twice (their relu, softmax), flatten's once),
    # the largest output
    per_image = image + 3 * (2 * 256 + 256 + 2 * 2) + 256
    assert estimate.activations == 4 * 10 * per_image
    sgd = budget.estimate_memory(plan, data, container(compose([*TINY, "optim=sgd"]).optim))
    assert sgd.weights == 4 * (conv + dense) * 3  # one momentum buffer
    assert sgd.weights < estimate.weights


def test_a_run_that_cannot_fit_is_refused_naming_the_estimate_and_the_memory(monkeypatch):
    plan, data, optim, trainer = _parts([])
    needed = budget.estimate_memory(plan, data, optim).total
    monkeypatch.setattr(budget, "available_memory", lambda trainer: (needed - 1, None, ""))
    with pytest.raises(ConfigError) as refused:
        budget.check_budget(plan, data, optim, trainer)
    assert "the run needs about" in str(refused.value)
    assert f"{budget.human(needed - 1)} memory available" in str(refused.value)
    monkeypatch.setattr(budget, "available_memory", lambda trainer: (needed, None, ""))
    assert budget.check_budget(plan, data, optim, trainer).total == needed
    # With a GPU the model goes there: the RAM holds only the data.
    estimate = budget.estimate_memory(plan, data, optim)
    monkeypatch.setattr(budget, "available_memory",
                        lambda trainer: (estimate.data, estimate.model - 1, "GPU test"))
    with pytest.raises(ConfigError, match="free on the GPU test"):
        budget.check_budget(plan, data, optim, trainer)


def test_max_macs_bounds_the_compute_and_can_be_raised():
    args = ["model.layers=[conv:8:2001:same,gap,dense:2:softmax]", "data.shape=[3,16,16]"]
    plan, data, optim, trainer = _parts(args)
    assert plan.analysis.macs == 16 * 16 * 8 * 2001 * 2001 * 3 + 8 * 2  # the conv and the dense layer
    with pytest.raises(ConfigError, match=r"2\.46e\+10 multiply-accumulates per image.*trainer\.max_macs=1e\+10"):
        budget.check_budget(plan, data, optim, trainer)
    plan, data, optim, trainer = _parts([*args, "trainer.max_macs=1e11"])
    budget.check_budget(plan, data, optim, trainer)


def test_the_summary_shows_the_estimate(capsys):
    from cnnlab.cli import main

    assert main(["summary", *TINY]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    plan, data, optim, _ = _parts([])
    assert line == f"Estimated training memory: {budget.estimate_memory(plan, data, optim).text()}"
    assert "activations at batch size 10" in line and "adam state" in line


def test_human_sizes():
    assert budget.human(512) == "512 B"
    assert budget.human(1536) == "1.5 KiB"
    assert budget.human(3 * 1024**4) == "3.0 TiB"
