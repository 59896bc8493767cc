"""The receive path of one room message touches only the rows that message concerns:
the same rows and about the same bytes in a small new room as in a larger one with
a history (the first release read and rewrote every inbound key and the whole log)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from backchannel.client.store import Store
from tests.client.helpers import People, handle_next_message, online, room_with, say

ROW_METHODS = ("get", "put", "delete", "values", "scan", "delete_scope", "add_message")


class Rows:
    """Counts row operations and bytes on one open store while ``on``."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[str] = Counter()
        self.bytes = 0
        self.on = False
        for name in ROW_METHODS:
            monkeypatch.setattr(store, name, self._wrap(name, getattr(store, name)))

    def _wrap(self, name: str, method: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            if self.on:
                self.calls[name] += 1
                self.bytes += sum(len(a) for a in (*args, result) if isinstance(a, bytes))
                if isinstance(result, list):
                    self.bytes += sum(len(r) for r in result if isinstance(r, bytes))
            return result

        return counted


async def one_message(
    people: People, monkeypatch: pytest.MonkeyPatch, names: list[str], history: int
) -> Rows:
    fac, room, joined = await room_with(people, *names)
    speakers = list(joined.values())
    for client, r in speakers:
        await online(client, r)
    for i in range(history):
        client, r = speakers[i % len(speakers)]
        await say(client, r, f"earlier {i}")
    await online(fac, room)
    speaker, speaker_room = speakers[0]
    await say(speaker, speaker_room, "the one we count")
    rows = Rows(fac.store, monkeypatch)
    await handle_next_message(fac, room, rows)
    assert fac.lines(room)[-1].text == "the one we count"
    return rows


async def test_one_room_message_touches_the_same_rows_whatever_the_room(
    people: People, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    small = await one_message(people, monkeypatch, ["a1"], history=0)
    (tmp_path / "large").mkdir()
    others = People(tmp_path / "large", people.relay, people.clock)
    try:
        large = await one_message(others, monkeypatch, ["b1", "b2", "b3"], history=12)
    finally:
        await others.close()
    assert small.calls == large.calls
    # Which rows: the sender's key and its next generation (is this one replaced?)
    # read; the key, the cursor and one line written. The sender's peer row is not
    # read: the name table in memory is current while the store has not changed
    # (issue 14; tests/client/test_peers.py).
    assert small.calls == Counter(get=2, put=2, add_message=1)
    assert not {"values", "scan"} & set(small.calls)  # nothing listed
    # Bytes do not grow with members or history (a few bytes of varint and names).
    assert large.bytes <= small.bytes + 64
