"""The folder of a training run (``output_dir``): claimed when a run is set up, changed only once it starts, and its
``log.txt``, written and read here alone.

**Claimed** (:func:`claim_output_dir`, rank 0, before anything is built): the folder is locked for the run
(``train.lock``, ``util.folder_lock``: a second ``main.py train`` into it stops at once, naming the process that
holds it; the lock of a killed run is taken over with a note; the lock is released, its file removed, when the run
ends, by an exception or Ctrl-C too). A folder that holds another run is refused (continue it with ``resume=``,
choose another ``output_dir``, or set ``overwrite=true`` to delete it), so that its trained checkpoints and log are
never replaced by accident. Claiming changes nothing in the folder but the lock file.

**Started** (:func:`start_run`, rank 0, once the model, the data and the checkpoint loaded and there is an epoch to
train or a record to complete): temporaries of killed writes (``.NAME.PID.tmp``, ``util.atomic_write``) are
removed, with ``overwrite=true`` the earlier run is deleted, ``config.yaml`` is written (a continued run keeps its
own; the config keys a resumed run changed go into the ``log.txt`` record of the first epoch it trains, see
:func:`config_changes`), and ``log.txt`` keeps the epochs before the first one trained. A refused or empty run (a
resume that does not fit, or whose epochs are all trained) leaves the folder as it was.

``log.txt`` holds one JSON record per finished epoch, in epoch order, each line written whole
(``util.atomic_write.append_text``). A last line without its newline was cut short (a writer killed mid-line by an
earlier version or another program): reading skips it with a warning, and a resumed run moves it to
``log.txt.torn``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import yaml

from engine.evaluation import DETECTIONS_FILE, METRICS_FILE
from util.atomic_write import append_text, make_folder, remove_stale_temporaries, write_text
from util.errors import UserError
from util.folder_lock import FolderLock

LOG_FILE = "log.txt"
TORN_FILE = "log.txt.torn"  # torn last lines of log.txt, set aside
CONFIG_FILE = "config.yaml"
LOCK_FILE = "train.lock"
LATEST_CHECKPOINT = "checkpoint.pth"
RUN_PATTERNS = ("checkpoint*.pth", LOG_FILE)  # the files that make a folder hold a run
OVERWRITTEN_PATTERNS = (*RUN_PATTERNS, DETECTIONS_FILE, METRICS_FILE)
UNCOMPARED_KEYS = ("resume",)  # differs in every resumed run: how it continues, not what it trains


def matching_files(output_dir: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted({path for pattern in patterns for path in output_dir.glob(pattern) if path.is_file()})


def continues_run_in(output_dir: str | Path, resume: str) -> bool:
    """Whether ``resume`` is a checkpoint inside ``output_dir``: the run there goes on."""
    return bool(resume) and Path(resume).resolve().parent == Path(output_dir).resolve()


def claim_output_dir(
    output_dir: str | Path, resume: str = "", finetune_from: str = "", overwrite: bool = False
) -> FolderLock:
    """Lock ``output_dir`` (created if missing) for a training run and check that it may train there; call on rank
    0 before anything is written. Returns the held lock (its ``note`` says whether a killed run's lock was taken
    over): release it when the run ends.

    Raises ``util.folder_lock.FolderInUseError`` naming the process that runs there, or a :class:`UserError`
    naming the ways on when the folder holds a run (``checkpoint*.pth`` or ``log.txt``) that ``resume`` does not
    continue and ``overwrite`` is not set; the lock is then released and the folder as it was.
    """
    output_dir = Path(output_dir)
    try:
        make_folder(output_dir)
    except OSError as error:
        reason = error.strerror or str(error)
        raise UserError(f"output_dir {output_dir} cannot be used: {reason}; choose another output_dir") from None
    lock = FolderLock.acquire(output_dir / LOCK_FILE, purpose="output_dir")
    existing = matching_files(output_dir, RUN_PATTERNS)
    if existing and not overwrite and not continues_run_in(output_dir, resume):
        lock.release()
        names = ", ".join(path.name for path in existing[:4]) + (", ..." if len(existing) > 4 else "")
        raise UserError(
            f"output_dir {output_dir} already holds a training run ({names}); nothing was changed. Continue it "
            f"with --opts resume={output_dir / LATEST_CHECKPOINT}, train into another output_dir, or set "
            "overwrite=true to delete that run and start anew"
        )
    return lock


def start_run(
    output_dir: str | Path,
    config: dict[str, Any],
    resume: str = "",
    finetune_from: str = "",
    overwrite: bool = False,
    start_epoch: int = 0,
) -> list[str]:
    """Make the claimed ``output_dir`` ready for the run's first epoch ``start_epoch``; call on rank 0 once the run
    will train or complete a record. Returns lines that say what changed.

    Removes the temporaries of killed writes; with ``overwrite`` deletes the earlier run's checkpoints, log and
    evaluation, the ``resume`` or ``finetune_from`` file excepted; writes ``config``, the resolved config, as
    ``config.yaml`` unless the run continues one of the folder's checkpoints and its ``config.yaml`` is there;
    removes the ``log.txt`` records from ``start_epoch`` on (those epochs are trained again) and sets a torn last
    line aside in ``log.txt.torn``.
    """
    output_dir = Path(output_dir)
    notes = [f"removed {path}, left by a write that was killed" for path in remove_stale_temporaries(output_dir)]
    continues = continues_run_in(output_dir, resume)
    if overwrite and not continues and matching_files(output_dir, RUN_PATTERNS):
        sources = {Path(path).resolve() for path in (resume, finetune_from) if path}
        removed = [path for path in matching_files(output_dir, OVERWRITTEN_PATTERNS) if path.resolve() not in sources]
        for path in removed:
            path.unlink()
        notes.append(f"overwrite=true: deleted the earlier run in {output_dir} ({len(removed)} files)")
    if not (continues and (output_dir / CONFIG_FILE).is_file()):
        write_text(output_dir / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
    return notes + keep_log_before(output_dir, start_epoch)


def config_changes(earlier: dict[str, Any] | None, now: dict[str, Any]) -> dict[str, list]:
    """The keys whose value differs between ``earlier``, the config a resumed checkpoint was trained with (None:
    the checkpoint holds none), and ``now``: ``{key: [earlier value, value now]}``, ``resume`` left out. A resumed
    run records them in the ``log.txt`` record of the first epoch it trains, as ``"config_changes"``."""
    if not earlier:
        return {}
    return {
        key: [earlier[key], value]
        for key, value in now.items()
        if key in earlier and key not in UNCOMPARED_KEYS and earlier[key] != value
    }


def append_log(output_dir: str | Path, record: dict) -> None:
    """``record`` as the last line of ``log.txt``, written whole (``util.atomic_write.append_text``)."""
    append_text(Path(output_dir) / LOG_FILE, json.dumps(record) + "\n")


def log_path(path: str | Path) -> Path:
    path = Path(path)
    return path / LOG_FILE if path.is_dir() else path


def split_log(path: Path) -> tuple[list[dict], str]:
    """The JSON records of the ``log.txt`` at ``path``, and its torn last line (a line without its newline that is
    not a record; "" when there is none). Any other line that is not a record raises a :class:`UserError` naming
    it."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")  # the part after the last newline is "" unless the last line was cut short
    records, torn = [], ""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                torn = line
                continue
            raise UserError(
                f"{path}, line {number}: not a JSON record ({error}); correct or delete that line"
            ) from None
    return records, torn


