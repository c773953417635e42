"""Accepting uploads (attack batches and defense checkpoints: validate, store, commit, enqueue)
and reading submissions back."""

from __future__ import annotations

import logging
import shutil
import uuid
from datetime import datetime, time, timedelta
from typing import NamedTuple

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from graders.batch_formats import BatchLimits, read_batch
from graders.checkpoints import write_safetensors
from graders.defense_models import DefenseManifest, load_defense
from graders.threat_model import check_threat_model
from server.artifacts import load_verified_eval_set
from server.assignments import AssignmentSpec, PhaseSpec, Track
from server.config import Settings
from server.db import utcnow
from server.errors import NotFound, PhaseClosed, QuotaExceeded
from server.models import Submission, SubmissionStatus, User
from server.queue import enqueue
from server.schemas import QuotaPublic, ScoreOverridePublic, SubmissionPublic
from server.services.deadlines import due_for, quota_grant_for
from server.storage import StoredUpload

log = logging.getLogger(__name__)

CHARGED = (SubmissionStatus.QUEUED, SubmissionStatus.RUNNING, SubmissionStatus.SCORED)


def _local(moment: datetime, assignment: AssignmentSpec) -> str:
    return moment.astimezone(assignment.zone).strftime("%Y-%m-%d %H:%M %Z")


def quota(
    *,
    session: Session,
    user: User,
    assignment: AssignmentSpec,
    phase: PhaseSpec,
    now: datetime | None = None,
) -> QuotaPublic:
    """What ``user`` has used of the phase's limits (raised by a staff grant, if any); the day
    ends at midnight course time."""
    now = now or utcnow()
    local_now = now.astimezone(assignment.zone)
    day_start = datetime.combine(local_now.date(), time(), tzinfo=assignment.zone)
    used_today, used_total = session.execute(
        select(
            func.count().filter(Submission.created_at >= day_start),
            func.count(),
        ).where(
            Submission.user_id == user.id,
            Submission.assignment_slug == assignment.slug,
            Submission.phase_id == phase.id,
            Submission.status.in_(CHARGED),
        )
    ).one()
    grant = quota_grant_for(session, user, assignment, phase)
    extra_day, extra_total = (grant.extra_per_day, grant.extra_total) if grant else (0, 0)
    limits = phase.limits
    return QuotaPublic(
        used_today=used_today,
        max_per_day=None if limits.max_per_day is None else limits.max_per_day + extra_day,
        used_total=used_total,
        max_total=None if limits.max_total is None else limits.max_total + extra_total,
        resets_at=day_start + timedelta(days=1),
    )


def _check_window(
    session: Session, user: User, assignment: AssignmentSpec, phase: PhaseSpec, now: datetime
) -> None:
    due = due_for(session, user, assignment, phase)
    if not phase.opens_at <= now < due:
        extended = " (your extended deadline)" if due != phase.due_at else ""
        raise PhaseClosed(
            f"Phase {phase.id!r} accepts submissions from {_local(phase.opens_at, assignment)} "
            f"to {_local(due, assignment)}{extended}; it is closed now.",
            {"opens_at": phase.opens_at.isoformat(), "due_at": due.isoformat()},
        )


def _check_quota(
    session: Session, user: User, assignment: AssignmentSpec, phase: PhaseSpec, now: datetime
) -> None:
    used = quota(session=session, user=user, assignment=assignment, phase=phase, now=now)
    if used.max_total is not None and used.used_total >= used.max_total:
        raise QuotaExceeded(
            f"You have used all {used.max_total} submissions of phase {phase.id!r}. "
            "Failed and cancelled submissions are not counted.",
            used.model_dump(mode="json"),
        )
    if used.max_per_day is not None and used.used_today >= used.max_per_day:
        raise QuotaExceeded(
            f"You have used today's {used.max_per_day} submissions of phase {phase.id!r}; "
            f"the count resets at {_local(used.resets_at, assignment)}.",
            used.model_dump(mode="json"),
        )


