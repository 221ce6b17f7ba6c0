"""``main.py train``: the training run, from a resolved config.

Files a training run writes under ``cfg.output_dir`` (rank 0 only):

| file | content |
|---|---|
| ``config.yaml`` | the resolved config |
| ``checkpoint.pth`` | the latest finished epoch: model, optimizer, lr_scheduler, scaler, epoch, config, |
| | category_names, log_record (the epoch's ``log.txt`` record before its evaluation) |
| ``checkpointNNNN.pth`` | the same, kept every ``save_every`` epochs and before the ``lr_drop`` |
| ``detections.json`` / ``metrics.json`` | the latest evaluation: COCO results and the 12 COCO metrics |
| ``log.txt`` | one JSON line per epoch: ``epoch``, ``lr``, ``train_<loss>``, ``val_<metric>``, ``epoch_time_s``; |
| | appended to when the run resumes |

A folder that holds another run is refused unless ``overwrite=true`` (``engine.run_dir``). Each epoch is
checkpointed before it is evaluated, and its ``log.txt`` record written last: a run that stops in the evaluation
keeps its training, and when it resumes the missing record is completed by evaluating that checkpoint again.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from datasets import CocoDetection
from engine.data import (
    build_eval_loader,
    build_split,
    build_train_loader,
)
from engine.evaluation import evaluate
from engine.optim import build_lr_scheduler, build_optimizer
from engine.run_dir import CONFIG_FILE, LATEST_CHECKPOINT, append_log, claim_output_dir, reconcile_log
from engine.runtime import build_model_on, decided_on_main, say
from engine.training import (
    NonFiniteLossError,
    build_grad_scaler,
    prepare_for_training,
    resolve_amp,
    train_one_epoch,
)
from models.describe import describe_state_dict
from util.checkpoint import (
    load_checkpoint,
    load_model_weights,
    restore_training_state,
    save_checkpoint,
)
from util.config import Config
from util.distributed import (
    DistributedInfo,
    barrier,
    explaining_timeouts,
    init_distributed,
)
from util.errors import UserError
from util.progress import format_duration

CLASS_HEADS = ("class_embed",)  # the detector's modules sized by num_classes (in the decoder too, two-stage)


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
    finished = epoch + 1
    return finished == cfg.epochs or (cfg.eval_every > 0 and finished % cfg.eval_every == 0)


@dataclass
class TrainingRun:
    """Everything one training process works with."""

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


def build_training(cfg: Config, info: DistributedInfo) -> TrainingRun:
    model, criterion, postprocessors = build_model_on(cfg, info)
    amp = resolve_amp(cfg.amp, info.device)
    prepare_for_training(model, amp, info.device)
    train_set, val_set = build_split("train", cfg), build_split("val", cfg)
    trained = (
        model
        if info.world_size == 1
        else DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    )
    optimizer = build_optimizer(model, cfg)
    return TrainingRun(
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


def resume_training(run: TrainingRun, cfg: Config, info: DistributedInfo) -> tuple[int, dict | None]:
    """Load ``cfg.resume`` or ``cfg.finetune_from`` (when set) into ``run``; returns the first epoch to train and,
    resuming, the ``log.txt`` record the checkpoint holds of its epoch (without evaluation; None if it has none)."""
    if cfg.resume and cfg.finetune_from:
        raise UserError(
            f"set resume (continue a run) or finetune_from (start a new run from its weights), not "
            f"both: resume={cfg.resume!r}, finetune_from={cfg.finetune_from!r}"
        )
    if cfg.finetune_from:
        kept = load_model_weights(
            run.model,
            load_checkpoint(cfg.finetune_from),
            cfg.finetune_from,
            describe=describe_state_dict,
            resizable=CLASS_HEADS,
        )
        fresh = f"; {len(kept)} class-head tensors (another num_classes) keep their initialisation" if kept else ""
        say(info, f"fine-tuning from the weights of {cfg.finetune_from}{fresh}")
        return 0, None
    if not cfg.resume:
        return 0, None
    checkpoint = load_checkpoint(cfg.resume)
    load_model_weights(run.model, checkpoint, cfg.resume, describe=describe_state_dict)
    start_epoch = restore_training_state(checkpoint, run.optimizer, run.lr_scheduler, run.scaler, cfg.resume)
    say(info, f"resumed from {cfg.resume}: continuing at epoch {start_epoch} of {cfg.epochs}")
    return start_epoch, checkpoint.get("log_record") if start_epoch > 0 else None


def save_epoch(run: TrainingRun, epoch: int, cfg: Config, output_dir: Path, record: dict) -> None:
    """``checkpoint.pth`` (and ``checkpointNNNN.pth`` when due) after epoch ``epoch``, with ``record``, its
    ``log.txt`` record so far; call on rank 0."""
    state = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": epoch,
        "config": cfg.to_dict(),
        "category_names": dict(run.train_set.category_names),
        "log_record": record,
    }
    save_checkpoint(state, output_dir / LATEST_CHECKPOINT)
    if checkpoint_due(epoch, cfg):
        save_checkpoint(state, output_dir / f"checkpoint{epoch:04d}.pth")


def evaluate_epoch(run: TrainingRun, epoch: int, cfg: Config, info: DistributedInfo, output_dir: Path) -> dict:
    """The ``val_<metric>`` entries of epoch ``epoch``'s record: its evaluation when due (rank 0), else none."""
    if not evaluation_due(epoch, cfg):
        return {}
    metrics = evaluate(
        run.model,
        run.postprocess,
        run.val_loader,
        run.val_set,
        info.device,
        output_dir,
        amp=run.amp,
        print_every=cfg.print_every,
    )
    return {f"val_{name}": value for name, value in (metrics or {}).items()}


