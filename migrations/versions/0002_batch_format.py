"""batches: format and arrays_complete

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("format", sa.String(length=16), nullable=True))
        batch.add_column(
            sa.Column("arrays_complete", sa.Boolean(), nullable=False, server_default=sa.true())
        )
    with op.batch_alter_table("batches") as batch:
        batch.alter_column("arrays_complete", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("arrays_complete")
        batch.drop_column("format")
