"""The whole flow through the real ``backchannel`` command and a real relay on 127.0.0.1.

A facilitator creates a Chatham House room and invites three people; they join
and talk; a sidebar stays between its two ends; an observer cannot post; a
removed participant reads nothing sent afterwards; used and expired invites
are refused; the export names nobody; and the relay's database holds none of
the words, names or the title.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backchannel.server.config import Settings
from tests.server.helpers import RelayServer

TITLE = "Back-channel on the northern water dispute"
NAMES = {"fac": "Facilitator Farida", "ann": "Ann Aldridge", "bob": "Bob Bakr", "obs": "Olga Obs"}
SECRETS = [
    "We could accept joint monitoring of the dam",
    "Our side needs the 2019 figures withdrawn first",
    "privately: my minister will not sign this year",
    "after the removal nobody outside should read this",
]


@dataclass
class Person:
    home: Path
    relay: RelayServer

    def run(
        self, *args: str, stdin: str | None = None, ok: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "BACKCHANNEL_HOME": str(self.home),
            "BACKCHANNEL_PASSPHRASE": "a long passphrase for tests",
            "BACKCHANNEL_KDF_PROFILE": "test-insecure",
            "NO_COLOR": "1",
        }
        result = subprocess.run(
            [sys.executable, "-m", "backchannel.client", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        if ok:
            assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result

    def out(self, *args: str, stdin: str | None = None) -> str:
        return self.run(*args, stdin=stdin).stdout.strip()

    def read_json(self, room: str) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.out("read", room, "--json").splitlines()]


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayServer]:
    server = RelayServer(
        Settings(
            data_dir=tmp_path / "relay", database_url=f"sqlite+aiosqlite:///{tmp_path}/relay.db"
        )
    ).start()
    yield server
    server.stop()


def people(tmp_path: Path, relay: RelayServer) -> dict[str, Person]:
    out = {}
    for who, name in NAMES.items():
        person = Person(tmp_path / who, relay)
        person.run("init", "--relay", relay.url, "--name", name)
        out[who] = person
    return out


def texts(lines: list[dict[str, object]], kind: str = "message") -> list[str]:
    return [str(line["text"]) for line in lines if line["kind"] == kind]


def test_chatham_room_end_to_end(tmp_path: Path, relay: RelayServer) -> None:
    p = people(tmp_path, relay)
    fac = p["fac"]
    room = fac.out("room", "create", TITLE, "--rules", "chatham", "--retention", "7d")
    assert room  # the local name, alone on stdout
    code_p = fac.out("invite", room, "--uses", "2")
    code_o = fac.out("invite", room, "--role", "observer")
    assert code_p.startswith(f"{relay.url} bcinv2-")

    local = {
        "ann": p["ann"].out("join", code_p, "--accept-rules"),
        "bob": p["bob"].out("join", code_p, "--accept-rules"),
        "obs": p["obs"].out("join", code_o, "--accept-rules"),
    }
    # The invite was for two people: a third use is refused with one clear line.
    late = Person(tmp_path / "late", relay)
    late.run("init", "--relay", relay.url, "--name", "Late Comer")
    refused = late.run("join", code_p, "--accept-rules", ok=False)
    assert refused.returncode != 0
    assert refused.stderr.startswith("error: ")
    assert "Traceback" not in refused.stderr

    # Everyone sees the same membership.
    members = json.loads(fac.out("members", room, "--json"))
    assert sorted(m["role"] for m in members) == [
        "facilitator",
        "observer",
        "participant",
        "participant",
    ]

    fac.run("send", room, SECRETS[0])
    p["ann"].run("send", local["ann"], SECRETS[1])
    for who in ("ann", "bob", "obs"):
        seen = texts(p[who].read_json(local[who]))
        assert SECRETS[0] in seen, who
    assert SECRETS[1] in texts(fac.read_json(room))
    assert SECRETS[1] in texts(p["bob"].read_json(local["bob"]))

    # Names arrived pairwise: the facilitator sees who said what inside the room.
    by_text = {line["text"]: line["from"] for line in fac.read_json(room)}
    assert by_text[SECRETS[1]] == NAMES["ann"]

    # A sidebar between Ann and Bob is invisible to the others.
    p["ann"].run("send", local["ann"], SECRETS[2], "--to", NAMES["bob"])
    assert SECRETS[2] in texts(p["bob"].read_json(local["bob"]), "sidebar")
    assert SECRETS[2] not in json.dumps(fac.read_json(room))
    assert SECRETS[2] not in json.dumps(p["obs"].read_json(local["obs"]))

    # An observer cannot post.
    denied = p["obs"].run("send", local["obs"], "observers should not be heard", ok=False)
    assert denied.returncode != 0
    assert "observer" in denied.stderr

    # The facilitator removes Bob; what is said afterwards never reaches him.
    fac.run("remove", room, NAMES["bob"])
    fac.run("send", room, SECRETS[3])
    assert SECRETS[3] in texts(p["ann"].read_json(local["ann"]))
    bob_lines = p["bob"].read_json(local["bob"])
    assert SECRETS[3] not in json.dumps(bob_lines)
    assert any("removed" in str(line["text"]) for line in bob_lines if line["kind"] == "notice")
    # Refused at once (it used to wait for a relay that answers nothing unauthenticated).
    gone = p["bob"].run("send", local["bob"], "am I still here?", ok=False, timeout=10)
    assert gone.returncode != 0
    assert "no longer a member" in gone.stderr

    # The export honours Chatham House: content, no speakers, no keys.
    exported = fac.out("export", room, "--format", "json")
    doc = json.loads(exported)
    assert doc["rules"] == "chatham"
    assert SECRETS[0] in exported
    assert SECRETS[1] in exported
    for name in NAMES.values():
        assert name not in exported
    assert all("from" not in m for m in doc["messages"])
    for m in members:
        assert m["fingerprint"][:16] not in exported
    md = fac.out("export", room, "--format", "md")
    assert "Chatham House" in md
    assert NAMES["ann"] not in md

    # The relay's database holds none of the words, names or the title.
    relay.stop()
    raw = b"".join(f.read_bytes() for f in tmp_path.glob("relay.db*"))
    assert raw
    for needle in [*SECRETS, TITLE, *NAMES.values(), "Aldridge", "dispute"]:
        assert needle.encode() not in raw, needle


def test_expired_invite_is_refused(tmp_path: Path, relay: RelayServer) -> None:
    fac = Person(tmp_path / "fac", relay)
    fac.run("init", "--relay", relay.url, "--name", "F")
    room = fac.out("room", "create", "t")
    code = fac.out("invite", room, "--expires", "60s")
    relay.clock.advance(120)
    joiner = Person(tmp_path / "j", relay)
    joiner.run("init", "--relay", relay.url, "--name", "J")
    result = joiner.run("join", code, "--accept-rules", ok=False)
    assert result.returncode != 0
    assert "expired" in result.stderr
    assert "Traceback" not in result.stderr


def test_hostile_text_is_shown_inert(tmp_path: Path, relay: RelayServer) -> None:
    p = {who: Person(tmp_path / who, relay) for who in ("fac", "ann")}
    p["fac"].run("init", "--relay", relay.url, "--name", "F")
    p["ann"].run("init", "--relay", relay.url, "--name", "\x1b[31mAnn\u202e")
    room = p["fac"].out("room", "create", "t", "--rules", "attributed")
    ann_room = p["ann"].out("join", p["fac"].out("invite", room), "--accept-rules")
    hostile = "\x1b]0;owned\x07\x1b[2J[bold]hi[/bold] \u202egnp.exe <script>"
    p["ann"].run("send", ann_room, hostile)
    plain = p["fac"].out("read", room)
    assert "\x1b" not in plain
    assert "\u202e" not in plain
    assert "\x07" not in plain
    assert "<U+001B>]0;owned<U+0007>" in plain
    exported = p["fac"].out("export", room, "--format", "md")
    assert "\x1b" not in exported
    assert "\\<script>" in exported  # no tag without its "<"


def test_errors_are_one_line_without_tracebacks(tmp_path: Path, relay: RelayServer) -> None:
    person = Person(tmp_path / "x", relay)
    missing = person.run("rooms", ok=False)
    assert missing.returncode != 0
    assert missing.stderr.startswith("error: ")
    person.run("init", "--relay", relay.url, "--name", "X")
    for args in (("send", "nowhere", "hi"), ("join", "bcinv1-garbage", "--accept-rules")):
        result = person.run(*args, ok=False)
        assert result.returncode != 0
        assert result.stderr.startswith("error: "), result.stderr
        assert "Traceback" not in result.stderr
    wrong = subprocess.run(
        [sys.executable, "-m", "backchannel.client", "rooms"],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "BACKCHANNEL_HOME": str(tmp_path / "x"),
            "BACKCHANNEL_PASSPHRASE": "nope",
        },
        check=False,
    )
    assert wrong.returncode != 0
    assert "wrong passphrase" in wrong.stderr
    dead = Person(tmp_path / "dead", relay)
    dead.run("init", "--relay", "http://127.0.0.1:9", "--name", "D", "--offline")
    unreachable = dead.run("room", "create", "t", ok=False)
    assert unreachable.returncode != 0
    assert "cannot reach the relay" in unreachable.stderr


def test_verify_and_wipe(tmp_path: Path, relay: RelayServer) -> None:
    fac, ann = Person(tmp_path / "fac", relay), Person(tmp_path / "ann", relay)
    fac.run("init", "--relay", relay.url, "--name", "Farida")
    ann.run("init", "--relay", relay.url, "--name", "Ann")
    room = fac.out("room", "create", "t")
    ann_room = ann.out("join", fac.out("invite", room), "--accept-rules")
    ann.run("read", ann_room)  # comes online: sends its key and profile
    fac.run("read", room)  # receives Ann's, sends its own
    ann.run("read", ann_room)
    number = fac.out("verify", room, "Ann", "--confirm")
    assert number == ann.out("verify", ann_room, "Farida")  # the same on both sides
    assert len(number.replace(" ", "")) == 60
    members = {m["name"]: m for m in json.loads(fac.out("members", room, "--json"))}
    assert members["Ann"]["verified"] is True
    assert not {m["name"]: m for m in json.loads(ann.out("members", ann_room, "--json"))}["Farida"][
        "verified"
    ]

    refused = ann.run("wipe", ok=False)  # not on a terminal: needs --yes
    assert refused.returncode != 0
    ann.run("wipe", "--yes")
    assert not list((tmp_path / "ann").glob("state.db*"))
    gone = ann.run("rooms", ok=False)
    assert gone.returncode != 0
    assert "no profile" in gone.stderr
