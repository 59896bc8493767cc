"""With the relay down, the command works from what is stored locally: `read`,
`members`, `rooms` and `export` show it (and say so), `send` queues, and the next
connection sends what was queued (docs/client.md, "Offline")."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from backchannel.server.config import Settings
from tests.e2e.test_cli_flow import Person
from tests.server.helpers import RelayServer

OFFLINE = "relay unreachable — showing what is stored locally"
QUEUED = "queued; will be sent when the relay is reachable"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "relay", database_url=f"sqlite+aiosqlite:///{tmp_path}/relay.db"
    )


@pytest.fixture
def relays(settings: Settings) -> Iterator[list[RelayServer]]:
    running = [RelayServer(settings).start()]
    yield running
    running[-1].stop()


def texts(person: Person, room: str) -> list[str]:
    lines = [json.loads(x) for x in person.out("read", room, "--json").splitlines()]
    return [str(x["text"]) for x in lines if x["kind"] == "message"]


def test_commands_work_offline_and_a_queued_send_goes_on_reconnect(
    tmp_path: Path, settings: Settings, relays: list[RelayServer]
) -> None:
    relay = relays[0]
    fac, ann = Person(tmp_path / "fac", relay), Person(tmp_path / "ann", relay)
    fac.run("init", "--relay", relay.url, "--name", "Farida")
    ann.run("init", "--relay", relay.url, "--name", "Ann")
    room = fac.out("room", "create", "Water talks")
    local = ann.out("join", fac.out("invite", room), "--accept-rules")
    fac.run("send", room, "before the outage")
    assert texts(ann, local) == ["before the outage"]

    relay.stop()
    shown = ann.run("read", local)
    assert "before the outage" in shown.stdout
    assert OFFLINE in shown.stderr
    assert OFFLINE not in shown.stdout  # stdout is the transcript alone
    members = ann.run("members", local, "--json")
    assert OFFLINE in members.stderr
    assert sorted(m["role"] for m in json.loads(members.stdout)) == ["facilitator", "participant"]
    # Named after its title once it arrived; `local`, the name `join` printed, still works.
    assert ann.out("rooms").startswith("water-talks\tWater talks\t")
    assert "before the outage" in ann.out("export", local)

    queued = ann.run("send", local, "written while the relay was down")
    assert QUEUED in queued.stderr
    # Shown at once in Ann's own transcript, sealed and waiting in the outbox.
    assert texts(ann, local) == ["before the outage", "written while the relay was down"]
    # A sidebar needs the relay (a pairwise session may need the other's keys).
    sidebar = ann.run("send", local, "--to", "Farida", "psst", ok=False)
    assert sidebar.returncode == 3
    assert sidebar.stderr.startswith("error: ")
    assert "Traceback" not in sidebar.stderr

    relays.append(RelayServer(settings, port=relay.port).start())
    # Any connection sends what waited: here a plain read.
    back = ann.run("read", local)
    assert OFFLINE not in back.stderr
    assert texts(fac, room) == ["before the outage", "written while the relay was down"]
    # Sent once: reading again neither resends nor shows it twice.
    ann.run("read", local)
    assert texts(fac, room) == ["before the outage", "written while the relay was down"]
