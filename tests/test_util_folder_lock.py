"""util.folder_lock: one process at a time; the refused one is told who holds the folder; a lock whose holder was
killed is taken over with a note; a released lock leaves no file."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from util.errors import UserError
from util.folder_lock import FolderInUseError, FolderLock

ROOT = Path(__file__).resolve().parents[1]


def hold_in_another_process(path: Path) -> subprocess.Popen:
    """A process that takes the lock on ``path``, says so on stdout, and waits to be killed."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from util.folder_lock import FolderLock
        lock = FolderLock.acquire({str(path)!r}, purpose="output_dir")
        print("held", flush=True)
        time.sleep(600)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_process_is_refused_naming_the_holder_then_takes_over_once_it_is_killed(tmp_path):
    path = tmp_path / "train.lock"
    holder = hold_in_another_process(path)
    try:
        with pytest.raises(FolderInUseError) as raised:
            FolderLock.acquire(path, purpose="output_dir")
        details = json.loads(path.read_text())
        assert details["pid"] == holder.pid and details["host"] == socket.gethostname()
        assert str(raised.value) == (
            f"output_dir {tmp_path} is in use by process {holder.pid} on host {socket.gethostname()} (started "
            f"{details['started']}), which holds {path}; wait for it to end or stop it, or choose another output_dir"
        )
        assert isinstance(raised.value, UserError)
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up: the file stays, the kernel drops the lock
        holder.wait()
    assert path.is_file()
    with FolderLock.acquire(path, purpose="output_dir") as lock:
        assert lock.note == (
            f"took over the lock {path} of process {holder.pid} on host {socket.gethostname()} (started "
            f"{details['started']}), which ended without releasing it"
        )
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_a_released_lock_leaves_no_file_and_can_be_taken_again(tmp_path):
    path = tmp_path / "train.lock"
    with FolderLock.acquire(path) as lock:
        assert lock.note == "" and path.is_file()
        with pytest.raises(FolderInUseError):  # another open file description of this process is refused too
            FolderLock.acquire(path)
    assert list(tmp_path.iterdir()) == []
    lock.release()  # twice: nothing happens
    with FolderLock.acquire(path):
        pass


def test_the_lock_is_released_when_an_exception_or_ctrl_c_leaves_the_block(tmp_path):
    path = tmp_path / "train.lock"
    for error in (RuntimeError("the run failed"), KeyboardInterrupt()):
        with pytest.raises(type(error)), FolderLock.acquire(path):
            raise error
        assert not path.exists()


def test_a_file_system_that_cannot_lock_is_used_unlocked_with_a_note(tmp_path, monkeypatch):
    def cannot_lock(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("util.folder_lock.fcntl.flock", cannot_lock)
    lock = FolderLock.acquire(tmp_path / "train.lock", purpose="output_dir")
    assert lock.note == f"output_dir {tmp_path} is not locked (No locks available): run one process in it"
    lock.release()


def test_a_lock_file_removed_between_open_and_lock_is_opened_again(tmp_path, monkeypatch):
    path = tmp_path / "train.lock"
    real_flock = fcntl.flock
    holders = []

    def flock_after_the_name_changed_hands(descriptor, operation):
        if not holders:  # meanwhile its holder removed the file and another process created and locked a new one
            path.unlink()
            holders.append(hold_in_another_process(path))
        real_flock(descriptor, operation)

    monkeypatch.setattr("util.folder_lock.fcntl.flock", flock_after_the_name_changed_hands)
    try:
        with pytest.raises(FolderInUseError) as raised:
            FolderLock.acquire(path)  # locks the removed file, sees that the name is another file's, tries that
        assert f"in use by process {holders[0].pid} on host" in str(raised.value)
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
