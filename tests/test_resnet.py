"""The resnet family: He et al. 2016's CIFAR ResNets (section 4.2), counted against a hand-written
PyTorch reference, and its knobs as one-word ablations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.cli import main
from cnnlab.config.compose import compose, container
from cnnlab.errors import ConfigError
from cnnlab.model.build import build
from cnnlab.model.family import model_tokens
from cnnlab.model.plan import model_plan
from cnnlab.model.shapes import analyse
from cnnlab.model.spec import parse_layers

RESNET = dict(name="resnet", init="keras", bn_momentum=0.9, bn_eps=1e-5, depth=20, blocks=None,
              widths=[16, 32, 64], bn=True, stem_kernel=3, dropout=0.0, shortcut="A")


class ReferenceBlock(nn.Module):
    """The basic block as CIFAR ResNet reimplementations write it (symmetric padding 1)."""

    def __init__(self, cin: int, width: int, stride: int, option: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.stride, self.extra = stride, width - cin
        self.projection = None
        if option == "B" and (stride != 1 or cin != width):
            self.projection = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.projection is not None:
            shortcut = self.projection(x)
        else:  # option A: subsample, zero channels after the identity's (fb.resnet.torch's order)
            shortcut = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.extra))
        return F.relu(out + shortcut)


class ReferenceResNet(nn.Module):
    def __init__(self, n: int, option: str, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for width, stride in [(16, 1), (32, 2), (64, 2)]:
            for b in range(n):
                blocks.append(ReferenceBlock(cin, width, stride if b == 0 else 1, option))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(x.mean(dim=(2, 3)))


def _torch_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("depth,option,count", [
    (20, "A", 269_722), (20, "B", 272_474), (32, "A", 464_154), (56, "A", 853_018), (110, "A", 1_727_962)])
def test_parameter_counts_equal_a_reference_resnet(depth, option, count):
    plan = model_plan(compose(["model=resnet", f"model.depth={depth}", f"model.shortcut={option}"]))
    reference = ReferenceResNet((depth - 2) // 6, option)
    assert plan.analysis.trainable == _torch_count(reference) == count
    assert plan.analysis.non_trainable == sum(
        b.numel() for n, b in reference.named_buffers() if n.endswith(("running_mean", "running_var")))


def test_resnet20_prints_the_papers_size(capsys):
    assert main(["summary", "model=resnet", "model.depth=20"]) == 0
    out = capsys.readouterr().out
    # He et al. 2016, Table 6: ResNet-20 has 0.27M parameters (option A, as all its CIFAR models).
    assert "Trainable params: 269,722" in out and "Total params: 271,098" in out
    assert "res 32 s2, zero-pad" in out and "res 16, identity" in out


@pytest.mark.parametrize("option", ["A", "B"])
def test_resnet20_computes_what_the_reference_computes(option):
    # On 33x33 TensorFlow's `same` padding of the stride-2 convs is 1 on each side (33 -> 17 -> 9),
    # PyTorch's padding=1: the two networks must agree to rounding.
    tokens = model_tokens({**RESNET, "shortcut": option}, 10)
    ours = build(analyse(parse_layers(tokens), (3, 33, 33)), init="torch", bn_eps=1e-5, logits=True).double().eval()
    reference = ReferenceResNet(3, option).double().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mine, theirs in zip(ours.parameters(), reference.parameters(), strict=True):
            assert mine.shape == theirs.shape
            theirs.copy_(mine)
        buffers = [(n, b) for n, b in ours.named_buffers() if "running" in n]
        reference_buffers = [b for n, b in reference.named_buffers() if "running" in n]
        for (name, mine), theirs in zip(buffers, reference_buffers, strict=True):
            mine.copy_(torch.rand(mine.shape, generator=g, dtype=mine.dtype) + (0.5 if "var" in name else -0.5))
            theirs.copy_(mine)
    x = torch.randn(2, 3, 33, 33, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-10, atol=1e-10)


def test_knobs_are_one_word_ablations():
    def tokens(*overrides):
        return model_plan(compose(["model=resnet", *overrides])).tokens

    base = tokens()
    assert base[:4] == ["conv:16:3:same:nobias", "bn", "relu", "res:16"]
    assert base[-2:] == ["gap", "dense:10:softmax"] and len(base) == 3 + 9 + 2
    assert tokens("model.bn=false")[:2] == ["conv:16:3:same:relu", "res:16:nobn"]
    assert tokens("model.stem_kernel=5")[0] == "conv:16:5:same:nobias"
    assert tokens("model.dropout=0.2")[-2] == "dropout:0.2"
    assert [t for t in tokens("model.shortcut=B") if "s2" in t] == ["res:32:s2", "res:64:s2"]
    assert all(t.endswith(":proj") for t in tokens("model.shortcut=C") if t.startswith("res"))
    assert tokens("model.depth=56").count("res:64") == 8
    assert [t for t in tokens("model.depth=null", "model.blocks=[1,2,1]") if t.startswith("res")] == [
        "res:16", "res:32:s2:pad", "res:32", "res:64:s2:pad"]
    no_bn = model_plan(compose(["model=resnet", "model.bn=false"])).analysis
    assert no_bn.non_trainable == 0


@pytest.mark.parametrize("override, message", [
    ({"depth": 18}, "model.depth must be 2 + 6n: a stem conv, 3 stages of n blocks of 2 convs, and the "
                    "classifier (8, 14, 20, 32, 56 ...; He et al. 2016 uses 20, 32, 44, 56, 110, 1202), got 18"),
    ({"depth": 2}, "model.depth must be 2 + 6n"),
    ({"depth": 1}, "model.depth must be null or an integer >= 2 (2 + 6n for 3 stages), got 1"),
    ({"depth": 20, "blocks": [3, 3, 3]}, "model.depth=20 and model.blocks=[3, 3, 3]: set exactly one"),
    ({"depth": None}, "model.depth=None and model.blocks=None: set exactly one"),
    ({"depth": None, "blocks": [3, 3]}, "model.blocks must be one block count per stage (3 stages"),
    ({"depth": None, "blocks": [3, 0, 3]}, "model.blocks must be null or a list of positive integers, one per stage"),
    ({"shortcut": "D"}, "model.shortcut must be one of A, B, C, got 'D'"),
    ({"stem_kernel": 0}, "model.stem_kernel must be an integer >= 1, got 0"),
    ({"widths": [16, 32], "depth": 20}, "model.depth must be 2 + 4n"),
    ({"kernels": [3]}, "unknown key 'model.kernels'"),
])
def test_bad_resnet_knobs(override, message):
    with pytest.raises(ConfigError) as info:
        model_tokens({**RESNET, **override}, 10)
    assert message in str(info.value)


def test_option_a_cannot_shrink_the_width():
    cfg = compose(["model=resnet", "model.widths=[32,16,8]"])
    with pytest.raises(ConfigError, match="layer 6 \\(res 16 s2, zero-pad\\) cannot zero-pad 32 input channels "
                                          "to 16; use proj"):
        model_plan(cfg)
    assert model_plan(compose(["model=resnet", "model.widths=[32,16,8]", "model.shortcut=B"]))
    assert container(cfg.model)["shortcut"] == "A"
