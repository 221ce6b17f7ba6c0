"""``main.py visualize`` (engine.visualize.visualize over engine.attention_view) for every variant, from a checkpoint
written the way training writes it (util.checkpoint.save_checkpoint, with config and category names)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import main
from models import CONFIG_DIR, build_model
from tests.tiny_model import TINY, VARIANTS, randomize_zero_initialised, tiny_config
from util.checkpoint import save_checkpoint

CONFIG = CONFIG_DIR / "deformable_detr.yaml"
IMAGE_SIZE = (70, 100)  # (height, width), shown at 64x91
SMALL = ["device=cpu", "val_size=64", "max_size=128"]
NAMES = {0: "circle", 1: "square", 2: "triangle", 3: "star", 4: "cross"}


def write_checkpoint(variant: str, path) -> list[str]:
    """A random tiny ``variant`` saved like a training checkpoint at ``path``; returns its config overrides."""
    overrides = [*TINY, *VARIANTS[variant]]
    torch.manual_seed(0)
    cfg = tiny_config(*VARIANTS[variant])
    model, _, _ = build_model(cfg)
    randomize_zero_initialised(model)
    save_checkpoint({"model": model.state_dict(), "epoch": 0, "config": cfg.to_dict(), "category_names": NAMES}, path)
    return overrides


def write_image(path) -> str:
    height, width = IMAGE_SIZE
    y, x = np.mgrid[0:height, 0:width]
    Image.fromarray(np.stack([x * 2, y * 3, 255 - x], -1).astype(np.uint8)).save(path)
    return str(path)


def run_visualize(tmp_path, variant: str, *extra: str) -> int:
    overrides = write_checkpoint(variant, tmp_path / "checkpoint.pth")
    image = write_image(tmp_path / "gradient.png")
    return main.main(
        [
            "visualize",
            "--config",
            str(CONFIG),
            "--opts",
            *overrides,
            *SMALL,
            f"resume={tmp_path / 'checkpoint.pth'}",
            "--image",
            image,
            "--out",
            str(tmp_path / "out"),
            "--threshold",
            "0",
            "--top-k",
            "2",
            *extra,
        ]
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_command_writes_every_file_for_every_variant(variant, tmp_path):
    assert run_visualize(tmp_path, variant) == 0
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "gradient_decoder_sampling.png",
        "gradient_detections.png",
        "gradient_encoder_sampling.png",
        "gradient_sampling.json",
    ]
    record = json.loads((tmp_path / "out" / "gradient_sampling.json").read_text())
    assert record["image_size"] == list(IMAGE_SIZE)
    assert len(record["detections"]) == 8  # threshold 0: every query of the tiny config
    assert len(record["decoder"]["queries"]) == 2 and record["decoder"]["queries"][0]["name"] in NAMES.values()


def test_points_layer_and_per_level_and_head_panels(tmp_path):
    assert (
        run_visualize(
            tmp_path, "deformable_detr", "--points", "0,0", "100,70", "--layer", "0", "--by-level", "--by-head"
        )
        == 0
    )
    out = tmp_path / "out"
    for part in ("decoder", "encoder"):
        assert (out / f"gradient_{part}_sampling_by_level.png").is_file()
        assert (out / f"gradient_{part}_sampling_by_head.png").is_file()
    record = json.loads((out / "gradient_sampling.json").read_text())
    assert record["decoder"]["layer"] == 0 and record["encoder"]["layer"] == 0
    assert [query["pixel"] for query in record["encoder"]["queries"]] == [[0.0, 0.0], [100.0, 70.0]]


def test_query_level_picks_encoder_queries_on_that_level(tmp_path):
    assert run_visualize(tmp_path, "deformable_detr", "--points", "0,0", "100,70", "--query-level", "2") == 0
    record = json.loads((tmp_path / "out" / "gradient_sampling.json").read_text())
    assert record["encoder"]["query_level"] == 2
    areas = [height * width for height, width in record["spatial_shapes"]]
    start = sum(areas[:2])
    assert [query["query"] for query in record["encoder"]["queries"]] == [start, start + areas[2] - 1]


def test_query_level_beyond_the_model_is_named(tmp_path):
    with pytest.raises(ValueError, match="query level 4 does not exist: the model has 4 feature level"):
        run_visualize(tmp_path, "deformable_detr", "--query-level", "4")


def test_layer_beyond_the_model_is_named(tmp_path):
    with pytest.raises(ValueError, match="encoder has 1 layer"):
        run_visualize(tmp_path, "deformable_detr", "--layer", "1")


def test_malformed_point_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main.main(["visualize", "--image", "a.png", "--points", "3;4"])
    assert "a point is x,y" in capsys.readouterr().err


def test_images_with_one_stem_are_refused(tmp_path, capsys):
    assert (
        main.main(
            [
                "visualize",
                "--config",
                str(CONFIG),
                "--opts",
                *TINY,
                *SMALL,
                "resume=none.pth",
                "--image",
                "a/x.png",
                "b/x.jpg",
            ]
        )
        == 2
    )
    assert "share the file name stems" in capsys.readouterr().err
