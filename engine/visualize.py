"""``main.py visualize``: where a checkpoint's attention (and DCN backbone) samples, drawn per image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from engine.attention_view import sample_attention, write_visualization
from engine.data import (
    build_config_transforms,
)
from engine.dcn_view import deform_layers, write_dcn_visualization
from engine.prediction import load_image
from engine.runtime import build_model_on, load_for_inference, say
from util.config import Config
from util.distributed import (
    init_distributed,
)
from util.errors import UserError


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
    ``engine.attention_view.write_visualization``); the encoder queries are cells of level ``query_level`` (0: the
    finest). With a DCN backbone also ``<stem>_dcn_sampling.png`` and a ``"dcn"`` entry in the JSON: the 729
    points of its last three deformable convolutions for the same query pixels (``engine.dcn_view``), recorded
    in the same forward.
    Returns the paths written."""
    stems = [Path(path).stem for path in images]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise UserError(
            f"images share the file name stems {repeated}: their outputs would overwrite each other; "
            "visualize them into different --out folders"
        )
    info = init_distributed(cfg.device, cfg.dist_timeout_minutes)
    model, _, _ = build_model_on(cfg, info)
    model, checkpoint, _ = load_for_inference(cfg, "visualize", model, info)
    names = checkpoint.get("category_names")
    transforms = build_config_transforms("val", cfg)
    written = []
    for path in images:
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
        dcn_layers = deform_layers(model, view.records)  # a DCN backbone's offsets and masks, if it has one
        pixels = [query.pixel for query in view.encoder]
        written += write_dcn_visualization(dcn_layers, pixels, view.image, view.resized_size, out_dir, Path(path).stem)
        say(
            info,
            f"{path}: {len(view.detections)} detection(s) at or above {threshold}; decoder layer "
            f"{view.decoder_layer}, encoder layer {view.encoder_layer}",
        )
    say(info, f"wrote {len(written)} file(s) to {out_dir}")
    return written
