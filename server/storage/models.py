"""The relay's schema: only what routing needs (DESIGN.md §4, issue #3 §4.1).

No column can hold a display name, room title or plaintext, because none ever
reaches the relay: ``data`` columns hold protocol objects that are either
signed public structures (log events, prekeys) or ciphertext. Timestamps are
coarse (rounded down to ``TIME_GRANULARITY`` seconds).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Index, Integer, LargeBinary, String, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

TIME_GRANULARITY = 60


def coarse(ts: float) -> int:
    return int(ts) // TIME_GRANULARITY * TIME_GRANULARITY


class Base(DeclarativeBase):
    pass


class Room(Base):
    __tablename__ = "rooms"

    id: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    head: Mapped[bytes] = mapped_column(LargeBinary(32))
    log_len: Mapped[int] = mapped_column(Integer)
    # Last sequence number handed out; the row lock on this counter is what keeps
    # sequence numbers gap-free across relay instances.
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    retention_seconds: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(Integer)
    # A checkpoint of the validated RoomState (RoomState.to_bytes) after the first
    # ``state_len`` events. Encoding the state costs time linear in its size, so it
    # is rewritten only now and then; an instance without the head state in memory
    # replays the few events after the checkpoint (see rooms.py).
    state: Mapped[bytes] = mapped_column(LargeBinary)
    state_len: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # Ciphertext bytes of the room's stored messages, kept in the transaction of
    # every insert and purge, so the room's quota is checked without a scan.
    stored_bytes: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))


class LogEvent(Base):
    __tablename__ = "log_events"
    __table_args__ = (UniqueConstraint("room_id", "hash", name="uq_log_event_hash"),)

    room_id: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    pos: Mapped[int] = mapped_column(Integer, primary_key=True)
    hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    data: Mapped[bytes] = mapped_column(LargeBinary)


class RoomMember(Base):
    """Membership as the validated log says, kept beside the state for lookups:
    who may subscribe, send, read the log (departed members up to ``left_pos``),
    upload and claim prekeys. ``dh`` is the member's X25519 public key, which a
    prekey bundle carries. A row is never deleted: ``left_pos`` marks a
    removal or leave."""

    __tablename__ = "room_members"
    __table_args__ = (Index("ix_room_members_member", "member"),)

    room_id: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    member: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    dh: Mapped[bytes] = mapped_column(LargeBinary(32))
    role: Mapped[str] = mapped_column(String(16))
    left_pos: Mapped[int | None] = mapped_column(Integer, nullable=True)


class RoomInvite(Base):
    """Which room published an invite key, so a short invite code, which names no
    room, can be looked up by the key (its log already shows the relay the key).
    The first room to publish a key keeps it: another room copying the key from a
    log it can read gets no row, so it cannot take over the lookup."""

    __tablename__ = "room_invites"

    invite: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    room_id: Mapped[bytes] = mapped_column(LargeBinary(32))


class RoomMessage(Base):
    __tablename__ = "room_messages"
    __table_args__ = (UniqueConstraint("room_id", "sender", "client_id", name="uq_room_msg_cid"),)

    room_id: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    sender: Mapped[bytes] = mapped_column(LargeBinary(32))
    client_id: Mapped[bytes] = mapped_column(LargeBinary(16))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[int] = mapped_column(Integer, index=True)


class MailboxItem(Base):
    __tablename__ = "mailbox"
    __table_args__ = (
        UniqueConstraint("recipient", "sender", "client_id", name="uq_mailbox_cid"),
        Index("ix_mailbox_recipient_id", "recipient", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    recipient: Mapped[bytes] = mapped_column(LargeBinary(32))
    sender: Mapped[bytes] = mapped_column(LargeBinary(32))
    room_id: Mapped[bytes] = mapped_column(LargeBinary(32), index=True)
    client_id: Mapped[bytes] = mapped_column(LargeBinary(16))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[int] = mapped_column(Integer, index=True)


class PreKeyRow(Base):
    __tablename__ = "prekeys"

    member: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    key_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class PreKeyMark(Base):
    """Highest prekey id ever accepted per member and kind: a replayed upload
    cannot bring back a one-time prekey that was already claimed."""

    __tablename__ = "prekey_marks"

    member: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    max_id: Mapped[int] = mapped_column(Integer)


class CreationToken(Base):
    """Operator-issued room-creation tokens, stored only as hashes; one use each."""

    __tablename__ = "creation_tokens"

    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    created_at: Mapped[int] = mapped_column(Integer)


class SeenNonce(Base):
    """Nonces of signed REST requests seen within the clock-skew window; shared
    through the database so a replay is refused by every relay instance."""

    __tablename__ = "seen_nonces"

    nonce: Mapped[bytes] = mapped_column(LargeBinary(16), primary_key=True)
    expires_at: Mapped[int] = mapped_column(Integer, index=True)
