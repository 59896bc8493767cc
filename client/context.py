"""What every part of the client shares: the open store, the clock, the relay connections."""

from __future__ import annotations

import time
from collections.abc import Callable

from .relay import RelayHttp
from .store import Store


class Context:
    def __init__(
        self, store: Store, *, proxy: str | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.proxy = proxy
        self.clock = clock
        self._http: dict[str, RelayHttp] = {}

    def now(self) -> int:
        return int(self.clock())

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def http(self, relay: str) -> RelayHttp:
        if relay not in self._http:
            self._http[relay] = RelayHttp(relay, proxy=self.proxy, clock=self.clock)
        return self._http[relay]

    async def aclose(self) -> None:
        for http in self._http.values():
            await http.aclose()
        self._http.clear()
