"""When a turn was dispatched, and when its broker message was confirmed.

``dispatched`` says a turn is its session's head, chosen to run; it does not
say its message reached the broker (a process can die between the two). With
``published_at`` the sweeper republishes only heads whose publish was never
confirmed, instead of every dispatched turn that waits in a backlog.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("turns") as batch:
        batch.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))
    # Turns dispatched before this revision count as published: their messages
    # were handled by the rules of that code.
    op.execute(
        "UPDATE turns SET dispatched_at = created_at, published_at = created_at WHERE dispatched"
    )


def downgrade() -> None:
    with op.batch_alter_table("turns") as batch:
        batch.drop_column("published_at")
        batch.drop_column("dispatched_at")
