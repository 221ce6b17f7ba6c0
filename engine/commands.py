"""The commands of ``main.py``: train, eval, predict and visualize, each from a resolved config.

Files a training run writes under ``cfg.output_dir`` (rank 0 only):

| file | content |
|---|---|
| ``config.yaml`` | the resolved config |
| ``checkpoint.pth`` | the latest finished epoch: model, optimizer, lr_scheduler, scaler, epoch, config |
| ``checkpointNNNN.pth`` | the same, kept every ``save_every`` epochs and before the ``lr_drop`` |
| ``detections.json`` / ``metrics.json`` | the latest evaluation: COCO results and the 12 COCO metrics |
| ``log.txt`` | one JSON line per epoch: ``epoch``, ``lr``, ``train_<loss>``, ``val_<metric>``, ``epoch_time_s``; |
| | emptied when a run starts from scratch, appended to when it resumes |
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Sequence
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
    build_config_transforms,
    build_eval_loader,
    build_split,
    build_train_loader,
)
from engine.evaluation import evaluate
from engine.optim import build_lr_scheduler, build_optimizer
from engine.prediction import load_image, predict_files
from engine.training import NonFiniteLossError, build_grad_scaler, train_one_epoch
from models import build_model
from models.describe import describe_state_dict
from util.checkpoint import (
    load_checkpoint,
    load_model_weights,
    restore_training_state,
    save_checkpoint,
)
from util.config import Config
from util.distributed import DistributedInfo, barrier, init_distributed
from util.progress import format_duration
from util.visualize import sample_attention, write_visualization
from util.visualize_dcn import record_deform_sampling, write_dcn_visualization

LOG_FILE = "log.txt"
CONFIG_FILE = "config.yaml"
LATEST_CHECKPOINT = "checkpoint.pth"
CLASS_HEADS = ("class_embed",)  # the detector's modules sized by num_classes (in the decoder too, two-stage)


def say(info: DistributedInfo, message: str) -> None:
    """Print ``message`` on rank 0."""
    if info.is_main:
        print(message, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed every epoch starts from: a function of these three alone, so that a run resumed at ``epoch`` draws
    the same augmentations, data-loader worker seeds and dropout as a run that never stopped."""
    return int(np.random.SeedSequence([seed % 2**32, rank, epoch]).generate_state(1)[0])


def build_model_on(cfg: Config, info: DistributedInfo) -> tuple[nn.Module, nn.Module, dict[str, nn.Module]]:
    """The model on this process's device. No ImageNet weights are fetched when a checkpoint (``resume`` or
    ``finetune_from``) will replace every backbone weight: evaluating a published checkpoint works offline."""
    if cfg.resume or cfg.finetune_from:
        cfg = dataclasses.replace(cfg, pretrained_backbone=False)
    model, criterion, postprocessors = build_model(cfg)
    return model.to(info.device), criterion.to(info.device), postprocessors


def _load_for_inference(cfg: Config, command: str, model: nn.Module) -> dict:
    if not cfg.resume:
        raise ValueError(f"{command} needs a checkpoint: --opts resume=PATH")
    checkpoint = load_checkpoint(cfg.resume)
    load_model_weights(model, checkpoint, cfg.resume, describe=describe_state_dict)
    return checkpoint


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
    train_set: CocoDetection
    val_set: CocoDetection
    train_loader: DataLoader
    val_loader: DataLoader


def build_training(cfg: Config, info: DistributedInfo) -> TrainingRun:
    model, criterion, postprocessors = build_model_on(cfg, info)
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
        scaler=build_grad_scaler(cfg.amp, info.device),
        train_set=train_set,
        val_set=val_set,
        train_loader=build_train_loader(train_set, cfg, info.rank, info.world_size),
        val_loader=build_eval_loader(val_set, cfg, info.rank, info.world_size),
    )


