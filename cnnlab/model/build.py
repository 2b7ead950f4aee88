"""Analysed specs -> a torch nn.Sequential that matches Keras numerically.

The analysis already knows every layer's input size, so `same` padding is
fixed here once: symmetric padding uses PyTorch's own (fast) padding,
asymmetric padding (stride > 1 or even kernels; TensorFlow puts the extra
pixel bottom/right) pads explicitly. Max pooling pads with -inf so padding
never wins; average pooling with `same` divides by the number of real pixels
under each window, as TensorFlow does.

Module names are `<token name><index>` (conv0, bn1, dense6, res3.conv1...), so
a weight's name in `weights.txt` points at its row in the summary.

The layers beyond the chapter follow Keras where Keras has them:
DepthwiseConv2D is a Conv2d with groups = C (output c*M + m comes from input
channel c, Keras's order); SeparableConv2D is that depthwise conv without
bias, then a 1x1 conv; GroupNormalization is nn.GroupNorm; LayerNorm on a map
is GroupNorm(1, C) (see cnnlab.model.spec for how that differs from Keras's
LayerNormalization default); norms use Keras's epsilon 1e-3. The residual
block is He et al. 2016's basic block (ResidualBlock below).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.model import dropout
from cnnlab.model.shapes import Analysis, LayerInfo, same_padding, shortcut_kind
from cnnlab.model.spec import (
    Activation,
    BatchNorm,
    Conv,
    Dense,
    DepthwiseConv,
    Dropout,
    Flatten,
    GlobalAvgPool,
    GlobalMaxPool,
    GroupNorm,
    LayerNorm,
    LayerSpec,
    Pool,
    Residual,
    SeparableConv,
    to_token,
)

# Keras's GroupNormalization and LayerNormalization epsilon (torch's default is 1e-5).
NORM_EPS = 1e-3


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


class GlobalMaxPool2d(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3))  # (B, C, H, W) -> (B, C)


class ZeroPadShortcut(nn.Module):
    """He et al. 2016's option A: the identity subsampled by the stride, zero channels appended.

    Subsampling keeps pixels 0, s, 2s ...: the pixels a 1x1 stride-s conv with Keras's `same`
    padding (none for k=1) reads, as the paper's Torch code (a 1x1 average pool of stride s).
    Each of `stack` copies (cnnlab.model.stacked) gets its own zero channels after its own.
    """

    def __init__(self, stride: tuple[int, int], in_channels: int, out_channels: int, stack: int = 1):
        super().__init__()
        self.stride, self.in_channels, self.out_channels, self.stack = stride, in_channels, out_channels, stack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride[0], ::self.stride[1]]  # (B, S*C, H', W')
        b, _, h, w = x.shape
        extra = self.out_channels - self.in_channels
        if extra == 0:
            return x
        x = x.reshape(b, self.stack, self.in_channels, h, w)
        return F.pad(x, (0, 0, 0, 0, 0, extra)).view(b, self.stack * self.out_channels, h, w)  # (B, S*W, H', W')

    def extra_repr(self) -> str:
        return f"stride={self.stride}, {self.in_channels} -> {self.out_channels} channels, stack={self.stack}"


class ResidualBlock(nn.Module):
    """He et al. 2016's basic block: act(bn2(conv2(act(bn1(conv1(x))))) + shortcut(x)).

    The modules are given (a lone network's here, a stacked one's in cnnlab.model.stacked),
    so the two share this forward.
    """

    def __init__(self, conv1: nn.Module, bn1: nn.Module, act1: nn.Module, conv2: nn.Module,
                 bn2: nn.Module, shortcut: nn.Module, act2: nn.Module):
        super().__init__()
        self.conv1, self.bn1, self.act1 = conv1, bn1, act1
        self.conv2, self.bn2 = conv2, bn2
        self.shortcut, self.act2 = shortcut, act2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.bn1(self.conv1(x)))  # (B, W, H', W')
        y = self.bn2(self.conv2(y))
        return self.act2(y + self.shortcut(x))


def activation_module(name: str) -> nn.Module:
    return {
        "relu": nn.ReLU,
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "softmax": lambda: nn.Softmax(dim=1),
        "linear": nn.Identity,
    }[name]()


def conv2d(in_channels: int, out_channels: int, kernel: tuple[int, int], stride: tuple[int, int],
           padding: tuple[int, int, int, int], bias: bool, groups: int = 1) -> nn.Conv2d:
    """A Conv2d with Keras's padding (top, bottom, left, right): PyTorch's own when symmetric."""
    args = dict(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel, stride=stride,
                bias=bias, groups=groups)
    if is_symmetric(padding):
        return nn.Conv2d(**args, padding=(padding[0], padding[2]))
    return PaddedConv2d(**args, pads=torch_pads(padding))  # TF's extra pixel bottom/right


def norm_module(layer: LayerInfo, stack: int = 1) -> nn.GroupNorm:
    """gn:G -> GroupNorm(G, C); ln -> GroupNorm(1, C). `stack` copies: S*G groups over S*C channels,
    which is each copy's own normalisation, since groups are consecutive channels."""
    groups = layer.spec.groups if isinstance(layer.spec, GroupNorm) else 1
    return nn.GroupNorm(stack * groups, stack * layer.input_shape[0], eps=NORM_EPS)