def read_log(path: str | Path) -> list[dict]:
    """The JSON records of ``log.txt`` (``path`` is the file or its run folder). A torn last line is left out with
    a warning; any other line that is not a record raises a :class:`UserError` naming it."""
    path = log_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {path}")
    records, torn = split_log(path)
    if torn:
        warnings.warn(f"{path}: its last line was cut short and is left out: {torn[:200]!r}", stacklevel=2)
    return records


def keep_log_before(output_dir: str | Path, epoch: int) -> list[str]:
    """Remove from ``log.txt`` the records of epoch ``epoch`` on (left by a run resumed from an earlier checkpoint:
    those epochs are trained again) and a torn last line, which is added to ``log.txt.torn``; returns lines that
    say what changed."""
    path = Path(output_dir) / LOG_FILE
    if not path.is_file():
        return []
    records, torn = split_log(path)
    kept = [record for record in records if record.get("epoch", -1) < epoch]
    content = path.read_bytes()
    unterminated = bool(content) and not torn and not content.endswith(b"\n")  # a record whose newline was lost
    notes = []
    if torn:
        append_text(path.with_name(TORN_FILE), torn + "\n")
        notes.append(
            f"{path}: its last line was cut short (a write killed mid-line) and is set aside in {TORN_FILE}: "
            f"{torn[:200]!r}"
        )
    dropped = sorted({record.get("epoch") for record in records if record.get("epoch", -1) >= epoch})
    if dropped:
        notes.append(f"{path}: removed the records of epochs {dropped}, trained again now")
    if torn or dropped or unterminated:
        write_text(path, "".join(json.dumps(record) + "\n" for record in kept))
    return notes


def unlogged_record(output_dir: str | Path, resume: str, last_record: dict | None) -> dict | None:
    """The record of the epoch that ``resume`` finished but ``log.txt`` of ``output_dir`` lacks, because the run
    stopped after that checkpoint was written, in the evaluation; None when the log has it, or ``resume`` is not a
    checkpoint of ``output_dir`` (its log starts anew). ``last_record`` is the checkpoint's own copy of that record
    (losses and lr; ``val_*`` are added by evaluating again). Reads only."""
    if last_record is None or not continues_run_in(output_dir, resume):
        return None
    path = Path(output_dir) / LOG_FILE
    records = split_log(path)[0] if path.is_file() else []
    if any(record.get("epoch") == last_record["epoch"] for record in records):
        return None
    return last_record
