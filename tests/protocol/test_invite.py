"""Invite codes: round trips, typo detection, tolerant reading, URL checks, length."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backchannel.protocol import invite as I
from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.protocol.encoding import encode
from backchannel.protocol.errors import InvalidInvite, InviteCodeError
from backchannel.protocol.keys import MemberKeyPair
from tests.protocol.drbg import Drbg

T0 = 1_800_000_000
URL = "https://relay.example.org"


def sample(url: str = URL, seed: str = "invite") -> I.InviteCode:
    rng = Drbg(seed)
    return I.InviteCode(relay_url=url, room_id=rng(32), invite_seed=rng(32), facilitator=rng(16))


CODE = sample()
TEXT = CODE.to_text()

hosts = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,6}){0,2}", fullmatch=True)
urls = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
    st.sampled_from(I.URL_SCHEMES),
    hosts,
    st.sampled_from(["", ":443", ":8443", ":1"]),
    st.sampled_from(["", "/", "/relay", "/a/b-c_d.e~f"]),
)
codes = st.builds(
    I.InviteCode,
    relay_url=urls,
    room_id=st.binary(min_size=32, max_size=32),
    invite_seed=st.binary(min_size=32, max_size=32),
    facilitator=st.binary(min_size=16, max_size=16),
)


@given(codes, st.integers(0, 9))
def test_round_trip(code: I.InviteCode, group: int) -> None:
    text = code.to_text(group)
    assert I.InviteCode.from_text(text) == code
    assert I.InviteCode.from_text(code.to_qr_text()) == code
    assert text.startswith("bcinv1")
    assert set(text) <= set("abcdefghijklmnopqrstuvwxyz234567-bcinv1")


def test_format() -> None:
    groups = TEXT.split("-")
    assert groups[0] == "bcinv1"
    assert all(len(g) == 5 for g in groups[1:-1])
    assert 1 <= len(groups[-1]) <= 5
    assert "=" not in TEXT
    qr = CODE.to_qr_text()
    assert set(qr) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567" + "1")
    body = base64.b32decode(CODE.to_text(0)[6:].upper() + "=" * (-len(CODE.to_text(0)[6:]) % 8))
    payload, check = body[:-4], body[-4:]
    assert payload == CODE.payload()
    assert check == P.hash_bytes(b"bc-inv-check", payload, 16)[:4]


def test_typical_length() -> None:
    """A code for a 25-character relay URL: 211 characters bare, 252 with dashes."""
    assert len(CODE.to_text(0)) == 211
    assert len(TEXT) == 252
    longest = sample("https://" + "r" * (I.MAX_URL_BYTES - 8))
    assert len(longest.to_text()) < 600  # the 200-byte URL bound keeps every code pasteable


@given(st.data())
def test_any_single_character_typo_is_caught(data: st.DataObject) -> None:
    compact = CODE.to_text(0)
    index = data.draw(st.integers(0, len(compact) - 1), label="index")
    options = [c for c in "abcdefghijklmnopqrstuvwxyz0123456789" if c != compact[index]]
    replacement = data.draw(st.sampled_from(options), label="replacement")
    typo = compact[:index] + replacement + compact[index + 1 :]
    with pytest.raises(InviteCodeError):
        I.InviteCode.from_text(typo)


@given(st.data())
def test_a_missing_or_extra_character_is_caught(data: st.DataObject) -> None:
    compact = CODE.to_text(0)
    index = data.draw(st.integers(0, len(compact) - 1), label="index")
    if data.draw(st.booleans(), label="delete"):
        changed = compact[:index] + compact[index + 1 :]
    else:
        changed = compact[:index] + data.draw(st.sampled_from("abcxyz234567")) + compact[index:]
    with pytest.raises(InviteCodeError):
        I.InviteCode.from_text(changed)


def test_swapped_neighbours_are_caught() -> None:
    compact = CODE.to_text(0)
    for i in range(6, len(compact) - 1):
        if compact[i] != compact[i + 1]:
            swapped = compact[:i] + compact[i + 1] + compact[i] + compact[i + 2 :]
            with pytest.raises(InviteCodeError):
                I.InviteCode.from_text(swapped)


@given(st.data())
def test_case_dashes_and_whitespace_are_ignored(data: st.DataObject) -> None:
    chars = list(CODE.to_text(0))
    out = []
    for c in chars:
        if data.draw(st.booleans()):
            c = c.upper()
        out.append(c)
        out.append(data.draw(st.sampled_from(["", "", "-", " ", "\n", "\t", "  -  "])))
    assert I.InviteCode.from_text("".join(out)) == CODE
    assert I.InviteCode.from_text(f"  {TEXT.upper()}\n") == CODE


@given(st.text(max_size=400))
def test_arbitrary_text_raises_only_invite_code_error(text: str) -> None:
    with pytest.raises(InviteCodeError):
        I.InviteCode.from_text(text)


@given(st.binary(max_size=300))
def test_arbitrary_base32_raises_only_invite_code_error(blob: bytes) -> None:
    text = "bcinv1" + base64.b32encode(blob).decode().rstrip("=").lower()
    with pytest.raises(InviteCodeError):
        I.InviteCode.from_text(text)


def _armour(payload: bytes) -> str:
    check = P.hash_bytes(b"bc-inv-check", payload, 16)[:4]
    return "bcinv1" + base64.b32encode(payload + check).decode().rstrip("=").lower()


def test_well_checksummed_but_malformed_payloads_are_refused() -> None:
    good = {"f": bytes(16), "k": bytes(32), "r": bytes(32), "u": URL, "v": 1}
    assert I.InviteCode.from_text(_armour(encode(good))).relay_url == URL
    for bad in (
        {**good, "v": 2},
        {**good, "x": 1},
        {**good, "k": bytes(31)},
        {**good, "u": "ftp://relay.example.org"},
        {**good, "u": 7},
        {k: v for k, v in good.items() if k != "r"},
    ):
        with pytest.raises(InviteCodeError):
            I.InviteCode.from_text(_armour(encode(bad)))  # type: ignore[arg-type]
    with pytest.raises(InviteCodeError):
        I.InviteCode.from_text(_armour(encode([1, 2, 3])))
    with pytest.raises(InviteCodeError):
        I.InviteCode.from_text(_armour(b""))


def test_non_text_and_oversized_input() -> None:
    with pytest.raises(InviteCodeError):
        I.InviteCode.from_text(b"bcinv1aaaa")  # type: ignore[arg-type]
    with pytest.raises(InviteCodeError):
        I.InviteCode.from_text(TEXT + "a" * I.MAX_TEXT)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "relay.example.org",
        "ftp://relay.example.org",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "https://",
        "https://user:secret@relay.example.org",
        "https://relay.example.org/?room=1",
        "https://relay.example.org/#x",
        "https://relay example.org",
        "https://relay.example.org:99999",
        "https://relay.example.org:port",
        "https://réseau.example.org",
        "https://relay.example.org/\x1b[31m",
        "HTTPS://relay.example.org",
        "https://" + "r" * I.MAX_URL_BYTES,
    ],
)
def test_bad_relay_urls_are_refused(url: str) -> None:
    with pytest.raises(InviteCodeError):
        I.check_relay_url(url)
    rng = Drbg("u")
    with pytest.raises(InviteCodeError):
        I.InviteCode(relay_url=url, room_id=rng(32), invite_seed=rng(32), facilitator=rng(16))


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000", "wss://relay.example.org/ws", "ws://[::1]:9000", URL]
)
def test_good_relay_urls(url: str) -> None:
    assert I.check_relay_url(url) == url


def test_field_sizes_are_checked() -> None:
    with pytest.raises(InviteCodeError):
        I.InviteCode(relay_url=URL, room_id=bytes(31), invite_seed=bytes(32), facilitator=bytes(16))
    with pytest.raises(InviteCodeError):
        I.InviteCode(relay_url=URL, room_id=bytes(32), invite_seed=bytes(32), facilitator=bytes(32))
    with pytest.raises(InviteCodeError):
        I.InviteCode(
            relay_url=URL,
            room_id=bytes(32),
            invite_seed=bytes(32),
            facilitator=bytes(16),
            version=2,
        )


def test_repr_hides_the_seed() -> None:
    text = repr(CODE)
    assert CODE.invite_seed.hex() not in text
    assert CODE.invite_seed.hex()[:16] not in text
    assert "relay.example.org" in text


def test_code_for_a_room_checks_against_its_log() -> None:
    rng = Drbg("invite-room")
    fac, joiner = MemberKeyPair.generate(rng), MemberKeyPair.generate(rng)
    log = L.RoomLog()
    log.append(L.make_create(fac, L.Rules(), T0, rng))
    event, seed = L.make_invite(fac, log.state, "observer", T0 + 3600, 1, T0, rng)
    log.append(event)
    code = I.InviteCode.from_text(I.InviteCode.for_room(URL, log.state, seed).to_text())
    assert code.facilitator == fac.public.fingerprint()[:16]
    invite = code.check_state(log.state)
    assert (invite.role, invite.uses_left, invite.expires) == ("observer", 1, T0 + 3600)
    log.append(L.make_join(joiner, code.invite_seed, log.state, T0 + 1))

    # A look-alike room served by the relay: other id, or same-looking but another creator.
    other = L.RoomLog()
    other.append(L.make_create(MemberKeyPair.generate(rng), L.Rules(), T0, rng))
    with pytest.raises(InvalidInvite):
        code.check_state(other.state)
    forged_creator = I.InviteCode(
        relay_url=URL, room_id=code.room_id, invite_seed=seed, facilitator=bytes(16)
    )
    with pytest.raises(InvalidInvite):
        forged_creator.check_state(log.state)
    unknown = I.InviteCode.for_room(URL, log.state, rng(32))
    with pytest.raises(InvalidInvite):
        unknown.check_state(log.state)
