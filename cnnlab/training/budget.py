"""What a run will need, from the config and the model plan alone: memory and compute.

A config that cannot fit (`model.widths=[100000]`, a dense layer of 1e9 units, a billion
synthetic images) used to start anyway and be killed by the kernel, or end in an allocator
traceback, sometimes with an MLflow run left RUNNING. Every tensor's shape is known before
anything is allocated (cnnlab.model.shapes), so the run's peak memory is estimated here and a
run that cannot fit is refused in one line before Hydra writes anything.

The estimate is an upper bound of the usual kind (as torchinfo's "estimated total size"):

    data         synthetic data: the uint8 train and test tensors, plus the float32
                 temporaries of the larger split while it is drawn (3 tensors of 4 bytes);
                 other data is decoded from files whose size the config does not say
    weights      parameters + gradients + the optimizer's state (Adam 2 slots per parameter,
                 SGD with momentum 1), and BatchNorm's moving statistics, float32
    activations  one training batch: every layer's output kept for the backward pass, a
                 fused activation's output and a residual block's inner tensors too, and the
                 gradient of the largest output: 3 float32 values per output element.
                 benchmarks/memory_estimate.py measures two Adam steps on the CPU: the estimate
                 of weights + activations was 1.75x (resnet) to 2.8x (vgg) the measured peak

The limit is the memory available now (psutil: RAM not in use, page cache counted as free);
with a GPU accelerator, the weights and activations are compared with the GPU's memory.
Compute: `trainer.max_macs` bounds the multiply-accumulates per image of the network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cnnlab.errors import ConfigError
from cnnlab.model.plan import ModelPlan
from cnnlab.model.spec import Residual

FLOAT = 4  # bytes of a float32: weights, gradients, optimizer state and activations
SAVED_PER_OUTPUT = 3  # float32 values per layer output element in a training step (see above)


@dataclass(frozen=True)
class MemoryEstimate:
    data: int  # bytes
    weights: int
    activations: int
    batch_size: int
    optimizer: str
    opaque: bool = False  # an opaque module (torchvision, registered): its activations are not known

    @property
    def model(self) -> int:
        """What lives on the training device besides the data."""
        return self.weights + self.activations

    @property
    def total(self) -> int:
        return self.data + self.model

    def text(self) -> str:
        data = f"data {human(self.data)}, " if self.data else ""
        activations = ("activations not estimated (an opaque module)" if self.opaque
                       else f"activations at batch size {self.batch_size} {human(self.activations)}")
        return (f"{human(self.total)} ({data}parameters, gradients and {self.optimizer} state "
                f"{human(self.weights)}, {activations})")


def human(n: float) -> str:
    """Bytes in binary units: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _optimizer_slots(optim: Mapping[str, Any]) -> int:
    if optim["name"] in ("adam", "adamw"):
        return 2  # exp_avg, exp_avg_sq
    return 1 if optim["momentum"] else 0  # sgd's momentum buffer


def _kept_outputs(spec: Any) -> int:
    """Tensors of the layer's output size kept for the backward pass."""
    if isinstance(spec, Residual):  # two convs, BNs and activations, the shortcut: some share storage
        return 4
    return 2 if getattr(spec, "activation", None) not in (None, "linear") else 1  # a fused activation


def estimate_memory(plan: ModelPlan, data: Mapping[str, Any], optim: Mapping[str, Any]) -> MemoryEstimate:
    """Peak memory of one training run, before anything is allocated."""
    values = 1
    for d in data["shape"]:
        values *= int(d)
    data_bytes = 0
    if data["name"] == "synthetic":
        n_train, n_test = int(data["n_train"]), int(data["n_test"])
        data_bytes = (n_train + n_test) * values + max(n_train, n_test) * values * 3 * FLOAT
    slots = _optimizer_slots(optim)
    weights = FLOAT * (plan.trainable * (2 + slots) + plan.non_trainable)
    batch = int(data["batch_size"])
    if plan.analysis is None:  # an opaque module: only its totals were measured
        return MemoryEstimate(data_bytes, weights, 0, batch, str(optim["name"]), opaque=True)
    outputs = 0
    largest = values
    for layer in plan.analysis.layers:
        size = 1
        for d in layer.output_shape:
            size *= d
        outputs += size * _kept_outputs(layer.spec)
        largest = max(largest, size)
    activations = FLOAT * batch * (values + SAVED_PER_OUTPUT * outputs + largest)
    return MemoryEstimate(data_bytes, weights, activations, batch, str(optim["name"]))


def available_memory(trainer: Mapping[str, Any]) -> tuple[int, int | None, str]:
    """(RAM available, the GPU's memory or None, what the GPU is) for the run's accelerator."""
    import psutil

    ram = psutil.virtual_memory().available
    if trainer["accelerator"] in ("gpu", "cuda"):
        import torch

        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info()
            return ram, free, f"GPU {torch.cuda.get_device_name()}"
    return ram, None, ""


def check_budget(plan: ModelPlan, data: Mapping[str, Any], optim: Mapping[str, Any],
                 trainer: Mapping[str, Any]) -> MemoryEstimate:
    """Refuse, in one line naming the estimate and the limit, a run that cannot fit in memory
    or whose network costs more than trainer.max_macs per image."""
    estimate = estimate_memory(plan, data, optim)
    ram, gpu, gpu_name = available_memory(trainer)
    if gpu is not None:
        needs = [(estimate.data, ram, "memory available"), (estimate.model, gpu, f"free on the {gpu_name}")]
    else:
        needs = [(estimate.total, ram, "memory available")]
    for need, have, where in needs:
        if need > have:
            raise ConfigError(
                f"the run needs about {estimate.text()} but this machine has {human(have)} {where}; "
                f"use a smaller model (model.widths, model.dense, model.layers), data.batch_size"
                f"{', data.shape or data.n_train' if estimate.data else ''}")
    macs = plan.macs
    if macs > trainer["max_macs"]:
        heaviest = ("" if plan.analysis is None else " (layer {0.index}: {0.macs:.3g})".format(
            max(plan.analysis.layers, key=lambda layer: layer.macs)))
        raise ConfigError(
            f"the network costs {macs:.3g} multiply-accumulates per image{heaviest} but trainer.max_macs="
            f"{trainer['max_macs']:.3g}; an epoch would take hours. Use smaller kernels or widths, or raise "
            "trainer.max_macs if you mean it")
    return estimate