def validate_batch(*, settings: Settings, phase: PhaseSpec, upload: StoredUpload) -> np.ndarray:
    """Parse the upload and check the threat model against the clean images; raise if invalid."""
    eval_set = load_verified_eval_set(settings.data_path, phase.evaluation_set)
    batch = read_batch(
        upload.path,
        upload.file_name,
        expected_names=eval_set.names,
        limits=BatchLimits.for_batch(len(eval_set)),
    )
    check_threat_model(eval_set.images, batch, phase.threat_model.to_threat_model(), eval_set.names)
    return batch


def upload_limit(*, settings: Settings, phase: PhaseSpec) -> int:
    """The most bytes an upload to ``phase`` may have."""
    phase_limit = (
        phase.defense.max_checkpoint_bytes
        if phase.defense is not None
        else phase.limits.max_upload_bytes
    )
    return min(phase_limit, settings.max_upload_bytes)


class Accepted(NamedTuple):
    submission: Submission
    reused: bool
    """True when ``submission`` is an earlier, already scored submission of the same file."""


def find_reusable(
    session: Session,
    *,
    user: User,
    phase: PhaseSpec,
    assignment: AssignmentSpec,
    file_sha256: str,
    manifest: DefenseManifest | None,
) -> Submission | None:
    """The user's earliest scored submission of the same bytes (and the same manifest) to this
    phase, scored under the phase's current scoring key; ``None`` if there is none."""
    wanted = manifest.model_dump(mode="json") if manifest is not None else None
    candidates = session.scalars(
        select(Submission)
        .where(
            Submission.user_id == user.id,
            Submission.assignment_slug == assignment.slug,
            Submission.phase_id == phase.id,
            Submission.file_sha256 == file_sha256,
            Submission.status == SubmissionStatus.SCORED,
            Submission.scoring_key == phase.scoring_key,
        )
        .order_by(Submission.created_at)
    )
    return next((row for row in candidates if row.manifest == wanted), None)


def create_submission(
    *,
    session: Session,
    settings: Settings,
    user: User,
    assignment: AssignmentSpec,
    phase: PhaseSpec,
    upload: StoredUpload,
    manifest: DefenseManifest | None = None,
) -> Accepted:
    """Accept a batch or a checkpoint: nothing is stored or charged unless every check passes.

    A file the user already had scored in this phase (same bytes, same manifest, same scoring
    key) is not graded again: the earlier submission is returned, nothing new is stored and the
    quota is not charged. A checkpoint is loaded strictly into its declared architecture here, so
    a wrong one is refused at once; what is stored for the worker is a safetensors copy of the
    loaded weights. The row is committed before the task is sent (a worker never sees an
    uncommitted row); if the broker is unreachable the submission stays queued and is sent later.
    """
    try:
        now = utcnow()
        _check_window(session, user, assignment, phase, now)
        previous = find_reusable(
            session,
            user=user,
            phase=phase,
            assignment=assignment,
            file_sha256=upload.sha256,
            manifest=manifest,
        )
        if previous is not None:
            log.info("upload by %s is identical to scored %s", user.username, previous.id)
            return Accepted(previous, reused=True)
        _check_quota(session, user, assignment, phase, now)
        submission_id = uuid.uuid4().hex
        directory = settings.upload_path / assignment.slug / phase.id
        if phase.track is Track.DEFENSE:
            if manifest is None:
                raise ValueError("a defense upload needs its manifest")  # the route parses it
            model = load_defense(upload.path, manifest, file_name=upload.file_name)
            directory.mkdir(parents=True, exist_ok=True)
            stored_path = directory / f"{submission_id}.safetensors"
            write_safetensors(model, stored_path)
            queue = "gpu"
        else:
            batch = validate_batch(settings=settings, phase=phase, upload=upload)
            directory.mkdir(parents=True, exist_ok=True)
            stored_path = directory / f"{submission_id}.npy"
            np.save(stored_path, batch, allow_pickle=False)
            queue = "cpu"
        suffix = "".join(c for c in upload.file_name.rsplit(".", 1)[-1][:12] if c.isalnum())
        shutil.move(upload.path, directory / f"{submission_id}.original.{suffix or 'bin'}")
    finally:
        upload.path.unlink(missing_ok=True)
    submission = Submission(
        id=submission_id,
        user_id=user.id,
        assignment_slug=assignment.slug,
        phase_id=phase.id,
        status=SubmissionStatus.QUEUED,
        file_name=upload.file_name[:255],
        file_sha256=upload.sha256,
        file_size=upload.size,
        batch_path=str(stored_path),
        manifest=manifest.model_dump(mode="json") if manifest is not None else None,
        queue=queue,
    )
    session.add(submission)
    try:
        session.commit()
    except Exception:
        stored_path.unlink(missing_ok=True)
        raise
    enqueue(session, settings, submission.id, phase=phase, queue=queue)
    session.refresh(submission)
    return Accepted(submission, reused=False)


