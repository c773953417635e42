"""roster details, invitations and per-student quota grants

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _user_fk(table: str, column: str, ondelete: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], ["user.id"], name=op.f(f"fk_{table}_{column}_user"), ondelete=ondelete
    )


def upgrade() -> None:
    with op.batch_alter_table("user") as batch:
        batch.add_column(sa.Column("full_name", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("email", sa.String(length=255), nullable=True))
    op.create_table(
        "invitation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("created_by_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        _user_fk("invitation", "created_by_id", "SET NULL"),
        _user_fk("invitation", "user_id", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invitation")),
        sa.UniqueConstraint("code_hash", name=op.f("uq_invitation_code_hash")),
    )
    op.create_index(op.f("ix_invitation_user_id"), "invitation", ["user_id"])
    op.create_table(
        "quota_grant",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("assignment_slug", sa.String(length=64), nullable=False),
        sa.Column("phase_id", sa.String(length=64), nullable=False),
        sa.Column("extra_per_day", sa.Integer(), nullable=False),
        sa.Column("extra_total", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("granted_by_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        _user_fk("quota_grant", "granted_by_id", "RESTRICT"),
        _user_fk("quota_grant", "user_id", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quota_grant")),
        sa.UniqueConstraint(
            "user_id", "assignment_slug", "phase_id", name=op.f("uq_quota_grant_user_id")
        ),
    )
    op.create_index(op.f("ix_quota_grant_user_id"), "quota_grant", ["user_id"])


def downgrade() -> None:
    op.drop_table("quota_grant")
    op.drop_table("invitation")
    with op.batch_alter_table("user") as batch:
        batch.drop_column("email")
        batch.drop_column("full_name")
