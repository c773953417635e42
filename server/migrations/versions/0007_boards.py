"""private board reveals and marked submissions

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22 13:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("submission") as batch:
        batch.add_column(sa.Column("marked_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "board_reveal",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("assignment_slug", sa.String(length=64), nullable=False),
        sa.Column("phase_id", sa.String(length=64), nullable=False),
        sa.Column("revealed_by_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["revealed_by_id"],
            ["user.id"],
            name=op.f("fk_board_reveal_revealed_by_id_user"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_board_reveal")),
        sa.UniqueConstraint(
            "assignment_slug", "phase_id", name=op.f("uq_board_reveal_assignment_slug")
        ),
    )


def downgrade() -> None:
    op.drop_table("board_reveal")
    with op.batch_alter_table("submission") as batch:
        batch.drop_column("marked_at")
