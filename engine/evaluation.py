"""COCO bbox evaluation of a detector over a loader, gathered from every rank with each image counted once."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from datasets import Batch, CocoDetection, CocoEvaluator, merge_detections
from engine.amp import autocast
from engine.data import (
    build_eval_loader,
    build_split,
)
from engine.runtime import build_model_on, load_for_inference, say
from util.config import Config
from util.distributed import (
    all_gather_object,
    explaining_timeouts,
    init_distributed,
    is_main_process,
)
from util.progress import Progress

DETECTIONS_FILE = "detections.json"
METRICS_FILE = "metrics.json"


@torch.no_grad()
def detect(model: nn.Module, postprocess: nn.Module, batch: Batch, amp: str = "none") -> list[dict[str, torch.Tensor]]:
    """Detections of every image of ``batch``: ``scores`` (K,), ``labels`` (K,), ``boxes`` (K, 4) x0, y0, x1, y1 in
    pixels of the original image (``target["orig_size"]``), on the CPU."""
    with autocast(amp, batch.images.device):
        outputs = model(batch.images, batch.padding_mask)
    outputs = {key: outputs[key].float() for key in ("pred_logits", "pred_boxes")}
    original_sizes = torch.stack([target["orig_size"] for target in batch.targets])
    found = postprocess(outputs, original_sizes)
    return [{key: value.cpu() for key, value in detections.items()} for detections in found]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    postprocess: nn.Module,
    loader: DataLoader,
    dataset: CocoDetection,
    device: torch.device,
    output_dir: str | Path | None = None,
    amp: str = "none",
    print_every: int = 10,
) -> dict[str, float] | None:
    """Run ``model`` over ``loader`` (this rank's share of ``dataset``), gather the detections of all ranks and
    evaluate them with pycocotools on rank 0.

    Rank 0 returns ``{"AP", "AP50", ..., "ARl"}`` and, with ``output_dir``, writes ``detections.json`` (COCO
    results, original category ids) and ``metrics.json`` there; other ranks return None.
    """
    model.eval()
    evaluator = CocoEvaluator(dataset.coco, dataset.label_to_category_id)
    progress = Progress(len(loader), header="eval", every=print_every, enabled=is_main_process())
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        found = detect(model, postprocess, batch, amp)
        evaluator.update({int(target["image_id"]): detections for target, detections in zip(batch.targets, found)})
        progress.step()
    progress.close()
    parts = all_gather_object(evaluator.detections)
    if not is_main_process():
        return None
    evaluator.detections = merge_detections(parts)
    output_path = Path(output_dir) / DETECTIONS_FILE if output_dir is not None else None
    metrics = evaluator.evaluate(output_path=output_path)
    print(evaluator.summary, end="", flush=True)
    if output_dir is not None:
        with open(Path(output_dir) / METRICS_FILE, "w", encoding="utf-8") as file:
            json.dump(metrics, file, indent=2)
    return metrics


def evaluate_checkpoint(cfg: Config) -> dict[str, float] | None:
    """Evaluate ``cfg.resume`` on the val split; rank 0 writes ``detections.json`` and ``metrics.json`` under
    ``cfg.output_dir`` and returns the metrics."""
    info = init_distributed(cfg.device, cfg.dist_timeout_minutes)
    model, _, postprocessors = build_model_on(cfg, info)
    model, _, amp = load_for_inference(cfg, "eval", model, info)
    val_set = build_split("val", cfg)
    loader = build_eval_loader(val_set, cfg, info.rank, info.world_size)
    if info.is_main:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    with explaining_timeouts(cfg.dist_timeout_minutes):
        metrics = evaluate(
            model,
            postprocessors["bbox"],
            loader,
            val_set,
            info.device,
            cfg.output_dir,
            amp=amp,
            print_every=cfg.print_every,
        )
    if metrics is not None:
        say(info, "metrics: " + json.dumps({name: round(value, 4) for name, value in metrics.items()}))
    return metrics