def residual_modules(layer: LayerInfo, spec: Residual, stack: int, bn: Callable[[int], nn.Module],
                     act: Callable[[], nn.Module]) -> ResidualBlock:
    """The basic block's modules for `stack` copies (1: a lone network): convs grouped by copy,
    `bn(channels)` the BatchNorm over the stacked channels, `act()` the activation."""
    cin, width, s = layer.input_shape[0], spec.filters, stack
    bias = not spec.bn  # BN's beta makes a conv bias redundant (He et al. 2016, torchvision)

    def norm() -> nn.Module:
        return bn(s * width) if spec.bn else nn.Identity()

    h, w = layer.output_shape[1:]
    conv1 = conv2d(s * cin, s * width, (3, 3), spec.stride, layer.padding, bias, groups=s)
    pads = (*same_padding(h, 3, 1), *same_padding(w, 3, 1))  # (1, 1, 1, 1)
    conv2 = conv2d(s * width, s * width, (3, 3), (1, 1), pads, bias, groups=s)
    kind = shortcut_kind(spec, cin)
    if kind == "projection":  # 1x1 stride s: Keras's `same` pads nothing for k = 1
        proj = conv2d(s * cin, s * width, (1, 1), spec.stride, (0, 0, 0, 0), bias, groups=s)
        shortcut = nn.Sequential(OrderedDict([("conv", proj), ("bn", norm())]))
    elif kind == "zero-pad":
        shortcut = ZeroPadShortcut(spec.stride, cin, width, stack=s)
    else:
        shortcut = nn.Identity()
    return ResidualBlock(conv1, norm(), act(), conv2, norm(), shortcut, act())


def conv_module(layer: LayerInfo, spec: Conv | DepthwiseConv | SeparableConv, stack: int = 1) -> nn.Module:
    """conv, dwconv and sepconv for `stack` copies (1: a lone network); grouped by copy."""
    cin, s = layer.input_shape[0], stack
    if isinstance(spec, Conv):
        return conv2d(s * cin, s * spec.filters, spec.kernel, spec.stride, layer.padding, spec.bias, groups=s)
    depth = cin * spec.multiplier
    bias = spec.bias and isinstance(spec, DepthwiseConv)  # SeparableConv2D's bias is the pointwise one's
    depthwise = conv2d(s * cin, s * depth, spec.kernel, spec.stride, layer.padding, bias, groups=s * cin)
    if isinstance(spec, DepthwiseConv):
        return depthwise
    pointwise = nn.Conv2d(s * depth, s * spec.filters, 1, bias=spec.bias, groups=s)
    return nn.Sequential(OrderedDict([("depthwise", depthwise), ("pointwise", pointwise)]))


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


def module_name(layer: LayerInfo) -> str:
    """`<token name><index>`: conv0, maxpool3, res5, gn2 ..."""
    return f"{to_token(layer.spec).split(':')[0]}{layer.index}"


def _layer_modules(layer: LayerInfo, bn_momentum: float, bn_eps: float):
    """(name, module) pairs for one spec; a fused activation gets its own module."""
    spec, name = layer.spec, module_name(layer)

    def bn(channels: int) -> nn.Module:
        # Keras's momentum m keeps m of the old statistic; PyTorch's keeps 1 - m.
        return nn.BatchNorm2d(channels, eps=bn_eps, momentum=1 - bn_momentum)

    match spec:
        case Conv() | DepthwiseConv() | SeparableConv():
            yield name, conv_module(layer, spec)
        case Residual():
            yield name, residual_modules(layer, spec, 1, bn, lambda: activation_module(spec.activation))
        case Dense():
            yield name, nn.Linear(layer.input_shape[0], spec.units, bias=spec.bias)
        case Pool():
            yield name, pool_module(layer, spec)
        case BatchNorm():
            cls = nn.BatchNorm2d if len(layer.input_shape) == 3 else nn.BatchNorm1d
            yield name, cls(layer.input_shape[0], eps=bn_eps, momentum=1 - bn_momentum)
        case GroupNorm() | LayerNorm():
            yield name, norm_module(layer)
        case Activation():
            yield name, activation_module(spec.name)
        case Dropout():
            yield name, dropout.Dropout(spec.rate)  # nn.Dropout's masks, drawn faster on the CPU
        case Flatten():
            yield name, nn.Flatten()
        case GlobalAvgPool():
            yield name, GlobalAvgPool2d()
        case GlobalMaxPool():
            yield name, GlobalMaxPool2d()
    activation = getattr(spec, "activation", None)
    if fused_activation(spec):
        yield f"{name}_{activation}", activation_module(activation)


def fused_activation(spec: LayerSpec) -> bool:
    """Does this layer carry its own activation module after it (conv:...:relu, dense:...:relu)?"""
    return isinstance(spec, (Conv, DepthwiseConv, SeparableConv, Dense)) and bool(spec.activation)


def ends_in_softmax(analysis: Analysis) -> bool:
    last = analysis.layers[-1].spec
    return (isinstance(last, Activation) and last.name == "softmax") or (
        isinstance(last, Dense) and last.activation == "softmax")


def init_keras(module: nn.Module) -> None:
    """Keras's defaults: Glorot-uniform kernels, zero biases (BN, GN: gamma 1, beta 0, as torch)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            # A lone network's only grouped conv is depthwise (groups = C). Keras's DepthwiseConv2D
            # kernel is (kh, kw, C, M): fans kh*kw*C and kh*kw*M, where torch's xavier would read
            # (C*M, 1, kh, kw) as fans kh*kw and kh*kw*C*M.
            if m.groups != m.in_channels:
                raise ValueError(f"Keras initialisation knows depthwise convs only, got groups={m.groups} "
                                 f"over {m.in_channels} channels")
            area = m.kernel_size[0] * m.kernel_size[1]
            fan_in, fan_out = area * m.in_channels, area * m.out_channels // m.in_channels
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
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
