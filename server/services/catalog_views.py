"""Public views of assignments and the clean-image downloads built from the evaluation sets."""

from __future__ import annotations

import io
import threading

from graders.datasets import write_npz_download, write_png_zip
from graders.errors import ArtifactError
from server.artifacts import load_verified_eval_set
from server.assignments import AssignmentSpec, PhaseSpec
from server.config import Settings
from server.db import utcnow
from server.schemas import AssignmentPublic, LimitsPublic, PhasePublic, ThreatModelPublic

_downloads: dict[tuple[str, str], bytes] = {}
_lock = threading.Lock()

METRIC_DESCRIPTIONS = {
    "mean_accuracy": "mean accuracy of the hidden models on your images; lower is better",
}


def dataset_bytes(*, settings: Settings, phase: PhaseSpec, fmt: str) -> bytes:
    """The clean-image download of ``phase`` in ``fmt`` (``zip`` or ``npz``), built once."""
    key = (phase.evaluation_set.sha256, fmt)
    with _lock:
        cached = _downloads.get(key)
    if cached is not None:
        return cached
    eval_set = load_verified_eval_set(settings.data_path, phase.evaluation_set)
    buffer = io.BytesIO()
    (write_png_zip if fmt == "zip" else write_npz_download)(eval_set, buffer)
    content = buffer.getvalue()
    with _lock:
        _downloads[key] = content
    return content


def assignment_public(
    *, assignment: AssignmentSpec, settings: Settings, base_url: str
) -> AssignmentPublic:
    now = utcnow()
    phases = []
    for phase in assignment.phases:
        prefix = f"{base_url}/api/v1/assignments/{assignment.slug}/phases/{phase.id}"
        try:
            eval_set = load_verified_eval_set(settings.data_path, phase.evaluation_set)
            n_images, synthetic = len(eval_set), eval_set.synthetic
        except ArtifactError:
            n_images, synthetic = None, None
        phases.append(
            PhasePublic(
                id=phase.id,
                title=phase.title,
                description=phase.description,
                track=phase.track.value,
                opens_at=phase.opens_at,
                due_at=phase.due_at,
                is_open=phase.is_open(now),
                threat_model=ThreatModelPublic(
                    norm=phase.threat_model.norm.value, eps=phase.threat_model.eps
                ),
                n_images=n_images,
                synthetic_images=synthetic,
                hidden_model_count=len(phase.hidden_models),
                metric=phase.metric.value,
                metric_description=METRIC_DESCRIPTIONS[phase.metric.value],
                limits=LimitsPublic(
                    max_per_day=phase.limits.max_per_day,
                    max_total=phase.limits.max_total,
                    max_upload_bytes=min(phase.limits.max_upload_bytes, settings.max_upload_bytes),
                ),
                dataset_urls={fmt: f"{prefix}/dataset?format={fmt}" for fmt in ("zip", "npz")},
                submissions_url=f"{prefix}/submissions",
                leaderboard_url=f"{prefix}/leaderboard",
            )
        )
    return AssignmentPublic(
        slug=assignment.slug,
        title=assignment.title,
        description=assignment.description,
        timezone=assignment.timezone,
        phases=phases,
    )
