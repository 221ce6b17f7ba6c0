"""engine.plot_logs: curves from log.txt into a PNG, drawn without pyplot and without switching matplotlib's
backend."""

from __future__ import annotations

import importlib
import json
import sys

import matplotlib

from engine.plot_logs import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
    assert (tmp_path / "a" / "curves.png").read_bytes()[:8] == PNG_SIGNATURE


def test_importing_and_plotting_leave_the_backend_alone_without_pyplot(tmp_path, monkeypatch):
    def switch(*args, **kwargs):
        raise AssertionError("matplotlib.use was called")

    backend = matplotlib.rcParams._get_backend_or_none()
    monkeypatch.setattr(matplotlib, "use", switch)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # importing pyplot now raises ImportError
    monkeypatch.delitem(sys.modules, "engine.plot_logs")  # import it anew
    plot_logs = importlib.import_module("engine.plot_logs")
    write_log(tmp_path, 2)
    plot_logs.main([str(tmp_path), "--out", str(tmp_path / "curves" / "run.png")])
    assert (tmp_path / "curves" / "run.png").read_bytes()[:8] == PNG_SIGNATURE
    assert matplotlib.rcParams._get_backend_or_none() == backend