def scored_in_phase(session: Session, assignment_slug: str, phase_id: str) -> list[Submission]:
    """Every scored submission of a phase, oldest first."""
    return list(
        session.scalars(
            select(Submission)
            .where(
                Submission.assignment_slug == assignment_slug,
                Submission.phase_id == phase_id,
                Submission.status == SubmissionStatus.SCORED,
            )
            .order_by(Submission.created_at)
        ).all()
    )


def latest_scored_per_student(
    session: Session, assignment_slug: str, phase_id: str
) -> list[Submission]:
    """Each student's latest scored submission of a phase."""
    latest: dict[int, Submission] = {}
    for row in scored_in_phase(session, assignment_slug, phase_id):
        latest[row.user_id] = row
    return list(latest.values())


def get_visible_submission(*, session: Session, user: User, submission_id: str) -> Submission:
    """A submission the user may read: their own, or any for staff (404 otherwise, not 403)."""
    submission = session.get(Submission, submission_id)
    if submission is None or (submission.user_id != user.id and not user.role.is_staff):
        raise NotFound(f"No submission {submission_id!r} among yours.")
    return submission


def list_submissions(
    *,
    session: Session,
    user: User,
    assignment: str | None = None,
    phase: str | None = None,
    status: SubmissionStatus | None = None,
    username: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[Submission], int]:
    """The user's submissions (all of them for staff, or one student's), newest first."""
    query = select(Submission)
    if not user.role.is_staff:
        query = query.where(Submission.user_id == user.id)
    elif username:
        query = query.join(User, User.id == Submission.user_id).where(User.username == username)
    if assignment:
        query = query.where(Submission.assignment_slug == assignment)
    if phase:
        query = query.where(Submission.phase_id == phase)
    if status:
        query = query.where(Submission.status == status)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(
        query.order_by(Submission.created_at.desc()).limit(limit).offset(offset)
    ).all()
    return list(rows), total


def queue_position(session: Session, submission: Submission) -> int | None:
    """1 for the next submission to be scored; ``None`` once it left the queue."""
    if submission.status is not SubmissionStatus.QUEUED:
        return None
    ahead = session.scalar(
        select(func.count())
        .select_from(Submission)
        .where(
            Submission.status == SubmissionStatus.QUEUED,
            Submission.queue == submission.queue,
            Submission.created_at < submission.created_at,
        )
    )
    return int(ahead or 0) + 1


def to_public(session: Session, submission: Submission, *, viewer: User) -> SubmissionPublic:
    """The API view of a submission; staff also see the owner and the grader log."""
    staff = viewer.role.is_staff
    return SubmissionPublic(
        id=submission.id,
        assignment=submission.assignment_slug,
        phase=submission.phase_id,
        status=submission.status.value,
        username=submission.user.username if staff else None,
        file_name=submission.file_name,
        file_sha256=submission.file_sha256,
        file_size=submission.file_size,
        manifest=submission.manifest,
        created_at=submission.created_at,
        started_at=submission.started_at,
        finished_at=submission.finished_at,
        queue_position=queue_position(session, submission),
        progress=submission.progress,
        score=submission.score,
        results=submission.results,
        error_message=submission.error_message,
        error_log=submission.error_log if staff else None,
        evaluator_version=submission.evaluator_version,
        attempts=submission.attempts,
        final_score=submission.final_score,
        override=_override_public(submission, staff=staff),
        marked_at=submission.marked_at,
    )


def _override_public(submission: Submission, *, staff: bool) -> ScoreOverridePublic | None:
    if submission.score_override is None or submission.override_at is None:
        return None
    by = submission.override_by
    return ScoreOverridePublic(
        score=submission.score_override,
        reason=submission.override_reason or "",
        by=by.username if staff and by is not None else None,
        at=submission.override_at,
    )
