"""Tests for weight files: safe reading, strict loading, safetensors writing, sha256 pins."""

from __future__ import annotations

import hashlib
import os
import shlex
from pathlib import Path

import pytest
import torch

from graders.architectures import Normalized, build_model
from graders.checkpoints import (
    load_weights,
    read_state_dict,
    sha256_file,
    verify_sha256,
    write_safetensors,
)
from graders.errors import ArtifactError


def _model(seed: int) -> Normalized:
    torch.manual_seed(seed)
    return build_model("resnet20").eval()


def _assert_same_function(a: Normalized, b: Normalized) -> None:
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def _parameters(model: Normalized) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.net.state_dict().items()}


def test_safetensors_round_trip(tmp_path: Path) -> None:
    source, target = _model(0), _model(1)
    path = tmp_path / "weights.safetensors"
    write_safetensors(source, path)
    state = read_state_dict(path)
    assert state.keys() == source.net.state_dict().keys()
    load_weights(target, state)
    _assert_same_function(source, target)


def test_write_safetensors_handles_channels_last_models(tmp_path: Path) -> None:
    source = _model(0).to(memory_format=torch.channels_last)
    assert not source.net.state_dict()["conv1.weight"].is_contiguous()
    path = tmp_path / "weights.safetensors"
    write_safetensors(source, path)
    state = read_state_dict(path)
    for key, value in source.net.state_dict().items():
        assert state[key].is_contiguous()
        assert torch.equal(state[key], value)
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def test_write_safetensors_refuses_other_suffixes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must end in .safetensors"):
        write_safetensors(_model(0), tmp_path / "weights.pt")


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_torch_save_round_trip(tmp_path: Path, suffix: str) -> None:
    source, target = _model(0), _model(1)
    path = tmp_path / f"weights{suffix}"
    torch.save(source.net.state_dict(), path)
    load_weights(target, read_state_dict(path))
    _assert_same_function(source, target)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_state_dicts_are_unwrapped(tmp_path: Path, wrapper: str) -> None:
    source = _model(0)
    path = tmp_path / "checkpoint.pth"
    torch.save({wrapper: source.net.state_dict(), "epoch": 200}, path)
    assert read_state_dict(path).keys() == source.net.state_dict().keys()


@pytest.mark.parametrize(
    ("content", "found"),
    [
        ([torch.zeros(2)], "found a list"),
        (torch.zeros(2, 3), "found a single tensor of shape \\(2, 3\\)"),
        ({"w": torch.zeros(1), "epoch": 3}, "non-tensor values at 'epoch' \\(int\\)"),
        ({}, "found an empty dict"),
        ({"state_dict": {"w": 1.5}}, "'state_dict' entry is a dict with non-tensor values"),
        ({"state_dict": {}, "model": {}}, "both 'state_dict' and 'model'"),
    ],
)
def test_read_state_dict_says_what_it_found(tmp_path: Path, content: object, found: str) -> None:
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(ArtifactError, match=f"odd.pt: expected a state_dict.*{found}"):
        read_state_dict(path)


def test_unknown_extension_lists_accepted_ones(tmp_path: Path) -> None:
    path = tmp_path / "weights.ckpt"
    path.write_bytes(b"")
    with pytest.raises(ArtifactError, match="weights.ckpt.*'.ckpt'.*.safetensors, .pt, .pth, .bin"):
        read_state_dict(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="absent.safetensors: file not found"):
        read_state_dict(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("name", ["garbage.pt", "garbage.safetensors", "empty.pth"])
def test_unparseable_files_give_a_short_error_naming_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"" if name.startswith("empty") else b"\x80\x02garbage" * 50)
    with pytest.raises(ArtifactError, match=f"{name}: could not read weights") as caught:
        read_state_dict(path)
    assert len(str(caught.value)) < 300
    assert "weights_only" not in str(caught.value)
    assert caught.value.__cause__ is None


class _RunsShellOnUnpickle:
    """Unpickling this calls ``os.system``: the classic malicious checkpoint."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_pickled_code_is_refused_and_never_run(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    payload = _RunsShellOnUnpickle(f"touch {shlex.quote(str(marker))}")
    torch.save({"conv1.weight": torch.zeros(1), "payload": payload}, path)

    with pytest.raises(ArtifactError, match="pickled Python object.*system") as caught:
        read_state_dict(path)
    assert "weights_only" not in str(caught.value)
    assert not marker.exists()

    # The file really is malicious: unsafe loading would have run the command.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_load_weights_names_missing_unexpected_and_mismatched_keys() -> None:
    state = _parameters(_model(0))
    del state["linear.bias"]
    state["extra.weight"] = torch.zeros(3)
    state["conv1.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(ArtifactError) as caught:
        load_weights(_model(1), state)
    message = str(caught.value)
    assert "1 missing key(s): linear.bias" in message
    assert "1 unexpected key(s): extra.weight" in message
    assert "conv1.weight (checkpoint (8, 3, 3, 3), model (16, 3, 3, 3))" in message


def test_load_weights_lists_only_the_first_few_keys() -> None:
    state = _parameters(_model(0))
    for key in [key for key in state if key.startswith("layer3")]:
        del state[key]
    with pytest.raises(ArtifactError, match=r"missing key\(s\): .*\.\.\. \(\d+ more\)"):
        load_weights(_model(1), state)


def test_load_weights_hints_at_a_wrapper_prefix() -> None:
    state = {f"module.{key}": value for key, value in _parameters(_model(0)).items()}
    with pytest.raises(ArtifactError, match="extra 'module.' prefix"):
        load_weights(_model(1), state)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_rejected_and_the_model_untouched(bad: float) -> None:
    state = _parameters(_model(0))
    state["layer2.1.conv1.weight"][0, 0, 0, 0] = bad
    target = _model(1)
    before = _parameters(target)
    with pytest.raises(ArtifactError, match="'layer2.1.conv1.weight' contains NaN or infinite"):
        load_weights(target, state)
    for key, value in target.net.state_dict().items():
        assert torch.equal(value, before[key])


def test_load_weights_accepts_plain_modules_and_old_batchnorm_checkpoints() -> None:
    source = _model(0)
    state = {
        key: value
        for key, value in _parameters(source).items()
        if not key.endswith("num_batches_tracked")
    }
    target = _model(1)
    load_weights(target.net, state)
    _assert_same_function(source, target)


def test_sha256_file_streams_large_files(tmp_path: Path) -> None:
    data = os.urandom((5 << 19) + 17)  # 2.5 MiB and a bit: crosses chunk boundaries
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_verify_sha256(tmp_path: Path) -> None:
    path = tmp_path / "hidden.safetensors"
    write_safetensors(_model(0), path)
    pinned = hashlib.sha256(path.read_bytes()).hexdigest()
    verify_sha256(path, pinned.upper())

    write_safetensors(_model(1), path)
    found = sha256_file(path)
    with pytest.raises(ArtifactError) as caught:
        verify_sha256(path, pinned)
    message = str(caught.value)
    assert message.startswith(f"hidden.safetensors: sha256 mismatch: expected {pinned}")
    assert f"found {found}" in message and "changed since the assignment spec pinned it" in message

    with pytest.raises(ArtifactError, match="gone.pt: file not found"):
        verify_sha256(tmp_path / "gone.pt", pinned)
    with pytest.raises(ValueError, match="64 hex characters"):
        verify_sha256(path, "abc")
