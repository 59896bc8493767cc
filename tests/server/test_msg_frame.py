"""The hot path's ``msg`` frame encoder gives exactly the bytes of the general one,
which checks every value against the data model (issue 14: fan-out and catch-up
encode a frame per message, and the check was a sixth of that)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backchannel.protocol.encoding import decode
from backchannel.server import frames as F


@given(
    room=st.binary(min_size=0, max_size=40),
    seq=st.integers(min_value=0, max_value=2**63 - 1),
    data=st.binary(max_size=5000),
    ts=st.integers(min_value=0, max_value=2**40),
)
def test_msg_frame_is_server_frame(room: bytes, seq: int, data: bytes, ts: int) -> None:
    fast = F.msg_frame(room, seq, data, ts)
    assert fast == F.server_frame("msg", room=room, seq=seq, data=data, ts=ts)
    assert decode(fast) == {"v": 1, "t": "msg", "room": room, "seq": seq, "data": data, "ts": ts}


def test_msg_frame_refuses_what_is_not_bytes() -> None:
    with pytest.raises(TypeError):
        F.msg_frame("room", 1, b"x", 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        F.msg_frame(b"room", 1, bytearray(b"x"), 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [23, 24, 255, 256, 65535, 65536, 70_000])
@pytest.mark.parametrize("number", [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1])
def test_msg_frame_at_every_length_boundary(size: int, number: int) -> None:
    data, room = b"\x01" * size, b"\x02" * 32
    fast = F.msg_frame(room, number, data, number)
    assert fast == F.server_frame("msg", room=room, seq=number, data=data, ts=number)


def test_msg_frame_refuses_what_cbor_cannot_hold_unsigned() -> None:
    with pytest.raises(ValueError, match="unsigned"):
        F.msg_frame(b"room", -1, b"x", 0)
    with pytest.raises(ValueError, match="unsigned"):
        F.msg_frame(b"room", 1, b"x", 2**64)
