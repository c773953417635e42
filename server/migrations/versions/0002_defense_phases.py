"""defense phases: submission manifest and queue, transfer results

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("submission") as batch:
        batch.add_column(sa.Column("manifest", sa.JSON(), nullable=True))
        batch.add_column(
            sa.Column("queue", sa.String(length=16), server_default="cpu", nullable=False)
        )
    op.create_table(
        "transfer_result",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("defense_submission_id", sa.String(length=32), nullable=False),
        sa.Column("attack_submission_id", sa.String(length=32), nullable=False),
        sa.Column("accuracy", sa.Float(), nullable=False),
        sa.Column("n_points", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["attack_submission_id"],
            ["submission.id"],
            name=op.f("fk_transfer_result_attack_submission_id_submission"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["defense_submission_id"],
            ["submission.id"],
            name=op.f("fk_transfer_result_defense_submission_id_submission"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_transfer_result")),
        sa.UniqueConstraint(
            "defense_submission_id",
            "attack_submission_id",
            name=op.f("uq_transfer_result_defense_submission_id"),
        ),
    )
    op.create_index(
        op.f("ix_transfer_result_attack_submission_id"),
        "transfer_result",
        ["attack_submission_id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_transfer_result_defense_submission_id"),
        "transfer_result",
        ["defense_submission_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_transfer_result_defense_submission_id"), table_name="transfer_result")
    op.drop_index(op.f("ix_transfer_result_attack_submission_id"), table_name="transfer_result")
    op.drop_table("transfer_result")
    with op.batch_alter_table("submission") as batch:
        batch.drop_column("queue")
        batch.drop_column("manifest")
