"""The client's transport to one relay: REST for set-up, one WebSocket for the hot path.

Nothing here decides what to believe: it moves bytes and maps the relay's
errors to :class:`RelayError`. What arrives is checked by the caller against
the validated room log (DESIGN.md §3: "only what a client validated is
believed").
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from backchannel.protocol import primitives as P
from backchannel.protocol import relayauth
from backchannel.protocol.encoding import Value, decode, encode
from backchannel.protocol.keys import MemberKeyPair

FRAME_VERSION = 1
MAX_FRAME = 4 << 20


class RelayError(Exception):
    """The relay refused something, or could not be reached. ``code`` is stable."""

    def __init__(self, code: str, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status

    def __str__(self) -> str:
        return f"{self.detail} ({self.code})"


class Unreachable(RelayError):
    def __init__(self, url: str) -> None:
        # Not the URL: an error line is read over shoulders and pasted into
        # reports, and the relay's address says which organisation you talk through.
        super().__init__("unreachable", "cannot reach the relay")
        self.url = url


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def origin_of(url: str) -> str:
    """The origin signatures are bound to: ``scheme://host:port`` as given, no path."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def ws_url(url: str) -> str:
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return f"{scheme}://{parts.netloc}/v1/ws"


def signed_request_headers(
    seed: bytes,
    origin: str,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    now: int | None = None,
    nonce: bytes | None = None,
) -> dict[str, str]:
    """The four ``X-BC-*`` headers that prove possession of the Ed25519 key ``seed``
    for one request (docs/relay-api.md, "Authentication")."""
    ts = int(time.time()) if now is None else now
    nonce = P.random_bytes(relayauth.REQUEST_NONCE_SIZE) if nonce is None else nonce
    sig = relayauth.sign_request(
        seed, origin=origin, method=method, path=path, body=body, timestamp=ts, nonce=nonce
    )
    return {
        "X-BC-Key": P.ed25519_public(seed).hex(),
        "X-BC-Time": str(ts),
        "X-BC-Nonce": b64(nonce),
        "X-BC-Sig": b64(sig),
    }


def _tls_for(url: str, proxy: str | None) -> ssl.SSLContext | bool:
    """What httpx verifies TLS with: the system's trust store, except where no TLS
    is spoken at all (a plain ``http://`` relay on loopback or an onion address,
    with no ``https://`` proxy). Loading the trust store costs 20 to 40 ms per
    client, a fifth of a short command's time; there, a context that requires
    verification and trusts nothing stands in for it, so nothing sent over TLS
    through it could ever be trusted by mistake."""
    if url.startswith("http://") and not (proxy or "").lower().startswith("https://"):
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    return True


