"""Public views of assignments and the clean-image downloads built from the evaluation sets."""

from __future__ import annotations

import io
import threading
from collections.abc import Mapping
from datetime import datetime

from graders.attacks.suite import build_suite
from graders.datasets import write_npz_download, write_png_zip
from graders.defense_models import NormalizationName
from graders.errors import ArtifactError
from server.artifacts import load_verified_eval_set
from server.assignments import AssignmentSpec, PhaseSpec, Track
from server.config import Settings
from server.db import utcnow
from server.schemas import (
    AssignmentPublic,
    DefensePublic,
    LimitsPublic,
    PhasePublic,
    ThreatModelPublic,
)
from server.services.submissions import upload_limit

_downloads: dict[tuple[str, str], bytes] = {}
_lock = threading.Lock()

METRIC_DESCRIPTIONS = {
    "mean_accuracy": "mean accuracy of the hidden models on your images; lower is better",
    "robust_accuracy": (
        "accuracy of your model on hidden points under the phase's attack suite, each point's "
        "worst case over the attacks; higher is better"
    ),
}


def _defense_public(phase: PhaseSpec, settings: Settings) -> DefensePublic | None:
    defense = phase.defense
    if defense is None:
        return None
    return DefensePublic(
        allowed_architectures=[a.value for a in defense.allowed_architectures],
        normalizations=[n.value for n in NormalizationName] + ["mean=r,g,b;std=r,g,b"],
        max_checkpoint_bytes=upload_limit(settings=settings, phase=phase),
        checkpoint_formats=[".safetensors", ".pt", ".pth"],
        leaderboard_suite=defense.leaderboard_suite.value,
        final_suite=defense.final_suite.value,
        suites={
            kind.value: [a.name.value for a in build_suite(kind, defense.params)]
            for kind in {defense.leaderboard_suite, defense.final_suite}
        },
        transfer_from=list(defense.transfer_from),
    )


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
    *,
    assignment: AssignmentSpec,
    settings: Settings,
    base_url: str,
    deadlines: Mapping[str, datetime] | None = None,
) -> AssignmentPublic:
    """The assignment as a student sees it; ``deadlines`` maps phase ids to the viewer's own
    deadline where an extension moved it."""
    now = utcnow()
    phases = []
    for phase in assignment.phases:
        prefix = f"{base_url}/api/v1/assignments/{assignment.slug}/phases/{phase.id}"
        try:
            eval_set = load_verified_eval_set(settings.data_path, phase.evaluation_set)
            n_images, synthetic = len(eval_set), eval_set.synthetic
        except ArtifactError:
            n_images, synthetic = None, None
        your_due = (deadlines or {}).get(phase.id, phase.due_at)
        phases.append(
            PhasePublic(
                id=phase.id,
                title=phase.title,
                description=phase.description,
                track=phase.track.value,
                opens_at=phase.opens_at,
                due_at=phase.due_at,
                your_due_at=your_due,
                is_open=phase.opens_at <= now < your_due,
                threat_model=ThreatModelPublic(
                    norm=phase.threat_model.norm.value, eps=phase.threat_model.eps
                ),
                n_images=n_images,
                synthetic_images=synthetic,
                hidden_model_count=len(phase.hidden_models),
                metric=phase.scoring_metric.value,
                metric_description=METRIC_DESCRIPTIONS[phase.scoring_metric.value],
                limits=LimitsPublic(
                    max_per_day=phase.limits.max_per_day,
                    max_total=phase.limits.max_total,
                    max_upload_bytes=upload_limit(settings=settings, phase=phase),
                ),
                defense=_defense_public(phase, settings),
                dataset_urls=(
                    {fmt: f"{prefix}/dataset?format={fmt}" for fmt in ("zip", "npz")}
                    if phase.track is Track.ATTACK
                    else {}
                ),
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