def resume_training(run: TrainingRun, cfg: Config, info: DistributedInfo) -> int:
    """Load ``cfg.resume`` or ``cfg.finetune_from`` (when set) into ``run``; returns the first epoch to train."""
    if cfg.resume and cfg.finetune_from:
        raise ValueError(
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
        return 0
    if not cfg.resume:
        return 0
    checkpoint = load_checkpoint(cfg.resume)
    load_model_weights(run.model, checkpoint, cfg.resume, describe=describe_state_dict)
    start_epoch = restore_training_state(checkpoint, run.optimizer, run.lr_scheduler, run.scaler, cfg.resume)
    say(info, f"resumed from {cfg.resume}: continuing at epoch {start_epoch} of {cfg.epochs}")
    return start_epoch


def save_epoch(run: TrainingRun, epoch: int, cfg: Config, output_dir: Path) -> None:
    """``checkpoint.pth`` (and ``checkpointNNNN.pth`` when due) after epoch ``epoch``; call on rank 0."""
    state = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": epoch,
        "config": cfg.to_dict(),
        "category_names": dict(run.train_set.category_names),
    }
    save_checkpoint(state, output_dir / LATEST_CHECKPOINT)
    if checkpoint_due(epoch, cfg):
        save_checkpoint(state, output_dir / f"checkpoint{epoch:04d}.pth")


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
            amp=cfg.amp,
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
    if info.is_main:
        save_epoch(run, epoch, cfg, output_dir)
    barrier()
    if evaluation_due(epoch, cfg):
        metrics = evaluate(
            run.model,
            run.postprocess,
            run.val_loader,
            run.val_set,
            info.device,
            output_dir,
            amp=cfg.amp,
            print_every=cfg.print_every,
        )
        record.update({f"val_{name}": value for name, value in (metrics or {}).items()})
    record["epoch_time_s"] = round(time.perf_counter() - epoch_start, 2)
    return record


def train(cfg: Config) -> dict[str, float] | None:
    """Train ``cfg.epochs`` epochs (from ``cfg.resume`` when given), evaluating and checkpointing as configured.

    Returns the last evaluation's metrics on rank 0 (None on other ranks or when no epoch was left to train).
    """
    info = init_distributed(cfg.device)
    seed_everything(cfg.seed + info.rank)
    output_dir = Path(cfg.output_dir)
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run = build_training(cfg, info)
    start_epoch = resume_training(run, cfg, info)
    if start_epoch >= cfg.epochs:
        say(
            info,
            f"nothing to train: {cfg.resume} already finished epoch {start_epoch - 1} and epochs={cfg.epochs}"
            f" (0-based epochs 0..{cfg.epochs - 1}); raise epochs (e.g. --opts epochs={start_epoch + 1}) to "
            "train further, or run `main.py eval` to evaluate it",
        )
        return None
    if info.is_main and start_epoch == 0:  # a fresh run: its log starts empty, as its checkpoints start anew
        (output_dir / LOG_FILE).unlink(missing_ok=True)
    num_parameters = sum(parameter.numel() for parameter in run.model.parameters() if parameter.requires_grad)
    say(
        info,
        f"training {num_parameters:,} parameters on {len(run.train_set)} images ({info.world_size} "
        f"process(es), {info.device}), evaluating on {len(run.val_set)}; output in {output_dir}",
    )
    run_start, metrics = time.perf_counter(), None
    for epoch in range(start_epoch, cfg.epochs):
        record = train_epoch(run, epoch, cfg, info, output_dir)
        if info.is_main:
            with open(output_dir / LOG_FILE, "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")
            metrics = {name[4:]: value for name, value in record.items() if name.startswith("val_")} or metrics
            shown = f", AP {record['val_AP']:.4f}" if "val_AP" in record else ""
            say(
                info,
                f"epoch {epoch} done in {format_duration(record['epoch_time_s'])}: loss "
                f"{record['train_loss']:.4f}{shown}",
            )
    say(info, f"training finished in {format_duration(time.perf_counter() - run_start)}")
    return metrics


