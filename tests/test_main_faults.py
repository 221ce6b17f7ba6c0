"""main.py end to end when something goes wrong, on a tiny shapes set: a second run into a folder in use stops at
once naming the first, a killed run's lock is taken over, Ctrl-C releases it; a refused or empty resume changes
nothing and a resumed one keeps its config; a full disk ends in one error line with nothing truncated left; a
torn last line of log.txt is set aside."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine.train
import main
from engine.export import export_onnx
from models import build_model
from tests.full_disk import disk_full_after, fill, small_file_system
from tests.tiny_model import tiny_config
from tests.tiny_training import CONFIG, run_main, tiny_overrides, tiny_training_config
from util.atomic_write import FileWriteError
from util.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NO_SPACE = "No space left on device; free some space there or write elsewhere"


@pytest.fixture
def copied_run(first_run, tmp_path) -> Path:
    output_dir = tmp_path / "run"
    shutil.copytree(first_run, output_dir)
    return output_dir


def contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def log_epochs(output_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (output_dir / "log.txt").read_text().splitlines()]


def wait_for_holder(lock: Path, process: subprocess.Popen, timeout_s: float = 300) -> dict:
    """The details the process holding ``lock`` wrote there, once it has."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the first run ended before it took the lock"
        try:
            holder = json.loads(lock.read_text())
        except (OSError, ValueError):
            holder = {}
        if holder.get("pid") == process.pid:
            return holder
        time.sleep(0.2)
    raise AssertionError(f"{lock} was not taken within {timeout_s} s")


