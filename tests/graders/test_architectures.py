"""Tests for the architecture registry: shapes, sizes, key names, normalization, factories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from graders.architectures import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    Architecture,
    BasicBlock,
    Normalized,
    build_model,
    load_factory,
    resnet,
    wide_resnet,
)

SMALL = [
    Architecture.RESNET20,
    Architecture.RESNET56,
    Architecture.RESNET18,
    Architecture.PREACT_RESNET18,
]

# Published sizes of these exact networks (1x1-conv + BN shortcuts for the He CIFAR ResNets).
PARAMETERS = {
    Architecture.RESNET20: 272_474,
    Architecture.RESNET56: 855_770,
    Architecture.RESNET18: 11_173_962,
    Architecture.PREACT_RESNET18: 11_172_170,
    Architecture.WIDERESNET28_10: 36_479_194,
}

KEYS = {
    Architecture.RESNET20: [
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.bn1.weight",
        "layer3.2.conv2.weight",
        "layer2.0.shortcut.0.weight",
        "layer2.0.shortcut.1.weight",
        "linear.weight",
    ],
    Architecture.RESNET18: ["layer4.1.bn2.weight", "layer4.0.shortcut.1.bias", "linear.bias"],
    Architecture.PREACT_RESNET18: ["layer2.0.shortcut.0.weight", "bn.weight", "linear.weight"],
    Architecture.WIDERESNET28_10: [
        "conv1.weight",
        "block1.layer.0.bn1.weight",
        "block1.layer.0.convShortcut.weight",
        "block3.layer.3.conv2.weight",
        "bn1.running_mean",
        "fc.weight",
    ],
}


def _parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.fixture(scope="module")
def wrn() -> Normalized:
    torch.manual_seed(0)
    return build_model(Architecture.WIDERESNET28_10).eval()


@pytest.mark.parametrize("architecture", SMALL)
def test_small_architectures_have_published_size_and_output_shape(
    architecture: Architecture,
) -> None:
    model = build_model(architecture).eval()
    assert _parameter_count(model) == PARAMETERS[architecture]
    with torch.inference_mode():
        logits = model(torch.rand(3, 3, 32, 32))
    assert logits.shape == (3, 10)
    assert torch.isfinite(logits).all()


def test_wideresnet28_10_size_and_channels_last_inference(wrn: Normalized) -> None:
    assert _parameter_count(wrn) == PARAMETERS[Architecture.WIDERESNET28_10]
    model = wrn.to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        logits = model(x)
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("architecture", SMALL)
def test_channels_last_inference_matches_contiguous(architecture: Architecture) -> None:
    torch.manual_seed(0)
    model = build_model(architecture).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("architecture", [a for a in KEYS if a is not Architecture.WIDERESNET28_10])
def test_state_dict_keys_follow_the_documented_convention(architecture: Architecture) -> None:
    keys = build_model(architecture).net.state_dict().keys()
    for key in KEYS[architecture]:
        assert key in keys


def test_wideresnet_keys_follow_robustbench(wrn: Normalized) -> None:
    keys = wrn.net.state_dict().keys()
    for key in KEYS[Architecture.WIDERESNET28_10]:
        assert key in keys
    assert "block2.layer.1.convShortcut.weight" not in keys


def test_normalization_is_inside_the_model() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    x = torch.rand(4, 3, 32, 32)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        wrapped = model(x)
        manual = model.net((x - mean) / std)
        raw = model.net(x)
    torch.testing.assert_close(wrapped, manual)
    assert not torch.allclose(wrapped, raw, atol=1e-3)


def test_identity_normalization_feeds_inputs_unchanged() -> None:
    model = build_model("resnet20", mean=(0, 0, 0), std=(1, 1, 1)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net(x))


def test_mean_and_std_are_not_in_the_state_dict() -> None:
    model = build_model(Architecture.RESNET20)
    plain = set(model.net.state_dict())
    assert set(model.state_dict()) == {f"net.{key}" for key in plain}
    assert {"mean", "std"} <= dict(model.named_buffers()).keys()


def test_normalized_buffers_follow_device_and_dtype() -> None:
    model = build_model("resnet20").double().eval()
    assert model.mean.dtype == torch.float64
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def test_build_model_accepts_strings_and_num_classes() -> None:
    model = build_model("preact_resnet18", num_classes=100).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 100)


def test_unknown_architecture_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'vgg16'") as caught:
        build_model("vgg16")
    for member in Architecture:
        assert member.value in str(caught.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"mean": (0.5, 0.5)}, "3 values"),
        ({"std": (1.0, 0.0, 1.0)}, "positive"),
    ],
)
def test_build_model_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model("resnet20", **kwargs)  # type: ignore[arg-type]


def test_generic_depths() -> None:
    assert sum(isinstance(module, BasicBlock) for module in resnet(32).modules()) == 15
    assert len(wide_resnet(16, 2).block1.layer) == 2
    with pytest.raises(ValueError, match="6n \\+ 2"):
        resnet(21)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        wide_resnet(27, 10)


def _write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    return path


def test_load_factory_returns_the_named_callable(tmp_path: Path) -> None:
    source = "from torch import nn\n\ndef make():\n    return nn.Linear(4, WIDTH)\n"
    first = _write(tmp_path / "a" / "factory.py", "WIDTH = 2\n" + source)
    second = _write(tmp_path / "b" / "factory.py", "WIDTH = 3\n" + source)
    make_first = load_factory(first, "make")
    make_second = load_factory(second, "make")
    first_model, second_model = make_first(), make_second()
    assert isinstance(first_model, nn.Linear) and first_model.out_features == 2
    assert isinstance(second_model, nn.Linear) and second_model.out_features == 3


def test_load_factory_errors(tmp_path: Path) -> None:
    factory = _write(tmp_path / "factory.py", "NOT_CALLABLE = 3\n\ndef make():\n    return None\n")
    broken = _write(tmp_path / "broken.py", "def make(:\n")
    with pytest.raises(ValueError, match="does not exist"):
        load_factory(tmp_path / "missing.py", "make")
    with pytest.raises(ValueError, match="defines no 'build'"):
        load_factory(factory, "build")
    with pytest.raises(ValueError, match="'NOT_CALLABLE' .* is a int, not a callable"):
        load_factory(factory, "NOT_CALLABLE")
    with pytest.raises(ValueError, match="importing factory file .* SyntaxError"):
        load_factory(broken, "make")
