"""Rooms count their stored ciphertext bytes, and their state becomes a checkpoint.

``rooms.stored_bytes`` holds the total size of a room's stored messages (the
per-room quota reads it instead of summing them); it starts as that sum.
``rooms.state_len`` says after how many events ``rooms.state`` was taken, now
that the state is rewritten only every so often; every existing state is the
head state, so it starts as ``log_len``. A downgrade brings every checkpoint
back up to the head, which is what the older code expects ``state`` to be.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "rooms",
        sa.Column("state_len", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )
    op.add_column(
        "rooms",
        sa.Column("stored_bytes", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
    )
    op.execute(
        "UPDATE rooms SET state_len = log_len, stored_bytes = COALESCE(("
        "SELECT SUM(LENGTH(room_messages.data)) FROM room_messages "
        "WHERE room_messages.room_id = rooms.id), 0)"
    )


def downgrade() -> None:
    from backchannel.protocol import roomlog

    conn = op.get_bind()
    stale = conn.execute(
        sa.text("SELECT id, state FROM rooms WHERE state_len < log_len")
    ).fetchall()
    for room_id, data in stale:
        state = roomlog.RoomState.from_bytes(bytes(data))
        events = conn.execute(
            sa.text("SELECT data FROM log_events WHERE room_id = :r AND pos >= :p ORDER BY pos"),
            {"r": room_id, "p": state.length},
        ).scalars()
        for event in events:
            state = roomlog.apply_event(state, bytes(event))
        conn.execute(
            sa.text("UPDATE rooms SET state = :s WHERE id = :r"),
            {"s": state.to_bytes(), "r": room_id},
        )
    with op.batch_alter_table("rooms") as batch:
        batch.drop_column("stored_bytes")
        batch.drop_column("state_len")
