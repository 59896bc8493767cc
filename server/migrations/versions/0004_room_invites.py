"""``room_invites``: the room each invite key was published in, for short invite codes.

A short code (``bcinv2``) carries no room id, so the relay finds the room from
the invite's public key. Existing logs are read once to fill the table, so an
invite made before the upgrade can be looked up too; the first room to
publish a key keeps it, as the relay does from now on.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

KEY = sa.LargeBinary(length=32)


def upgrade() -> None:
    from backchannel.protocol import errors, roomlog

    table = op.create_table(
        "room_invites",
        sa.Column("invite", KEY, nullable=False),
        sa.Column("room_id", KEY, nullable=False),
        sa.PrimaryKeyConstraint("invite"),
    )
    conn = op.get_bind()
    rows = conn.execute(
        sa.text("SELECT room_id, data FROM log_events WHERE pos > 0 ORDER BY room_id, pos")
    )
    seen: dict[bytes, bytes] = {}
    for room_id, data in rows:
        try:
            event = roomlog.decode_event(bytes(data))
        except errors.ProtocolError:
            continue  # stored events were validated; a stranger one is no invite
        if isinstance(event, roomlog.InviteEvent):
            seen.setdefault(event.invite, bytes(room_id))
    if seen:
        op.bulk_insert(table, [{"invite": k, "room_id": r} for k, r in seen.items()])


def downgrade() -> None:
    op.drop_table("room_invites")