def evaluate_checkpoint(cfg: Config) -> dict[str, float] | None:
    """Evaluate ``cfg.resume`` on the val split; rank 0 writes ``detections.json`` and ``metrics.json`` under
    ``cfg.output_dir`` and returns the metrics."""
    info = init_distributed(cfg.device)
    model, _, postprocessors = build_model_on(cfg, info)
    _load_for_inference(cfg, "eval", model)
    val_set = build_split("val", cfg)
    loader = build_eval_loader(val_set, cfg, info.rank, info.world_size)
    if info.is_main:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    metrics = evaluate(
        model,
        postprocessors["bbox"],
        loader,
        val_set,
        info.device,
        cfg.output_dir,
        amp=cfg.amp,
        print_every=cfg.print_every,
    )
    if metrics is not None:
        say(info, "metrics: " + json.dumps({name: round(value, 4) for name, value in metrics.items()}))
    return metrics


def predict(cfg: Config, images: Sequence[str | Path], out_dir: str | Path, threshold: float = 0.5) -> list[dict]:
    """Detect in ``images`` with ``cfg.resume`` and write ``out_dir/predictions.json`` and the drawn images."""
    info = init_distributed(cfg.device)
    model, _, postprocessors = build_model_on(cfg, info)
    checkpoint = _load_for_inference(cfg, "predict", model)
    names = checkpoint.get("category_names")
    results = predict_files(
        model,
        postprocessors["bbox"],
        images,
        build_config_transforms("val", cfg),
        info.device,
        out_dir,
        names,
        threshold,
        cfg.amp,
    )
    for result in results:
        found = ", ".join(f"{d['name']} {d['score']:.2f}" for d in result["detections"]) or "nothing"
        say(info, f"{result['file']}: {found}")
    say(info, f"wrote {len(results)} drawn image(s) and predictions.json to {out_dir}")
    return results


def visualize(
    cfg: Config,
    images: Sequence[str | Path],
    out_dir: str | Path,
    threshold: float = 0.5,
    top_k: int = 4,
    points: Sequence[tuple[float, float]] | None = None,
    layer: int = -1,
    by_level: bool = False,
    by_head: bool = False,
    query_level: int = 0,
) -> list[Path]:
    """Where ``cfg.resume`` looks in each of ``images``: writes ``out_dir/<stem>_detections.png``,
    ``<stem>_decoder_sampling.png``, ``<stem>_encoder_sampling.png`` and ``<stem>_sampling.json`` (see
    ``util.visualize.write_visualization``); the encoder queries are cells of level ``query_level`` (0: the
    finest). With a DCN backbone also ``<stem>_dcn_sampling.png`` and a ``"dcn"`` entry in the JSON: the 729
    points of its last three deformable convolutions for the same query pixels (``util.visualize_dcn``).
    Returns the paths written."""
    stems = [Path(path).stem for path in images]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise ValueError(
            f"images share the file name stems {repeated}: their outputs would overwrite each other; "
            "visualize them into different --out folders"
        )
    info = init_distributed(cfg.device)
    model, _, _ = build_model_on(cfg, info)
    checkpoint = _load_for_inference(cfg, "visualize", model)
    names = checkpoint.get("category_names")
    transforms = build_config_transforms("val", cfg)
    written = []
    for path in images:
        with record_deform_sampling(model) as dcn_records:  # a DCN backbone's offsets and masks, if it has one
            view = sample_attention(
                model,
                load_image(path),
                transforms,
                threshold=threshold,
                top_k=top_k,
                points=points,
                layer=layer,
                query_level=query_level,
            )
        written += write_visualization(view, out_dir, Path(path).stem, names, by_level, by_head)
        pixels = [query.pixel for query in view.encoder]
        written += write_dcn_visualization(dcn_records, pixels, view.image, view.resized_size, out_dir, Path(path).stem)
        say(
            info,
            f"{path}: {len(view.detections)} detection(s) at or above {threshold}; decoder layer "
            f"{view.decoder_layer}, encoder layer {view.encoder_layer}",
        )
    say(info, f"wrote {len(written)} file(s) to {out_dir}")
    return written
