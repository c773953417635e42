"""ORM tables: users, API tokens, web sessions, submissions, extensions, the audit log, transfer
results and worker heartbeats."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy import Enum as SAEnum
from sqlalchemy.orm import Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from server.db import Base, utcnow


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given; store UTC-aware datetimes")
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Role(StrEnum):
    STUDENT = "student"
    TA = "ta"
    INSTRUCTOR = "instructor"

    @property
    def is_staff(self) -> bool:
        return self in (Role.TA, Role.INSTRUCTOR)


class SubmissionStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SCORED = "scored"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (
            SubmissionStatus.SCORED,
            SubmissionStatus.FAILED,
            SubmissionStatus.CANCELLED,
        )


class FailureCause(StrEnum):
    """Why a submission failed; none of these is charged to the student's quota."""

    INFRASTRUCTURE = "infrastructure"
    """Its worker died ``max_attempts`` times (the lease ran out each time)."""
    ARTIFACT = "artifact"
    """A hidden file of the phase is missing or does not match its pinned hash."""
    GRADER = "grader"
    """The grader refused the stored upload with a reason (``GraderError``)."""
    INTERNAL = "internal"
    """Any other exception in the grader."""
    TIME_LIMIT = "time_limit"
    """Scoring ran past the phase's time limit."""


def _new_id() -> str:
    return uuid.uuid4().hex


def _enum(enum_cls: type[Enum], name: str, length: int = 16) -> SAEnum:
    return SAEnum(
        enum_cls,
        name=name,
        native_enum=False,
        length=length,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class User(Base):
    __tablename__ = "user"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[Role] = mapped_column(_enum(Role, "role"))
    pseudonym: Mapped[str] = mapped_column(String(64), unique=True)
    full_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    email: Mapped[str | None] = mapped_column(String(255), nullable=True)
    password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)
    """argon2 hash; ``None`` until a password is set (API tokens work without one)."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user")


class ApiToken(Base):
    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    user: Mapped[User] = relationship(back_populates="tokens")


class WebSession(Base):
    """A browser login: the cookie holds a random value, the table only its HMAC."""

    __tablename__ = "web_session"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    """Sent back by forms and by the pages' API calls (``X-CSRF-Token``)."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    user: Mapped[User] = relationship()


