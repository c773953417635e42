"""Registry of standard CIFAR-10 networks, each returned with its input normalization inside.

Callers always feed images in [0, 1] (NCHW float); :class:`Normalized` applies mean and std.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import uuid
from collections.abc import Callable, Sequence
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2471, 0.2435, 0.2616)


class Architecture(StrEnum):
    """Architectures a hidden model or a student's defense can be built from, by spec name."""

    RESNET20 = "resnet20"
    RESNET56 = "resnet56"
    RESNET18 = "resnet18"
    PREACT_RESNET18 = "preact_resnet18"
    WIDERESNET28_10 = "wideresnet28_10"


def _conv3x3(in_planes: int, out_planes: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _init_weights(module: nn.Module) -> None:
    """He-normal convolutions, unit BatchNorm, zero linear bias: the usual CIFAR training start."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.Linear) and layer.bias is not None:
            nn.init.zeros_(layer.bias)


class BasicBlock(nn.Module):
    """Post-activation residual block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    The shortcut is the identity, or a 1x1 conv + BN (``shortcut.0``, ``shortcut.1``) when the
    stride or the channel count changes.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                _conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + residual)


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016b): conv2(relu(bn2(conv1(relu(bn1(x)))))).

    A projection shortcut (``shortcut.0``, a 1x1 conv without BN) is applied to relu(bn1(x)).
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, 1)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(_conv1x1(in_planes, planes, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + residual


def _stage(
    block: type[BasicBlock] | type[PreActBlock],
    in_planes: int,
    planes: int,
    count: int,
    stride: int,
) -> nn.Sequential:
    """``count`` blocks; only the first one changes the stride and the channel count."""
    blocks = [block(in_planes, planes, stride)]
    blocks += [block(planes, planes, 1) for _ in range(count - 1)]
    return nn.Sequential(*blocks)


class ResNet(nn.Module):
    """Post-activation CIFAR ResNet: 3x3 stem conv + BN, stages ``layer1..layerK``, ``linear``.

    Covers both the He et al. (2016) CIFAR variants (16/32/64 channels, see :func:`resnet`) and
    the common CIFAR ResNet-18 (64..512 channels, no max-pool, see :func:`resnet18`).
    """

    def __init__(
        self,
        stage_widths: Sequence[int],
        blocks_per_stage: Sequence[int],
        *,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if len(stage_widths) != len(blocks_per_stage) or not stage_widths:
            raise ValueError("stage_widths and blocks_per_stage must be non-empty and equally long")
        self.conv1 = _conv3x3(3, stage_widths[0], 1)
        self.bn1 = nn.BatchNorm2d(stage_widths[0])
        self._stage_names: list[str] = []
        in_planes = stage_widths[0]
        for index, (width, count) in enumerate(zip(stage_widths, blocks_per_stage, strict=True)):
            stride = 1 if index == 0 else 2
            name = f"layer{index + 1}"
            self.add_module(name, _stage(BasicBlock, in_planes, width, count, stride))
            self._stage_names.append(name)
            in_planes = width
        self.linear = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for name in self._stage_names:
            out = getattr(self, name)(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return cast(torch.Tensor, self.linear(out))


class PreActResNet(nn.Module):
    """Pre-activation ResNet: stem ``conv1``, stages ``layer1..layer4``, final ``bn``, ``linear``.

    The final BN + ReLU before pooling follows the PreActResNet-18 of the fast adversarial
    training papers (Wong et al. 2020, Rice et al. 2020), so their checkpoints load unchanged.
    """

    def __init__(
        self,
        stage_widths: Sequence[int],
        blocks_per_stage: Sequence[int],
        *,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if len(stage_widths) != len(blocks_per_stage) or not stage_widths:
            raise ValueError("stage_widths and blocks_per_stage must be non-empty and equally long")
        self.conv1 = _conv3x3(3, stage_widths[0], 1)
        self._stage_names: list[str] = []
        in_planes = stage_widths[0]
        for index, (width, count) in enumerate(zip(stage_widths, blocks_per_stage, strict=True)):
            stride = 1 if index == 0 else 2
            name = f"layer{index + 1}"
            self.add_module(name, _stage(PreActBlock, in_planes, width, count, stride))
            self._stage_names.append(name)
            in_planes = width
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        for name in self._stage_names:
            out = getattr(self, name)(out)
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return cast(torch.Tensor, self.linear(out))


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv residual block of a wide ResNet (Zagoruyko & Komodakis 2016).

    Attribute names (``bn1``, ``conv1``, ``bn2``, ``conv2``, ``convShortcut``) follow the
    WideResNet of RobustBench and the Madry-lab models, so their checkpoints load unchanged.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = _conv3x3(out_planes, out_planes, 1)
        self.dropout = dropout
        self.convShortcut: nn.Conv2d | None = None
        if stride != 1 or in_planes != out_planes:
            self.convShortcut = _conv1x1(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        residual = x if self.convShortcut is None else self.convShortcut(pre)
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + residual


class WideStage(nn.Module):
    """One group of wide blocks, held as ``layer`` so keys read ``block1.layer.0.conv1.weight``."""

    def __init__(
        self, in_planes: int, out_planes: int, count: int, stride: int, dropout: float
    ) -> None:
        super().__init__()
        blocks = [WideBasicBlock(in_planes, out_planes, stride, dropout)]
        blocks += [WideBasicBlock(out_planes, out_planes, 1, dropout) for _ in range(count - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.layer(x))


class WideResNet(nn.Module):
    """WRN-depth-k: stem ``conv1``, groups ``block1..block3``, final ``bn1``, classifier ``fc``."""

    def __init__(
        self, depth: int, widen_factor: int, *, num_classes: int = 10, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"wide ResNet depth must be 6n + 4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        count = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = _conv3x3(3, widths[0], 1)
        self.block1 = WideStage(widths[0], widths[1], count, 1, dropout)
        self.block2 = WideStage(widths[1], widths[2], count, 2, dropout)
        self.block3 = WideStage(widths[2], widths[3], count, 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return cast(torch.Tensor, self.fc(out))


def resnet(depth: int, *, num_classes: int = 10) -> ResNet:
    """He et al. (2016) CIFAR ResNet-``depth`` (depth = 6n + 2: 20, 32, 44, 56, 110, ...).

    Three stages of n basic blocks with 16/32/64 channels; shortcuts that change shape are a
    1x1 conv + BN ("option B"), so checkpoints with parameter-free "option A" shortcuts do not
    load. State_dict keys: ``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``,
    ``layer{2,3}.0.shortcut.{0,1}``, ``linear``.
    """
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
    count = (depth - 2) // 6
    return ResNet((16, 32, 64), (count, count, count), num_classes=num_classes)


def resnet18(*, num_classes: int = 10) -> ResNet:
    """The common CIFAR ResNet-18: 3x3 stem conv with 64 channels, no max-pool, [2, 2, 2, 2].

    State_dict keys: ``conv1``, ``bn1``, ``layer{1..4}.{0,1}.{conv1,bn1,conv2,bn2}``,
    ``layer{2,3,4}.0.shortcut.{0,1}``, ``linear`` (the kuangliu/pytorch-cifar convention).
    """
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes=num_classes)


def preact_resnet18(*, num_classes: int = 10) -> PreActResNet:
    """Pre-activation ResNet-18 as used by the fast adversarial training papers.

    State_dict keys: ``conv1``, ``layer{1..4}.{0,1}.{bn1,conv1,bn2,conv2}``,
    ``layer{2,3,4}.0.shortcut.0``, ``bn``, ``linear``.
    """
    return PreActResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes=num_classes)


def wide_resnet(
    depth: int, widen_factor: int, *, num_classes: int = 10, dropout: float = 0.0
) -> WideResNet:
    """WRN-``depth``-``widen_factor`` (depth = 6n + 4), BN-ReLU-conv blocks.

    State_dict keys follow RobustBench's WideResNet: ``conv1``,
    ``block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2}``, ``block{1,2,3}.layer.0.convShortcut``,
    ``bn1``, ``fc``. Dropout is 0 for the robust-training models this registry targets.
    """
    return WideResNet(depth, widen_factor, num_classes=num_classes, dropout=dropout)


_BUILDERS: dict[Architecture, Callable[..., nn.Module]] = {
    Architecture.RESNET20: partial(resnet, 20),
    Architecture.RESNET56: partial(resnet, 56),
    Architecture.RESNET18: resnet18,
    Architecture.PREACT_RESNET18: preact_resnet18,
    Architecture.WIDERESNET28_10: partial(wide_resnet, 28, 10),
}


class Normalized(nn.Module):
    """``net((x - mean) / std)``: feeds [0, 1] images to a net trained on normalized ones.

    ``mean`` and ``std`` are non-persistent buffers, so ``Normalized.net.state_dict()`` is exactly
    the plain architecture's state_dict; checkpoints are read and written through ``net``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) == 0 or len(mean) != len(std):
            raise ValueError(f"mean and std need one value per channel, got {mean} and {std}")
        if not all(math.isfinite(value) for value in mean):
            raise ValueError(f"mean must be finite, got {mean}")
        if not all(math.isfinite(value) and value > 0 for value in std):
            raise ValueError(f"std must be finite and positive, got {std}")
        self.net = net
        shape = (1, len(mean), 1, 1)
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(shape), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(shape), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.net((x - self.mean) / self.std))

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _parse_architecture(architecture: Architecture | str) -> Architecture:
    try:
        return Architecture(architecture)
    except ValueError:
        known = ", ".join(member.value for member in Architecture)
        raise ValueError(f"unknown architecture {architecture!r}; known: {known}") from None


def build_model(
    architecture: Architecture | str,
    *,
    num_classes: int = 10,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> Normalized:
    """A freshly initialised ``architecture`` that takes [0, 1] images, normalization included.

    Pass ``mean=(0, 0, 0), std=(1, 1, 1)`` for a net trained on unnormalized inputs (as most
    RobustBench models are). Load weights into the result with ``graders.checkpoints``.
    """
    parsed = _parse_architecture(architecture)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {tuple(mean)} and {tuple(std)}")
    return Normalized(_BUILDERS[parsed](num_classes=num_classes), mean, std)


def load_factory(path: Path, function: str) -> Callable[[], nn.Module]:
    """The zero-argument callable ``function`` defined in the Python file ``path``.

    For architectures outside the registry, a TA puts a factory file in their assignment folder.
    Importing the file RUNS it with the grader's privileges: use this for trusted TA code only,
    never for anything a student uploaded. Each call imports the file afresh under a unique
    module name, so two assignments' ``factory.py`` files never shadow each other.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"factory file {path} does not exist")
    module_name = f"_graders_factory_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"factory file {path} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ValueError(
                f"importing factory file {path} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if not hasattr(module, function):
            raise ValueError(f"factory file {path} defines no {function!r}")
        factory = getattr(module, function)
        if not callable(factory):
            raise ValueError(
                f"{function!r} in factory file {path} is a {type(factory).__name__}, not a callable"
            )
    except ValueError:
        del sys.modules[module_name]
        raise
    return cast(Callable[[], nn.Module], factory)
