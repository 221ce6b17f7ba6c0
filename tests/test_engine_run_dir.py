"""engine.run_dir: a run's folder is locked while a run goes on and never taken over by accident, nothing in it
changes until the run starts, and its log keeps one record per epoch, a torn last line set aside."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.run_dir import (
    append_log,
    claim_output_dir,
    config_changes,
    keep_log_before,
    read_log,
    start_run,
    unlogged_record,
)
from util.errors import UserError
from util.folder_lock import FolderInUseError

CONFIG = {"lr": 0.0002, "epochs": 2, "resume": ""}


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
    assert contents(output_dir) == before  # the lock was released, its file removed


def test_a_folder_in_use_is_refused_until_its_lock_is_released(tmp_path):
    output_dir = tmp_path / "run"
    lock = claim_output_dir(output_dir)
    assert lock.note == "" and (output_dir / "train.lock").is_file()
    with pytest.raises(FolderInUseError, match=f"output_dir {output_dir} is in use by process "):
        claim_output_dir(output_dir, overwrite=True)
    lock.release()
    assert list(output_dir.iterdir()) == []
    claim_output_dir(output_dir).release()


def test_resuming_one_of_its_checkpoints_claims_the_folder_without_changing_it(tmp_path):
    output_dir = finished_run(tmp_path / "run")
    before = contents(output_dir)
    claim_output_dir(output_dir, resume=str(output_dir / "checkpoint0001.pth")).release()
    assert contents(output_dir) == before


def test_a_continued_run_keeps_its_config_and_a_new_one_writes_it(tmp_path):
    output_dir = finished_run(tmp_path / "run")
    assert start_run(output_dir, CONFIG, resume=str(output_dir / "checkpoint.pth"), start_epoch=2) == []
    assert (output_dir / "config.yaml").read_bytes() == b"config.yaml"
    elsewhere = tmp_path / "elsewhere"
    assert start_run(elsewhere, CONFIG, resume=str(output_dir / "checkpoint.pth"), start_epoch=2) == []
    assert (elsewhere / "config.yaml").read_text() == "lr: 0.0002\nepochs: 2\nresume: ''\n"


def test_overwrite_deletes_the_earlier_run_but_not_the_checkpoint_it_starts_from(tmp_path):
    output_dir = finished_run(tmp_path / "run")
    claim_output_dir(output_dir, overwrite=True).release()
    notes = start_run(output_dir, CONFIG, finetune_from=str(output_dir / "checkpoint0001.pth"), overwrite=True)
    assert notes == [f"overwrite=true: deleted the earlier run in {output_dir} (3 files)"]
    assert sorted(contents(output_dir)) == ["checkpoint0001.pth", "config.yaml"]
    assert (output_dir / "config.yaml").read_text().startswith("lr: 0.0002\n")


def test_a_started_run_removes_the_temporaries_of_killed_writes(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    stale = output_dir / f".checkpoint.pth.{int(finished.stdout)}.tmp"
    stale.write_bytes(b"half a checkpoint")
    claim_output_dir(output_dir).release()
    assert stale.exists()  # claiming changes nothing
    assert start_run(output_dir, CONFIG) == [f"removed {stale}, left by a write that was killed"]
    assert sorted(contents(output_dir)) == ["config.yaml"]


def test_log_records_of_epochs_to_be_trained_again_are_removed(tmp_path):
    output_dir = finished_run(tmp_path / "run")
    notes = keep_log_before(output_dir, 1)
    assert notes == [f"{output_dir / 'log.txt'}: removed the records of epochs [1], trained again now"]
    assert [record["epoch"] for record in read_log(output_dir)] == [0]
    assert keep_log_before(tmp_path / "empty", 3) == []


def test_the_record_of_an_epoch_that_stopped_in_its_evaluation_is_found(tmp_path):
    output_dir = finished_run(tmp_path / "run")
    checkpoint = str(output_dir / "checkpoint.pth")
    record = {"epoch": 2, "train_loss": 0.5, "epoch_time_s": 3.0}
    assert unlogged_record(output_dir, checkpoint, record) == record  # log.txt has epochs 0 and 1
    append_log(output_dir, {**record, "val_AP": 0.1})
    assert unlogged_record(output_dir, checkpoint, record) is None
    # resumed from a checkpoint elsewhere: this folder's log starts at the next epoch
    assert unlogged_record(tmp_path / "other", checkpoint, record) is None


def test_a_torn_last_line_is_left_out_when_read_and_set_aside_when_the_run_resumes(tmp_path):
    output_dir = finished_run(tmp_path / "run")
    with open(output_dir / "log.txt", "a") as file:
        file.write('{"epoch": 2, "train_lo')  # killed mid-line
    with pytest.warns(UserWarning, match=r"log.txt: its last line was cut short and is left out"):
        assert [record["epoch"] for record in read_log(output_dir)] == [0, 1]
    assert unlogged_record(output_dir, str(output_dir / "checkpoint.pth"), {"epoch": 2}) == {"epoch": 2}
    assert keep_log_before(output_dir, 3) == [
        f"{output_dir / 'log.txt'}: its last line was cut short (a write killed mid-line) and is set aside in "
        'log.txt.torn: \'{"epoch": 2, "train_lo\''
    ]
    assert (output_dir / "log.txt.torn").read_text() == '{"epoch": 2, "train_lo\n'
    append_log(output_dir, {"epoch": 2})
    assert [record["epoch"] for record in read_log(output_dir)] == [0, 1, 2]


def test_a_whole_last_record_without_its_newline_is_kept_and_the_next_one_starts_a_line(tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "log.txt").write_text('{"epoch": 0}\n{"epoch": 1}')
    assert keep_log_before(output_dir, 2) == []
    append_log(output_dir, {"epoch": 2})
    assert [record["epoch"] for record in read_log(output_dir)] == [0, 1, 2]


def test_the_log_reads_back_from_the_file_or_its_folder(tmp_path):
    output_dir = finished_run(tmp_path / "run")
    expected = [{"epoch": 0, "train_loss": 1.0}, {"epoch": 1, "train_loss": 1.0}]
    assert read_log(output_dir) == read_log(output_dir / "log.txt") == expected


def test_a_whole_line_that_is_not_json_is_named(tmp_path):
    (tmp_path / "log.txt").write_text('{"epoch": 0}\nnot json\n{"epoch": 1}\n')
    with pytest.raises(UserError, match=f"{tmp_path / 'log.txt'}, line 2: not a JSON record"):
        read_log(tmp_path)


def test_a_missing_log_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training log"):
        read_log(tmp_path / "nowhere")


def test_config_changes_are_the_keys_whose_value_differs_but_resume(tmp_path):
    now = {**CONFIG, "lr": 0.0001, "epochs": 4, "resume": "run/checkpoint.pth", "new_key": 1}
    assert config_changes(CONFIG, now) == {"lr": [0.0002, 0.0001], "epochs": [2, 4]}
    assert config_changes(None, now) == {} and config_changes(CONFIG, CONFIG) == {}
    json.dumps(config_changes(CONFIG, now))  # goes into a log.txt record
