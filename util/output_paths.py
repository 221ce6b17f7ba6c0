"""Where a command will write, checked before it starts its work: an output folder or file that cannot be written
is refused at once, naming the path, the operating system's reason and what to give instead, rather than after an
epoch of training or a minutes-long export.

Nothing is created: a folder that does not exist yet is judged by the nearest folder above it that does, where one
nameless temporary file (``O_TMPFILE`` on Linux) is opened and closed, which tests what permissions alone cannot
(a read-only file system; root, whom permissions do not stop).

    check_output_folder("outputs/r50", "output_dir")   # -> None, or UserError
    check_output_file("model.onnx", "--out")
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from util.errors import UserError


def check_output_folder(path: str | Path, name: str) -> None:
    """Raise a :class:`UserError` unless ``path`` is a folder this process can write in, or one it can create;
    ``name`` is what the user set (``output_dir``, ``--out``), for the message."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{name} {path} is a file, not a folder: give a folder (it is created if missing)")
    _check_can_write_in(path, name, path)


def check_output_file(path: str | Path, name: str) -> None:
    """Raise a :class:`UserError` unless ``path`` names a file this process can write (its folder existing or
    creatable); ``name`` is what the user set (``--out``), for the message."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{name} {path} is a folder: give the file to write, e.g. {path / 'model.onnx'}")
    _check_can_write_in(path.parent, name, path)


def _check_can_write_in(folder: Path, name: str, given: Path) -> None:
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise UserError(f"{name} {given} lies under {existing}, which is a file, not a folder: give another path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise UserError(
            f"{name} {given} cannot be written: {reason} ({existing}); set {name} to a place you can write to"
        ) from None


def _nearest_existing(path: Path) -> Path:
    """``path`` or the nearest folder above it that exists (the current folder for a relative path)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
