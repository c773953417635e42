"""What staff changed for one student in a phase: a later deadline (an extension) and extra
submissions (a quota grant)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.assignments import AssignmentSpec, PhaseSpec
from server.models import Extension, QuotaGrant, User


def extension_for(
    session: Session, user: User, assignment: AssignmentSpec, phase: PhaseSpec
) -> Extension | None:
    return session.scalar(
        select(Extension).where(
            Extension.user_id == user.id,
            Extension.assignment_slug == assignment.slug,
            Extension.phase_id == phase.id,
        )
    )


def due_for(session: Session, user: User, assignment: AssignmentSpec, phase: PhaseSpec) -> datetime:
    """The user's own deadline for a phase: the phase's, or a later one granted to them."""
    extension = extension_for(session, user, assignment, phase)
    if extension is not None and extension.due_at > phase.due_at:
        return extension.due_at
    return phase.due_at


def quota_grant_for(
    session: Session, user: User, assignment: AssignmentSpec, phase: PhaseSpec
) -> QuotaGrant | None:
    return session.scalar(
        select(QuotaGrant).where(
            QuotaGrant.user_id == user.id,
            QuotaGrant.assignment_slug == assignment.slug,
            QuotaGrant.phase_id == phase.id,
        )
    )