class RelayHttp:
    """REST calls, signed where the relay asks for proof of a key."""

    def __init__(
        self,
        url: str,
        *,
        proxy: str | None = None,
        timeout: float = 20.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url.rstrip("/")
        self.clock = clock
        self.origin = origin_of(self.url)
        self._http = httpx.AsyncClient(
            base_url=self.url, timeout=timeout, proxy=proxy, verify=_tls_for(self.url, proxy)
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        signer: bytes | None = None,
    ) -> Any:
        content = b"" if body is None else httpx.Request("POST", "/", json=body).content
        headers = {"content-type": "application/json"} if body is not None else {}
        if signer is not None:
            headers |= signed_request_headers(
                signer, self.origin, method, path, content, now=int(self.clock())
            )
        try:
            response = await self._http.request(method, path, content=content, headers=headers)
        except httpx.TransportError as exc:
            raise Unreachable(self.url) from exc
        except httpx.HTTPError as exc:  # e.g. a body that does not decode: the relay's fault
            raise RelayError("protocol", "the relay's answer could not be read") from exc
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.status_code >= 400:
            error = payload.get("error", {}) if isinstance(payload, dict) else {}
            raise RelayError(
                str(error.get("code", "http_error")),
                str(error.get("detail", f"the relay answered {response.status_code}")),
                response.status_code,
            )
        return payload

    async def create_room(self, event: bytes, token: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"event": b64(event)}
        if token:
            body["token"] = token
        result: dict[str, Any] = await self._request("POST", "/v1/rooms", body=body)
        return result

    async def append(self, room_id: bytes, event: bytes) -> dict[str, Any]:
        result: dict[str, Any] = await self._request(
            "POST", f"/v1/rooms/{room_id.hex()}/events", body={"event": b64(event)}
        )
        return result

    async def events(self, room_id: bytes, after: int, signer: bytes) -> list[bytes]:
        out: list[bytes] = []
        while True:
            path = f"/v1/rooms/{room_id.hex()}/events?after={after + len(out)}"
            page = await self._request("GET", path, signer=signer)
            batch = [unb64(e) for e in page["events"]]
            out.extend(batch)
            if not batch or after + 1 + len(out) >= int(page["length"]):
                return out

    async def preview(self, room_id: bytes, invite_seed: bytes) -> list[bytes]:
        page = await self._request("GET", f"/v1/rooms/{room_id.hex()}/preview", signer=invite_seed)
        return [unb64(e) for e in page["events"]]

    async def invite_log(self, invite_seed: bytes) -> list[bytes]:
        """The log of the room that published this invite key (for a short code)."""
        public = P.ed25519_public(invite_seed)
        page = await self._request("GET", f"/v1/invites/{public.hex()}/log", signer=invite_seed)
        return [unb64(e) for e in page["events"]]

    async def upload_prekeys(self, upload: bytes) -> dict[str, Any]:
        result: dict[str, Any] = await self._request(
            "PUT", "/v1/prekeys", body={"upload": b64(upload)}
        )
        return result

    async def claim(self, member_sign: bytes, signer: bytes) -> bytes:
        result = await self._request(
            "POST", f"/v1/prekeys/{member_sign.hex()}/claim", signer=signer, body={}
        )
        return unb64(result["bundle"])

    async def limits(self) -> dict[str, Any]:
        """The relay's size limits (``GET /v1/limits``), asked once per instance.

        Only an answer is kept: after a failure the next call asks again.
        """
        cached: dict[str, Any] | None = getattr(self, "_limits", None)
        if cached is None:
            answer = await self._request("GET", "/v1/limits")
            names = ("max_message_bytes", "max_frame_bytes", "max_event_bytes", "max_mailbox_depth")
            if not isinstance(answer, dict) or not all(
                type(answer.get(n)) is int and answer[n] > 0 for n in names
            ):
                raise RelayError("protocol", "the relay's limits are malformed")
            cached = self._limits = {n: answer[n] for n in names}
            # Added later: a relay of an earlier release does not say (its defaults).
            inflight = answer.get("max_inflight_writes")
            cached["max_inflight_writes"] = (
                inflight if type(inflight) is int and inflight > 0 else 64
            )
            rate, burst = answer.get("send_rate_per_second"), answer.get("send_burst")
            ok_rate = type(rate) in (int, float) and 0 < rate < 1e9
            cached["send_rate_per_second"] = rate if ok_rate else 20
            cached["send_burst"] = burst if type(burst) is int and burst > 0 else 40
        return cached


@dataclass(frozen=True, slots=True)
class Frame:
    type: str
    fields: dict[str, Value]

    def __getitem__(self, key: str) -> Value:
        return self.fields[key]

    def get(self, key: str) -> Value:
        return self.fields.get(key)


def encode_frame(kind: str, **fields: Value) -> bytes:
    return encode({"t": kind, "v": FRAME_VERSION, **fields})


def decode_frame(data: bytes | str) -> Frame:
    if isinstance(data, str):
        raise RelayError("malformed", "the relay sent a text frame")
    value = decode(data, max_size=MAX_FRAME)
    if not isinstance(value, dict) or value.get("v") != FRAME_VERSION:
        raise RelayError("unsupported_version", "the relay speaks another frame version")
    kind = value.get("t")
    if not isinstance(kind, str):
        raise RelayError("malformed", "frame without a type")
    return Frame(kind, {k: v for k, v in value.items() if k not in ("t", "v")})


class RelaySocket:
    """One authenticated WebSocket.

    After authentication a single reader task owns the connection's receive
    side: replies to our sends (``sent``, ``psent`` and errors naming a cid)
    resolve the matching :meth:`request`, everything else lands in
    :attr:`inbox` in arrival order.
    """

    def __init__(self, conn: ClientConnection, origin: str) -> None:
        self._conn = conn
        self.origin = origin
        self._nonce: bytes | None = None
        self._pending: dict[bytes, asyncio.Future[Frame]] = {}
        #: Whether the relay accepted at least one key: it answers nothing else before.
        self.authenticated = False
        self.inbox: asyncio.Queue[Frame | RelayError] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls, url: str, keys: list[MemberKeyPair], *, proxy: str | None = None
    ) -> RelaySocket:
        # Frames are ciphertext: compression would gain nothing.
        kwargs: dict[str, Any] = {"max_size": MAX_FRAME, "open_timeout": 20, "compression": None}
        if proxy:
            kwargs["proxy"] = proxy
        try:
            conn = await websockets.connect(ws_url(url), **kwargs)
        except (OSError, websockets.exceptions.WebSocketException, TimeoutError) as exc:
            raise Unreachable(url) from exc
        sock = cls(conn, origin_of(url))
        first = await sock._recv_raw(timeout=20)
        if first.type != "challenge":
            raise RelayError("protocol", "the relay did not send a challenge")
        sock._nonce = _bytes(first["nonce"])
        if keys:
            await sock._authenticate(keys)
        sock._reader = asyncio.create_task(sock._read_loop())
        return sock

    async def _authenticate(self, keys: list[MemberKeyPair]) -> None:
        assert self._nonce is not None
        proofs: list[Value] = [
            {
                "key": k.public.sign,
                "sig": relayauth.sign_challenge(k.sign_seed, self.origin, self._nonce),
            }
            for k in keys
        ]
        await self.send("auth", keys=proofs)
        while True:
            frame = await self._recv_raw(timeout=20)
            if frame.type == "error":
                raise RelayError(str(frame["code"]), str(frame.get("detail")))
            if frame.type == "challenge":
                self._nonce = _bytes(frame["nonce"])
            elif frame.type == "ready":
                self.authenticated = True
                return
            else:
                self.inbox.put_nowait(frame)

    async def _recv_raw(self, timeout: float | None = None) -> Frame:
        try:
            async with asyncio.timeout(timeout):
                data = await self._conn.recv()
        except websockets.exceptions.ConnectionClosed as exc:
            raise RelayError("disconnected", "the connection to the relay closed") from exc
        except TimeoutError as exc:
            raise RelayError("timeout", "the relay did not answer in time") from exc
        return decode_frame(data)

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await self._recv_raw()
                # The relay answers a request with its cid; an error names it as ``ref``.
                cid = (
                    frame.get("ref" if frame.type == "error" else "cid")
                    if frame.type in ("sent", "psent", "error")
                    else None
                )
                if isinstance(cid, bytes) and cid in self._pending:
                    future = self._pending.pop(cid)
                    if not future.done():
                        future.set_result(frame)
                elif frame.type == "challenge":
                    self._nonce = _bytes(frame["nonce"])
                else:
                    self.inbox.put_nowait(frame)
        except RelayError as exc:
            self._fail(exc)
        except Exception as exc:  # a malformed frame from the relay ends this connection
            self._fail(RelayError("protocol", f"the relay sent something unreadable: {exc}"))

    def _fail(self, exc: RelayError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()
        self.inbox.put_nowait(exc)

    async def send(self, kind: str, **fields: Value) -> None:
        try:
            await self._conn.send(encode_frame(kind, **fields))
        except websockets.exceptions.ConnectionClosed as exc:
            raise RelayError("disconnected", "the connection to the relay closed") from exc

    async def request(
        self, kind: str, *, cid: bytes, timeout: float = 30, **fields: Value
    ) -> Frame:
        """Send a frame carrying ``cid`` and wait for the relay's answer to it."""
        future = await self.submit(kind, cid=cid, **fields)
        return await self.reply(cid, future, timeout=timeout)

    async def submit(self, kind: str, *, cid: bytes, **fields: Value) -> asyncio.Future[Frame]:
        """Send a frame carrying ``cid`` without waiting: many may be in flight at
        once (the relay answers each by its cid); :meth:`reply` collects the answer."""
        waiting = self._pending.get(cid)
        if waiting is not None and not waiting.done():
            # Already in flight (a flush met a message a pipeline sent): one frame,
            # one answer, and every waiter gets it.
            return waiting
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[cid] = future
        try:
            await self.send(kind, cid=cid, **fields)
        except BaseException:
            self._pending.pop(cid, None)
            raise
        return future

    async def reply(
        self, cid: bytes, future: asyncio.Future[Frame], *, timeout: float = 30
    ) -> Frame:
        try:
            async with asyncio.timeout(timeout):
                frame = await future
        except TimeoutError as exc:
            raise RelayError("timeout", "the relay did not acknowledge in time") from exc
        finally:
            self._pending.pop(cid, None)
        if frame.type == "error":
            raise RelayError(str(frame["code"]), str(frame.get("detail")))
        return frame

    async def recv(self, timeout: float | None = None) -> Frame:
        """The next frame that is not a reply; raises if the connection failed."""
        try:
            async with asyncio.timeout(timeout):
                item = await self.inbox.get()
        except TimeoutError:
            raise
        if isinstance(item, RelayError):
            self.inbox.put_nowait(item)  # every later recv fails the same way
            raise item
        return item

    def ready(self, most: int) -> list[Frame]:
        """Up to ``most`` frames that have already arrived, without waiting (a
        failure stays queued for the next :meth:`recv`)."""
        out: list[Frame] = []
        while len(out) < most and not self.inbox.empty():
            item = self.inbox.get_nowait()
            if isinstance(item, RelayError):
                self.inbox.put_nowait(item)
                break
            out.append(item)
        return out

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        with contextlib.suppress(Exception):
            await self._conn.close()


def _bytes(value: Value) -> bytes:
    if not isinstance(value, bytes):
        raise RelayError("protocol", "the relay sent a malformed frame")
    return value
