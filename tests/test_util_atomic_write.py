"""util.atomic_write: a file is written whole or not at all; a failed write names the file and the operating
system's reason, removes its temporary and keeps the earlier file; on a real full file system too."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.full_disk import fill, small_file_system
from util.atomic_write import (
    FileNotWritableError,
    FileWriteError,
    append_text,
    atomic_write,
    remove_stale_temporaries,
    write_json,
    write_text,
)
from util.checkpoint import load_checkpoint, save_checkpoint
from util.errors import RunError, UserError

ROOT = Path(__file__).resolve().parents[1]
NO_SPACE = "No space left on device; free some space there or write elsewhere"


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_file_is_written_whole_with_no_temporary_left(tmp_path):
    path = write_json(tmp_path / "sub" / "metrics.json", {"AP": 0.5}, indent=2)
    assert json.loads(path.read_text()) == {"AP": 0.5}
    assert [entry.name for entry in path.parent.iterdir()] == ["metrics.json"]


def test_a_full_disk_names_the_file_and_the_reason_and_keeps_the_earlier_file(tmp_path):
    path = write_text(tmp_path / "detections.json", "earlier")
    with pytest.raises(FileWriteError) as raised, atomic_write(path) as file:
        file.write("half of the new content")
        file.flush()
        full_disk()
    assert str(raised.value) == f"cannot write {path}: {NO_SPACE}"
    assert raised.value.errno == errno.ENOSPC and isinstance(raised.value, (RunError, OSError))
    assert path.read_text() == "earlier"
    assert [entry.name for entry in tmp_path.iterdir()] == ["detections.json"]


def test_a_failed_flush_or_fsync_is_a_failed_write(tmp_path, monkeypatch):
    monkeypatch.setattr("os.fsync", full_disk)
    with pytest.raises(FileWriteError, match="No space left on device"):
        write_text(tmp_path / "config.yaml", "lr: 1.0")
    assert list(tmp_path.iterdir()) == []


def test_a_writer_that_hides_the_reason_is_traced_to_the_operating_systems_error(tmp_path):
    path = tmp_path / "checkpoint.pth"
    with pytest.raises(FileWriteError, match="No space left on device"), atomic_write(path, "wb"):
        try:
            full_disk()
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 704 vs 598")  # noqa: B904
    assert list(tmp_path.iterdir()) == []


def test_a_reason_lost_altogether_is_found_in_the_free_space(tmp_path, monkeypatch):
    monkeypatch.setattr("util.atomic_write.no_space_left", lambda folder: True)
    with pytest.raises(FileWriteError, match="No space left on device"), atomic_write(tmp_path / "c.pth", "wb"):
        raise RuntimeError("unexpected pos 704 vs 598")


def test_other_errors_in_the_block_propagate_as_they_are_and_leave_nothing(tmp_path):
    path = write_text(tmp_path / "predictions.json", "earlier")
    for error in (TypeError("not JSON serialisable"), KeyboardInterrupt()):
        with pytest.raises(type(error)), atomic_write(path) as file:
            file.write("half")
            raise error
    assert path.read_text() == "earlier" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit])
def test_an_interruption_while_an_os_error_is_handled_stays_an_interruption(tmp_path, interruption):
    """Ctrl-C during a checkpoint's write once ended a run with "cannot write checkpoint.pth: File exists" (exit 1):
    it arrived while mkdir(exist_ok=True) handled a FileExistsError, and the error's chain named that."""
    path = tmp_path / "checkpoint.pth"
    path.write_text("earlier")
    with pytest.raises(interruption):
        with atomic_write(path) as file:
            file.write("new")
            try:
                raise FileExistsError(errno.EEXIST, "File exists")
            except FileExistsError:
                raise interruption from None
    assert path.read_text() == "earlier"
    assert list(tmp_path.iterdir()) == [path]


def test_a_path_the_user_can_change_is_a_user_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(FileNotWritableError) as raised:
        write_text(tmp_path / "a_file" / "model.onnx", "")
    assert str(raised.value).startswith(f"cannot write {tmp_path / 'a_file' / 'model.onnx'}: Not a directory")
    assert isinstance(raised.value, UserError)
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(FileNotWritableError, match="Is a directory"):
        write_text(tmp_path / "folder.onnx", "")


def test_a_failed_append_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = append_text(tmp_path / "log.txt", '{"epoch": 0}\n')
    append_text(path, '{"epoch": 1}\n')
    monkeypatch.setattr("os.fsync", full_disk)
    with pytest.raises(FileWriteError, match=f"cannot write {path}: No space left on device"):
        append_text(path, '{"epoch": 2}\n')
    assert path.read_text() == '{"epoch": 0}\n{"epoch": 1}\n'
    assert [entry.name for entry in tmp_path.iterdir()] == ["log.txt"]


def test_a_process_killed_while_writing_leaves_the_earlier_file_and_a_temporary_removed_later(tmp_path):
    path = write_text(tmp_path / "log.txt", "earlier\n")
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from util.atomic_write import atomic_write
        with atomic_write({str(path)!r}) as file:
            file.write("half of it")
            file.flush()
            os._exit(9)  # no clean-up, as a kill or a power cut
    """)
    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == 9
    assert path.read_text() == "earlier\n"
    (stale,) = tmp_path.glob(".log.txt.*.tmp")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert [entry.name for entry in tmp_path.iterdir()] == ["log.txt"]


def test_on_a_full_file_system_json_and_checkpoints_fail_naming_the_reason(tmp_path):
    with small_file_system(tmp_path / "disk") as disk:
        metrics = write_json(disk / "metrics.json", {"AP": 0.5})
        checkpoint = save_checkpoint({"model": {"weight": torch.ones(3)}, "epoch": 1}, disk / "checkpoint.pth")
        fill(disk, leave=4096)
        with pytest.raises(FileWriteError) as raised:
            write_json(metrics, {"AP": [0.25] * 100_000})
        assert str(raised.value) == f"cannot write {metrics}: {NO_SPACE}"
        with pytest.raises(FileWriteError) as raised:
            save_checkpoint({"model": {"weight": torch.zeros(100_000)}, "epoch": 2}, checkpoint)
        assert str(raised.value) == f"cannot write {checkpoint}: {NO_SPACE}"  # not torch's "unexpected pos"
        assert json.loads(metrics.read_text()) == {"AP": 0.5} and load_checkpoint(checkpoint)["epoch"] == 1
        assert sorted(entry.name for entry in disk.iterdir()) == ["checkpoint.pth", "filler", "metrics.json"]
