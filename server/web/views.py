"""What the student pages show, in plain words: phase cards and rules, a submission's status,
the final selection and its marks, and the details of a scored attack batch or defense. Pages
call these; they read the database through the services and never write. Scores and results
reach a student only through :func:`server.services.boards.submission_for` (rounded, and cut to
aggregate numbers while the phase's feedback says so)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from graders.attacks.masking import FlagCode
from graders.batch_formats import ACCEPTED_FORMATS
from graders.errors import ArtifactError
from graders.threat_model import Norm
from server.artifacts import load_verified_eval_set
from server.assignments import AssignmentSpec, Feedback, PhaseSpec, Selection, Track
from server.catalog import Catalog
from server.config import Settings
from server.errors import NotFound
from server.models import Submission, SubmissionStatus, User
from server.schemas import PhasePublic, QuotaPublic, SubmissionPublic
from server.services import boards, catalog_views
from server.services import submissions as submission_service
from server.services.deadlines import due_for
from server.web import figures

TRACK_NAMES = {Track.ATTACK: "Attack", Track.DEFENSE: "Defense"}


def threat_model_text(norm: Norm, eps: float) -> str:
    """``L-inf, eps 8/255 ...`` with what it means for the pixels."""
    if norm is Norm.LINF:
        return (
            f"L-inf, eps {eps:g}/255: each pixel channel may move by at most {eps:g} on the "
            "0-255 scale"
        )
    return (
        f"L2, eps {eps / 255:.3g} on [0, 1] images ({eps:g} on the 0-255 scale): the length of "
        "each image's whole change"
    )


def catalog_zone(catalog: Catalog) -> ZoneInfo:
    """The timezone of times that belong to no one assignment (an account's tokens, an
    invitation's expiry): the course's, when its assignments agree on one, else UTC."""
    zones = {assignment.timezone for assignment in catalog.assignments.values()}
    if len(zones) == 1:
        return next(iter(catalog.assignments.values())).zone
    return ZoneInfo("UTC")


def find_assignment(catalog: Catalog, slug: str) -> AssignmentSpec:
    assignment = catalog.assignments.get(slug)
    if assignment is None:
        raise NotFound(f"There is no assignment {slug!r}; your assignments are on the home page.")
    return assignment


def find_phase(assignment: AssignmentSpec, phase_id: str) -> PhaseSpec:
    phase = assignment.phase(phase_id)
    if phase is None:
        known = ", ".join(p.title for p in assignment.phases)
        raise NotFound(f"{assignment.title} has no phase {phase_id!r} (its phases: {known}).")
    return phase


# --- Phases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseCard:
    """A phase as the home page lists it, with the viewer's own deadline and quota."""

    assignment: AssignmentSpec
    phase: PhaseSpec
    track_name: str
    due_at: datetime
    """The viewer's deadline: the phase's, or a later one from an extension."""
    extended: bool
    state: str
    """``upcoming``, ``open`` or ``closed`` for the viewer."""
    quota: QuotaPublic
    left_today: int | None
    left_total: int | None


def phase_card(
    *, session: Session, user: User, assignment: AssignmentSpec, phase: PhaseSpec, now: datetime
) -> PhaseCard:
    due = due_for(session, user, assignment, phase)
    used = submission_service.quota(
        session=session, user=user, assignment=assignment, phase=phase, now=now
    )
    state = "upcoming" if now < phase.opens_at else "open" if now < due else "closed"
    return PhaseCard(
        assignment=assignment,
        phase=phase,
        track_name=TRACK_NAMES[phase.track],
        due_at=due,
        extended=due != phase.due_at,
        state=state,
        quota=used,
        left_today=None if used.max_per_day is None else max(0, used.max_per_day - used.used_today),
        left_total=None if used.max_total is None else max(0, used.max_total - used.used_total),
    )


def home_cards(
    *, session: Session, user: User, catalog: Catalog, now: datetime
) -> list[tuple[AssignmentSpec, list[PhaseCard]]]:
    """Every assignment with a card per phase, in the order of the specs."""
    return [
        (
            assignment,
            [
                phase_card(session=session, user=user, assignment=assignment, phase=p, now=now)
                for p in assignment.phases
            ],
        )
        for assignment in catalog.assignments.values()
    ]


@dataclass(frozen=True)
class UploadRules:
    """What the upload form accepts (the browser checks these before sending anything)."""

    extensions: list[str]
    formats: list[tuple[str, str]]
    """(extension, what it must contain)."""
    max_bytes: int
    url: str


@dataclass(frozen=True)
class PhasePage:
    card: PhaseCard
    public: PhasePublic
    threat_model: str
    upload: UploadRules
    quota_url: str
    latest: StatusView | None
    selection: str
    """Which submission counts for the grade, in words."""
    feedback: str | None
    """What students see of their results during the phase, when it is less than everything."""
    marking: Marking | None


def phase_page(
    *,
    session: Session,
    settings: Settings,
    catalog: Catalog,
    user: User,
    assignment: AssignmentSpec,
    phase: PhaseSpec,
    now: datetime,
) -> PhasePage:
    card = phase_card(session=session, user=user, assignment=assignment, phase=phase, now=now)
    public = next(
        p
        for p in catalog_views.assignment_public(
            assignment=assignment,
            settings=settings,
            base_url="",
            deadlines={phase.id: card.due_at},
        ).phases
        if p.id == phase.id
    )
    if public.defense is not None:
        formats = [
            (suffix, "a state_dict of an allowed architecture")
            for suffix in public.defense.checkpoint_formats
        ]
    else:
        formats = [(f["extension"], f["content"]) for f in ACCEPTED_FORMATS]
    rows, _ = submission_service.list_submissions(
        session=session,
        user=user,
        assignment=assignment.slug,
        phase=phase.id,
        username=user.username,
        limit=1,
    )
    return PhasePage(
        card=card,
        public=public,
        threat_model=threat_model_text(phase.threat_model.norm, phase.threat_model.eps),
        upload=UploadRules(
            extensions=[suffix for suffix, _ in formats],
            formats=formats,
            max_bytes=public.limits.max_upload_bytes,
            url=public.submissions_url,
        ),
        quota_url=f"/api/v1/assignments/{assignment.slug}/phases/{phase.id}/quota",
        latest=status_view(boards.submission_for(session, catalog, rows[0], viewer=user))
        if rows
        else None,
        selection=selection_text(phase),
        feedback=feedback_text(phase),
        marking=marking(session=session, user=user, assignment=assignment, phase=phase, now=now),
    )


# --- Final selection and feedback -------------------------------------------------------------


def selection_text(phase: PhaseSpec) -> str:
    """Which submission decides the grade, in words (:data:`boards.SELECTION_RULES`)."""
    board = phase.leaderboard
    text = f"Your grade counts {boards.SELECTION_RULES[board.selection]}."
    if board.selection is Selection.MARKED:
        text += (
            f" Mark up to {board.max_marked} of your scored submissions on your submissions "
            "page, before your deadline."
        )
    return text


def feedback_text(phase: PhaseSpec) -> str | None:
    """What a student sees of their results while the private board is closed, when the phase
    shows less than everything."""
    board = phase.leaderboard
    parts = []
    if board.feedback is Feedback.AGGREGATE:
        per = "hidden model" if phase.track is Track.ATTACK else "attack"
        parts.append(
            f"Until the private board opens you see your overall score only, not the results "
            f"per {per}."
        )
    if board.round_to is not None:
        example = round(0.123456, board.round_to)
        parts.append(
            f"Scores are rounded to {board.round_to} decimals until then (0.123456 shows as "
            f"{example * 100:.2f} %)."
        )
    return " ".join(parts) or None


def results_withheld(results: dict[str, Any] | None) -> bool:
    """Whether a student's view of results was cut to aggregate numbers
    (:func:`boards.student_view` marks it with a ``feedback`` entry)."""
    return results is not None and "feedback" in results


@dataclass(frozen=True)
class Marking:
    """A student's marks in a phase whose final selection is ``marked``."""

    marked: int
    max_marked: int
    open: bool
    """Before the student's deadline: marks can still change."""

    @property
    def full(self) -> bool:
        return self.marked >= self.max_marked


def marking(
    *, session: Session, user: User, assignment: AssignmentSpec, phase: PhaseSpec, now: datetime
) -> Marking | None:
    """How many of their submissions ``user`` marked in ``phase`` (``None``: the phase's
    selection is not ``marked``)."""
    board = phase.leaderboard
    if board.selection is not Selection.MARKED:
        return None
    count = session.scalar(
        select(func.count())
        .select_from(Submission)
        .where(
            Submission.user_id == user.id,
            Submission.assignment_slug == assignment.slug,
            Submission.phase_id == phase.id,
            Submission.marked_at.is_not(None),
        )
    )
    due = due_for(session, user, assignment, phase)
    return Marking(marked=count or 0, max_marked=board.max_marked, open=now < due)


def mark_action(submission: Submission, state: Marking | None, viewer: User) -> str | None:
    """The button a submission offers its owner: ``mark``, ``unmark`` or none (another phase
    rule, the deadline has passed, not scored, or as many marked as the phase allows)."""
    if state is None or not state.open or submission.user_id != viewer.id:
        return None
    if submission.marked_at is not None:
        return "unmark"
    if submission.status is SubmissionStatus.SCORED and not state.full:
        return "mark"
    return None


@dataclass(frozen=True)
class HistoryRow:
    """A row of the student's history: the submission as they may see it."""

    submission: Submission
    assignment: AssignmentSpec | None
    phase: PhaseSpec | None
    public: SubmissionPublic
    status: StatusView
    marked: bool
    mark: str | None


@dataclass(frozen=True)
class History:
    rows: list[HistoryRow]
    markings: list[tuple[AssignmentSpec, PhaseSpec, Marking]]
    """The ``marked`` phases among the rows, with the viewer's count of marks."""


def history(
    *, session: Session, catalog: Catalog, user: User, rows: list[Submission], now: datetime
) -> History:
    """The viewer's submissions with their scores as the viewer may see them and, in phases
    whose selection is ``marked``, whether each is marked and which button it offers."""
    states: dict[tuple[str, str], tuple[AssignmentSpec, PhaseSpec, Marking] | None] = {}
    result = []
    for row in rows:
        assignment = catalog.assignments.get(row.assignment_slug)
        phase = assignment.phase(row.phase_id) if assignment is not None else None
        key = (row.assignment_slug, row.phase_id)
        if key not in states:
            state = None
            if assignment is not None and phase is not None:
                found = marking(
                    session=session, user=user, assignment=assignment, phase=phase, now=now
                )
                state = (assignment, phase, found) if found is not None else None
            states[key] = state
        state = states[key]
        public = boards.submission_for(session, catalog, row, viewer=user)
        result.append(
            HistoryRow(
                submission=row,
                assignment=assignment,
                phase=phase,
                public=public,
                status=status_view(public),
                marked=state is not None and row.marked_at is not None,
                mark=mark_action(row, state[2] if state else None, user),
            )
        )
    return History(rows=result, markings=[s for s in states.values() if s is not None])


# --- Status ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusView:
    """A submission's state in words, as the live status region shows it."""

    submission_id: str
    status: str
    headline: str
    detail: str
    final: bool
    progress: tuple[float, float] | None = None
    """(done, total) of a running evaluation, when the worker reports numbers."""
    score: str | None = None
    note: str | None = None


def score_text(metric: str, value: float) -> str:
    """A score with what it means: ``41.20 % (mean accuracy of the hidden models ...)``."""
    return f"{value * 100:.2f} % ({catalog_views.METRIC_DESCRIPTIONS[metric]})"


def _progress_words(progress: dict[str, Any] | None) -> tuple[str, tuple[float, float] | None]:
    """What a running grader reported, in words, and how far it is if it says."""
    progress = progress or {}
    stage = progress.get("stage")
    if stage == "attack":
        index, total = int(progress.get("attack_index", 1)), int(progress.get("attacks", 1))
        done, todo = (
            int(progress.get("points_attacked", 0)),
            int(progress.get("points_to_attack", 0)),
        )
        attack, suite = progress.get("attack", "?"), progress.get("suite", "?")
        words = (
            f"Attack {index} of {total} ({attack}, {suite} suite): {done} of {todo} points "
            f"attacked so far, {progress.get('robust_points_left', '?')} still robust."
        )
        fraction = (index - 1 + (done / todo if todo else 0.0)) / max(1, total)
        return words, (round(fraction * 100, 1), 100.0)
    if stage == "scoring":
        return f"Scoring your images on {progress.get('models', 'the')} hidden models.", None
    stages = {
        "loading": "Loading your upload and the phase's files.",
        "checking the model": "Checking your model for signs of gradient masking.",
        "eps sweep": "Measuring robust accuracy at other values of eps.",
        "transfer attacks": "Testing your model on the attack batches of other students.",
    }
    return stages.get(str(stage), "A worker is scoring it."), None


def status_view(public: SubmissionPublic) -> StatusView:
    """The status of a submission in plain words (queued with position, running with progress,
    scored with the score, failed with the reason)."""
    status = SubmissionStatus(public.status)
    progress: tuple[float, float] | None = None
    score: str | None = None
    note: str | None = None
    if status is SubmissionStatus.QUEUED:
        headline = "Queued"
        detail = (
            f"Position {public.queue_position} in the queue. Scoring starts when a worker is "
            "free; this status updates by itself."
            if public.queue_position is not None
            else "Waiting for a worker."
        )
        if public.attempts:
            detail += " A worker stopped while scoring it, so it is being tried again."
    elif status is SubmissionStatus.RUNNING:
        headline = "Running"
        detail, progress = _progress_words(public.progress)
    elif status is SubmissionStatus.SCORED:
        headline, detail = "Scored", "Scoring finished."
        metric = str((public.results or {}).get("metric", "mean_accuracy"))
        value = public.final_score if public.final_score is not None else public.score
        score = score_text(metric, value) if value is not None else None
        if public.override is not None and public.score is not None:
            note = (
                f"The course staff set this score (the grader's was "
                f"{public.score * 100:.2f} %): {public.override.reason}"
            )
    elif status is SubmissionStatus.FAILED:
        headline = "Failed"
        detail = public.error_message or "The grader did not record a reason."
        note = "A failed submission does not count against your quota; you can submit again."
    else:
        headline = "Cancelled"
        detail = public.error_message or "This submission was cancelled before it was scored."
        note = "A cancelled submission does not count against your quota."
    return StatusView(
        submission_id=public.id,
        status=status.value,
        headline=headline,
        detail=detail,
        final=status.is_final,
        progress=progress,
        score=score,
        note=note,
    )


# --- Submission details -----------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    index: int
    name: str
    linf: int
    amplification: float


@dataclass(frozen=True)
class AttackDetail:
    models: list[dict[str, Any]]
    fooled_by_k: list[tuple[int, int]]
    """(k, images that fool exactly k hidden models)."""
    n_images: int | None
    samples: list[Sample] = field(default_factory=list)
    histograms: figures.BatchDistances | None = None
    unavailable: str | None = None
    """Why the images cannot be shown, when they cannot."""


def attack_detail(
    *,
    settings: Settings,
    phase: PhaseSpec | None,
    submission: Submission,
    results: dict[str, Any] | None,
) -> AttackDetail:
    """The per-model results in ``results`` (the viewer's view of them) and, from the stored
    batch against the clean images, sample images and the distance histograms (the student
    holds both already, so these are shown whatever the phase's feedback)."""
    results = results or {}
    fooled = results.get("fooled_by_k") or []
    detail = AttackDetail(
        models=list(results.get("models") or []),
        fooled_by_k=list(enumerate(fooled)),
        n_images=results.get("n_images"),
    )
    if phase is None:
        return _unavailable(detail, "its phase is no longer part of the course")
    try:
        eval_set = load_verified_eval_set(settings.data_path, phase.evaluation_set)
        batch = figures.load_batch(Path(submission.batch_path), eval_set)
    except (ArtifactError, figures.BatchUnavailable) as exc:
        return _unavailable(detail, str(exc))
    linf = np.abs(batch.astype(np.int32) - eval_set.images.astype(np.int32))
    samples = [
        Sample(
            index=i,
            name=eval_set.names[i],
            linf=int(linf[i].max()),
            amplification=figures.amplification(eval_set.images[i], batch[i]),
        )
        for i in figures.sample_indices(len(batch))
    ]
    histograms = figures.batch_distances(
        eval_set.images, batch, phase.threat_model.norm, phase.threat_model.eps
    )
    return AttackDetail(
        models=detail.models,
        fooled_by_k=detail.fooled_by_k,
        n_images=detail.n_images or len(batch),
        samples=samples,
        histograms=histograms,
    )


def _unavailable(detail: AttackDetail, reason: str) -> AttackDetail:
    return AttackDetail(
        models=detail.models,
        fooled_by_k=detail.fooled_by_k,
        n_images=detail.n_images,
        unavailable=f"The images of this batch cannot be shown: {reason}.",
    )


FLAG_TITLES = {
    FlagCode.NONDETERMINISTIC: "Outputs change between identical runs",
    FlagCode.BATCH_DEPENDENT: "Predictions depend on the other images in the batch",
    FlagCode.PROBABILITIES: "Outputs look like probabilities, not logits",
    FlagCode.ZERO_GRADIENTS: "Gradients are zero",
    FlagCode.NONFINITE_GRADIENTS: "Gradients are not finite (NaN or infinity)",
    FlagCode.BLACK_BOX_GAP: "A black-box attack did better than the white-box attacks",
    FlagCode.TRANSFER_GAP: "Transferred attacks did better than the white-box attacks",
    FlagCode.EPS_SWEEP_NOT_MONOTONE: "Robust accuracy rises as eps grows",
    FlagCode.EPS_SWEEP_NOT_ZERO: "Still robust at a very large eps",
    FlagCode.LOW_CLEAN_ACCURACY: "Clean accuracy is below the phase's minimum",
}
"""A short heading per gradient-masking flag; the flag's own message says what was seen, what
it usually means and what to do."""


@dataclass(frozen=True)
class FlagView:
    code: str
    title: str
    message: str


@dataclass(frozen=True)
class SuiteView:
    name: str
    role: str
    """``leaderboard``, ``final`` or both."""
    clean_accuracy: float
    robust_accuracy: float
    n_points: int
    attacks: list[dict[str, Any]]


@dataclass(frozen=True)
class TransferView:
    attack_phase: str
    batches: int
    worst: float
    mean: float


@dataclass(frozen=True)
class DefenseDetail:
    clean_accuracy: float | None
    robust_accuracy: float | None
    final_robust_accuracy: float | None
    n_points: int | None
    randomized: bool
    suites: list[SuiteView]
    flags: list[FlagView]
    sweep: figures.LinePlot | None
    sweep_rows: list[tuple[float, float]]
    transfer: list[TransferView]


def _flag_view(flag: dict[str, Any]) -> FlagView:
    code = str(flag.get("code", ""))
    try:
        title = FLAG_TITLES[FlagCode(code)]
    except ValueError:
        title = code.replace("_", " ").capitalize() or "Flag"
    return FlagView(code=code, title=title, message=str(flag.get("message", "")))


def defense_detail(*, phase: PhaseSpec | None, results: dict[str, Any]) -> DefenseDetail:
    """Clean and robust accuracy, each suite's per-attack breakdown, the eps sweep as a plot,
    the gradient-masking flags and a summary of the transfer attacks, from ``results`` as the
    viewer may see them (what is not there is not shown)."""
    board, final = results.get("leaderboard_suite"), results.get("final_suite")
    suites = []
    for name, report in (results.get("suites") or {}).items():
        roles = [role for role, kind in (("leaderboard", board), ("final", final)) if kind == name]
        suites.append(
            SuiteView(
                name=name,
                role=" and ".join(roles),
                clean_accuracy=float(report.get("clean_accuracy", 0.0)),
                robust_accuracy=float(report.get("robust_accuracy", 0.0)),
                n_points=int(report.get("n_points", 0)),
                attacks=list(report.get("attacks") or []),
            )
        )
    suites.sort(key=lambda s: (s.name != board, s.name))
    rows = [(float(p["eps"]), float(p["robust_accuracy"])) for p in results.get("eps_sweep") or []]
    threat = results.get("threat_model") or {}
    sweep = None
    if rows:
        eps = float(threat.get("eps", phase.threat_model.eps if phase else 0.0))
        norm = Norm(str(threat.get("norm", "linf")))
        sweep = figures.sweep_plot(rows, eps, norm.label)
    by_phase: dict[str, list[float]] = {}
    for cell in results.get("transfer") or []:
        by_phase.setdefault(str(cell.get("attack_phase")), []).append(float(cell["accuracy"]))
    return DefenseDetail(
        clean_accuracy=results.get("clean_accuracy"),
        robust_accuracy=results.get("robust_accuracy"),
        final_robust_accuracy=results.get("final_robust_accuracy"),
        n_points=results.get("n_points"),
        randomized=bool(results.get("randomized")),
        suites=suites,
        flags=[_flag_view(f) for f in results.get("flags") or []],
        sweep=sweep,
        sweep_rows=sorted(rows),
        transfer=[
            TransferView(phase_id, len(values), min(values), sum(values) / len(values))
            for phase_id, values in by_phase.items()
        ],
    )


def sample_png(
    *,
    settings: Settings,
    phase: PhaseSpec | None,
    submission: Submission,
    index: int,
    kind: figures.SampleKind,
) -> bytes:
    """One picture of one image of an attack batch, as PNG bytes (404 when there is none)."""
    if phase is None or phase.track is not Track.ATTACK:
        raise NotFound("Only attack batches have sample images.")
    try:
        eval_set = load_verified_eval_set(settings.data_path, phase.evaluation_set)
        batch = figures.load_batch(Path(submission.batch_path), eval_set)
    except figures.BatchUnavailable as exc:
        raise NotFound(f"The images of this batch cannot be shown: {exc}.") from exc
    if not 0 <= index < len(batch):
        raise NotFound(f"This batch has images 0 to {len(batch) - 1}, not {index}.")
    image = figures.sample_image(eval_set.images[index], batch[index], kind)
    return figures.png_bytes(image)
