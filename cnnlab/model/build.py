"""Analysed specs -> a torch nn.Sequential that matches Keras numerically.

The analysis already knows every layer's input size, so `same` padding is
fixed here once: symmetric padding uses PyTorch's own (fast) padding,
asymmetric padding (stride > 1 or even kernels; TensorFlow puts the extra
pixel bottom/right) pads explicitly. Max pooling pads with -inf so padding
never wins; average pooling with `same` divides by the number of real pixels
under each window, as TensorFlow does.

Module names are `<kind><index>` (conv0, bn1, dense6...), so a weight's name
in `weights.txt` points at its row in the summary.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.model.shapes import Analysis, LayerInfo
from cnnlab.model.spec import Activation, BatchNorm, Conv, Dense, Dropout, Flatten, GlobalAvgPool, Pool


def torch_pads(padding: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    top, bottom, left, right = padding
    return (left, right, top, bottom)  # F.pad's order: last dim first


def is_symmetric(padding: tuple[int, int, int, int]) -> bool:
    top, bottom, left, right = padding
    return top == bottom and left == right


class PaddedConv2d(nn.Conv2d):
    """Conv2d after explicit (possibly asymmetric) zero padding."""

    def __init__(self, *args, pads: tuple[int, int, int, int], **kwargs):
        super().__init__(*args, padding=0, **kwargs)
        self.pads = pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pads))


def tile_max(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """The max of each kh x kw tile (tiles side by side, rows and columns past the last whole
    tile dropped, as max pooling with stride == kernel does): elementwise maxima of strided
    views, which vectorise, where the CPU's max_pool2d walks each window with its index."""
    ho, wo = x.shape[-2] // kh, x.shape[-1] // kw
    rows = x[..., 0:ho * kh:kh, :wo * kw]
    for i in range(1, kh):
        rows = torch.maximum(rows, x[..., i:ho * kh:kh, :wo * kw])  # (..., Ho, Wo * kw)
    out = rows[..., 0::kw]
    for j in range(1, kw):
        out = torch.maximum(out, rows[..., j::kw])
    return out  # (..., Ho, Wo)


class _TileMax(torch.autograd.Function):
    """tile_max with max_pool2d's gradient: all of a tile's gradient goes to its first maximum
    in row-major order (ties included), found again in backward from the saved input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
        out = tile_max(x, kh, kw)
        ctx.save_for_backward(x, out)
        ctx.kernel = (kh, kw)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, out = ctx.saved_tensors
        kh, kw = ctx.kernel
        ho, wo = out.shape[-2:]
        grad_x = torch.zeros_like(x)
        taken = None  # tiles whose first maximum has been found
        for i in range(kh):
            for j in range(kw):
                at = (..., slice(i, ho * kh, kh), slice(j, wo * kw, kw))
                wins = x[at] == out
                if taken is None:
                    taken = wins
                else:
                    wins = wins & ~taken
                    taken |= wins
                grad_x[at] = grad * wins
        return grad_x, None, None


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d, faster where its windows tile the input (kernel == stride, no padding, no
    dilation, floor mode; the chapter's MaxPool2D(2, 2) is one): 0.53 vs 0.95 ms forward and
    backward on the baseline's (32, 6, 32, 32) at 1 thread (benchmarks/step_parts.py). The output and the
    gradient are exactly max_pool2d's, ties included (tests/test_build.py); only a window holding
    a NaN differs (its gradient is zero), and a NaN there makes the loss NaN, which stops a run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel, stride = _pair(self.kernel_size), _pair(self.stride or self.kernel_size)
        if (kernel != stride or _pair(self.padding) != (0, 0) or _pair(self.dilation) != (1, 1)
                or self.ceil_mode or self.return_indices
                # torch.compile and torch.export (the logged pt2 model) get torch's own op: a
                # portable graph, and the compiler generates its own fast pooling.
                or torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            return super().forward(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _TileMax.apply(x, *kernel)
        return tile_max(x, *kernel)


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class PaddedMaxPool2d(MaxPool2d):
    """MaxPool2d after -inf padding: a padded pixel never wins the max."""

    def __init__(self, *args, pads: tuple[int, int, int, int], **kwargs):
        super().__init__(*args, padding=0, **kwargs)
        self.pads = pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pads, value=float("-inf")))


class PaddedAvgPool2d(nn.Module):
    """TensorFlow's `same` average pooling: the mean over the real pixels of each window."""

    def __init__(self, kernel: tuple[int, int], stride: tuple[int, int],
                 pads: tuple[int, int, int, int], in_hw: tuple[int, int]):
        super().__init__()
        self.kernel, self.stride, self.pads = kernel, stride, pads
        ones = F.pad(torch.ones(1, 1, *in_hw), pads)
        real = F.avg_pool2d(ones, kernel, stride)  # fraction of real pixels per window
        self.register_buffer("real_fraction", real, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.pad(x, self.pads), self.kernel, self.stride) / self.real_fraction

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel}, stride={self.stride}, pads={self.pads}"


