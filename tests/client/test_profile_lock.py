"""One writer per profile: a second open of the same home is refused with the holder's PID,
in this process, from another process, and through the real command."""

from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from backchannel.client.store import LOCK_NAME, ProfileInUse, Store, StoreError, wipe
from backchannel.protocol import primitives as P

FAST = {"opslimit": P.ARGON2_OPSLIMIT_MIN, "memlimit": P.ARGON2_MEMLIMIT_MIN}
PASSPHRASE = "a long passphrase for tests"

HOLDER = """
import sys
from pathlib import Path
from backchannel.client.store import Store
store = Store.open(Path(sys.argv[1]), sys.argv[2])
print("open", flush=True)
sys.stdin.read()
"""


def in_use_by(pid: int) -> str:
    return rf"^this profile is open in another backchannel process \(pid {pid}\)$"


def test_second_open_in_this_process_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    store = Store.create(tmp_path, PASSPHRASE, **FAST)
    assert stat.S_IMODE((tmp_path / LOCK_NAME).stat().st_mode) == 0o600
    with pytest.raises(ProfileInUse, match=in_use_by(os.getpid())) as info:
        Store.open(tmp_path, PASSPHRASE)
    assert isinstance(info.value, StoreError)
    # Refusing must not erase the holder's PID, or the next refusal could not name it.
    with pytest.raises(ProfileInUse, match=in_use_by(os.getpid())):
        Store.open(tmp_path, PASSPHRASE)
    store.close()
    Store.open(tmp_path, PASSPHRASE).close()


def test_a_failed_open_releases_the_lock(tmp_path: Path) -> None:
    Store.create(tmp_path, PASSPHRASE, **FAST).close()
    with pytest.raises(StoreError, match="wrong passphrase"):
        Store.open(tmp_path, "not the passphrase")
    Store.open(tmp_path, PASSPHRASE).close()


def test_another_process_holds_the_lock_until_it_is_killed(tmp_path: Path) -> None:
    Store.create(tmp_path, PASSPHRASE, **FAST).close()
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), PASSPHRASE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 60)
        assert ready, "the holder did not open the store"
        assert child.stdout.readline() == "open\n"
        with pytest.raises(ProfileInUse, match=in_use_by(child.pid)):
            Store.open(tmp_path, PASSPHRASE)
        # SIGKILL runs no cleanup: only the kernel can release the lock.
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    Store.open(tmp_path, PASSPHRASE).close()


def test_wipe_proceeds_while_the_profile_is_open(tmp_path: Path) -> None:
    store = Store.create(tmp_path, PASSPHRASE, **FAST)
    assert wipe(tmp_path)
    assert list(tmp_path.iterdir()) == []
    store.close()


def command(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "BACKCHANNEL_HOME": str(home),
        "BACKCHANNEL_PASSPHRASE": PASSPHRASE,
        "BACKCHANNEL_KDF_PROFILE": "test-insecure",
        "NO_COLOR": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "backchannel.client", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_the_command_refuses_an_open_profile_with_one_error_and_a_hint(tmp_path: Path) -> None:
    home = tmp_path / "ann"
    # Nothing listens on port 9: reaching the network would be a different error.
    made = command(home, "init", "--relay", "http://127.0.0.1:9", "--name", "Ann", "--offline")
    assert made.returncode == 0, made.stderr
    store = Store.open(home, PASSPHRASE)
    try:
        result = command(home, "read", "Water talks")
    finally:
        store.close()
    assert result.returncode != 0
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("error: ")] == [
        f"error: this profile is open in another backchannel process (pid {os.getpid()})"
    ]
    assert lines == [lines[0], "hint: close the other window, or wait for it to finish"]
