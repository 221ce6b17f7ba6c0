"""A real full disk for the tests: a small tmpfs mounted on a folder (root only; skipped where mount is refused),
and a file that takes every block left on it."""

from __future__ import annotations

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
