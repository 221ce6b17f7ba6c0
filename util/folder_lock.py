"""One process at a time in a folder: an exclusive lock on a lock file, naming its holder to whoever is refused.

    with FolderLock.acquire(output_dir / "train.lock", purpose="output_dir") as lock:
        print(lock.note)   # "took over the lock of process ... which ended without releasing it", or ""
        ...                # train; a second process's FolderLock.acquire raises FolderInUseError meanwhile

Why ``fcntl.flock`` on the lock file, not a file created with ``O_CREAT | O_EXCL``: the kernel releases a flock when
its holder ends in any way, ``kill -9`` and a crash included, so a dead holder never blocks the folder and no guess
is needed about whether it still runs (a recycled process id, a holder on another host whose age says nothing: an
``O_EXCL`` file outlives its creator, and taking it over safely needs such guesses). On a network file system
Linux implements flock with the file system's own byte-range locks (NFS: the lock manager, which also releases the
locks of a host that died). Where the file system cannot lock (``ENOLCK``, ``EOPNOTSUPP``: some FUSE and SMB
mounts) the folder is used unlocked and :attr:`FolderLock.note` says so.

The holder writes its process id, host and start time into the file, for the message of a refused process. When
it releases the lock it removes the file first, so a folder keeps no lock file after a run that ended; a file left
with a holder's details (killed) is taken over silently by the next process but for :attr:`FolderLock.note`. Since
the file can be removed between another process's ``open`` and its ``flock``, a lock is held only on the file that
the name still points to (compared by device and inode; otherwise the acquirer opens the name again).

A lock is held by an open file description: a child created by ``fork`` (a data-loader worker) shares it until it
ends, and a process that opened the file twice holds it once. POSIX only: where ``fcntl`` is missing (Windows) no
lock is taken and the note says so.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from util.atomic_write import write_error
from util.errors import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class FolderInUseError(UserError):
    """Another process holds the folder's lock; the message names it (process id, host, start time)."""


@dataclass
class FolderLock:
    """A held lock on ``path`` (``descriptor`` -1: the file system could not lock; nothing is held)."""

    path: Path
    descriptor: int
    note: str = ""  # what the caller should tell the user: a lock taken over, or none taken

    @classmethod
    def acquire(cls, path: str | Path, purpose: str = "folder") -> FolderLock:
        """Lock ``path`` (created if missing) and write this process's details into it, or raise
        :class:`FolderInUseError` naming the process that holds it (``purpose`` names the folder in messages, e.g.
        ``"output_dir"``)."""
        path = Path(path)
        if fcntl is None:
            return cls(path, -1, f"{purpose} {path.parent} is not locked: this system has no fcntl.flock")
        while True:
            try:
                descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:  # a read-only folder, ...
                raise write_error(path, error) from error
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = read_holder(descriptor)
                os.close(descriptor)
                raise FolderInUseError(refusal(path, purpose, holder)) from None
            except OSError as error:
                os.close(descriptor)
                if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    reason = error.strerror or str(error)
                    return cls(path, -1, f"{purpose} {path.parent} is not locked ({reason}): run one process in it")
                raise
            if same_file(descriptor, path):
                break
            os.close(descriptor)  # its last holder removed the file after we opened it: open the name again
        earlier = read_holder(descriptor)
        write_holder(descriptor)
        note = ""
        if earlier:
            note = f"took over the lock {path} of {describe(earlier)}, which ended without releasing it"
        return cls(path, descriptor, note)

    def release(self) -> None:
        """Remove the lock file and release the lock; a second call does nothing."""
        if self.descriptor < 0:
            return
        try:
            if same_file(self.descriptor, self.path):
                self.path.unlink()
        except OSError:
            pass  # the file stays; the next holder takes it over, as after a kill
        finally:
            os.close(self.descriptor)  # releases the flock
            self.descriptor = -1

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()


def same_file(descriptor: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``descriptor``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def write_holder(descriptor: int) -> None:
    """This process's details as the lock file's whole content."""
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)
    os.fsync(descriptor)


def read_holder(descriptor: int) -> dict:
    """The details the lock's holder wrote (empty when it has not yet, or the file is not ours)."""
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe(holder: dict) -> str:
    return f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {holder.get('started', '?')})"


def refusal(path: Path, purpose: str, holder: dict) -> str:
    who = describe(holder) if holder else "another process (starting now)"
    return (
        f"{purpose} {path.parent} is in use by {who}, which holds {path}; wait for it to end or stop it, "
        f"or choose another {purpose}"
    )
