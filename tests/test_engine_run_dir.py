"""engine.run_dir: a run's folder is never taken over by accident, and its log keeps one record per epoch and is
read back with broken lines named."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.run_dir import append_log, claim_output_dir, read_log, reconcile_log
from util.errors import UserError


def finished_run(output_dir):
    """A folder as a finished two-epoch run leaves it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in ("checkpoint.pth", "checkpoint0001.pth", "metrics.json", "config.yaml"):
        (output_dir / name).write_bytes(name.encode())
    for epoch in range(2):
        append_log(output_dir, {"epoch": epoch, "train_loss": 1.0})
    return output_dir


def contents(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def test_a_run_in_the_folder_is_refused_naming_the_ways_on_and_nothing_changes(tmp_path):
    output_dir = finished_run(tmp_path / "run")
    before = contents(output_dir)
    for source in ({}, {"finetune_from": str(output_dir / "checkpoint.pth")}, {"resume": str(tmp_path / "a.pth")}):
        with pytest.raises(UserError) as raised:
            claim_output_dir(output_dir, **source)
        message = str(raised.value)
        assert f"output_dir {output_dir} already holds a training run" in message
        assert f"resume={output_dir / 'checkpoint.pth'}" in message and "overwrite=true" in message
    assert contents(output_dir) == before


def test_resuming_one_of_its_checkpoints_continues_the_run(tmp_path):
    output_dir = finished_run(tmp_path / "run")
    before = contents(output_dir)
    assert claim_output_dir(output_dir, resume=str(output_dir / "checkpoint0001.pth")) == []
    assert contents(output_dir) == before


def test_overwrite_deletes_the_earlier_run_but_not_the_checkpoint_it_starts_from(tmp_path):
    output_dir = finished_run(tmp_path / "run")
    notes = claim_output_dir(output_dir, finetune_from=str(output_dir / "checkpoint0001.pth"), overwrite=True)
    assert notes == [f"overwrite=true: deleted the earlier run in {output_dir} (3 files)"]
    assert sorted(contents(output_dir)) == ["checkpoint0001.pth", "config.yaml"]


def test_a_folder_without_a_run_is_created_and_cleared_of_stale_temporaries(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    stale = output_dir / f".checkpoint.pth.{int(finished.stdout)}.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert claim_output_dir(output_dir) == [f"removed {stale}, left by a checkpoint write that was killed"]
    assert list(output_dir.iterdir()) == []
    assert claim_output_dir(tmp_path / "new" / "run") == [] and (tmp_path / "new" / "run").is_dir()


def test_log_records_of_epochs_to_be_trained_again_are_removed(tmp_path):
    output_dir = finished_run(tmp_path / "run")
    unlogged, notes = reconcile_log(output_dir, str(output_dir / "checkpoint0000.pth"), 1, None)
    assert unlogged is None
    assert notes == [f"{output_dir / 'log.txt'}: removed the records of epochs [1], trained again now"]
    lines = (output_dir / "log.txt").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0]
    assert reconcile_log(tmp_path / "empty", "", 3, None) == (None, [])


def test_the_record_of_an_epoch_that_stopped_in_its_evaluation_is_found(tmp_path):
    output_dir = finished_run(tmp_path / "run")
    checkpoint = str(output_dir / "checkpoint.pth")
    record = {"epoch": 2, "train_loss": 0.5, "epoch_time_s": 3.0}
    assert reconcile_log(output_dir, checkpoint, 3, record) == (record, [])  # log.txt has epochs 0 and 1
    append_log(output_dir, {**record, "val_AP": 0.1})
    assert reconcile_log(output_dir, checkpoint, 3, record) == (None, [])
    # resumed from a checkpoint elsewhere: this folder's log starts at the next epoch
    assert reconcile_log(tmp_path / "other", checkpoint, 3, record) == (None, [])


def test_the_log_reads_back_from_the_file_or_its_folder(tmp_path):
    output_dir = finished_run(tmp_path / "run")
    expected = [{"epoch": 0, "train_loss": 1.0}, {"epoch": 1, "train_loss": 1.0}]
    assert read_log(output_dir) == read_log(output_dir / "log.txt") == expected


def test_a_line_that_is_not_json_is_named(tmp_path):
    (tmp_path / "log.txt").write_text('{"epoch": 0}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        read_log(tmp_path)


def test_a_missing_log_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training log"):
        read_log(tmp_path / "nowhere")
