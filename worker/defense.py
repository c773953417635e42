"""Defense-phase work: evaluating a submitted checkpoint with the phase's attack suites, and the
transfer matrix (each scored defense against the scored batches of the attack phases)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from graders.attack_scoring import default_device, predict
from graders.attacks.masking import check_transfer_gap
from graders.checkpoints import sha256_file
from graders.defense_models import DefenseManifest, load_defense
from graders.defense_scoring import evaluate_defense
from graders.errors import GraderError, SubmissionRejected
from server.artifacts import load_verified_eval_set
from server.assignments import AssignmentSpec, PhaseSpec, Track
from server.config import Settings
from server.db import run_with_retry
from server.models import Submission, TransferResult
from server.services.submissions import latest_scored_per_student

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0


def _throttled(report: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """Pass progress on when the stage or attack changes, else at most once a second (each
    report is a database write)."""
    last = 0.0
    last_key: tuple[Any, ...] = ()

    def progress(state: dict[str, Any]) -> None:
        nonlocal last, last_key
        now = time.monotonic()
        key = (state.get("stage"), state.get("suite"), state.get("attack"))
        if key != last_key or now - last >= PROGRESS_EVERY_S:
            last, last_key = now, key
            report(state)

    return progress


def load_submitted_model(submission: Submission) -> Any:
    """The stored (already validated) checkpoint of a defense submission, in eval mode."""
    if submission.manifest is None:
        raise GraderError("this defense submission has no manifest")
    manifest = DefenseManifest.model_validate(submission.manifest)
    try:
        return load_defense(Path(submission.batch_path), manifest).to(default_device())
    except SubmissionRejected as exc:  # validated at upload, so the stored file changed
        raise GraderError(
            f"the stored checkpoint could not be loaded again: {exc.message}"
        ) from exc


def grade_defense(
    *,
    session: Session,
    settings: Settings,
    assignment: AssignmentSpec,
    phase: PhaseSpec,
    submission: Submission,
    report_progress: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Evaluate one defense submission; returns the results to store (score included)."""
    if phase.defense is None:
        raise GraderError(f"phase {phase.id!r} is not a defense phase")
    eval_set = load_verified_eval_set(settings.data_path, phase.evaluation_set)
    model = load_submitted_model(submission)
    report = evaluate_defense(
        model,
        eval_set.images,
        eval_set.labels,
        phase.threat_model.to_threat_model(),
        phase.defense,
        progress=_throttled(report_progress),
    )
    results = report.model_dump(mode="json")
    results["architecture"] = submission.manifest
    results["hashes"] = {
        "evaluation_set": phase.evaluation_set.sha256,
        "checkpoint": sha256_file(Path(submission.batch_path)),
        "uploaded_file": submission.file_sha256,
    }
    if phase.defense.transfer_from:
        report_progress({"stage": "transfer attacks"})
        # Reads and writes the database after what may have been hours of attacks: a database
        # restart now is waited for (the cells already recorded are skipped on the next try).
        transfer = run_with_retry(
            session,
            lambda: _transfer_against_batches(
                session=session,
                settings=settings,
                assignment=assignment,
                phase=phase,
                defense=submission,
                model=model,
            ),
            what=f"transfer scoring of defense {submission.id}",
        )
        results["transfer"] = transfer
        comparable = [t["accuracy"] for t in transfer if t["same_points"]]
        if comparable:
            flag = check_transfer_gap(
                white_box_robust=report.final_robust_accuracy, transfer_robust=min(comparable)
            )
            if flag is not None:
                results["flags"].append(flag.model_dump(mode="json"))
    return results


def _transfer_accuracy(model: Any, batch_path: str, labels: np.ndarray) -> float:
    adversarial = np.load(Path(batch_path), allow_pickle=False)
    return float((predict(model, adversarial) == labels).mean())


def _record(session: Session, defense_id: str, attack_id: str, accuracy: float, n: int) -> None:
    exists = session.scalar(
        select(TransferResult.id).where(
            TransferResult.defense_submission_id == defense_id,
            TransferResult.attack_submission_id == attack_id,
        )
    )
    if exists is None:
        session.add(
            TransferResult(
                defense_submission_id=defense_id,
                attack_submission_id=attack_id,
                accuracy=accuracy,
                n_points=n,
            )
        )
        session.commit()


def _transfer_against_batches(
    *,
    session: Session,
    settings: Settings,
    assignment: AssignmentSpec,
    phase: PhaseSpec,
    defense: Submission,
    model: Any,
) -> list[dict[str, Any]]:
    """The defense's accuracy on each student's latest scored batch of the transfer phases."""
    out = []
    for source_id in phase.defense.transfer_from if phase.defense else []:
        source = assignment.phase(source_id)
        if source is None or source.track is not Track.ATTACK:
            continue
        eval_set = load_verified_eval_set(settings.data_path, source.evaluation_set)
        same = source.evaluation_set.sha256 == phase.evaluation_set.sha256
        for batch in latest_scored_per_student(session, assignment.slug, source.id):
            accuracy = _transfer_accuracy(model, batch.batch_path, eval_set.labels)
            _record(session, defense.id, batch.id, accuracy, len(eval_set))
            out.append(
                {
                    "attack_phase": source.id,
                    "attack_submission_id": batch.id,
                    "accuracy": accuracy,
                    "n_points": len(eval_set),
                    "same_points": same,
                }
            )
    return out


def defense_phases_fed_by(assignment: AssignmentSpec, attack_phase_id: str) -> Sequence[PhaseSpec]:
    """The defense phases whose transfer matrix uses batches of ``attack_phase_id``."""
    return [
        p
        for p in assignment.phases
        if p.defense is not None and attack_phase_id in p.defense.transfer_from
    ]


def transfer_new_batch(
    *, session: Session, settings: Settings, assignment: AssignmentSpec, attack: Submission
) -> int:
    """Score a newly scored attack batch against every student's latest scored defense of the
    phases that take transfer attacks from its phase; returns how many cells were added."""
    source = assignment.phase(attack.phase_id)
    if source is None or source.track is not Track.ATTACK:
        return 0
    eval_set = load_verified_eval_set(settings.data_path, source.evaluation_set)
    added = 0
    for phase in defense_phases_fed_by(assignment, source.id):
        for defense in latest_scored_per_student(session, assignment.slug, phase.id):
            done = session.scalar(
                select(TransferResult.id).where(
                    TransferResult.defense_submission_id == defense.id,
                    TransferResult.attack_submission_id == attack.id,
                )
            )
            if done is not None:
                continue
            model = load_submitted_model(defense)
            accuracy = _transfer_accuracy(model, attack.batch_path, eval_set.labels)
            _record(session, defense.id, attack.id, accuracy, len(eval_set))
            added += 1
    return added
