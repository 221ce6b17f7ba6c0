"""Files written whole or not at all: every file the program writes goes through :func:`atomic_write`.

The content goes to a temporary ``.NAME.PID.tmp`` in the file's own folder, is flushed and fsynced, then renamed
over ``NAME`` with ``os.replace`` (atomic within one file system, on POSIX and Windows) and the folder is synced.
A reader, or a process killed at any instant (``kill -9``, Ctrl-C, an exception), sees the earlier file or the
whole new one, never part of one; a killed writer's temporary is removed later by :func:`remove_stale_temporaries`.

A failed write removes the temporary, keeps the earlier file as it was, and raises an error that names the file
and the reason in the operating system's own words: :class:`FileWriteError` for a fault of the machine (``No
space left on device``, an I/O error; ``main.py`` exits with status 1), :class:`FileNotWritableError` for a path
the user can change (permission denied, a read-only file system, a folder where the file should be, a file where a
folder should be; status 2). A writer that reports a failed write in its own words (``torch.save``: ``[enforce
fail at inline_container.cc] unexpected pos``) is traced back to the operating system's error through the
exception chain, else through the folder's free space.

An append (``log.txt``, a line per epoch) rewrites the whole file the same way (:func:`append_text`): the file is
small, and a killed or failed append leaves the file as it was, never a torn last line.

    from util.atomic_write import atomic_write, write_json
    with atomic_write(path, "wb") as file:
        torch.save(state, file)
    write_json(out_dir / "metrics.json", metrics, indent=2)
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from util.errors import RunError, UserError

# errno values that name a path the user can change rather than a fault of the machine
NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.ENOENT, errno.ENAMETOOLONG}
NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class FileWriteError(RunError, OSError):
    """A file could not be written for a fault of the machine (a full disk, an I/O error); the message names the
    file and the operating system's reason, ``errno`` holds its code. The earlier file, if any, is as it was."""


class FileNotWritableError(UserError, OSError):
    """A file could not be written where the user asked (permission, a read-only file system, a folder or a file in
    the way); the message names the file, the reason and the way on, ``errno`` holds the code."""


def temporary_path(path: Path, pid: int | None = None) -> Path:
    """The temporary :func:`atomic_write` writes before renaming it to ``path``: ``.NAME.PID.tmp`` beside it."""
    return path.with_name(f".{path.name}.{os.getpid() if pid is None else pid}.tmp")


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """A file object open on ``path``'s temporary (``mode`` ``"w"`` for text, ``"wb"`` for bytes; its folder is
    created); when the block ends, its content replaces ``path`` whole. A failed write raises
    :class:`FileWriteError` or :class:`FileNotWritableError` (see the module docstring); any other exception in the
    block propagates as it is. Either way the temporary is removed and ``path`` is as it was."""
    with atomic_path(path) as temporary, open(temporary, mode, encoding=None if "b" in mode else encoding) as file:
        yield file


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """:func:`atomic_write` for a writer that takes a file name (the ONNX exporters): the temporary's path, which
    the block writes and which then replaces ``path`` whole."""
    path = Path(path)
    temporary = temporary_path(path)
    try:
        make_folder(path.parent)
        yield temporary
        sync_file(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        remove_quietly(temporary)
        reason = os_error_of(error, path.parent)
        if reason is None:
            raise
        raise write_error(path, reason) from error
    sync_folder(path.parent)


def sync_file(path: Path) -> None:
    """fsync the file at ``path``: its content is on the disk before it is renamed into place."""
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def make_folder(folder: Path) -> None:
    """``folder`` and its parents created; a file in the way is ``ENOTDIR`` (``mkdir`` says "File exists")."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None


def write_bytes(path: str | Path, data: bytes) -> Path:
    """``data`` as the whole content of ``path`` (see :func:`atomic_write`); returns ``path``."""
    with atomic_write(path, "wb") as file:
        file.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """``text`` as the whole content of ``path``, UTF-8 (see :func:`atomic_write`); returns ``path``."""
    with atomic_write(path, "w") as file:
        file.write(text)
    return Path(path)


def write_json(path: str | Path, value: Any, **dump_options: Any) -> Path:
    """``value`` as JSON (``json.dump`` options such as ``indent``), the whole content of ``path``; a value JSON
    cannot hold raises before anything is written. Returns ``path``."""
    return write_text(path, json.dumps(value, **dump_options))


def append_text(path: str | Path, text: str) -> Path:
    """``path`` with ``text`` added at its end, written whole: a failed or killed append leaves the file as it
    was, never part of ``text`` (the file is read and written again: for small files such as ``log.txt``)."""
    path = Path(path)
    try:
        earlier = path.read_bytes() if path.is_file() else b""
    except OSError as error:
        raise write_error(path, error) from error
    return write_bytes(path, earlier + text.encode("utf-8"))


def write_error(path: Path, error: OSError) -> FileWriteError | FileNotWritableError:
    """The error to raise for ``error`` while writing ``path``: names the file and the operating system's reason."""
    reason = error.strerror or str(error)
    if error.errno in NOT_WRITABLE:
        raised = FileNotWritableError(f"cannot write {path}: {reason}; choose a place you can write to")
    elif error.errno in NO_SPACE:
        raised = FileWriteError(f"cannot write {path}: {reason}; free some space there or write elsewhere")
    else:
        raised = FileWriteError(f"cannot write {path}: {reason}")
    raised.errno = error.errno
    return raised


def os_error_of(error: BaseException, folder: Path) -> OSError | None:
    """The operating system's error behind ``error``, raised while writing into ``folder``: ``error`` itself or one
    in its chain (``__cause__``, ``__context__``) with an errno; for a ``RuntimeError`` without one (a writer that
    lost it), ``ENOSPC`` when ``folder``'s file system has no space left. None: not a failed write, and never for
    an interruption (Ctrl-C's ``KeyboardInterrupt``, ``SystemExit``): it stays itself even when it arrives while an
    ``OSError`` is being handled (``mkdir(exist_ok=True)`` handles a ``FileExistsError`` inside)."""
    if not isinstance(error, Exception):
        return None
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno is not None:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    if isinstance(error, RuntimeError) and no_space_left(folder):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def no_space_left(folder: Path) -> bool:
    """Whether the file system of ``folder`` has no block left for an unprivileged writer."""
    try:
        return os.statvfs(folder).f_bavail == 0
    except (OSError, AttributeError):  # no statvfs on Windows
        return False


def sync_folder(folder: Path) -> None:
    """fsync ``folder`` so that a rename in it survives a power cut; a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems do not sync folders; the rename itself is atomic regardless
    finally:
        os.close(descriptor)


def remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # the error being reported matters more than a temporary that cannot be removed


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries that :func:`atomic_write` left in ``folder`` when its process was killed mid-write.

    Only files named ``.NAME.PID.tmp`` whose process PID no longer runs on this machine are removed: another
    process writing into the same folder keeps its file. Returns the paths removed.
    """
    removed = []
    for candidate in sorted(Path(folder).glob(".*.tmp")):
        match = re.fullmatch(r"\.(.+)\.(\d+)\.tmp", candidate.name)
        if match and candidate.is_file() and not process_is_running(int(match.group(2))):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def process_is_running(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (``os.kill(pid, 0)`` sends no signal)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:  # pid out of range
        return False
    return True