@pytest.mark.slow  # a training in another process while two more start: 20-60 s on 2 loaded cores
def test_a_second_run_into_a_folder_in_use_stops_at_once_and_a_killed_runs_lock_is_taken_over(
    coco_path, tmp_path, capsys
):
    output_dir = tmp_path / "run"
    command = [sys.executable, "main.py", "train", "--config", str(CONFIG), "--opts"]
    first = subprocess.Popen(
        [*command, *tiny_overrides(coco_path, output_dir, "epochs=1000")],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        holder = wait_for_holder(output_dir / "train.lock", first)
        assert run_main("train", opts=tiny_overrides(coco_path, output_dir, "overwrite=true")) == 2
        error = capsys.readouterr().err
        assert error == (
            f"error: output_dir {output_dir} is in use by process {first.pid} on host {socket.gethostname()} "
            f"(started {holder['started']}), which holds {output_dir / 'train.lock'}; wait for it to end or stop "
            "it, or choose another output_dir\n"
        )
    finally:
        first.kill()  # SIGKILL: no clean-up, the lock file stays
        first.wait()
    assert (output_dir / "train.lock").is_file()
    assert run_main("train", opts=tiny_overrides(coco_path, output_dir, "overwrite=true")) == 0
    assert f"took over the lock {output_dir / 'train.lock'} of process {first.pid} " in capsys.readouterr().out
    assert not (output_dir / "train.lock").exists() and log_epochs(output_dir) == [0]


def test_ctrl_c_during_training_releases_the_lock(coco_path, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.train, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.train.train(tiny_training_config(coco_path, tmp_path / "run"))
    assert not (tmp_path / "run" / "train.lock").exists()


def test_a_refused_resume_and_one_with_nothing_to_train_leave_the_folder_as_it_was(copied_run, coco_path, capsys):
    before = contents(copied_run)
    checkpoint = f"resume={copied_run / 'checkpoint.pth'}"
    assert run_main("train", opts=tiny_overrides(coco_path, copied_run, checkpoint, "two_stage=true")) == 2
    assert "does not fit this model" in capsys.readouterr().err
    assert contents(copied_run) == before
    assert run_main("train", opts=tiny_overrides(coco_path, copied_run, checkpoint, "epochs=1", "lr=1e-5")) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert contents(copied_run) == before


def test_a_resumed_run_keeps_its_config_and_logs_what_changed(first_run, copied_run, coco_path, capsys):
    config = (copied_run / "config.yaml").read_bytes()
    opts = tiny_overrides(coco_path, copied_run, f"resume={copied_run / 'checkpoint.pth'}", "epochs=2", "lr=1e-4")
    assert run_main("train", opts=opts) == 0
    changes = {"lr": [0.0002, 0.0001], "epochs": [1, 2], "output_dir": [str(first_run), str(copied_run)]}
    out = capsys.readouterr().out
    assert "config changed since" in out and "lr 0.0002 -> 0.0001" in out
    assert (copied_run / "config.yaml").read_bytes() == config
    records = [json.loads(line) for line in (copied_run / "log.txt").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [0, 1]
    assert "config_changes" not in records[0] and records[1]["config_changes"] == changes
    assert load_checkpoint(copied_run / "checkpoint.pth")["config"]["lr"] == 0.0001  # the next resume compares to it


def test_a_torn_last_line_of_the_log_is_set_aside_and_the_run_resumes(copied_run, coco_path, capsys):
    torn = '{"epoch": 1, "lr": 0.0002, "train_lo'
    with open(copied_run / "log.txt", "a", encoding="utf-8") as file:
        file.write(torn)  # a writer killed mid-line
    opts = tiny_overrides(coco_path, copied_run, f"resume={copied_run / 'checkpoint.pth'}", "epochs=2")
    assert run_main("train", opts=opts) == 0
    assert "its last line was cut short (a write killed mid-line) and is set aside in log.txt.torn" in (
        capsys.readouterr().out
    )
    assert (copied_run / "log.txt.torn").read_text() == torn + "\n"
    assert log_epochs(copied_run) == [0, 1]


def assert_one_error_line_and_nothing_left(error: str, path: Path, reason: str = NO_SPACE) -> None:
    assert error == f"error: cannot write {path}: {reason}\n"
    assert not path.exists() and not list(path.parent.glob(".*.tmp"))


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(copied_run, coco_path, monkeypatch, capsys):
    disk_full_after(monkeypatch, free_bytes=4096)
    opts = tiny_overrides(coco_path, copied_run, f"resume={copied_run / 'checkpoint.pth'}", "epochs=2")
    assert run_main("train", opts=opts) == 1
    error = capsys.readouterr().err
    assert error == f"error: cannot write {copied_run / 'checkpoint.pth'}: {NO_SPACE}\n"
    assert load_checkpoint(copied_run / "checkpoint.pth")["epoch"] == 0 and log_epochs(copied_run) == [0]
    assert not list(copied_run.glob(".*.tmp"))


def test_a_full_disk_during_evaluation_leaves_no_truncated_detections(first_run, coco_path, tmp_path, capsys):
    with small_file_system(tmp_path / "disk") as disk:
        fill(disk, leave=8192)  # the detections take about 25 KB
        out = disk / "eval"
        assert run_main("eval", opts=tiny_overrides(coco_path, out, f"resume={first_run / 'checkpoint.pth'}")) == 1
        assert_one_error_line_and_nothing_left(capsys.readouterr().err, out / "detections.json")
        assert list(out.iterdir()) == []


def test_a_full_disk_while_predicting_names_the_picture(first_run, coco_path, tmp_path, monkeypatch, capsys):
    disk_full_after(monkeypatch, free_bytes=1000)
    image = next((coco_path / "val2017").iterdir())
    opts = tiny_overrides(coco_path, tmp_path, f"resume={first_run / 'checkpoint.pth'}")
    argv = ["predict", "--config", str(CONFIG), "--image", str(image), "--out", str(tmp_path / "predictions")]
    assert main.main([*argv, "--opts", *opts]) == 1
    picture = tmp_path / "predictions" / f"000_{image.stem}.png"
    assert_one_error_line_and_nothing_left(capsys.readouterr().err, picture)


def test_a_full_disk_while_visualizing_names_the_figure(first_run, coco_path, tmp_path, monkeypatch, capsys):
    disk_full_after(monkeypatch, free_bytes=1000)
    image = next((coco_path / "val2017").iterdir())
    opts = tiny_overrides(coco_path, tmp_path, f"resume={first_run / 'checkpoint.pth'}")
    argv = ["visualize", "--config", str(CONFIG), "--image", str(image), "--out", str(tmp_path / "figures")]
    assert main.main([*argv, "--opts", *opts]) == 1
    figure = tmp_path / "figures" / f"{image.stem}_detections.png"
    assert_one_error_line_and_nothing_left(capsys.readouterr().err, figure)


def test_an_onnx_export_that_fails_half_way_leaves_nothing(tmp_path, monkeypatch):
    model, _, _ = build_model(tiny_config())

    def write_half_then_fail(*args, **kwargs):
        Path(args[2]).write_bytes(b"half a graph")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch.onnx, "export", write_half_then_fail)
    out = tmp_path / "model.onnx"
    with pytest.raises(FileWriteError) as raised:
        export_onnx(model, out, exporter="torchscript")
    assert str(raised.value) == f"cannot write {out}: {NO_SPACE}"
    assert list(tmp_path.iterdir()) == []
