"""util.output_paths: output folders and files refused before a command works, naming the path and the reason;
nothing created by the check."""

from __future__ import annotations

import pytest

from tests.read_only import read_only_folder
from util.errors import UserError
from util.output_paths import check_output_file, check_output_folder


def test_a_folder_to_create_under_a_writable_one_passes_and_is_not_created(tmp_path):
    check_output_folder(tmp_path / "a" / "b", "output_dir")
    check_output_file(tmp_path / "c" / "model.onnx", "--out")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_and_file_pass(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"old")
    check_output_folder(tmp_path, "--out")
    check_output_file(tmp_path / "model.onnx", "--out")
    assert [path.name for path in tmp_path.iterdir()] == ["model.onnx"]


def test_a_file_given_as_a_folder_is_named(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(UserError, match=f"^output_dir {tmp_path / 'run'} is a file, not a folder"):
        check_output_folder(tmp_path / "run", "output_dir")


def test_a_folder_given_as_a_file_is_named(tmp_path):
    with pytest.raises(UserError, match=f"^--out {tmp_path} is a folder: give the file to write"):
        check_output_file(tmp_path, "--out")


@pytest.mark.parametrize("check", [check_output_folder, check_output_file])
def test_a_path_under_a_file_names_the_file(tmp_path, check):
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(UserError, match=f"lies under {tmp_path / 'notes.txt'}, which is a file, not a folder"):
        check(tmp_path / "notes.txt" / "deeper" / "x", "--out")


@pytest.mark.parametrize("check", [check_output_folder, check_output_file])
def test_a_read_only_place_is_refused_with_the_reason(tmp_path, check):
    with read_only_folder(tmp_path / "read_only") as folder:
        if folder is None:
            pytest.skip("no read-only folder can be made here")
        with pytest.raises(UserError) as refused:
            check(folder / "run" / "x", "--out")
    message = str(refused.value)
    assert message.startswith(f"--out {folder / 'run' / 'x'} cannot be written: ")
    assert ("Read-only file system" in message or "Permission denied" in message) and str(folder) in message
