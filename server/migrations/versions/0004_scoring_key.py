"""submission scoring key (reuse of identical uploads)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows scored before this revision keep NULL: they are never reused, only re-scored.
    with op.batch_alter_table("submission") as batch:
        batch.add_column(sa.Column("scoring_key", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("submission") as batch:
        batch.drop_column("scoring_key")
