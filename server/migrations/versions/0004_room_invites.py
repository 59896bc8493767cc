"""``room_invites``: the room each invite key was published in, for short invite codes.

A short code (``bcinv2``) carries no room id, so the relay finds the room from
the invite's public key. Existing logs are read once to fill the table, so an
invite made before the upgrade can be looked up too. A key published in
more than one room gets no row (which came first is not on record); from
now on the relay gives a key to the first room that publishes it.

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
    seen: dict[bytes, set[bytes]] = {}
    for room_id, data in rows:
        try:
            event = roomlog.decode_event(bytes(data))
        except errors.ProtocolError:
            continue  # stored events were validated; a stranger one is no invite
        if isinstance(event, roomlog.InviteEvent):
            seen.setdefault(event.invite, set()).add(bytes(room_id))
    # Which room published a key first is not recorded in what came before, so a
    # key published in several rooms (a copy) gets no row: no room can take over
    # its lookup. Keys from before this release are long-code keys, which are
    # looked up by room, not by key, so nothing honest is lost.
    unique = {k: next(iter(r)) for k, r in seen.items() if len(r) == 1}
    if unique:
        op.bulk_insert(table, [{"invite": k, "room_id": r} for k, r in unique.items()])


def downgrade() -> None:
    op.drop_table("room_invites")