class GlobalAvgPool2d(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)


def activation_module(name: str) -> nn.Module:
    return {
        "relu": nn.ReLU,
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "softmax": lambda: nn.Softmax(dim=1),
        "linear": nn.Identity,
    }[name]()


def _conv(layer: LayerInfo, spec: Conv) -> nn.Module:
    args = dict(in_channels=layer.input_shape[0], out_channels=spec.filters,
                kernel_size=spec.kernel, stride=spec.stride, bias=spec.bias)
    if is_symmetric(layer.padding):
        return nn.Conv2d(**args, padding=(layer.padding[0], layer.padding[2]))
    return PaddedConv2d(**args, pads=torch_pads(layer.padding))


def pool_module(layer: LayerInfo, spec: Pool) -> nn.Module:
    symmetric = is_symmetric(layer.padding)
    sym_pad = (layer.padding[0], layer.padding[2])
    if spec.kind == "max":
        if symmetric:
            return MaxPool2d(spec.size, spec.stride, padding=sym_pad)
        return PaddedMaxPool2d(spec.size, spec.stride, pads=torch_pads(layer.padding))
    if symmetric:
        # count_include_pad=False divides by the real pixels, like TensorFlow.
        return nn.AvgPool2d(spec.size, spec.stride, padding=sym_pad, count_include_pad=False)
    return PaddedAvgPool2d(spec.size, spec.stride, torch_pads(layer.padding),
                           layer.input_shape[1:])


def _layer_modules(layer: LayerInfo, bn_momentum: float, bn_eps: float):
    """(name, module) pairs for one spec; a fused activation gets its own module."""
    spec, name = layer.spec, f"{type(layer.spec).__name__.lower()}{layer.index}"
    match spec:
        case Conv():
            yield f"conv{layer.index}", _conv(layer, spec)
        case Dense():
            yield f"dense{layer.index}", nn.Linear(layer.input_shape[0], spec.units, bias=spec.bias)
        case Pool():
            yield f"{spec.kind}pool{layer.index}", pool_module(layer, spec)
        case BatchNorm():
            # Keras's momentum m keeps m of the old statistic; PyTorch's keeps 1 - m.
            cls = nn.BatchNorm2d if len(layer.input_shape) == 3 else nn.BatchNorm1d
            yield f"bn{layer.index}", cls(layer.input_shape[0], eps=bn_eps, momentum=1 - bn_momentum)
        case Activation():
            yield f"{spec.name}{layer.index}", activation_module(spec.name)
        case Dropout():
            yield name, nn.Dropout(spec.rate)
        case Flatten():
            yield name, nn.Flatten()
        case GlobalAvgPool():
            yield f"gap{layer.index}", GlobalAvgPool2d()
    activation = getattr(spec, "activation", None)
    if isinstance(spec, (Conv, Dense)) and activation:
        yield f"{name}_{activation}", activation_module(activation)


def ends_in_softmax(analysis: Analysis) -> bool:
    last = analysis.layers[-1].spec
    return (isinstance(last, Activation) and last.name == "softmax") or (
        isinstance(last, Dense) and last.activation == "softmax")


def init_keras(module: nn.Module) -> None:
    """Keras's defaults: Glorot-uniform kernels, zero biases (BN: gamma 1, beta 0, as torch)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)  # fans: k*k*in and k*k*out, as Keras
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build(analysis: Analysis, init: str = "keras", bn_momentum: float = 0.99,
          bn_eps: float = 1e-3, logits: bool = False) -> nn.Sequential:
    """Build the network the analysis describes.

    With `logits=True` a final softmax is left out, so training can use
    cross-entropy on logits (numerically safer); prediction applies it. `init`, `bn_momentum`
    and `bn_eps` come checked (cnnlab.config.schema: model.init, model.bn_momentum, model.bn_eps).
    """
    modules = [pair for layer in analysis.layers
               for pair in _layer_modules(layer, bn_momentum, bn_eps)]
    if logits and ends_in_softmax(analysis):
        modules = modules[:-1]
    network = nn.Sequential(OrderedDict(modules))
    if init == "keras":
        init_keras(network)
    return network
