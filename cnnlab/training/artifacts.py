"""Files a run leaves behind (as the chapter's Keras program did: weights.txt, curves.png) and their logging."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def write_weights(network: nn.Module, path: Path) -> None:
    """Every trainable variable: name, shape and all of its values (the chapter's dump)."""
    with open(path, "w") as out:
        for name, param in network.named_parameters():
            if not param.requires_grad:
                continue
            values = param.detach().cpu()
            if values.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds each value exactly
                values = values.float()
            values = values.numpy()
            out.write(f"{name} shape={tuple(values.shape)}\n")
            # One line per last-axis row. savetxt, not array2string: 30x faster on the
            # baseline's 198k values (2 s per run otherwise).
            rows = values.reshape(-1, values.shape[-1]) if values.ndim > 1 else values[None]
            np.savetxt(out, rows, fmt="%.9g", delimiter=", ")  # 9 digits round-trip float32
            out.write("\n")


def read_history(path: Path) -> list[dict]:
    """Per-epoch metrics written by `EpochHistory`, one JSON object a line."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_history(rows: list[dict], path: Path) -> None:
    """Rewrite atomically: a kill mid-write never leaves a half line behind."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


def plot_curves(rows: list[dict], path: Path, title: str = "") -> None:
    """The chapter's two panels: accuracy and loss, train and validation, per epoch."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("acc", "loss")):
        for stage, style in (("train", "o-"), ("val", "s--")):
            values = [row.get(f"{stage}/{metric}") for row in rows]
            ax.plot(epochs, values, style, label=f"{stage}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy" if metric == "acc" else "loss")
        ax.set_title(f"{'Accuracy' if metric == 'acc' else 'Loss'} {title}".strip())
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# classes.json: the data's class names in label order, so a run's model is served without its data.
CLASSES_FILE = "classes.json"
RUN_FILES = ("summary.txt", "summary.json", "config.yaml", "curves.png", "history.jsonl", CLASSES_FILE)
WEIGHTS_FILE = "weights.txt"  # only where tracking.weights_txt asks for it (wants_weights_txt)
BASELINE_MODEL = "baseline"  # conf/model/baseline.yaml: the chapter's model, which dumped weights.txt


def wants_weights_txt(setting: bool | str, model: Mapping[str, Any]) -> bool:
    """tracking.weights_txt: true, false, or auto = only for the chapter's baseline model exactly as
    conf/model/baseline.yaml defines it (the chapter's dump; 2.9 MB of text for its 198k weights,
    more for bigger models, and a variant's weights are in its checkpoints anyway)."""
    if setting != "auto":
        return bool(setting)
    from omegaconf import OmegaConf

    from cnnlab.config.compose import CONF_DIR

    baseline = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{BASELINE_MODEL}.yaml"))
    return dict(model) == baseline


def write_run_files(run_dir: Path, plan, network: nn.Module, config_yaml: str, classes: list[str],
                    weights_txt: bool) -> None:
    """Everything a finished run leaves in its directory, besides checkpoints."""
    from cnnlab.model.summary import summary_dict, summary_text

    (run_dir / CLASSES_FILE).write_text(json.dumps(list(classes)) + "\n")
    (run_dir / "summary.txt").write_text(summary_text(plan) + "\n")
    (run_dir / "summary.json").write_text(json.dumps(summary_dict(plan), indent=2) + "\n")
    (run_dir / "config.yaml").write_text(config_yaml)
    if weights_txt:
        write_weights(network, run_dir / WEIGHTS_FILE)
    else:  # one a resumed run wrote before, with the setting on, is not this run's last word
        (run_dir / WEIGHTS_FILE).unlink(missing_ok=True)
    plot_curves(read_history(run_dir / "history.jsonl"), run_dir / "curves.png", plan.name)


def log_run_files(tracker, run_dir: Path) -> None:
    """The run directory's files, Hydra's .hydra/ and the best/last checkpoints, to MLflow."""
    for name in RUN_FILES:
        tracker.log_artifact(run_dir / name)
    if (run_dir / WEIGHTS_FILE).is_file():
        tracker.log_artifact(run_dir / WEIGHTS_FILE)
    if (run_dir / ".hydra").is_dir():
        tracker.log_artifact(run_dir / ".hydra", "hydra")
    for name in ("best.ckpt", "last.ckpt"):
        if (run_dir / "checkpoints" / name).is_file():
            tracker.log_artifact(run_dir / "checkpoints" / name, "checkpoints")


def log_pytorch_model(tracker, network: nn.Module, datamodule, plan) -> None:
    """The final model in MLflow's pytorch flavour (pt2: no pickle), with a signature, in float32.

    It returns probabilities when the layer list ends in softmax, like Keras's model.
    """
    import copy

    import mlflow
    import torch
    from mlflow.models import infer_signature

    # In float32, as served (images become float32 tensors): a bf16-true or 64-true run's weights would
    # refuse a float32 input, and numpy, which the signature and example go through, has no bfloat16.
    model = copy.deepcopy(network).cpu().float().eval()
    if plan.ends_in_softmax:
        model = torch.nn.Sequential(model, torch.nn.Softmax(dim=1))
    x = next(iter(datamodule.test_dataloader()))[0][:2].cpu()
    with torch.no_grad():
        y = model(x)
    mlflow.set_tracking_uri(tracker.uri)
    with mlflow.start_run(run_id=tracker.run_id):
        mlflow.pytorch.log_model(
            model, name="model", signature=infer_signature(x.numpy(), y.numpy()),
            input_example=x.numpy(), serialization_format="pt2",
            # Given, not inferred: inference took 14.7 s for a tiny model on these machines.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            # MLflow would load the saved model back and predict the input example (0.3 s
            # and more per run, BENCHMARKS.md); tests/test_train.py checks the logged model
            # predicts like the trained one instead.
            validate_serving_input=False)