def train_epoch(run: TrainingRun, epoch: int, cfg: Config, info: DistributedInfo, output_dir: Path) -> dict:
    """Train, checkpoint and (when due) evaluate epoch ``epoch``; returns its ``log.txt`` record."""
    epoch_start = time.perf_counter()
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
        last = output_dir / LATEST_CHECKPOINT
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
        raise NonFiniteLossError(f"{error}; {kept}. Lower lr, set clip_max_norm, or turn amp off.") from None
    record = {
        "epoch": epoch,
        "lr": run.optimizer.param_groups[0]["lr"],
        **{f"train_{name}": value for name, value in losses.items()},
    }
    run.lr_scheduler.step()
    record["epoch_time_s"] = round(time.perf_counter() - epoch_start, 2)
    if info.is_main:
        save_epoch(run, epoch, cfg, output_dir, record)
    barrier()
    record.update(evaluate_epoch(run, epoch, cfg, info, output_dir))
    record["epoch_time_s"] = round(time.perf_counter() - epoch_start, 2)
    return record


def complete_record(run: TrainingRun, record: dict, cfg: Config, info: DistributedInfo, output_dir: Path) -> dict:
    """Evaluate again the epoch of ``record`` (a checkpoint's record that ``log.txt`` lacks) and log it."""
    epoch, start = record["epoch"], time.perf_counter()
    say(info, f"log.txt has no record of epoch {epoch}, which its checkpoint finished: completing it")
    record = {**record, **evaluate_epoch(run, epoch, cfg, info, output_dir)}
    record["epoch_time_s"] = round(record.get("epoch_time_s", 0.0) + time.perf_counter() - start, 2)
    if info.is_main:
        append_log(output_dir, record)
    return record


def log_epoch(record: dict, info: DistributedInfo, output_dir: Path) -> None:
    """Append ``record`` to ``log.txt`` and say how the epoch went (rank 0)."""
    if not info.is_main:
        return
    append_log(output_dir, record)
    shown = f", AP {record['val_AP']:.4f}" if "val_AP" in record else ""
    say(
        info,
        f"epoch {record['epoch']} done in {format_duration(record['epoch_time_s'])}: loss "
        f"{record['train_loss']:.4f}{shown}",
    )


def validation_metrics(record: dict) -> dict[str, float]:
    return {name[4:]: value for name, value in record.items() if name.startswith("val_")}


def train(cfg: Config) -> dict[str, float] | None:
    """Train ``cfg.epochs`` epochs (from ``cfg.resume`` when given), evaluating and checkpointing as configured.

    Returns the last evaluation's metrics on rank 0 (None on other ranks, or when no evaluation ran). Raises a
    :class:`UserError` when ``cfg.output_dir`` holds another run (see ``engine.run_dir``).
    """
    info = init_distributed(cfg.device, cfg.dist_timeout_minutes)
    seed_everything(cfg.seed + info.rank)
    with explaining_timeouts(cfg.dist_timeout_minutes):
        return train_epochs(cfg, info, Path(cfg.output_dir))


def train_epochs(cfg: Config, info: DistributedInfo, output_dir: Path) -> dict[str, float] | None:
    for note in decided_on_main(
        info, lambda: claim_output_dir(output_dir, cfg.resume, cfg.finetune_from, cfg.overwrite)
    ):
        say(info, note)
    if info.is_main:
        (output_dir / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run = build_training(cfg, info)
    start_epoch, last_record = resume_training(run, cfg, info)
    unlogged, notes = decided_on_main(info, lambda: reconcile_log(output_dir, cfg.resume, start_epoch, last_record))
    for note in notes:
        say(info, note)
    metrics = validation_metrics(complete_record(run, unlogged, cfg, info, output_dir)) if unlogged else {}
    if start_epoch >= cfg.epochs:
        say(
            info,
            f"nothing to train: {cfg.resume} already finished epoch {start_epoch - 1} and epochs={cfg.epochs}"
            f" (0-based epochs 0..{cfg.epochs - 1}); raise epochs (e.g. --opts epochs={start_epoch + 1}) to "
            "train further, or run `main.py eval` to evaluate it",
        )
        return (metrics or None) if info.is_main else None
    num_parameters = sum(parameter.numel() for parameter in run.model.parameters() if parameter.requires_grad)
    say(
        info,
        f"training {num_parameters:,} parameters on {len(run.train_set)} images ({info.world_size} "
        f"process(es), {info.device}), evaluating on {len(run.val_set)}; output in {output_dir}",
    )
    run_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        record = train_epoch(run, epoch, cfg, info, output_dir)
        log_epoch(record, info, output_dir)
        metrics = validation_metrics(record) or metrics
    say(info, f"training finished in {format_duration(time.perf_counter() - run_start)}")
    return (metrics or None) if info.is_main else None
