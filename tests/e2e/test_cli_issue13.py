"""Issue 13, "wrong or lost": the real ``backchannel`` command, each defect as a user meets it.

Exports to a folder that is not there, a wipe under a running ``read -f``, names
that changed between two commands, multi-line messages and sidebars in
``read``, ``chat`` without a terminal, Ctrl-C at a prompt, errors that named
the wrong cause, and the first run (``init``, ``profile``, help).
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backchannel.server.config import Settings
from tests.e2e.test_cli_flow import Person
from tests.server.helpers import RelayServer

PASS = "a long passphrase for tests"


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayServer]:
    server = RelayServer(
        Settings(
            data_dir=tmp_path / "relay", database_url=f"sqlite+aiosqlite:///{tmp_path}/relay.db"
        )
    ).start()
    yield server
    server.stop()


def person(tmp_path: Path, relay: RelayServer, who: str, name: str) -> Person:
    p = Person(tmp_path / who, relay)
    p.run("init", "--relay", relay.url, "--name", name)
    return p


def env_of(home: Path, *, with_passphrase: bool = True) -> dict[str, str]:
    env = {
        **os.environ,
        "BACKCHANNEL_HOME": str(home),
        "BACKCHANNEL_KDF_PROFILE": "test-insecure",
        "NO_COLOR": "1",
    }
    if with_passphrase:
        env["BACKCHANNEL_PASSPHRASE"] = PASS
    else:
        env.pop("BACKCHANNEL_PASSPHRASE", None)
    return env


def one_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result
    assert result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("error: ") == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def facilitated(tmp_path: Path, relay: RelayServer, rules: str = "attributed") -> tuple:
    """Farida's room with Ann in it, both online once so that profiles have travelled."""
    fac = person(tmp_path, relay, "fac", "Farida")
    ann = person(tmp_path, relay, "ann", "Ann")
    room = fac.out("room", "create", "Water talks", "--rules", rules)
    ann_room = ann.out("join", fac.out("invite", room), "--accept-rules")
    ann.run("read", ann_room)
    fac.run("read", room)
    ann.run("read", ann_room)
    return fac, room, ann, ann_room


# --- a terminal, for prompts ---------------------------------------------------------------


