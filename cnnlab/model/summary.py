"""Keras-style model summary (table and JSON), computed from the analysis alone.

The table shows maps channels-last (16x16x6), as Keras's `model.summary()`
does; the JSON lists shapes as (C, H, W), PyTorch's layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cnnlab.model.plan import ModelPlan
from cnnlab.model.shapes import ReceptiveField, format_shape, layer_text

if TYPE_CHECKING:
    from cnnlab.training.budget import MemoryEstimate


def _pair(values) -> str:
    a, b = values
    return f"{a:g}" if a == b else f"{a:g}x{b:g}"


def _rf_text(rf: ReceptiveField | None) -> str:
    return "-" if rf is None else f"{_pair(rf.size)} /{_pair(rf.jump)}"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-" * len(line(header))
    return [rule, line(header), rule, *map(line, rows), "=" * len(rule)]


def module_summary_text(plan: ModelPlan) -> str:
    """An opaque module's summary: its top-level children, the measured totals, no receptive field."""
    counts = plan.module.counts
    rows = [(name, kind, f"{params:,}", f"{macs:,}") for name, kind, params, macs in counts.children]
    return "\n".join([
        f'Model: "{plan.name}"   input {format_shape(plan.input_shape)}',
        f"Module: {plan.description} ({plan.module.class_name}; measured by a forward pass on the meta device)",
        *_table(("Child", "Class", "Params", "MACs"), rows, {2, 3}),
        f"Output shape: {format_shape(counts.output_shape)}",
        f"Total params: {plan.total_params:,}",
        f"Trainable params: {plan.trainable:,}",
        f"Non-trainable params: {plan.non_trainable:,} (BatchNorm moving mean/variance, frozen parameters)",
        f"PyTorch parameters: {plan.torch_parameters:,} (PyTorch keeps BN moving statistics as buffers)",
        f"Total MACs: {plan.macs:,} (FlopCounterMode: convolutions and matmuls; FLOPs = 2 x MACs)",
        "Receptive field: n/a (an opaque module)",
    ])


def summary_text(plan: ModelPlan, memory: MemoryEstimate | None = None) -> str:
    """The table; `memory`, when given, adds the training run's estimated peak memory."""
    if plan.module is not None:
        return module_summary_text(plan) + (f"\nEstimated training memory: {memory.text()}" if memory else "")
    a = plan.analysis
    rows = [(str(layer.index), layer_text(layer), format_shape(layer.output_shape),
             f"{layer.params:,}", f"{layer.macs:,}", _rf_text(layer.rf)) for layer in a.layers]
    header = ("#", "Layer", "Output shape", "Params", "MACs", "RF /jump")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {0, 3, 4}

    def line(cells) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-" * len(line(header))
    rf = a.receptive_field
    out = [
        f'Model: "{plan.name}"   input {format_shape(a.input_shape)}',
        "Layers: [" + ", ".join(plan.tokens) + "]",
        rule, line(header), rule, *map(line, rows), "=" * len(rule),
        f"Total params: {a.total_params:,}",
        f"Trainable params: {a.trainable:,}",
        f"Non-trainable params: {a.non_trainable:,} (BatchNorm moving mean/variance)",
        f"PyTorch parameters: {a.trainable:,} (PyTorch keeps BN moving statistics as buffers)",
        f"Total MACs: {a.macs:,} (FLOPs = 2 x MACs)",
        f"Receptive field: {_pair(rf.size)} pixels, jump {_pair(rf.jump)}",
        *([f"Estimated training memory: {memory.text()}"] if memory else []),
    ]
    return "\n".join(out)


def summary_dict(plan: ModelPlan) -> dict:
    if plan.module is not None:
        return {"name": plan.name, "kind": plan.kind, "description": plan.description,
                "input_shape": list(plan.input_shape), "output_shape": list(plan.output_shape),
                "children": [{"name": n, "class": c, "params": p, "macs": m}
                             for n, c, p, m in plan.module.counts.children],
                "total_params": plan.total_params, "trainable_params": plan.trainable,
                "non_trainable_params": plan.non_trainable, "torch_parameters": plan.torch_parameters,
                "macs": plan.macs, "flops": 2 * plan.macs, "receptive_field": None}
    return {"name": plan.name, "tokens": plan.tokens, **plan.analysis.as_dict()}
