"""`cnnlab evaluate RUN_ID [data overrides]`: a logged run's network on its test split, or on
other data of the same shape and classes: accuracy, per-class precision, recall and support, a
confusion matrix (CSV and PNG), logged back to the run under evaluate/.

Metrics are torchmetrics' (the library training's accuracy comes from). A class that is never
predicted has precision 0 (torchmetrics' zero_division default), stated under the table.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from cnnlab.errors import ConfigError
from cnnlab.serving.load import LoadedRun

if TYPE_CHECKING:
    import torch

# Artifacts go here in the run; evaluations on other data go to a subfolder named by the overrides.
ARTIFACT_FOLDER = "evaluate"
ACC_METRIC = "evaluate/acc"  # logged for the run's own test split only: one metric, one meaning


@dataclass
class Evaluation:
    run_id: str
    data: str                 # where the images came from (TensorData.source)
    classes: list[str]
    accuracy: float
    precision: list[float]    # per class
    recall: list[float]
    support: list[int]        # true images per class
    confusion: list[list[int]]  # [true][predicted]

    def text(self) -> str:
        width = max(len("class"), *(len(c) for c in self.classes))
        lines = [f"run {self.run_id} on {sum(self.support)} images of {self.data}",
                 f"accuracy {self.accuracy:.4f}", "",
                 f"{'class':<{width}}  precision  recall  support"]
        lines += [f"{c:<{width}}  {p:9.4f}  {r:6.4f}  {s:7d}"
                  for c, p, r, s in zip(self.classes, self.precision, self.recall, self.support)]
        if any(sum(row[j] for row in self.confusion) == 0 for j in range(len(self.classes))):
            lines.append("(a class never predicted has precision 0)")
        return "\n".join(lines)


def evaluation_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The run's config with data overrides applied: `data.KEY=VALUE` changes the run's own data
    config; `data=NAME` takes conf/data/NAME.yaml instead. Either way the data must have the
    run's shape and number of classes."""
    from cnnlab.config.compose import compose, container
    from cnnlab.config.schema import check_config
    from cnnlab.data.sources import user_cache_dir

    for override in overrides:
        if not override.startswith(("data.", "data=")):
            raise ConfigError(f"evaluate takes data overrides only (data.KEY=VALUE or data=NAME), "
                              f"got '{override}'")
    run, cfg = cfg, copy.deepcopy(cfg)  # the loaded run's own stays as logged
    group = [o for o in overrides if o.startswith("data=")]
    keys = [o for o in overrides if not o.startswith("data=")]
    if group:
        fresh = compose([*group, *keys])  # another data config, composed as cnnlab train would
        OmegaConf.set_struct(cfg, False)
        cfg.data = OmegaConf.create(container(fresh.data))
        OmegaConf.set_struct(cfg, True)
    else:
        cfg.merge_with(OmegaConf.from_dotlist(keys))
    # This user's decode cache, not the one the logged config resolved to (as cnnlab reproduce).
    cfg.merge_with(OmegaConf.from_dotlist([f"paths.cache={user_cache_dir()}"]))
    check_same_task(run, cfg.data)  # first: the schema's complaints about such data would hide it
    check_config(container(cfg))
    return cfg


def check_same_task(run: DictConfig, data: DictConfig) -> None:
    """The data must have the shape and the number of classes the network was trained on."""
    trained = (list(run.data.shape), int(run.data.num_classes))
    given = (list(data.shape), int(data.num_classes))
    if trained != given:
        raise ConfigError(f"data {data.name} has shape {given[0]} and {given[1]} classes but the run's network "
                          f"was trained on {run.data.name}: shape {trained[0]}, {trained[1]} classes")


def evaluate(loaded: LoadedRun, overrides: list[str]) -> tuple[Evaluation, torch.Tensor, torch.Tensor]:
    """The evaluation, the predicted labels and the true labels."""
    from cnnlab.config.compose import container
    from cnnlab.data.sources import load_dataset

    cfg = evaluation_config(loaded.config, overrides)
    data = load_dataset(container(cfg.data), Path(cfg.paths.cache), cfg.seed)
    if list(data.classes) != list(loaded.classes):
        raise ConfigError(f"data {data.source} has classes {list(data.classes)} but the run's network "
                          f"was trained on classes {list(loaded.classes)}")
    predicted = predict_labels(loaded, data.test_x, int(cfg.data.eval_batch_size))
    return figures(predicted, data.test_y, loaded.classes, loaded.run_id, data.source), predicted, data.test_y


def figures(predicted: torch.Tensor, target: torch.Tensor, classes: list[str], run_id: str,
            source: str) -> Evaluation:
    """Accuracy, per-class precision, recall and support, and the confusion matrix (torchmetrics)."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_confusion_matrix,
        multiclass_precision,
        multiclass_recall,
    )

    k = len(classes)
    confusion = multiclass_confusion_matrix(predicted, target, k)  # [true, predicted]
    return Evaluation(
        run_id, source, list(classes),
        float(multiclass_accuracy(predicted, target, k, average="micro")),
        multiclass_precision(predicted, target, k, average=None).tolist(),
        multiclass_recall(predicted, target, k, average=None).tolist(),
        confusion.sum(dim=1).tolist(), confusion.tolist())


def predict_labels(loaded: LoadedRun, images, batch_size: int):
    """Arg-max labels of (N, C, H, W) uint8 images, in batches."""
    import torch

    labels = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size].permute(0, 2, 3, 1)  # (B, H, W, C), as served
            labels.append(loaded.network(loaded.preprocess(chunk)).argmax(dim=1))
    return torch.cat(labels)


def write_files(result: Evaluation, folder: Path) -> list[Path]:
    """confusion_matrix.csv and .png, per_class.csv."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    confusion = pd.DataFrame(result.confusion, index=pd.Index(result.classes, name="true \\ predicted"),
                             columns=result.classes)
    per_class = pd.DataFrame({"class": result.classes, "precision": result.precision,
                              "recall": result.recall, "support": result.support})
    paths = [folder / "confusion_matrix.csv", folder / "per_class.csv", folder / "confusion_matrix.png"]
    confusion.to_csv(paths[0])
    per_class.to_csv(paths[1], index=False)
    plot_confusion(result, paths[2])
    return paths


def plot_confusion(result: Evaluation, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    k = len(result.classes)
    size = min(4 + 0.45 * k, 20)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(result.confusion, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(k), result.classes, rotation=90 if k > 6 else 0)
    ax.set_yticks(range(k), result.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {result.accuracy:.4f}, {sum(result.support)} images")
    if k <= 30:  # counts stay readable
        top = max(max(row) for row in result.confusion) or 1
        for i, row in enumerate(result.confusion):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                        color="white" if count > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def artifact_folder(overrides: list[str]) -> str:
    from cnnlab.config.compose import slug

    return ARTIFACT_FOLDER if not overrides else f"{ARTIFACT_FOLDER}/{slug(' '.join(overrides))}"


def log_to_run(reader, result: Evaluation, files: list[Path], overrides: list[str]) -> str:
    """The files under evaluate/ (evaluate/<overrides>/ for other data); evaluate/acc for the
    run's own test split."""
    folder = artifact_folder(overrides)
    for path in files:
        reader.attach(result.run_id, path, folder)
    if not overrides:  # a new metric beside the run's own, which it never changes
        reader.client.log_metric(result.run_id, ACC_METRIC, result.accuracy)
    return folder
