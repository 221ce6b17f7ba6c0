"""``main.py train``: the training run, from a resolved config, read top to bottom.

:func:`train` claims the output folder (:func:`holding_output_dir`), sets the run up (model, data, optimizer:
:func:`set_up`), resumes or fine-tunes (:func:`start_from`), starts it in the folder, then loops over the epochs.
One epoch (:func:`train_epoch`) is seeded, trained over the batches (:func:`train_one_epoch`: forward, losses, NaN
check, backward, clipping, step, progress), steps the learning-rate schedule, is checkpointed, evaluated when due
and logged, in that order.

Files a training run writes under ``cfg.output_dir`` (rank 0 only):

| file | content |
|---|---|
| ``config.yaml`` | the resolved config |
| ``checkpoint.pth`` | the latest finished epoch: model, optimizer, lr_scheduler, scaler, epoch, config, |
| | category_names, log_record (the epoch's ``log.txt`` record before its evaluation) |
| ``checkpointNNNN.pth`` | the same, kept every ``save_every`` epochs and before the ``lr_drop`` |
| ``detections.json`` / ``metrics.json`` | the latest evaluation: COCO results and the 12 COCO metrics |
| ``log.txt`` | one JSON line per epoch: ``epoch``, ``lr``, ``train_<loss>``, ``val_<metric>``, ``epoch_time_s``, |
| | ``epoch_cpu_s``; appended to when the run resumes |
| ``train.lock`` | while the run goes on: its process id, host and start time (``engine.run_dir``) |

The folder is locked for the run, and one that holds another run is refused unless ``overwrite=true``; nothing in
it changes until the model, the data and the checkpoint loaded and there is work to do (``engine.run_dir``). Every
file is written whole or not at all (``util.atomic_write``). Each epoch is checkpointed before it is evaluated, and
its ``log.txt`` record written last: a run that stops in the evaluation keeps its training, and when it resumes the
missing record is completed by evaluating that checkpoint again. A resumed run keeps the folder's ``config.yaml``;
the record of the first epoch it trains lists the config keys changed since the checkpoint was written
(``"config_changes": {"lr": [old, new], ...}``, ``resume`` left out).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from datasets import Batch, CocoDetection
from engine.amp import autocast, autocast_dtype, build_grad_scaler, prepare_for_training, resolve_amp, to_float32
from engine.data import build_eval_loader, build_split, build_train_loader
from engine.evaluation import evaluate
from engine.optim import build_lr_scheduler, build_optimizer
from engine.run_dir import (
    LATEST_CHECKPOINT,
    append_log,
    claim_output_dir,
    config_changes,
    start_run,
    unlogged_record,
)
from engine.runtime import build_model_on, decided_on_main, say
from models.describe import describe_state_dict
from ops.functional import resolve_backend
from util.checkpoint import load_checkpoint, load_model_weights, restore_training_state, save_checkpoint
from util.config import Config
from util.distributed import (
    DistributedInfo,
    all_reduce_mean,
    barrier,
    explaining_timeouts,
    init_distributed,
    is_main_process,
)
from util.errors import RunError, UserError
from util.progress import Progress, format_duration

CLASS_HEADS = ("class_embed",)  # the detector's modules sized by num_classes (in the decoder too, two-stage)
SHOWN = ("loss", "loss_ce", "loss_bbox", "loss_giou", "lr")  # the values the progress line prints


class NonFiniteLossError(RunError):
    """The predictions or the loss became NaN or infinite; training stops before the step that would spread it to
    the weights."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped the run; the message says where and how to resume (``main.py`` prints it and exits
    with status 130, as shells do for a process that SIGINT ended)."""


@dataclass
class TrainingRun:
    """Everything one training process works with."""

    cfg: Config
    info: DistributedInfo  # this process: rank, world size, device
    output_dir: Path
    model: nn.Module  # the detector itself, whose state_dict is saved
    trained: nn.Module  # the detector, wrapped in DistributedDataParallel with several processes
    criterion: nn.Module
    postprocess: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp: str  # cfg.amp resolved for the device ("auto" -> "bfloat16" or "none")
    train_set: CocoDetection
    val_set: CocoDetection
    train_loader: DataLoader
    val_loader: DataLoader
    config_changes: dict[str, list] = field(default_factory=dict)  # for the first epoch a resumed run logs


def train(cfg: Config) -> dict[str, float] | None:
    """Train ``cfg.epochs`` epochs (from ``cfg.resume`` when given), evaluating and checkpointing as configured.

    Returns the last evaluation's metrics on rank 0 (None on other ranks, or when no evaluation ran). Raises a
    :class:`UserError` when ``cfg.output_dir`` is in use by another process or holds another run (see
    ``engine.run_dir``), and a :class:`NonFiniteLossError` naming the last good checkpoint when the loss is no
    longer finite.
    """
    if cfg.resume and cfg.finetune_from:
        raise UserError(
            f"set resume (continue a run) or finetune_from (start a new run from its weights), not "
            f"both: resume={cfg.resume!r}, finetune_from={cfg.finetune_from!r}"
        )
    info = init_distributed(cfg.device, cfg.dist_timeout_minutes)
    seed_everything(cfg.seed + info.rank)
    with explaining_timeouts(cfg.dist_timeout_minutes), holding_output_dir(cfg, info):
        run = set_up(cfg, info)
        start_epoch, last_record = start_from(run)
        unlogged = decided_on_main(info, partial(unlogged_record, run.output_dir, cfg.resume, last_record))
        if start_epoch >= cfg.epochs and unlogged is None:
            nothing_to_train(run, start_epoch)  # the folder is left as it was
            return None
        begin = partial(start_run, run.output_dir, cfg.to_dict(), cfg.resume, cfg.finetune_from, cfg.overwrite)
        for note in decided_on_main(info, partial(begin, start_epoch=start_epoch)):
            say(info, note)
        metrics = validation_metrics(complete_record(run, unlogged)) if unlogged else {}
        if start_epoch >= cfg.epochs:
            nothing_to_train(run, start_epoch)
            return (metrics or None) if info.is_main else None
        num_parameters = sum(parameter.numel() for parameter in run.model.parameters() if parameter.requires_grad)
        say(
            info,
            f"training {num_parameters:,} parameters on {len(run.train_set)} images ({info.world_size} "
            f"process(es), {info.device}, {numerics(cfg, run.amp, info.device)}), evaluating on "
            f"{len(run.val_set)}; output in {run.output_dir}",
        )
        run_start = time.perf_counter()
        for epoch in range(start_epoch, cfg.epochs):
            try:
                record = train_epoch(run, epoch)
            except KeyboardInterrupt:
                last = last_good_checkpoint(run)
                way_on = f"resume with --opts resume={last}" if last else "no checkpoint yet: start the run again"
                raise TrainingInterrupted(f"interrupted in epoch {epoch}; {way_on}") from None
            metrics = validation_metrics(record) or metrics
        say(info, f"training finished in {format_duration(time.perf_counter() - run_start)}")
    return (metrics or None) if info.is_main else None


@contextmanager
def holding_output_dir(cfg: Config, info: DistributedInfo) -> Iterator[None]:
    """``cfg.output_dir`` claimed for this run while the block runs (``engine.run_dir.claim_output_dir``): rank 0
    takes its lock, every rank learns the outcome; the lock is released when the block ends, however it ends."""
    held = []

    def claim() -> str:
        held.append(claim_output_dir(cfg.output_dir, cfg.resume, cfg.finetune_from, cfg.overwrite))
        return held[0].note

    note = decided_on_main(info, claim)
    if note:
        say(info, note)
    try:
        yield
    finally:
        for lock in held:
            lock.release()


def set_up(cfg: Config, info: DistributedInfo) -> TrainingRun:
    """Build the model on this process's device, the data, the optimizer, its schedule and the gradient scaler;
    nothing is written."""
    model, criterion, postprocessors = build_model_on(cfg, info)
    amp = resolve_amp(cfg.amp, info.device)
    prepare_for_training(model, amp, info.device)
    train_set, val_set = build_split("train", cfg), build_split("val", cfg)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    trained = model if info.world_size == 1 else DistributedDataParallel(model, device_ids=device_ids)
    optimizer = build_optimizer(model, cfg)
    return TrainingRun(
        cfg=cfg,
        info=info,
        output_dir=Path(cfg.output_dir),
        model=model,
        trained=trained,
        criterion=criterion,
        postprocess=postprocessors["bbox"],
        optimizer=optimizer,
        lr_scheduler=build_lr_scheduler(optimizer, cfg),
        scaler=build_grad_scaler(amp, info.device),
        amp=amp,
        train_set=train_set,
        val_set=val_set,
        train_loader=build_train_loader(train_set, cfg, info.rank, info.world_size),
        val_loader=build_eval_loader(val_set, cfg, info.rank, info.world_size),
    )


def start_from(run: TrainingRun) -> tuple[int, dict | None]:
    """Resume ``cfg.resume`` or fine-tune from ``cfg.finetune_from`` (when set); nothing is written. -> (the first
    epoch to train, the ``log.txt`` record the resumed checkpoint holds of its epoch, without evaluation; None if
    it has none)."""
    if run.cfg.finetune_from:
        fine_tune(run)
    return resume(run) if run.cfg.resume else (0, None)


def nothing_to_train(run: TrainingRun, start_epoch: int) -> None:
    say(
        run.info,
        f"nothing to train: {run.cfg.resume} already finished epoch {start_epoch - 1} and epochs={run.cfg.epochs}"
        f" (0-based epochs 0..{run.cfg.epochs - 1}); raise epochs (e.g. --opts epochs={start_epoch + 1}) to "
        "train further, or run `main.py eval` to evaluate it",
    )


def fine_tune(run: TrainingRun) -> None:
    """Load the weights of ``cfg.finetune_from``; class heads of another ``num_classes`` keep their initialisation.
    The optimizer, schedule and epochs start anew."""
    source = run.cfg.finetune_from
    checkpoint = load_checkpoint(source)
    kept = load_model_weights(run.model, checkpoint, source, describe=describe_state_dict, resizable=CLASS_HEADS)
    fresh = f"; {len(kept)} class-head tensors (another num_classes) keep their initialisation" if kept else ""
    say(run.info, f"fine-tuning from the weights of {source}{fresh}")


def resume(run: TrainingRun) -> tuple[int, dict | None]:
    """Load ``cfg.resume``: weights, optimizer, schedule and scaler; note the config keys changed since it was
    written (``run.config_changes``). -> (the first epoch to train, the ``log.txt`` record the checkpoint holds of
    its epoch, without evaluation; None if it has none)."""
    source = run.cfg.resume
    checkpoint = load_checkpoint(source)
    load_model_weights(run.model, checkpoint, source, describe=describe_state_dict)
    start_epoch = restore_training_state(checkpoint, run.optimizer, run.lr_scheduler, run.scaler, source)
    say(run.info, f"resumed from {source}: continuing at epoch {start_epoch} of {run.cfg.epochs}")
    run.config_changes = config_changes(checkpoint.get("config"), run.cfg.to_dict())
    if run.config_changes and start_epoch < run.cfg.epochs:
        changed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in run.config_changes.items())
        say(run.info, f"config changed since {source}: {changed}")
    return start_epoch, checkpoint.get("log_record") if start_epoch > 0 else None


def complete_record(run: TrainingRun, record: dict) -> dict:
    """Evaluate again (when due) the epoch of ``record``, a checkpoint's record that ``log.txt`` lacks, and log
    it; returns the completed record."""
    epoch, start, cpu_start = record["epoch"], time.perf_counter(), time.process_time()
    say(run.info, f"log.txt has no record of epoch {epoch}, which its checkpoint finished: completing it")
    record = dict(record)
    if evaluation_due(epoch, run.cfg):
        record.update(evaluate_epoch(run))
    record_times(record, start - record.get("epoch_time_s", 0.0), cpu_start - record.get("epoch_cpu_s", 0.0))
    if run.info.is_main:
        append_log(run.output_dir, record)
    return record


def train_epoch(run: TrainingRun, epoch: int) -> dict:
    """Epoch ``epoch`` (0-based), in order: seed, train over the batches, step the schedule, checkpoint, evaluate
    when due, log. Returns its ``log.txt`` record."""
    cfg, info = run.cfg, run.info
    epoch_start, cpu_start = time.perf_counter(), time.process_time()
    seed_everything(epoch_seed(cfg.seed, info.rank, epoch))
    run.train_loader.batch_sampler.sampler.set_epoch(epoch)
    try:
        losses = train_one_epoch(
            run.trained,
            run.criterion,
            run.train_loader,
            run.optimizer,
            info.device,
            epoch,
            clip_max_norm=cfg.clip_max_norm,
            amp=run.amp,
            scaler=run.scaler,
            print_every=cfg.print_every,
        )
    except NonFiniteLossError as error:
        last = last_good_checkpoint(run)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise NonFiniteLossError(f"{error}; {kept}. Lower lr, set clip_max_norm, or turn amp off.") from None
    record = {"epoch": epoch, "lr": run.optimizer.param_groups[0]["lr"]}
    record.update({f"train_{name}": value for name, value in losses.items()})
    run.lr_scheduler.step()
    record_times(record, epoch_start, cpu_start)
    if info.is_main:
        save_epoch(run, epoch, record)  # before the evaluation: a run stopped there keeps the epoch's training
    barrier()
    if evaluation_due(epoch, cfg):
        record.update(evaluate_epoch(run))
    record_times(record, epoch_start, cpu_start)
    if info.is_main:
        log_epoch(run, record)
    return record


def record_times(record: dict, wall_start: float, cpu_start: float) -> None:
    """Set the record's ``epoch_time_s`` (wall seconds since ``wall_start``, a ``time.perf_counter``) and
    ``epoch_cpu_s`` (this process's CPU seconds, all its threads, since ``cpu_start``, a ``time.process_time``).

    An epoch whose wall time grew while its CPU time did not lost the time to the machine (other processes, a busy
    host), not to more work.
    """
    record["epoch_time_s"] = round(time.perf_counter() - wall_start, 2)
    record["epoch_cpu_s"] = round(time.process_time() - cpu_start, 2)


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    *,
    clip_max_norm: float = 0.0,
    amp: str = "none",
    scaler: torch.amp.GradScaler | None = None,
    print_every: int = 10,
) -> dict[str, float]:
    """Train ``model`` on every batch of ``loader`` once, under autocast for ``amp`` (resolved, see
    ``engine.amp``).

    Returns the epoch's averages over this process's batches, then over processes: ``loss`` (the weighted
    total) and every loss of ``criterion`` unweighted (``loss_ce``, ``loss_bbox_0``, ``class_error``, ...).
    Raises :class:`NonFiniteLossError` (on every rank alike) when a prediction is not finite (before the matching,
    which cannot rank NaN costs) or the total loss is not, before the optimizer step.
    """
    model.train()
    criterion.train()
    scaler = scaler if scaler is not None else build_grad_scaler("none", device)
    progress = Progress(len(loader), header=f"epoch {epoch}", every=print_every, enabled=is_main_process(), shown=SHOWN)
    for iteration, batch in enumerate(loader):
        batch: Batch = batch.to(device, non_blocking=True)
        outputs = forward_outputs(model, batch, amp)
        stop_on_non_finite_outputs(outputs, epoch, iteration)
        losses = criterion(outputs, batch.targets)
        loss = criterion.total_loss(losses)
        total = all_reduce_mean(loss.detach().reshape(1)).item()
        if not math.isfinite(total):
            shown = ", ".join(f"{name} {value.item():.4g}" for name, value in losses.items() if name in SHOWN)
            raise NonFiniteLossError(
                f"epoch {epoch}, iteration {iteration}: the loss is {total} ({shown}); "
                "training stopped before the optimizer step"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_max_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
        scaler.step(optimizer)
        scaler.update()
        progress.step(
            loss=loss.item(),
            **{name: value.item() for name, value in losses.items()},
            lr=optimizer.param_groups[0]["lr"],
        )
    progress.close()
    averages = {name: value for name, value in progress.averages().items() if name != "lr"}
    return mean_over_processes(averages, device)


def forward_losses(
    model: nn.Module, criterion: nn.Module, batch: Batch, amp: str = "none"
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The model on ``batch`` under autocast for ``amp``, the criterion on its float32 outputs: -> (every loss of
    the criterion, the weighted total). :func:`train_one_epoch` runs the same two steps, checking the outputs
    between them."""
    losses = criterion(forward_outputs(model, batch, amp), batch.targets)
    return losses, criterion.total_loss(losses)


def forward_outputs(model: nn.Module, batch: Batch, amp: str = "none") -> dict:
    """The model's outputs on ``batch`` under autocast for ``amp``, floating tensors in float32."""
    with autocast(amp, batch.images.device):
        outputs = model(batch.images, batch.padding_mask)
    return to_float32(outputs)


def floating_tensors(outputs: Any, name: str = "") -> list[tuple[str, torch.Tensor]]:
    """The floating tensors of ``outputs`` (nested dicts and lists) with their names, e.g.
    ``aux_outputs.0.pred_boxes``."""
    if isinstance(outputs, torch.Tensor):
        return [(name, outputs.detach())] if outputs.is_floating_point() else []
    if isinstance(outputs, dict):
        items = outputs.items()
    elif isinstance(outputs, (list, tuple)):
        items = enumerate(outputs)
    else:
        return []
    return [entry for key, value in items for entry in floating_tensors(value, f"{name}.{key}" if name else str(key))]


def stop_on_non_finite_outputs(outputs: dict, epoch: int, iteration: int) -> None:
    """Raise :class:`NonFiniteLossError` on every rank alike when any rank's ``outputs`` hold NaN or infinity
    (one device synchronisation when all are finite)."""
    tensors = floating_tensors(outputs)
    bad = torch.stack([(~torch.isfinite(tensor)).sum() for _, tensor in tensors])  # (number of tensors,)
    if all_reduce_mean(bad.sum().float().reshape(1)).item() == 0:
        return
    found = [
        f"{name} ({count} of {tensor.numel()} values)" for (name, tensor), count in zip(tensors, bad.tolist()) if count
    ]
    where = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "") if found else "on another process"
    raise NonFiniteLossError(
        f"epoch {epoch}, iteration {iteration}: the model's predictions are not finite ({where}); "
        "training stopped before the matching and the optimizer step"
    )


