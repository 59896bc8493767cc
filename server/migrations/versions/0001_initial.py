"""Initial schema: the tables issue #3 created with ``create_all``.

A database created by that code (tables, no ``alembic_version``) is stamped
with this revision by ``backchannel-relay migrate`` and upgraded from here.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

KEY = sa.LargeBinary(length=32)


def upgrade() -> None:
    op.create_table(
        "rooms",
        sa.Column("id", KEY, nullable=False),
        sa.Column("head", KEY, nullable=False),
        sa.Column("log_len", sa.Integer(), nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("retention_seconds", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "log_events",
        sa.Column("room_id", KEY, nullable=False),
        sa.Column("pos", sa.Integer(), nullable=False),
        sa.Column("hash", KEY, nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("room_id", "pos"),
        sa.UniqueConstraint("room_id", "hash", name="uq_log_event_hash"),
    )
    op.create_table(
        "room_members",
        sa.Column("room_id", KEY, nullable=False),
        sa.Column("member", KEY, nullable=False),
        sa.Column("dh", KEY, nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("left_pos", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("room_id", "member"),
    )
    op.create_index("ix_room_members_member", "room_members", ["member"])
    op.create_table(
        "room_messages",
        sa.Column("room_id", KEY, nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("sender", KEY, nullable=False),
        sa.Column("client_id", sa.LargeBinary(length=16), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("room_id", "seq"),
        sa.UniqueConstraint("room_id", "sender", "client_id", name="uq_room_msg_cid"),
    )
    op.create_index("ix_room_messages_created_at", "room_messages", ["created_at"])
    op.create_table(
        "mailbox",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("recipient", KEY, nullable=False),
        sa.Column("sender", KEY, nullable=False),
        sa.Column("room_id", KEY, nullable=False),
        sa.Column("client_id", sa.LargeBinary(length=16), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("recipient", "sender", "client_id", name="uq_mailbox_cid"),
    )
    op.create_index("ix_mailbox_created_at", "mailbox", ["created_at"])
    op.create_index("ix_mailbox_recipient_id", "mailbox", ["recipient", "id"])
    op.create_index("ix_mailbox_room_id", "mailbox", ["room_id"])
    op.create_table(
        "prekeys",
        sa.Column("member", KEY, nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("member", "kind", "key_id"),
    )
    op.create_table(
        "prekey_marks",
        sa.Column("member", KEY, nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("max_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("member", "kind"),
    )
    op.create_table(
        "creation_tokens",
        sa.Column("token_hash", KEY, nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("token_hash"),
    )
    op.create_table(
        "seen_nonces",
        sa.Column("nonce", sa.LargeBinary(length=16), nullable=False),
        sa.Column("expires_at", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("nonce"),
    )
    op.create_index("ix_seen_nonces_expires_at", "seen_nonces", ["expires_at"])
    op.create_table(
        "schema_info",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(
        sa.table("schema_info", sa.column("id", sa.Integer), sa.column("version", sa.Integer)),
        [{"id": 1, "version": 1}],
    )


def downgrade() -> None:
    for table in (
        "schema_info",
        "seen_nonces",
        "creation_tokens",
        "prekey_marks",
        "prekeys",
        "mailbox",
        "room_messages",
        "room_members",
        "log_events",
        "rooms",
    ):
        op.drop_table(table)
