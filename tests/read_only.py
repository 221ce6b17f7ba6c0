"""A folder nothing can be written in, for the tests of refused output paths: a read-only tmpfs mounted on it when
this process is root (whom permissions do not stop), else the folder without write permission."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def read_only_folder(folder: Path) -> Iterator[Path | None]:
    """``folder`` made read-only while the block runs; None where this process can make it neither way (root
    without the right to mount)."""
    folder.mkdir(parents=True, exist_ok=True)
    if getattr(os, "geteuid", lambda: 0)() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    try:
        command = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)]
        mounted = subprocess.run(command, capture_output=True, check=False).returncode == 0
    except OSError:  # no mount command
        mounted = False
    try:
        yield folder if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)
