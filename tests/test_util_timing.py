"""util.timing: the medians of calls timed alone and in turns (on a fake clock that only the calls advance)."""

from __future__ import annotations

import pytest
import torch

from util import timing

CPU = torch.device("cpu")


class Clock:
    """A perf_counter that stands still except while a call "takes" its seconds."""

    def __init__(self) -> None:
        self.now, self.calls = 0.0, []

    def __call__(self) -> float:
        return self.now

    def call(self, name: str, seconds: list[float]):
        durations = iter(seconds)

        def function() -> None:
            self.calls.append(name)
            self.now += next(durations)

        return function


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    return fake


def test_median_ms_leaves_the_warm_up_untimed(clock):
    function = clock.call("f", [0.080, 0.0, 0.020])
    assert timing.median_ms(function, CPU, repeats=2, warmup=1) == pytest.approx(10.0)
    assert clock.calls == ["f"] * 3


def test_interleaved_medians_time_every_function_in_turns(clock):
    functions = {"a": clock.call("a", [0.5, 0.001, 0.003, 0.002]), "b": clock.call("b", [0.5, 0.010, 0.030, 0.020])}
    medians = timing.interleaved_medians(functions, CPU, repeats=3, warmup=1)
    assert clock.calls == ["a", "b"] * 4
    assert medians == pytest.approx({"a": 2.0, "b": 20.0})