class Terminal:
    """The command on a pseudo-terminal of its own (its controlling terminal), so that
    it prompts as it would for a person, and Ctrl-C is a real ^C."""

    def __init__(self, home: Path, *args: str, with_passphrase: bool = True) -> None:
        env = env_of(home, with_passphrase=with_passphrase)
        pid, fd = pty.fork()
        if pid == 0:  # pragma: no cover - the child
            os.execvpe(sys.executable, [sys.executable, "-m", "backchannel.client", *args], env)
        self.pid, self.fd, self.seen = pid, fd, b""

    def expect(self, needle: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while needle.encode() not in self.seen:
            assert time.monotonic() < deadline, self.seen
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    self.seen += os.read(self.fd, 4096)
                except OSError:  # the child is gone
                    assert needle.encode() in self.seen, self.seen

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def exit_code(self, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                with_rest = select.select([self.fd], [], [], 0.1)[0]
                if with_rest:
                    with contextlib.suppress(OSError):
                        self.seen += os.read(self.fd, 4096)
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                os.close(self.fd)
                pytest.fail(f"still running after {timeout}s: {self.seen!r}")
            time.sleep(0.05)


# --- 1. export -----------------------------------------------------------------------------


def test_export_to_a_missing_folder_is_one_error_and_a_written_export_is_private(
    tmp_path: Path, relay: RelayServer
) -> None:
    fac = person(tmp_path, relay, "fac", "Farida")
    room = fac.out("room", "create", "t")
    fac.run("send", room, "for the record")
    missing = fac.run("export", room, "-o", str(tmp_path / "missing" / "dir" / "x.md"), ok=False)
    one_error(missing, "cannot write", "No such file or directory")
    assert "for the record" not in missing.stderr
    target = tmp_path / "x.md"
    fac.run("export", room, "-o", str(target))
    assert "for the record" in target.read_text()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


# --- 2. wipe under a running process --------------------------------------------------------


def test_wipe_refuses_while_read_follow_holds_the_profile_and_force_stops_it_cleanly(
    tmp_path: Path, relay: RelayServer
) -> None:
    fac = person(tmp_path, relay, "fac", "Farida")
    room = fac.out("room", "create", "t")
    fac.run("send", room, "first")
    follower = subprocess.Popen(
        [sys.executable, "-m", "backchannel.client", "read", room, "--follow"],
        env=env_of(fac.home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        assert "first" in follower.stdout.readline()  # it holds the profile now
        refused = fac.run("wipe", "--yes", ok=False)
        one_error(refused, "open in another backchannel process", "--force")
        assert (fac.home / "state.db").exists()
        assert follower.poll() is None  # untouched
        fac.run("wipe", "--yes", "--force")
        assert not (fac.home / "state.db").exists()
        _, err = follower.communicate(timeout=15)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 1
    assert err == "error: this profile was wiped while the command ran\n"


# --- 3. names ------------------------------------------------------------------------------


def test_members_json_names_you_by_your_name_and_verify_you_is_refused_clearly(
    tmp_path: Path, relay: RelayServer
) -> None:
    fac, room, _ann, _ann_room = facilitated(tmp_path, relay)
    listed = json.loads(fac.out("members", room, "--json"))
    me = [m for m in listed if m["me"]]
    assert [m["name"] for m in me] == ["Farida"]
    assert "you" not in [m["name"] for m in listed]
    for query in ("you", "Farida", "me"):
        refused = fac.run("verify", room, query, ok=False)
        one_error(refused, "you cannot verify yourself")
    one_error(fac.run("remove", room, "you", ok=False), "cannot remove yourself")
    one_error(fac.run("send", room, "hi", "--to", "you", ok=False), "another member")


def test_room_titles_and_names_match_whatever_their_case(
    tmp_path: Path, relay: RelayServer
) -> None:
    fac, room, _ann, _ann_room = facilitated(tmp_path, relay)
    fac.run("send", room, "in the titled room")
    assert "in the titled room" in fac.out("read", "water talks")
    assert "in the titled room" in fac.out("read", "WATER  TALKS")
    assert fac.out("verify", "water talks", "ann")


def test_a_label_printed_before_a_profile_arrived_still_names_the_member(
    tmp_path: Path, relay: RelayServer
) -> None:
    fac = person(tmp_path, relay, "fac", "Farida")
    chen = person(tmp_path, relay, "chen", "Chen")
    room = fac.out("room", "create", "t", "--rules", "attributed")
    chen_room = chen.out("join", fac.out("invite", room), "--accept-rules")
    # Before Chen's profile arrives, `members` shows its pseudonym...
    (before,) = [m["name"] for m in json.loads(fac.out("members", room, "--json")) if not m["me"]]
    assert before != "Chen"
    chen.run("read", chen_room)
    fac.run("read", room)
    # ...which became "Chen" meanwhile; the label just printed still works.
    (after,) = [m["name"] for m in json.loads(fac.out("members", room, "--json")) if not m["me"]]
    assert after == "Chen"
    assert fac.out("verify", room, before) == fac.out("verify", room, "Chen")
    # And a name it changed from (`profile --name`), while no one else has it.
    chen.out("profile", "--name", "Chen Wei")
    chen.run("read", chen_room)  # the new name travels
    fac.run("read", room)
    names = [m["name"] for m in json.loads(fac.out("members", room, "--json"))]
    assert "Chen Wei" in names
    fac.run("remove", room, "Chen")
    assert "removed" in fac.run("read", room).stdout


# --- 4. read and export ----------------------------------------------------------------------


def test_read_shows_line_breaks_as_indented_lines_and_whose_sidebar_it_is(
    tmp_path: Path, relay: RelayServer
) -> None:
    fac, room, ann, ann_room = facilitated(tmp_path, relay)
    ann.run("send", ann_room, "first line\nsecond \x1b[2J line\n[2030-01-01 00:00] • you: fake")
    ann.run("send", ann_room, "just us", "--to", "Farida")
    fac.run("send", room, "just us two", "--to", "Ann")
    lines = fac.out("read", room).splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith("? Ann: first line"))
    assert lines[start + 1] == "    second <U+001B>[2J line"
    # A line inside a message cannot pass for a line of its own.
    assert lines[start + 2] == "    [2030-01-01 00:00] • you: fake"
    assert "<U+000A>" not in "\n".join(lines)
    assert any(line.endswith("(sidebar from Ann) ? Ann: just us") for line in lines)
    assert any(line.endswith("(sidebar to Ann) • you: just us two") for line in lines)
    md = fac.out("export", room, "--format", "md")
    assert "CANARY-ONE" not in md  # (not sent)
    ann.run("send", ann_room, "CANARY-ONE (v1.2) - ok")
    fac.run("read", room)
    md = fac.out("export", room, "--format", "md")
    assert "CANARY-ONE (v1.2) - ok" in md  # nothing to escape there
    assert "\n  second <U+001B>\\[2J line" in md  # indented under its item, inert


# --- 5. chat without a terminal ------------------------------------------------------------


def test_chat_without_a_terminal_refuses_with_a_hint(tmp_path: Path, relay: RelayServer) -> None:
    fac = person(tmp_path, relay, "fac", "Farida")
    room = fac.out("room", "create", "t")
    result = fac.run("chat", room, ok=False, timeout=20)
    one_error(result, "chat needs a terminal")
    assert "read ROOM --follow" in result.stderr
    assert result.stdout == ""


# --- 6. Ctrl-C -----------------------------------------------------------------------------


def test_ctrl_c_at_the_rules_prompt_exits_at_once_with_130(
    tmp_path: Path, relay: RelayServer
) -> None:
    fac = person(tmp_path, relay, "fac", "Farida")
    ann = person(tmp_path, relay, "ann", "Ann")
    code = fac.out("invite", fac.out("room", "create", "t"))
    term = Terminal(ann.home, "join", code)
    term.expect("Do you accept these rules?")
    term.type("\x03")  # Ctrl-C, through the terminal
    assert term.exit_code(timeout=10) == 130
    assert b"Traceback" not in term.seen
    assert json.loads(ann.out("rooms", "--json")) == []  # nothing was joined


def test_ctrl_c_at_the_passphrase_prompt_and_in_read_follow_exit_130(
    tmp_path: Path, relay: RelayServer
) -> None:
    fac = person(tmp_path, relay, "fac", "Farida")
    room = fac.out("room", "create", "t")
    term = Terminal(fac.home, "rooms", with_passphrase=False)
    term.expect("passphrase:")
    term.type("\x03")
    assert term.exit_code() == 130
    follow = Terminal(fac.home, "read", room, "--follow")
    time.sleep(3)  # connected and waiting
    follow.type("\x03")
    assert follow.exit_code() == 130
    assert b"Traceback" not in follow.seen


# --- 7. errors that name their cause -------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_dead_or_bad_proxy_is_named_as_the_problem(tmp_path: Path, relay: RelayServer) -> None:
    fac = person(tmp_path, relay, "fac", "Farida")
    proxy = f"socks5://127.0.0.1:{closed_port()}"
    dead = fac.run("--proxy", proxy, "room", "create", "t", ok=False)
    one_error(dead, "cannot reach the proxy")
    assert dead.returncode == 3
    assert "127.0.0.1" not in dead.stderr  # no address in the line
    bad = fac.run("--proxy", "tor please", "rooms", ok=False)
    one_error(bad, "not a usable proxy URL")
    assert bad.returncode == 2


def test_relay_urls_with_v1_a_wrong_path_or_https_against_http(
    tmp_path: Path, relay: RelayServer
) -> None:
    made = Person(tmp_path / "v1", relay).run("init", "--relay", relay.url + "/v1", "--name", "A")
    assert "without /v1" in made.stderr
    assert Person(tmp_path / "v1", relay).out("profile").splitlines()[1] == f"relay\t{relay.url}"
    wrong = Person(tmp_path / "w", relay).run(
        "init", "--relay", relay.url + "/relay", "--name", "A", ok=False
    )
    one_error(wrong, "does not lead to a backchannel relay")
    assert not (tmp_path / "w" / "state.db").exists()  # nothing made in vain
    tls = Person(tmp_path / "tls", relay).run(
        "init", "--relay", relay.url.replace("http://", "https://"), "--name", "A", ok=False
    )
    one_error(tls, "TLS handshake")
    assert "http://" in tls.stderr  # the hint


def test_a_reused_room_creation_token_says_it_was_used(tmp_path: Path) -> None:
    server = RelayServer(
        Settings(
            data_dir=tmp_path / "relay",
            database_url=f"sqlite+aiosqlite:///{tmp_path}/relay.db",
            creation_policy="token",
        )
    ).start()
    try:
        token = server.call(server.store.create_token())
        fac = person(tmp_path, server, "fac", "Farida")
        fac.run("room", "create", "one", "--token", token)
        again = fac.run("room", "create", "two", "--token", token, ok=False)
        one_error(again, "already used")
        unknown = fac.run("room", "create", "two", "--token", "bct_nope", ok=False)
        one_error(unknown, "does not know this room-creation token")
        one_error(fac.run("room", "create", "two", ok=False), "--token")
    finally:
        server.stop()


def test_zero_durations_are_refused_before_any_relay_is_asked(tmp_path: Path) -> None:
    dead = Person(tmp_path / "d", relay=None)  # type: ignore[arg-type]
    dead.run("init", "--relay", f"http://127.0.0.1:{closed_port()}", "--name", "D", "--offline")
    for args in (
        ("invite", "anything", "--expires", "0d"),
        ("room", "create", "t", "--retention", "0d"),
        ("room", "create", "t", "--retention", "7 days"),
    ):
        result = dead.run(*args, ok=False)
        one_error(result)
        assert result.returncode == 2, args  # a usage error, not "cannot reach the relay"
        assert "cannot reach" not in result.stderr


def test_leave_twice_and_the_last_facilitator(tmp_path: Path, relay: RelayServer) -> None:
    fac, room, ann, ann_room = facilitated(tmp_path, relay)
    last = fac.run("leave", room, ok=False)
    one_error(last, "only facilitator", "--force")
    assert "you left" not in last.stderr
    ann.run("leave", ann_room)
    again = ann.run("leave", ann_room, ok=False)
    one_error(again, "already left")
    fac2, room2 = fac, fac.out("room", "create", "alone")
    fac2.run("leave", room2)  # nobody else: nobody is left without a facilitator
    other = person(tmp_path, relay, "bob", "Bob")
    room3 = fac.out("room", "create", "three")
    other.out("join", fac.out("invite", room3), "--accept-rules")
    fac.run("leave", room3, "--force")


# --- 8. the first run ----------------------------------------------------------------------


def test_init_checks_the_relay_unless_offline(tmp_path: Path, relay: RelayServer) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    refused = Person(tmp_path / "a", relay).run("init", "--relay", url, "--name", "A", ok=False)
    one_error(refused, "cannot reach the relay")
    assert refused.returncode == 3
    assert not (tmp_path / "a" / "state.db").exists()
    Person(tmp_path / "a", relay).run("init", "--relay", url, "--name", "A", "--offline")
    assert (tmp_path / "a" / "state.db").exists()


def test_init_asks_again_when_the_passphrases_differ(tmp_path: Path, relay: RelayServer) -> None:
    home = tmp_path / "p"
    term = Terminal(home, "init", "--relay", relay.url, "--name", "P", with_passphrase=False)
    term.expect("new passphrase:")
    term.type("one passphrase\n")
    term.expect("again:")
    term.type("another\n")
    term.expect("differ; try again")
    # Wait for the next prompt before typing: getpass flushes what was typed ahead
    # of it (TCSAFLUSH), as a terminal would for a person typing too early.
    term.seen = term.seen[term.seen.index(b"differ; try again") :]
    term.expect("new passphrase:")
    term.type("the real one\n")
    term.seen = b""
    term.expect("again:")
    term.type("the real one\n")
    assert term.exit_code(timeout=30) == 0, term.seen
    opened = subprocess.run(
        [sys.executable, "-m", "backchannel.client", "rooms"],
        env={**env_of(home), "BACKCHANNEL_PASSPHRASE": "the real one"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert opened.returncode == 0, opened.stderr


def test_first_run_messages_profile_help_and_version(tmp_path: Path, relay: RelayServer) -> None:
    empty = Person(tmp_path / "empty", relay)
    missing = empty.run("rooms", ok=False)
    one_error(missing, "no profile here", "backchannel init")
    assert not (tmp_path / "empty" / "state.db").exists()
    fac = person(tmp_path, relay, "fac", "Farida")
    none = fac.run("rooms")
    assert none.stdout == ""  # a script sees no rooms, not a sentence
    assert "no rooms yet" in none.stderr
    assert fac.out("rooms", "--json") == "[]"
    changed = fac.out("profile", "--name", "Farida Z", "--affiliation", "Institute")
    assert changed.splitlines() == [
        "name\tFarida Z",
        f"relay\t{relay.url}",
        "affiliation\tInstitute",
    ]
    assert fac.out("profile", "--relay", relay.url + "/").splitlines()[1] == f"relay\t{relay.url}"
    dead = fac.run("profile", "--relay", f"http://127.0.0.1:{closed_port()}", ok=False)
    one_error(dead, "cannot reach the relay")
    assert fac.out("profile").splitlines()[1] == f"relay\t{relay.url}"  # unchanged
    for command in (
        ("send",),
        ("join",),
        ("invite",),
        ("room", "create"),
        ("wipe",),
        ("read",),
        ("leave",),
        ("init",),
    ):
        shown = fac.out(*command, "--help")
        assert "<bool>" not in shown, command
    invite_help = fac.out("invite", "--help")
    assert "participant|observer|facilitator" in invite_help
    assert "90s, 45m, 12h, 7d or 2w" in invite_help
    create_help = fac.out("room", "create", "--help")
    assert "chatham|attributed|anonymous" in create_help
    assert "90s, 45m, 12h, 7d or 2w" in create_help
    version = fac.run("--version")
    assert version.stdout.startswith("backchannel ")
    assert version.stdout.split()[1][0].isdigit()
