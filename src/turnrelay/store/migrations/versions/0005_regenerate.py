"""Regenerate: a turn that answers a user message again supersedes the earlier answer.

``turns.superseded_by`` names the turn that replaced this one (an AI SDK
``regenerate-message``); a superseded turn's messages leave the session's
messages and the model's history, and stay readable as a turn.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("turns") as batch:
        batch.add_column(sa.Column("superseded_by", sa.String(36), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("turns") as batch:
        batch.drop_column("superseded_by")
