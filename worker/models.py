"""Hidden models for a phase, built from the spec and cached per worker process by weight hash."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from graders.architectures import build_model, load_factory
from graders.attack_scoring import HiddenModel, default_device, predict
from graders.checkpoints import load_weights, read_state_dict, verify_sha256
from graders.datasets import EvalSet
from graders.errors import ArtifactError
from graders.preprocessing import Defended, build_preprocessing
from server.artifacts import artifact_path
from server.assignments import AssignmentSpec, HiddenModelSpec

_models: dict[tuple[str, ...], HiddenModel] = {}
_clean_predictions: dict[tuple[tuple[str, ...], str], np.ndarray] = {}
_lock = threading.Lock()


def _cache_key(spec: HiddenModelSpec) -> tuple[str, ...]:
    pre = spec.preprocessing
    return (
        spec.weights.sha256,
        spec.architecture.value if spec.architecture else f"factory:{spec.factory}",
        f"{pre.kind.value}:{sorted(pre.params.items())}" if pre else "none",
    )


def _build(spec: HiddenModelSpec, assignment: AssignmentSpec, data_dir: Path) -> HiddenModel:
    path = artifact_path(data_dir, spec.weights)
    verify_sha256(path, spec.weights.sha256)
    if spec.architecture is not None:
        module: torch.nn.Module = build_model(spec.architecture)
    else:
        file_name, function = str(spec.factory).split(":")
        try:
            module = load_factory(assignment.folder / file_name, function)()
        except ValueError as exc:
            raise ArtifactError(f"hidden model {spec.name}: {exc}") from exc
    load_weights(module, read_state_dict(path))
    label = None
    if spec.preprocessing is not None:
        pre = spec.preprocessing
        module = Defended(build_preprocessing(pre.kind, **pre.params), module)
        label = f"{pre.kind.value}({', '.join(f'{k}={v}' for k, v in pre.params.items())})"
    module = module.to(default_device()).to(memory_format=torch.channels_last).eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return HiddenModel(
        name=spec.name, module=module, weights_sha256=spec.weights.sha256, preprocessing=label
    )


def hidden_model(spec: HiddenModelSpec, assignment: AssignmentSpec, data_dir: Path) -> HiddenModel:
    """The ready-to-score model for ``spec``, loaded (and hash-checked) once per process."""
    key = _cache_key(spec)
    with _lock:
        cached = _models.get(key)
        if cached is None or cached.name != spec.name:
            cached = _models[key] = _build(spec, assignment, data_dir)
        return cached


def clean_predictions(
    model: HiddenModel, spec: HiddenModelSpec, eval_set: EvalSet, eval_set_sha256: str
) -> np.ndarray:
    """``model``'s predictions on the clean evaluation images, computed once per process."""
    key = (_cache_key(spec), eval_set_sha256)
    with _lock:
        cached = _clean_predictions.get(key)
        if cached is None:
            cached = _clean_predictions[key] = predict(model.module, eval_set.images)
        return cached
