"""util.progress: plain lines when the stream is not a terminal, averages, rank-0 silence."""

from __future__ import annotations

import io

from util.progress import Progress, format_duration


def test_plain_lines_every_n_iterations_and_after_the_last():
    stream = io.StringIO()
    progress = Progress(5, header="epoch 0", every=2, stream=stream)
    for value in (1.0, 2.0, 3.0, 4.0, 5.0):
        progress.step(loss=value)
    lines = stream.getvalue().splitlines()
    assert [line.split("]")[0] for line in lines] == ["epoch 0 [2/5", "epoch 0 [4/5", "epoch 0 [5/5"]
    assert "\r" not in stream.getvalue()
    assert "it/s" in lines[-1] and "ETA" in lines[-1] and "loss 3 (3)" in lines[-1]
    assert progress.averages() == {"loss": 3.0}


def test_disabled_progress_prints_nothing_but_still_averages():
    stream = io.StringIO()
    progress = Progress(2, enabled=False, stream=stream)
    progress.step(loss=1.0)
    progress.step(loss=3.0)
    progress.close()
    assert stream.getvalue() == "" and progress.averages() == {"loss": 2.0}


def test_only_the_shown_values_are_printed():
    stream = io.StringIO()
    progress = Progress(1, shown=("loss",), stream=stream)
    progress.step(loss=1.0, loss_ce_0=2.0)
    assert "loss_ce_0" not in stream.getvalue()


def test_durations_read_as_hours_minutes_seconds():
    assert format_duration(3725.4) == "1:02:05"
