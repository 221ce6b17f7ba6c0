"""util.checkpoint: atomic saving that survives a crash mid-write or a full disk, the temporaries of killed writes
removed, and loading without arbitrary pickle, unreadable files named."""

from __future__ import annotations

import argparse
import errno
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from util.atomic_write import FileWriteError, remove_stale_temporaries
from util.checkpoint import (
    load_checkpoint,
    load_model_weights,
    restore_training_state,
    save_checkpoint,
)
from util.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


class NotAllowed:
    """A class that weights_only loading must refuse to build."""


def state(value: float) -> dict:
    return {"model": {"weight": torch.full((3,), value)}, "epoch": int(value), "config": {"lr": 1e-4}}


def test_save_then_load_round_trips(tmp_path):
    save_checkpoint(state(1.0), tmp_path / "checkpoint.pth")
    loaded = load_checkpoint(tmp_path / "checkpoint.pth")
    assert torch.equal(loaded["model"]["weight"], torch.ones(3)) and loaded["epoch"] == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "checkpoint.pth"]  # no temporary file left


def test_full_disk_while_saving_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(state(1.0), path)

    def write_half_then_fail(obj, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(FileWriteError) as raised:
        save_checkpoint(state(2.0), path)
    assert str(raised.value) == (
        f"cannot write {path}: No space left on device; free some space there or write elsewhere"
    )
    assert isinstance(raised.value, OSError)  # callers that catch OSError still do
    assert load_checkpoint(path)["epoch"] == 1
    assert list(tmp_path.iterdir()) == [path]


def test_other_write_errors_name_the_file_and_the_reason(tmp_path, monkeypatch):
    def fail(obj, file):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(FileWriteError, match=f"cannot write {tmp_path / 'c.pth'}: Input/output error"):
        save_checkpoint(state(2.0), tmp_path / "c.pth")
    assert list(tmp_path.iterdir()) == []


def test_process_killed_while_saving_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(state(1.0), path)
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from util.checkpoint import save_checkpoint
        def write_half_then_die(obj, file):
            file.write(b"PK half a checkpoint")
            file.flush()
            os._exit(9)  # no cleanup, as a kill or power loss
        torch.save = write_half_then_die
        save_checkpoint({{"model": {{}}, "epoch": 2}}, {str(path)!r})
    """)
    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == 9
    assert load_checkpoint(path)["epoch"] == 1


def test_original_checkpoints_with_argparse_namespace_load(tmp_path):
    path = tmp_path / "r50_deformable_detr.pth"
    torch.save({"model": {}, "epoch": 49, "args": argparse.Namespace(lr=2e-4, lr_drop=40)}, path)
    assert load_checkpoint(path)["args"].lr_drop == 40


def test_arbitrary_objects_are_refused_naming_the_class_without_suggesting_unsafe_loading(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": NotAllowed()}, path)
    with pytest.raises(UserError) as raised:
        load_checkpoint(path)
    message = str(raised.value)
    assert str(path) in message and "NotAllowed" in message
    assert "objects other than tensors and plain Python values" in message and "refused for safety" in message
    assert "weights_only" not in message


def unreadable_file(kind: str, path: Path) -> Path:
    """A file named ``path`` that is no checkpoint: ``kind`` says how."""
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("epoch: 3\nthis is a text file\n")
    elif kind == "random bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
    else:  # a checkpoint cut short, as by an interrupted copy
        torch.save(state(1.0), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("empty", "it is empty"),
        ("text", "it is not in PyTorch's format"),
        ("random bytes", "its content is not a PyTorch checkpoint"),
        ("truncated", "it is truncated or corrupted"),
    ],
)
def test_unreadable_file_is_named_without_suggesting_unsafe_loading(tmp_path, kind, reason):
    path = unreadable_file(kind, tmp_path / "checkpoint.pth")
    with pytest.raises(UserError) as raised:
        load_checkpoint(path)
    message = str(raised.value)
    assert message.startswith(f"{path} is not a readable checkpoint: {reason}")
    assert "weights_only" not in message


def test_temporaries_of_killed_writes_are_removed_but_not_those_of_running_processes(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    stale = tmp_path / f".checkpoint.pth.{dead_pid}.tmp"
    running = tmp_path / f".checkpoint.pth.{os.getpid()}.tmp"  # e.g. a second run writing into this folder
    others = [tmp_path / f"notes.{dead_pid}.tmp", tmp_path / ".checkpoint.pth.tmp", tmp_path / "checkpoint.pth"]
    for path in [stale, running, *others]:
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(tmp_path.iterdir()) == sorted([running, *others])


def test_missing_file_and_missing_model_entry_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_checkpoint(tmp_path / "nothing.pth")
    torch.save({"weights": {}}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="no 'model' entry"):
        load_checkpoint(tmp_path / "other.pth")


def test_model_weights_that_do_not_fit_name_the_keys():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="missing keys.*bias"):
        load_model_weights(model, {"model": {"weight": torch.zeros(2, 2), "extra": torch.zeros(1)}})


def test_training_state_is_restored_and_the_next_epoch_returned():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    scheduler.step()
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "epoch": 3,
    }
    fresh_optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    fresh_scheduler = torch.optim.lr_scheduler.StepLR(fresh_optimizer, step_size=5, gamma=0.1)
    assert restore_training_state(checkpoint, fresh_optimizer, fresh_scheduler) == 4
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert fresh_scheduler.last_epoch == 1 and fresh_scheduler.step_size == 5  # the config's lr_drop is kept
    assert restore_training_state({"model": {}}, fresh_optimizer, fresh_scheduler) == 0


def tiny_detector(*overrides: str) -> torch.nn.Module:
    from models import build_model
    from tests.tiny_training import CONFIG, TINY
    from util.config import load_config

    return build_model(load_config(CONFIG, overrides=[*TINY, *overrides]))[0]


def test_a_checkpoint_of_another_variant_is_named_with_both_descriptions():
    from models.describe import describe_state_dict

    checkpoint = {"model": tiny_detector("with_box_refine=true").state_dict()}
    with pytest.raises(
        ValueError,
        match=r"unexpected keys \['transformer\.decoder\.bbox_embed.*"
        r"The checkpoint: one-stage, box refinement.*This model: one-stage, no box",
    ):
        load_model_weights(tiny_detector(), checkpoint, "refine.pth", describe=describe_state_dict)


def test_shapes_that_differ_are_named_not_left_to_torch():
    checkpoint = {"model": tiny_detector("num_feature_levels=1").state_dict()}
    with pytest.raises(ValueError, match=r"shapes differ \['transformer\.level_embed \(1, 32\) \(model \(4, 32\)\)"):
        load_model_weights(tiny_detector(), checkpoint, "single_scale.pth")


def test_class_heads_of_another_num_classes_keep_their_initialisation_and_the_rest_loads():
    source, target = tiny_detector("num_classes=6"), tiny_detector("num_classes=9")
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(1.0)  # so that loaded and initial values differ everywhere
    initial_heads = {name: value.clone() for name, value in target.state_dict().items() if "class_embed" in name}
    with pytest.raises(ValueError, match="class_embed.0.weight"):
        load_model_weights(target, {"model": source.state_dict()}, "six.pth")
    kept = load_model_weights(target, {"model": source.state_dict()}, "six.pth", resizable=("class_embed",))
    assert sorted(kept) == sorted(initial_heads)
    for name, value in target.state_dict().items():
        expected = initial_heads[name] if name in initial_heads else source.state_dict()[name]
        assert torch.equal(value, expected), name
