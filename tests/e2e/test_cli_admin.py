"""`backchannel role`, `rules`, `invites` and `revoke`: the real command against a real
relay, each mistake answered by one `error:` line."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from backchannel.server.config import Settings
from tests.e2e.test_cli_flow import Person
from tests.server.helpers import RelayServer


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayServer]:
    server = RelayServer(
        Settings(
            data_dir=tmp_path / "relay", database_url=f"sqlite+aiosqlite:///{tmp_path}/relay.db"
        )
    ).start()
    yield server
    server.stop()


def one_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result
    assert result.stderr.startswith("error: "), result.stderr
    assert result.stderr.count("error: ") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def seated(tmp_path: Path, relay: RelayServer) -> tuple[Person, str, Person, str]:
    fac, ann = Person(tmp_path / "fac", relay), Person(tmp_path / "ann", relay)
    fac.run("init", "--relay", relay.url, "--name", "Farida")
    ann.run("init", "--relay", relay.url, "--name", "Ann")
    room = fac.out("room", "create", "Water talks")
    ann_room = ann.out("join", fac.out("invite", room), "--accept-rules")
    for who, r in ((ann, ann_room), (fac, room), (ann, ann_room)):
        who.run("read", r)  # profiles travel
    return fac, room, ann, ann_room


def test_roles_and_rules_from_the_command_line(tmp_path: Path, relay: RelayServer) -> None:
    fac, room, ann, ann_room = seated(tmp_path, relay)
    assert fac.out("rules", room) == "mode\tchatham\nretention\t1 week"
    for arg in ("ROLE", "facilitator|participant|observer"):
        assert arg in fac.out("role", "--help")
    assert "chatham|attributed|anonymous" in fac.out("rules", "--help")

    fac.run("rules", room, "--mode", "attributed", "--retention", "1d")
    assert ann.out("rules", ann_room) == "mode\tattributed\nretention\t1 day"
    assert "the rules changed: from now on this room is on the record" in ann.out("read", ann_room)
    one_error(ann.run("rules", ann_room, "--mode", "chatham", ok=False), "only a facilitator")

    fac.run("role", room, "Ann", "observer")
    one_error(ann.run("send", ann_room, "may I?", ok=False), "observers cannot post")
    assert "you are now an observer" in ann.out("read", ann_room)
    fac.run("role", room, "Ann", "participant")
    ann.run("send", ann_room, "thank you")
    assert "thank you" in fac.out("read", room)

    one_error(fac.run("role", room, "you", "observer", ok=False), "only facilitator")
    one_error(fac.run("role", room, "Nobody", "observer", ok=False), "no member")
    one_error(ann.run("role", ann_room, "Farida", "observer", ok=False), "only a facilitator")
    for args in (
        ("role", room, "Ann", "boss"),
        ("rules", room, "--mode", "secret"),
        ("rules", room, "--retention", "0d"),
        ("rules", room, "--retention", "30s"),
    ):
        result = fac.run(*args, ok=False)
        one_error(result)
        assert result.returncode == 2, args
    fac.run("role", room, "Ann", "facilitator")
    fac.run("role", room, "you", "participant")  # someone else facilitates now
    assert "Ann" in ann.out("members", ann_room)
    assert fac.out("rules", room).startswith("mode\tattributed")


def test_invites_listed_and_revoked(tmp_path: Path, relay: RelayServer) -> None:
    fac = Person(tmp_path / "fac", relay)
    fac.run("init", "--relay", relay.url, "--name", "Farida")
    room = fac.out("room", "create", "Water talks")
    kept = fac.out("invite", room, "--role", "observer", "--uses", "2")
    dropped = fac.out("invite", room)
    listed = json.loads(fac.out("invites", room, "--json"))
    assert [(i["role"], i["uses_left"]) for i in listed] == [("observer", 2), ("participant", 1)]
    lines = fac.out("invites", room).splitlines()
    assert [line.split("\t")[0] for line in lines] == [i["id"] for i in listed]

    fac.run("revoke", room, listed[1]["id"])
    assert [i["id"] for i in json.loads(fac.out("invites", room, "--json"))] == [listed[0]["id"]]
    one_error(fac.run("revoke", room, listed[1]["id"], ok=False), "no open invite")
    one_error(fac.run("revoke", room, "zz", ok=False), "not an invite id")

    bob = Person(tmp_path / "bob", relay)
    bob.run("init", "--relay", relay.url, "--name", "Bob")
    one_error(bob.run("join", dropped, "--accept-rules", ok=False), "expired, used up or unknown")
    bob_room = bob.out("join", kept, "--accept-rules")
    one_error(bob.run("revoke", bob_room, listed[0]["id"], ok=False), "only a facilitator")
