"""API schemas, separate from the ORM tables and named for their role."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ThreatModelPublic(BaseModel):
    norm: str
    eps: float
    scale: str = "0-255 pixel values"


class LimitsPublic(BaseModel):
    max_per_day: int | None
    max_total: int | None
    max_upload_bytes: int


class DefensePublic(BaseModel):
    """What a defense phase accepts and how it evaluates uploads."""

    allowed_architectures: list[str]
    normalizations: list[str]
    max_checkpoint_bytes: int
    checkpoint_formats: list[str]
    leaderboard_suite: str
    final_suite: str
    suites: dict[str, list[str]]
    transfer_from: list[str]


class PhasePublic(BaseModel):
    id: str
    title: str
    description: str
    track: str
    opens_at: datetime
    due_at: datetime
    your_due_at: datetime = Field(
        description="your own deadline: due_at, or later when a TA granted you an extension"
    )
    is_open: bool = Field(description="whether you can submit now (your own deadline counts)")
    threat_model: ThreatModelPublic
    n_images: int | None
    synthetic_images: bool | None
    hidden_model_count: int
    metric: str
    metric_description: str
    limits: LimitsPublic
    defense: DefensePublic | None = None
    dataset_urls: dict[str, str]
    submissions_url: str
    leaderboard_url: str


class AssignmentSummary(BaseModel):
    slug: str
    title: str
    timezone: str
    phases: list[str]


class AssignmentsPublic(BaseModel):
    data: list[AssignmentSummary]


class AssignmentPublic(BaseModel):
    slug: str
    title: str
    description: str
    timezone: str
    phases: list[PhasePublic]


class QuotaPublic(BaseModel):
    used_today: int
    max_per_day: int | None
    used_total: int
    max_total: int | None
    resets_at: datetime


class ScoreOverridePublic(BaseModel):
    score: float
    reason: str
    by: str | None = Field(default=None, description="the TA (shown to staff only)")
    at: datetime


class SubmissionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    assignment: str
    phase: str
    status: str
    username: str | None = None
    file_name: str
    file_sha256: str
    file_size: int
    manifest: dict[str, Any] | None = None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    queue_position: int | None = None
    progress: dict[str, Any] | None = None
    score: float | None
    results: dict[str, Any] | None
    error_message: str | None
    error_log: str | None = None
    evaluator_version: str | None
    attempts: int
    final_score: float | None = Field(
        default=None, description="the score that counts: a TA's override if any, else `score`"
    )
    override: ScoreOverridePublic | None = None
    marked_at: datetime | None = Field(
        default=None, description="when you marked it for the final selection (`marked` phases)"
    )
    reused: bool = Field(
        default=False,
        description="set in the answer to an upload identical to one already scored in this "
        "phase: that earlier submission is returned, and nothing is charged",
    )


class SubmissionsPublic(BaseModel):
    data: list[SubmissionPublic]
    count: int


class LeaderboardEntry(BaseModel):
    rank: int | None = Field(description="null for students without a scored submission (last)")
    pseudonym: str
    username: str | None = None
    score: float | None
    submission_id: str | None = None
    submissions: int
    best_submitted_at: datetime | None = Field(description="when the ranked submission was made")
    last_submitted_at: datetime | None
    is_you: bool = False


class LeaderboardPublic(BaseModel):
    assignment: str
    phase: str
    metric: str
    board: str = Field(description="public (during the phase) or private (final, decides grades)")
    revealed: bool = Field(description="whether the private board is open to students")
    selection: str = Field(description="how entries are scored and ranked, in words")
    entries: list[LeaderboardEntry]


class UserPublic(BaseModel):
    username: str
    role: str
    pseudonym: str


class ComponentHealth(BaseModel):
    ok: bool
    detail: str | None = None


class WorkerPublic(BaseModel):
    hostname: str
    queues: str
    last_seen_at: datetime


class QueuePublic(BaseModel):
    """One Celery queue: submissions waiting and being scored, and live workers consuming it."""

    queued: int
    running: int
    workers: int


class HealthPublic(BaseModel):
    status: str
    database: ComponentHealth
    broker: ComponentHealth
    workers: list[WorkerPublic]
    queued: int
    running: int
    queues: dict[str, QueuePublic]


class TransferCell(BaseModel):
    attack_submission_id: str | None
    attack_phase: str
    attacker: str
    accuracy: float
    n_points: int


class TransferRow(BaseModel):
    defense_submission_id: str | None
    defender: str
    robust_accuracy: float | None
    cells: list[TransferCell]


class TransferMatrixPublic(BaseModel):
    assignment: str
    phase: str
    description: str
    rows: list[TransferRow]


class ReasonIn(BaseModel):
    reason: str = Field(default="", max_length=2000, description="recorded in the audit log")


class RegradePhaseIn(ReasonIn):
    only_failed: bool = Field(default=False, description="queue again only failed submissions")


class OverrideIn(ReasonIn):
    score: float | None = Field(description="the score that counts, 0..1; null clears it")


class ExtensionIn(ReasonIn):
    due_at: datetime = Field(description="the student's new deadline, with a UTC offset")


class ExtensionPublic(BaseModel):
    username: str
    due_at: datetime
    reason: str
    granted_by: str
    created_at: datetime


class ExtensionsPublic(BaseModel):
    data: list[ExtensionPublic]


class RegradeCount(BaseModel):
    queued: int


class AuditEventPublic(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    assignment: str | None
    phase: str | None
    submission_id: str | None
    subject: str | None
    reason: str
    details: dict[str, Any] | None


class AuditLogPublic(BaseModel):
    data: list[AuditEventPublic]


class PseudonymIn(BaseModel):
    pseudonym: str = Field(description="3-32 characters: lowercase letters, digits and '-'")


class TokenIn(BaseModel):
    name: str = Field(default="token", max_length=64, description="what it is for, e.g. 'laptop'")


class TokenPublic(BaseModel):
    id: int
    name: str
    created_at: datetime
    revoked_at: datetime | None


class NewTokenPublic(TokenPublic):
    token: str = Field(description="shown once; only its hash is stored")


class TokensPublic(BaseModel):
    data: list[TokenPublic]


class InvitationIn(BaseModel):
    code: str = Field(max_length=128)
    password: str = Field(max_length=1024)
    pseudonym: str | None = None


class RosterStudentPublic(BaseModel):
    student_id: str
    name: str
    email: str
    created: bool
    invitation_code: str | None = Field(description="shown once; null if they set a password")


class RosterPublic(BaseModel):
    students: list[RosterStudentPublic]
    created: int
    invitations: int
    invitation_expires_in_days: float


class QuotaGrantIn(ReasonIn):
    extra_per_day: int = Field(default=0, ge=0, le=1000)
    extra_total: int = Field(default=0, ge=0, le=1000)


class ReceiptPublic(BaseModel):
    receipt: dict[str, Any] = Field(description="the facts of the score, as signed")
    signature: str = Field(description="hmac-sha256 over the receipt's canonical JSON")


class ReceiptCheck(BaseModel):
    valid: bool = Field(description="this server signed exactly this receipt")
    matches_record: bool = Field(description="the submission's record still says the same")
    differences: dict[str, Any] = Field(description="field -> what the receipt and the record say")