class Extension(Base):
    """A later deadline for one student in one phase, granted by staff."""

    __tablename__ = "extension"
    __table_args__ = (UniqueConstraint("user_id", "assignment_slug", "phase_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"), index=True)
    assignment_slug: Mapped[str] = mapped_column(String(64))
    phase_id: Mapped[str] = mapped_column(String(64))
    due_at: Mapped[datetime] = mapped_column(UTCDateTime())
    reason: Mapped[str] = mapped_column(Text)
    granted_by_id: Mapped[int] = mapped_column(ForeignKey("user.id", ondelete="RESTRICT"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    user: Mapped[User] = relationship(foreign_keys=[user_id])
    granted_by: Mapped[User] = relationship(foreign_keys=[granted_by_id])


class AuditAction(StrEnum):
    CANCEL = "cancel"
    REGRADE = "regrade"
    OVERRIDE = "override"
    EXTENSION_GRANTED = "extension_granted"
    EXTENSION_REVOKED = "extension_revoked"
    QUOTA_RAISED = "quota_raised"
    ROSTER_IMPORTED = "roster_imported"
    REVEAL = "reveal"


class Invitation(Base):
    """A one-time code a student uses to set their password; only its HMAC is stored."""

    __tablename__ = "invitation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"), index=True)
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_by_id: Mapped[int | None] = mapped_column(
        ForeignKey("user.id", ondelete="SET NULL"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    user: Mapped[User] = relationship(foreign_keys=[user_id])


class BoardReveal(Base):
    """Staff opened a phase's private board before it would open by itself."""

    __tablename__ = "board_reveal"
    __table_args__ = (UniqueConstraint("assignment_slug", "phase_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_slug: Mapped[str] = mapped_column(String(64))
    phase_id: Mapped[str] = mapped_column(String(64))
    revealed_by_id: Mapped[int] = mapped_column(ForeignKey("user.id", ondelete="RESTRICT"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class QuotaGrant(Base):
    """Extra submissions for one student in one phase, granted by staff."""

    __tablename__ = "quota_grant"
    __table_args__ = (UniqueConstraint("user_id", "assignment_slug", "phase_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"), index=True)
    assignment_slug: Mapped[str] = mapped_column(String(64))
    phase_id: Mapped[str] = mapped_column(String(64))
    extra_per_day: Mapped[int] = mapped_column(Integer, default=0)
    extra_total: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str] = mapped_column(Text)
    granted_by_id: Mapped[int] = mapped_column(ForeignKey("user.id", ondelete="RESTRICT"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    user: Mapped[User] = relationship(foreign_keys=[user_id])


class AuditEvent(Base):
    """One staff action (or a student's own cancel): who, when, on what, and why."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    actor_id: Mapped[int] = mapped_column(ForeignKey("user.id", ondelete="RESTRICT"), index=True)
    action: Mapped[AuditAction] = mapped_column(_enum(AuditAction, "audit_action", length=32))
    assignment_slug: Mapped[str | None] = mapped_column(String(64), nullable=True)
    phase_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    submission_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    subject_id: Mapped[int | None] = mapped_column(
        ForeignKey("user.id", ondelete="RESTRICT"), nullable=True
    )
    """The student the action concerns."""
    reason: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)

    actor: Mapped[User] = relationship(foreign_keys=[actor_id])
    subject: Mapped[User | None] = relationship(foreign_keys=[subject_id])


class Submission(Base):
    __tablename__ = "submission"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=_new_id)
    user_id: Mapped[int] = mapped_column(ForeignKey("user.id", ondelete="RESTRICT"), index=True)
    assignment_slug: Mapped[str] = mapped_column(String(64), index=True)
    phase_id: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[SubmissionStatus] = mapped_column(
        _enum(SubmissionStatus, "submission_status"), index=True
    )
    file_name: Mapped[str] = mapped_column(String(255))
    file_sha256: Mapped[str] = mapped_column(String(64))
    file_size: Mapped[int] = mapped_column(Integer)
    batch_path: Mapped[str] = mapped_column(String(512))
    """The stored, validated upload the worker reads: an .npy batch or a .safetensors model."""
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    """Defense uploads: architecture and input normalization."""
    queue: Mapped[str] = mapped_column(String(16), default="cpu", server_default="cpu")
    task_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    results: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_log: Mapped[str | None] = mapped_column(Text, nullable=True)
    failure_cause: Mapped[FailureCause | None] = mapped_column(
        _enum(FailureCause, "failure_cause", length=32), nullable=True
    )
    evaluator_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    score_override: Mapped[float | None] = mapped_column(Float, nullable=True)
    """A score set by staff (with a reason, in the audit log); it replaces ``score`` in rankings
    and exports, and survives regrades until staff clear it."""
    override_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    override_by_id: Mapped[int | None] = mapped_column(
        ForeignKey("user.id", ondelete="RESTRICT"), nullable=True
    )
    override_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    marked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    """Set while the student marks this submission for the final selection (``marked`` phases)."""
    scoring_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """Scored submissions: :attr:`server.assignments.PhaseSpec.scoring_key` of the phase as the
    worker read it; an identical upload under the same key reuses this score."""
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    user: Mapped[User] = relationship(foreign_keys=[user_id])
    override_by: Mapped[User | None] = relationship(foreign_keys=[override_by_id])

    @property
    def final_score(self) -> float | None:
        """The score that counts: staff's override when there is one, else the grader's."""
        return self.score_override if self.score_override is not None else self.score


class TransferResult(Base):
    """Accuracy of one scored defense on one scored attack batch (the transfer matrix)."""

    __tablename__ = "transfer_result"
    __table_args__ = (UniqueConstraint("defense_submission_id", "attack_submission_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    defense_submission_id: Mapped[str] = mapped_column(
        ForeignKey("submission.id", ondelete="CASCADE"), index=True
    )
    attack_submission_id: Mapped[str] = mapped_column(
        ForeignKey("submission.id", ondelete="CASCADE"), index=True
    )
    accuracy: Mapped[float] = mapped_column(Float)
    n_points: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WorkerHeartbeat(Base):
    __tablename__ = "worker_heartbeat"

    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    queues: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
