"""The airbench-style GPU recipe (conf/experiment/airbench.yaml) is correct on a CPU."""

from mlflow.tracking import MlflowClient

from cnnlab.config.compose import compose
from cnnlab.model.plan import model_plan
from cnnlab.train import train


def test_airbench_recipe_composes_as_written():
    cfg = compose(["experiment=airbench"])
    assert model_plan(cfg).analysis.total_params == 1_975_072
    assert (cfg.optim.name, cfg.optim.nesterov, cfg.optim.schedule, cfg.optim.label_smoothing) == (
        "sgd", True, "onecycle", 0.2)
    assert (cfg.data.batch_size, cfg.data.augment.crop_padding, cfg.data.augment.hflip) == (512, 2, True)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.checkpoint.monitor == "val/acc"


def test_airbench_recipe_trains_on_a_cpu(tmp_path):
    """A few batches of CIFAR-shaped synthetic data, in float32: the path a GPU run takes, minus bf16."""
    train(compose(["experiment=airbench", "data=synthetic", "data.shape=[3,32,32]", "data.num_classes=10",
                   "data.n_train=256", "data.n_test=64", "data.batch_size=64", "trainer.precision=32-true",
                   "trainer.accelerator=cpu", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
                   "tracking.log_model=false", f"paths.runs={tmp_path}"]))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name(
        "airbench: an airbench94-style recipe on CIFAR-10").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [1, 2]
    assert run.data.params["model.total_params"] == "1975072"
