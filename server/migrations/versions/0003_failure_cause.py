"""submission failure cause

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FAILURE_CAUSES = ("infrastructure", "artifact", "grader", "internal", "time_limit")

_EARLIER_MESSAGES = {
    "infrastructure": "Infrastructure error:%",
    "artifact": "The grader could not load a hidden artifact%",
    "grader": "The grader could not score this submission:%",
    "internal": "Internal grader error%",
}
"""How the failures recorded before this revision begin, to give them their cause."""


def upgrade() -> None:
    with op.batch_alter_table("submission") as batch:
        batch.add_column(
            sa.Column(
                "failure_cause",
                sa.Enum(*_FAILURE_CAUSES, name="failure_cause", native_enum=False, length=32),
                nullable=True,
            )
        )
    submission = sa.table(
        "submission",
        sa.column("status", sa.String()),
        sa.column("error_message", sa.Text()),
        sa.column("failure_cause", sa.String()),
    )
    for cause, pattern in _EARLIER_MESSAGES.items():
        op.execute(
            submission.update()
            .where(
                submission.c.status == "failed",
                submission.c.failure_cause.is_(None),
                submission.c.error_message.like(pattern),
            )
            .values(failure_cause=cause)
        )


def downgrade() -> None:
    with op.batch_alter_table("submission") as batch:
        batch.drop_column("failure_cause")