def save_epoch(run: TrainingRun, epoch: int, record: dict) -> None:
    """``checkpoint.pth`` (and ``checkpointNNNN.pth`` when due) after epoch ``epoch``, with ``record``, its
    ``log.txt`` record so far; call on rank 0."""
    state = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": epoch,
        "config": run.cfg.to_dict(),
        "category_names": dict(run.train_set.category_names),
        "log_record": record,
    }
    save_checkpoint(state, run.output_dir / LATEST_CHECKPOINT)
    if checkpoint_due(epoch, run.cfg):
        save_checkpoint(state, run.output_dir / f"checkpoint{epoch:04d}.pth")


def evaluate_epoch(run: TrainingRun) -> dict[str, float]:
    """The model evaluated on the val split: the ``val_<metric>`` entries of the epoch's record on rank 0, which
    also writes ``detections.json`` and ``metrics.json``; none on other ranks."""
    metrics = evaluate(
        run.model,
        run.postprocess,
        run.val_loader,
        run.val_set,
        run.info.device,
        run.output_dir,
        amp=run.amp,
        print_every=run.cfg.print_every,
    )
    return {f"val_{name}": value for name, value in (metrics or {}).items()}


def log_epoch(run: TrainingRun, record: dict) -> None:
    """Append ``record`` to ``log.txt`` and say how the epoch went; call on rank 0."""
    write_record(run, record)
    shown = f", AP {record['val_AP']:.4f}" if "val_AP" in record else ""
    say(
        run.info,
        f"epoch {record['epoch']} done in {format_duration(record['epoch_time_s'])} "
        f"({record['epoch_cpu_s']:.0f} s of CPU time): loss {record['train_loss']:.4f}{shown}",
    )


