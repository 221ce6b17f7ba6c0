"""The folder of a training run (``output_dir``): claimed when a run starts, and its ``log.txt``, written and read
here alone.

A run starts in a folder that holds no other run: a second ``main.py train`` into a finished run's folder is
refused (continue it with ``resume=``, or choose another ``output_dir``, or set ``overwrite=true`` to delete it),
so that its trained checkpoints and log are never replaced by accident. Temporaries that a killed checkpoint write
left behind (``.NAME.PID.tmp``, see ``util.checkpoint``) are removed when a run starts.

``log.txt`` holds one JSON record per finished epoch, in epoch order, the epochs a checkpoint of the folder covers.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.evaluation import DETECTIONS_FILE, METRICS_FILE
from util.checkpoint import remove_stale_temporaries
from util.errors import UserError

LOG_FILE = "log.txt"
CONFIG_FILE = "config.yaml"
LATEST_CHECKPOINT = "checkpoint.pth"
RUN_PATTERNS = ("checkpoint*.pth", LOG_FILE)  # the files that make a folder hold a run
OVERWRITTEN_PATTERNS = (*RUN_PATTERNS, DETECTIONS_FILE, METRICS_FILE)


def matching_files(output_dir: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted({path for pattern in patterns for path in output_dir.glob(pattern) if path.is_file()})


def continues_run_in(output_dir: str | Path, resume: str) -> bool:
    """Whether ``resume`` is a checkpoint inside ``output_dir``: the run there goes on."""
    return bool(resume) and Path(resume).resolve().parent == Path(output_dir).resolve()


def claim_output_dir(
    output_dir: str | Path, resume: str = "", finetune_from: str = "", overwrite: bool = False
) -> list[str]:
    """Make ``output_dir`` ready for a training run; call on rank 0 before anything is written there.

    A run already in the folder (``checkpoint*.pth`` or ``log.txt``) goes on when ``resume`` is one of its
    checkpoints; otherwise it raises a :class:`UserError` naming the ways on, or with ``overwrite`` its files (and
    ``detections.json``, ``metrics.json``) are deleted, the ``resume`` or ``finetune_from`` file excepted.
    Returns lines that say what was removed.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    existing = matching_files(output_dir, RUN_PATTERNS)
    if existing and not overwrite and not continues_run_in(output_dir, resume):
        names = ", ".join(path.name for path in existing[:4]) + (", ..." if len(existing) > 4 else "")
        raise UserError(
            f"output_dir {output_dir} already holds a training run ({names}); nothing was changed. Continue it "
            f"with --opts resume={output_dir / LATEST_CHECKPOINT}, train into another output_dir, or set "
            "overwrite=true to delete that run and start anew"
        )
    notes = [
        f"removed {path}, left by a checkpoint write that was killed" for path in remove_stale_temporaries(output_dir)
    ]
    if existing and not continues_run_in(output_dir, resume):  # overwrite
        sources = {Path(path).resolve() for path in (resume, finetune_from) if path}
        removed = [path for path in matching_files(output_dir, OVERWRITTEN_PATTERNS) if path.resolve() not in sources]
        for path in removed:
            path.unlink()
        notes.append(f"overwrite=true: deleted the earlier run in {output_dir} ({len(removed)} files)")
    return notes


def append_log(output_dir: str | Path, record: dict) -> None:
    with open(Path(output_dir) / LOG_FILE, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


def read_log(path: str | Path) -> list[dict]:
    """The JSON records of ``log.txt`` (``path`` is the file or its run folder); errors name the line."""
    path = Path(path)
    path = path / LOG_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {path}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not a JSON record ({error})") from error
    return records


def log_before(output_dir: str | Path, epoch: int) -> tuple[list[dict], list[dict]]:
    """The records of ``log.txt`` for the epochs before ``epoch``, and those from ``epoch`` on, which are removed
    from the file (left by a run resumed from an earlier checkpoint: those epochs are trained again)."""
    path = Path(output_dir) / LOG_FILE
    if not path.is_file():
        return [], []
    records = read_log(path)
    kept = [record for record in records if record.get("epoch", -1) < epoch]
    dropped = [record for record in records if record.get("epoch", -1) >= epoch]
    if dropped:
        path.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")
    return kept, dropped


def reconcile_log(
    output_dir: str | Path, resume: str, start_epoch: int, last_record: dict | None
) -> tuple[dict | None, list[str]]:
    """Make ``log.txt`` hold the epochs before ``start_epoch`` alone, the resumed run going on from there.

    Returns the record of the epoch that ``resume`` (a checkpoint of ``output_dir``) finished but ``log.txt``
    lacks, because the run stopped after that checkpoint was written, in the evaluation (None when the log is
    complete), and lines that say what changed. ``last_record`` is the checkpoint's own copy of that record
    (losses and lr; ``val_*`` are added by evaluating again).
    """
    kept, dropped = log_before(output_dir, start_epoch)
    notes = []
    if dropped:
        epochs = sorted({record.get("epoch") for record in dropped})
        notes.append(f"{Path(output_dir) / LOG_FILE}: removed the records of epochs {epochs}, trained again now")
    if last_record is None or not continues_run_in(output_dir, resume):
        return None, notes
    if any(record.get("epoch") == last_record["epoch"] for record in kept):
        return None, notes
    return last_record, notes
