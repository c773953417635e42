"""Hidden artifacts in the data directory: resolving spec references and loading them verified."""

from __future__ import annotations

import threading
from pathlib import Path

from graders.checkpoints import verify_sha256
from graders.datasets import EvalSet, load_eval_set
from graders.errors import ArtifactError
from server.assignments import ArtifactRef

_eval_sets: dict[str, EvalSet] = {}
_lock = threading.Lock()


def artifact_path(data_dir: Path, ref: ArtifactRef) -> Path:
    """Where ``ref`` lives; never outside ``data_dir``."""
    path = (data_dir / ref.file).resolve()
    if not path.is_relative_to(data_dir.resolve()):
        raise ArtifactError(f"{ref.file}: resolves outside the data directory")
    return path


def load_verified_eval_set(data_dir: Path, ref: ArtifactRef) -> EvalSet:
    """The evaluation set ``ref`` names, checked against its sha256 once per process."""
    with _lock:
        cached = _eval_sets.get(ref.sha256)
        if cached is not None:
            return cached
        path = artifact_path(data_dir, ref)
        verify_sha256(path, ref.sha256)
        try:
            eval_set = load_eval_set(path)
        except ValueError as exc:
            raise ArtifactError(str(exc)) from exc
        _eval_sets[ref.sha256] = eval_set
        return eval_set
