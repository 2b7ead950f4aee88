"""`cnnlab train` restarts itself once with glibc malloc settings (cnnlab/training/allocator.py)."""

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from cnnlab.training.allocator import SETTINGS, SWITCH

TINY = ["data=synthetic", "model.widths=[4]", "model.dense=[8]", "trainer.accelerator=cpu",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "tracking.log_model=false"]


def _malloc_tag(tmp_path, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in SETTINGS and k != SWITCH}
    done = subprocess.run([sys.executable, "-m", "cnnlab.cli", "train", *TINY, f"paths.runs={tmp_path}"],
                          capture_output=True, text=True, env={**clean, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return run.data.tags["malloc"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")
def test_training_runs_with_the_malloc_settings_and_says_so(tmp_path):
    assert _malloc_tag(tmp_path) == "MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=268435456"


def test_the_malloc_settings_can_be_switched_off(tmp_path):
    assert _malloc_tag(tmp_path, **{SWITCH: "0"}) == "glibc defaults"
