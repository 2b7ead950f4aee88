"""The experiment's shared names, in one place: metrics, their direction, and which config
keys are not "what is trained".

Training logs these metrics, checkpoints follow one of them, compare and report aggregate
them, reproduce checks them; run names, the config hash, compare's variant grouping and
Hydra's `override_dirname.exclude_keys` all apply the one rule below. Nothing here imports
torch, Lightning or MLflow.
"""

from __future__ import annotations

# Logged once per epoch (MLflow step = epoch, 1-based), in the order the console prints them.
EPOCH_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best")
# The learning rate each epoch trained with (the first param group's): logged with every epoch's
# row, but not a result (no direction, not monitored, not compared by reproduce or compare).
LEARNING_RATE = "train/lr"
# Logged once, after fitting, for the checkpoint that was tested.
TEST_METRICS = ("test/loss", "test/acc")
# Seconds an epoch took; logged with every epoch's row, so its steps say which epochs MLflow has.
EPOCH_TIME = "time/epoch_s"
ALL_METRICS = EPOCH_METRICS + TEST_METRICS

# Which way is better, for every metric (checkpoint mode, plots, "better"/"worse" decisions).
DIRECTION = {name: "min" if name.endswith("loss") else "max" for name in ALL_METRICS}

# What ModelCheckpoint may follow: only metrics logged every epoch exist when it runs.
MONITORS = EPOCH_METRICS
# The metrics compare and report aggregate over seeds, and the default one they test.
COMPARED_METRICS = ("val/acc_best", "test/acc")
DEFAULT_COMPARED = "val/acc_best"

# Config keys (dotted; a trailing dot is a whole group) that say where things live or how a
# run is shown, not what is trained. They are left out of the config hash, the run name and
# folder, and the knobs compare groups runs by.
NOT_TRAINED = ("paths.", "tracking.", "ablation.", "run.", "ckpt_path", "trainer.enable_progress_bar",
               "trainer.threads", "trainer.max_macs", "data.root", "data.archive", "data.download", "hydra.")
# Trained, but a longer run continues the same one: the same command with more epochs resumes
# its run folder instead of starting a new run, so it is left out of names and folders too.
CONTINUES_RUN = ("trainer.max_epochs",)
# Params derived from the knobs (shown as their own columns), and the replicate index.
DERIVED = ("model.total_params", "model.trainable_params", "model.macs", "model.receptive_field",
           "model.layers_expanded", "data.fingerprint", "data.source")
REPLICATE = "seed"
# Tags of runs that check another run rather than replicate it: compare leaves them out.
REPRODUCES_TAG = "reproduces"  # = the run id reproduced (cnnlab reproduce)
TORCH_THREADS_TAG = "torch.threads"  # the CPU threads a run trained with: reproduce uses the same
AUDIT_TAG = "audit"  # = which of the audit's two runs (cnnlab audit)
CHECK_TAGS = (REPRODUCES_TAG, AUDIT_TAG)
# A registered model's factory: its source file and the file's sha256 when it trained (reproduce
# refuses when the file has changed since).
MODEL_SOURCE_TAG = "model.source_file"
MODEL_SOURCE_HASH_TAG = "model.source_sha256"


def _matches(key: str, rules: tuple[str, ...]) -> bool:
    return any(key == rule.rstrip(".") or (rule.endswith(".") and key.startswith(rule)) for rule in rules)


def is_trained(key: str) -> bool:
    """Does this config key change what is trained (and so the config hash)?"""
    return not _matches(key, NOT_TRAINED)


def in_run_name(key: str) -> bool:
    """Does an override of this key name a different run (and run folder)?"""
    return is_trained(key) and not _matches(key, CONTINUES_RUN)


def is_knob(key: str) -> bool:
    """Can runs that differ in this param be different variants in compare?"""
    return is_trained(key) and not _matches(key, DERIVED) and key != REPLICATE
