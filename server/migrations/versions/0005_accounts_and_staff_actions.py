"""passwords, web sessions, extensions, score overrides and the audit log

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_AUDIT_ACTIONS = ("cancel", "regrade", "override", "extension_granted", "extension_revoked")


def _user_fk(table: str, column: str, ondelete: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], ["user.id"], name=op.f(f"fk_{table}_{column}_user"), ondelete=ondelete
    )


def upgrade() -> None:
    with op.batch_alter_table("user") as batch:
        batch.add_column(sa.Column("password_hash", sa.String(length=255), nullable=True))
    with op.batch_alter_table("submission") as batch:
        batch.add_column(sa.Column("score_override", sa.Float(), nullable=True))
        batch.add_column(sa.Column("override_reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("override_by_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("override_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_foreign_key(
            op.f("fk_submission_override_by_id_user"),
            "user",
            ["override_by_id"],
            ["id"],
            ondelete="RESTRICT",
        )
    op.create_table(
        "web_session",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        _user_fk("web_session", "user_id", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_web_session")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_web_session_token_hash")),
    )
    op.create_index(op.f("ix_web_session_user_id"), "web_session", ["user_id"])
    op.create_table(
        "extension",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("assignment_slug", sa.String(length=64), nullable=False),
        sa.Column("phase_id", sa.String(length=64), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("granted_by_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        _user_fk("extension", "granted_by_id", "RESTRICT"),
        _user_fk("extension", "user_id", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_extension")),
        sa.UniqueConstraint(
            "user_id", "assignment_slug", "phase_id", name=op.f("uq_extension_user_id")
        ),
    )
    op.create_index(op.f("ix_extension_user_id"), "extension", ["user_id"])
    op.create_table(
        "audit_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("actor_id", sa.Integer(), nullable=False),
        sa.Column(
            "action",
            sa.Enum(*_AUDIT_ACTIONS, name="audit_action", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("assignment_slug", sa.String(length=64), nullable=True),
        sa.Column("phase_id", sa.String(length=64), nullable=True),
        sa.Column("submission_id", sa.String(length=32), nullable=True),
        sa.Column("subject_id", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        _user_fk("audit_event", "actor_id", "RESTRICT"),
        _user_fk("audit_event", "subject_id", "RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_event")),
    )
    for column in ("actor_id", "created_at", "submission_id"):
        op.create_index(op.f(f"ix_audit_event_{column}"), "audit_event", [column])


def downgrade() -> None:
    op.drop_table("audit_event")
    op.drop_table("extension")
    op.drop_table("web_session")
    with op.batch_alter_table("submission") as batch:
        batch.drop_constraint(op.f("fk_submission_override_by_id_user"), type_="foreignkey")
        for column in ("override_at", "override_by_id", "override_reason", "score_override"):
            batch.drop_column(column)
    with op.batch_alter_table("user") as batch:
        batch.drop_column("password_hash")
