from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import DosRelay, Honest


@pytest.fixture
def dos_relay_factory(tmp_path: Path) -> Iterator[Callable[..., DosRelay]]:
    started: list[DosRelay] = []

    def make(**settings: Any) -> DosRelay:
        relay = DosRelay(tmp_path / f"r{len(started)}", **{k: str(v) for k, v in settings.items()})
        relay.start()
        started.append(relay)
        return relay

    yield make
    for relay in started:
        relay.stop()
        # Every error the relay mapped to a response is logged as one line, never a traceback.
        assert "Traceback" not in relay.all_stderr(), relay.all_stderr()[-3000:]


@pytest.fixture
def dos_relay(dos_relay_factory: Callable[..., DosRelay]) -> DosRelay:
    return dos_relay_factory()


@pytest.fixture
async def honest(dos_relay: DosRelay) -> AsyncIterator[Honest]:
    h = await Honest.open(dos_relay)
    yield h
    await h.close()
