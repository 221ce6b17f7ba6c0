"""util.plot_logs: curves from log.txt into a PNG; broken logs are named."""

from __future__ import annotations

import json

import pytest

from util.plot_logs import main, read_log


def write_log(folder, epochs: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        {
            "epoch": epoch,
            "train_loss": 5.0 - epoch,
            "train_loss_ce": 1.0,
            "train_loss_bbox": 0.5,
            "train_loss_giou": 0.7,
            **({"val_AP": 0.1 * epoch, "val_AP50": 0.2 * epoch} if epoch % 2 else {}),
        }
        for epoch in range(epochs)
    ]
    (folder / "log.txt").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_curves_of_two_runs_go_to_a_png(tmp_path):
    write_log(tmp_path / "a", 4)
    write_log(tmp_path / "b", 3)
    main([str(tmp_path / "a"), str(tmp_path / "b" / "log.txt")])
    assert (tmp_path / "a" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_line_that_is_not_json_is_named(tmp_path):
    (tmp_path / "log.txt").write_text('{"epoch": 0}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        read_log(tmp_path)


def test_a_missing_log_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training log"):
        read_log(tmp_path / "nowhere")