def last_good_checkpoint(run: TrainingRun) -> Path | None:
    """The checkpoint the run can go on from: this run's latest, else the one it resumed; None before either."""
    latest = run.output_dir / LATEST_CHECKPOINT
    if latest.is_file():
        return latest
    return Path(run.cfg.resume) if run.cfg.resume else None


def write_record(run: TrainingRun, record: dict) -> None:
    """Append ``record`` to ``log.txt``, with ``config_changes`` when it is the first epoch a resumed run trained
    after its config changed; call on rank 0."""
    if run.config_changes:
        record, run.config_changes = {**record, "config_changes": run.config_changes}, {}
    append_log(run.output_dir, record)


def numerics(cfg: Config, amp: str, device: torch.device) -> str:
    """What besides the seed fixes a run's numbers (docs/training.md, "Reproducibility"): the precision, the CPU
    threads and the attention backend ``auto`` resolves to, e.g. ``"bfloat16 autocast, 2 threads, attention cpu"``."""
    dtype = autocast_dtype(amp)
    precision = "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"
    count = torch.get_num_threads()
    threads = f", {count} thread{'s' if count != 1 else ''}" if device.type == "cpu" else ""
    return f"{precision}{threads}, attention {resolve_backend(cfg.attention_backend, device, dtype or torch.float32)}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed every epoch starts from: a function of these three alone, so that a run resumed at ``epoch`` draws
    the same augmentations, data-loader worker seeds and dropout as a run that never stopped."""
    return int(np.random.SeedSequence([seed % 2**32, rank, epoch]).generate_state(1)[0])


def checkpoint_due(epoch: int, cfg: Config) -> bool:
    """Whether epoch ``epoch`` (0-based, just finished) also gets a ``checkpointNNNN.pth``."""
    finished = epoch + 1
    return cfg.save_every > 0 and (finished % cfg.save_every == 0 or finished == cfg.lr_drop)


def evaluation_due(epoch: int, cfg: Config) -> bool:
    """Whether epoch ``epoch`` (0-based, just finished) is evaluated: the last one, and every ``eval_every``."""
    finished = epoch + 1
    return finished == cfg.epochs or (cfg.eval_every > 0 and finished % cfg.eval_every == 0)


def validation_metrics(record: dict) -> dict[str, float]:
    """The ``val_<metric>`` entries of a ``log.txt`` record, without the prefix."""
    return {name[4:]: value for name, value in record.items() if name.startswith("val_")}


def mean_over_processes(averages: dict[str, float], device: torch.device) -> dict[str, float]:
    names = sorted(averages)
    values = all_reduce_mean(torch.tensor([averages[name] for name in names], dtype=torch.float64, device=device))
    return dict(zip(names, values.tolist()))
