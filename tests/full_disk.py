"""A full disk for the tests: a small tmpfs mounted on a folder (root only; skipped where mount is refused) and a
file that takes every block left on it; and, everywhere, files of ``util.atomic_write`` that run out of space."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_file_system(folder: Path, size: str = "1m") -> Iterator[Path]:
    """``folder`` as the mount point of a ``size`` tmpfs while the block runs; the test is skipped when this
    process may not mount one (not root, a container without the capability, no ``mount``)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, check=False
        )
    except OSError as error:
        pytest.skip(f"cannot mount a tmpfs here: {error}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path, leave: int = 0) -> Path:
    """A file in ``folder`` taking all its free space but about ``leave`` bytes."""
    status = os.statvfs(folder)
    free = status.f_bavail * status.f_frsize
    filler = folder / "filler"
    with open(filler, "wb") as file:
        file.write(b"\0" * max(0, free - leave))
    return filler


class FillingFile:
    """A file object whose writes fail with ENOSPC once ``budget[0]`` bytes are spent, after writing what fits."""

    def __init__(self, file, budget: list[int]):
        self._file, self._budget = file, budget

    def write(self, data):
        if len(data) > self._budget[0]:
            self._file.write(data[: self._budget[0]])
            self._budget[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget[0] -= len(data)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._file.close()


def disk_full_after(monkeypatch: pytest.MonkeyPatch, free_bytes: int) -> None:
    """Every file ``util.atomic_write`` opens from now on shares ``free_bytes`` of space; a write past it fails
    with ``ENOSPC``, as on a disk that fills up."""
    budget = [free_bytes]
    real_open = open
    monkeypatch.setattr(
        "util.atomic_write.open", lambda *args, **kwargs: FillingFile(real_open(*args, **kwargs), budget), raising=False
    )
