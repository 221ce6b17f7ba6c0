"""main.py on the user's mistakes, one table: each ends in one ``error:`` line naming the thing and the way on, with
exit status 2 and no traceback; and what issue 18 asked of a few that are not mistakes (a point outside the image
is drawn, an unreadable image among several is skipped, a data set whose boxes all lie outside is trained with a
warning, Ctrl-C names the checkpoint to resume from).

Most cases run ``main.main`` in this process and stop while loading; the few that need a real process (the
warning that logging prints on stderr, a SIGINT) run ``python main.py``. The data sets are the tiny ones of
tests/coco_data.py (three images of at most 30 pixels), broken one way per case.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from models import build_model
from tests.coco_data import annotation_dict, write_coco
from tests.read_only import read_only_folder
from tests.tiny_training import CONFIG, TINY, make_shapes, tiny_overrides, tiny_training_config
from util.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Given:
    """What a case builds on: its own folder, a good data set, a checkpoint of the TINY model, an image, and a
    folder nothing can be written in."""

    tmp: Path
    coco: Path
    checkpoint: Path
    image: Path
    read_only: Path | None

    def opts(self, *extra: str) -> list[str]:
        return [*TINY, f"coco_path={self.coco}", f"output_dir={self.tmp / 'run'}", *extra]

    def train(self, *extra: str) -> list[str]:
        return ["train", "--config", str(CONFIG), "--opts", *self.opts(*extra)]

    def with_checkpoint(self, command: str, *extra: str, checkpoint: Path | None = None) -> list[str]:
        resume = f"resume={checkpoint or self.checkpoint}"
        return [command, "--config", str(CONFIG), "--opts", *self.opts(resume, *extra)]

    def visualize(self, *flags: str, opts: tuple[str, ...] = (), images: tuple[Path, ...] = ()) -> list[str]:
        images = images or (self.image,)
        command = self.with_checkpoint("visualize", *opts)
        return [*command, "--image", *map(str, images), "--out", str(self.tmp / "out"), "--threshold", "0", *flags]


def broken_coco(given: Given, change: Callable[[dict], object]) -> Path:
    """A data set under ``given.tmp / "data"`` whose training annotations are ``change``d (val: the good ones)."""
    data = annotation_dict()
    change(data)
    root = given.tmp / "data"
    write_coco(root, data, "train")
    write_coco(root, None, "val")
    return root


def train_on(given: Given, change: Callable[[dict], object]) -> list[str]:
    return given.train(f"coco_path={broken_coco(given, change)}")


def train_on_annotation_bytes(given: Given, content: bytes) -> list[str]:
    root = broken_coco(given, lambda data: None)
    (root / "annotations" / "instances_train2017.json").write_bytes(content)
    return given.train(f"coco_path={root}")


def set_key(entry: dict, key: str, value) -> None:
    entry[key] = value


def annotation_file(given: Given) -> Path:
    return given.tmp / "data" / "annotations" / "instances_train2017.json"


def hf_folder(given: Given, config: bytes, weights: bytes | None = None) -> list[str]:
    """``convert --from-hf`` of a folder holding ``config`` as config.json and ``weights`` as model.safetensors
    (default: a valid file of one tensor)."""
    folder = given.tmp / "hf"
    folder.mkdir()
    (folder / "config.json").write_bytes(config)
    if weights is None:
        from safetensors.torch import save as save_safetensors

        weights = save_safetensors({"class_embed.0.bias": torch.zeros(91)})
    (folder / "model.safetensors").write_bytes(weights)
    return ["convert", "--from-hf", str(folder), "--out", str(given.tmp / "converted.pth")]


def truncated_safetensors() -> bytes:
    from safetensors.torch import save as save_safetensors

    whole = save_safetensors({"class_embed.0.bias": torch.zeros(91)})
    return whole[: len(whole) // 2]


def checkpoint_holding(given: Given, model) -> Path:
    path = given.tmp / "odd.pth"
    torch.save({"model": model, "epoch": 0}, path)
    return path


def a_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("a file\n")
    return path


def no_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")


@dataclass
class Case:
    """``argv(given)`` -> the command; ``status``: its exit status; ``line``: the first line it must print on stderr
    (``{tmp}``, ``{coco}``, ... are the fields of :class:`Given`); ``how``: ``main`` in this process,
    ``process`` (``python main.py``, for what logging prints)."""

    argv: Callable[[Given], list[str]]
    status: int
    line: str
    how: str = "main"
    check: Callable[[Given], None] | None = None  # what must be on disk afterwards
    needs: Callable[[], None] | None = None  # skips the case where it cannot happen


def visualized(given: Given) -> None:
    record = json.loads((given.tmp / "out" / "gradient_sampling.json").read_text())
    assert [query["pixel"] for query in record["encoder"]["queries"]] == [[-100.0, -100.0], [5.0, 7.0]]
    first, second = (query["query"] for query in record["encoder"]["queries"])
    assert first == 0  # the finest level's top-left cell: the nearest to (-100, -100)
    assert second != first


def only_the_readable_image_visualized(given: Given) -> None:
    assert sorted(path.name for path in (given.tmp / "out").iterdir()) == [
        "gradient_decoder_sampling.png",
        "gradient_detections.png",
        "gradient_encoder_sampling.png",
        "gradient_sampling.json",
    ]


def trained(given: Given) -> None:
    assert (given.tmp / "run" / "checkpoint.pth").is_file()


MISTAKES = {
    # item 10: the data set
    "coco_path missing": Case(
        lambda given: given.train(f"coco_path={given.tmp / 'nothing'}"),
        2,
        "error: coco_path {tmp}/nothing does not exist: give the folder holding train2017/, val2017/ and annotations/",
    ),
    "coco_path empty": Case(
        lambda given: given.train("coco_path="), 2, "error: coco_path is empty: set it to the data set's folder"
    ),
    "coco_path an empty folder": Case(
        lambda given: given.train(f"coco_path={given.tmp}"),
        2,
        "error: annotation file {tmp}/annotations/instances_train2017.json does not exist: coco_path must hold",
    ),
    "negative image width": Case(
        lambda given: train_on(given, lambda data: set_key(data["images"][0], "width", -30)),
        2,
        "error: {tmp}/data/annotations/instances_train2017.json: image id 7: 'width' must be a positive integer",
    ),
    "negative box width": Case(
        lambda given: train_on(given, lambda data: set_key(data["annotations"][0], "bbox", [2, 3, -10, 5])),
        2,
        "error: {tmp}/data/annotations/instances_train2017.json: annotation id 101: 'bbox' has a negative size",
    ),
    "NaN coordinate": Case(
        lambda given: train_on(given, lambda data: set_key(data["annotations"][0], "bbox", [2, float("nan"), 1, 5])),
        2,
        "error: {tmp}/data/annotations/instances_train2017.json: annotation id 101: 'bbox' must be 4 finite numbers",
    ),
    "unknown category": Case(
        lambda given: train_on(given, lambda data: set_key(data["annotations"][0], "category_id", 2)),
        2,
        "error: {tmp}/data/annotations/instances_train2017.json: annotation id 101: category_id 2 is not among",
    ),
    "image listed twice": Case(
        lambda given: train_on(given, lambda data: data["images"].append(dict(data["images"][0]))),
        2,
        "error: {tmp}/data/annotations/instances_train2017.json: image id 7: the image id appears twice",
    ),
    "annotation of a missing image": Case(
        lambda given: train_on(given, lambda data: set_key(data["annotations"][0], "image_id", 99)),
        2,
        "error: {tmp}/data/annotations/instances_train2017.json: annotation id 101: image_id 99 is not among",
    ),
    "invalid JSON": Case(
        lambda given: train_on_annotation_bytes(given, b'{"images": [}'),
        2,
        "error: {tmp}/data/annotations/instances_train2017.json: not valid JSON: Expecting value: line 1",
    ),
    "not UTF-8": Case(
        lambda given: train_on_annotation_bytes(given, '{"images": [], "note": "café"}'.encode("latin-1")),
        2,
        "error: {tmp}/data/annotations/instances_train2017.json: not UTF-8 text (byte 0xe9 at offset 27); "
        "save the file as UTF-8 JSON",
    ),
    # item 15, through main.py too
    "file_name outside the image folder": Case(
        lambda given: train_on(given, lambda data: set_key(data["images"][2], "file_name", "../../../../etc/hostname")),
        2,
        "error: {tmp}/data/annotations/instances_train2017.json: image id 9: 'file_name' '../../../../etc/hostname' "
        "points outside the image folder",
    ),
    # item 10: the config and the machine
    "device=cuda without a GPU": Case(
        lambda given: given.train("device=cuda"),
        2,
        "error: device='cuda' but CUDA is not available here; set device=cpu (e.g. --opts device=cpu)",
        needs=no_cuda,
    ),
    "unknown backbone": Case(
        lambda given: given.train("backbone=resnet5000"),
        2,
        "error: backbone 'resnet5000' is neither one of resnet18, resnet34, resnet50, resnet101 nor a timm model name",
    ),
    "seed out of range": Case(
        lambda given: given.train("seed=18446744073709551616"),
        2,
        "error: config key 'seed' in --opts seed=18446744073709551616 must be in [0, 4294967295]",
    ),
    "seed negative": Case(
        lambda given: given.train("seed=-1"), 2, "error: config key 'seed' in --opts seed=-1 must be in [0, 4294967295]"
    ),
    # item 10: where the commands write
    "read-only output_dir": Case(
        lambda given: given.train(f"output_dir={given.read_only / 'run'}"),
        2,
        "error: output_dir {read_only}/run cannot be written: ",
    ),
    "output_dir a file": Case(
        lambda given: given.train(f"output_dir={a_file(given.tmp / 'run.txt')}"),
        2,
        "error: output_dir {tmp}/run.txt is a file, not a folder: give a folder (it is created if missing)",
    ),
    "export --out read-only": Case(
        lambda given: [*given.with_checkpoint("export"), "--out", str(given.read_only / "model.onnx")],
        2,
        "error: --out {read_only}/model.onnx cannot be written: ",
    ),
    "export --out onto a folder": Case(
        lambda given: [*given.with_checkpoint("export"), "--out", str(given.tmp)],
        2,
        "error: --out {tmp} is a folder: give the file to write, e.g. {tmp}/model.onnx",
    ),
    "export --out under a file": Case(
        lambda given: [*given.with_checkpoint("export"), "--out", str(a_file(given.tmp / "notes.txt") / "model.onnx")],
        2,
        "error: --out {tmp}/notes.txt/model.onnx lies under {tmp}/notes.txt, which is a file, not a folder",
    ),
    "predict --out a file": Case(
        lambda given: [
            *given.with_checkpoint("predict"),
            *["--image", str(given.image), "--out", str(a_file(given.tmp / "predictions.json"))],
        ],
        2,
        "error: --out {tmp}/predictions.json is a file, not a folder",
    ),
    # item 10: visualize's flags
    "visualize --layer 99": Case(
        lambda given: given.visualize("--layer", "99"),
        2,
        "error: layer 99 does not exist: the encoder has 1 layer(s), so layer must be in [-1, 0]",
    ),
    "a layer past the encoder's": Case(
        lambda given: given.visualize("--layer", "1", opts=("dec_layers=2",)),
        2,
        "error: layer 1 does not exist: the encoder has 1 layer(s), so layer must be in [-1, 0]",
    ),
    "visualize --query-level 9": Case(
        lambda given: given.visualize("--query-level", "9"),
        2,
        "error: query level 9 does not exist: the model has 4 feature level(s), so the query level must be in [0, 3]",
    ),
    # item 10: files that are not what they should be
    "checkpoint whose model is a list": Case(
        lambda given: given.with_checkpoint("eval", checkpoint=checkpoint_holding(given, [1, 2, 3])),
        2,
        "error: checkpoint {tmp}/odd.pth: its 'model' entry is a list, not a state dict",
    ),
    "checkpoint whose model holds strings": Case(
        lambda given: given.with_checkpoint("eval", checkpoint=checkpoint_holding(given, {"weight": "zeros"})),
        2,
        "error: checkpoint {tmp}/odd.pth: its 'model' entry is a mapping holding other values, not a state dict",
    ),
    "convert a truncated safetensors file": Case(
        lambda given: hf_folder(given, b"{}", truncated_safetensors()),
        2,
        "error: {tmp}/hf/model.safetensors is not a readable safetensors file (",
    ),
    "convert with an invalid config.json": Case(
        lambda given: hf_folder(given, b'{"d_model": 256,'),
        2,
        "error: {tmp}/hf/config.json is not valid JSON (",
    ),
    "convert with a config.json holding a list": Case(
        lambda given: hf_folder(given, b"[1, 2]"),
        2,
        "error: {tmp}/hf/config.json holds a JSON list, not an object of DeformableDetrConfig's fields",
    ),
    # item 11: a point outside the image is drawn with its nearest cell
    "visualize --points -100,-100": Case(
        lambda given: given.visualize("--points", "-100,-100", "5,7"), 0, "", check=visualized
    ),
    # item 12: an unreadable image among several is skipped, as predict does
    "visualize an unreadable image among others": Case(
        lambda given: given.visualize(images=(a_file(given.tmp / "broken.png"), given.image)),
        1,
        "error: 1 of 2 image(s) could not be visualized ({tmp}/broken.png: cannot identify image file",
        check=only_the_readable_image_visualized,
    ),
    # item 13: boxes that all lie outside their images: trained, with a warning counting them
    "every box outside its image": Case(
        lambda given: train_on(
            given,
            lambda data: [annotation.update(bbox=[1000, 1000, 5, 5], iscrowd=0) for annotation in data["annotations"]],
        ),
        0,
        "WARNING: {tmp}/data/annotations/instances_train2017.json: 6 of its 6 non-crowd boxes lie outside their image "
        "or have no area inside it and are not used, leaving 2 image(s) without boxes",
        how="process",
        check=trained,
    ),
}


@pytest.fixture(scope="module")
def read_only(tmp_path_factory) -> Iterator[Path | None]:
    with read_only_folder(tmp_path_factory.mktemp("read_only")) as folder:
        yield folder


@pytest.fixture(scope="module")
def shared(tmp_path_factory, read_only) -> dict:
    """The good data set, a checkpoint of the TINY model and a 64-pixel image, made once."""
    folder = tmp_path_factory.mktemp("shared")
    coco = folder / "coco"
    write_coco(coco, image_set="train")
    write_coco(coco, image_set="val")
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_training_config(coco, folder / "unused"))
    checkpoint = save_checkpoint(
        {"model": model.state_dict(), "epoch": 0, "category_names": {1: "cat", 3: "dog"}}, folder / "checkpoint.pth"
    )
    y, x = np.mgrid[0:64, 0:64]
    image = folder / "gradient.png"
    Image.fromarray(np.stack([x * 4, y * 4, 255 - x * 4], -1).astype(np.uint8)).save(image)
    return {"coco": coco, "checkpoint": checkpoint, "image": image, "read_only": read_only}


def run_main_py(argv: list[str], timeout: float = 600) -> tuple[int, str]:
    completed = subprocess.run(
        [sys.executable, "main.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    return completed.returncode, completed.stderr


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_mistake_ends_in_one_error_line_without_a_traceback(name, tmp_path, shared, capsys):
    case = MISTAKES[name]
    given = Given(tmp=tmp_path, **shared)
    if "read_only" in case.line and given.read_only is None:
        pytest.skip("no read-only folder can be made here (neither a read-only mount nor permissions)")
    if case.needs is not None:
        case.needs()
    argv = case.argv(given)
    if case.how == "process":
        status, error = run_main_py(argv)
    else:
        status = main.main(argv)
        error = capsys.readouterr().err
    assert status == case.status, error
    assert "Traceback" not in error
    expected = case.line.format(**vars(given))
    errors = [line for line in error.splitlines() if line.startswith("error:")]
    if status == 0:
        assert errors == []
        assert not expected or any(line.startswith(expected) for line in error.splitlines()), error
    else:
        assert len(errors) == 1 and errors[0].startswith(expected), error
    if case.check is not None:
        case.check(given)


def test_ctrl_c_in_training_ends_in_one_line_naming_the_checkpoint_to_resume_from(tmp_path, shared):
    given = Given(tmp=tmp_path, **shared)
    argv = given.train("epochs=20", "eval_every=0")
    # -u: each line reaches the pipe when printed (block-buffered, "epoch 1 [" could arrive at the end of the run).
    # SIGINT back to its default in the child: a shell without job control starts a background job (`make test &`,
    # a CI runner's) with SIGINT ignored, children inherit that, and Python then never raises KeyboardInterrupt.
    process = subprocess.Popen(
        [sys.executable, "-u", "main.py", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        for line in process.stdout:
            if line.startswith("epoch 1 ["):  # a step of epoch 1 is done; epoch 0 is checkpointed
                process.send_signal(signal.SIGINT)
                break
        _, error = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 130, error
    assert "Traceback" not in error
    checkpoint = tmp_path / "run" / "checkpoint.pth"
    assert [line for line in error.splitlines() if not line.startswith("WARNING: ")] == [
        f"error: interrupted in epoch 1; resume with --opts resume={checkpoint}"
    ]


def test_a_diverging_run_stops_with_the_documented_message_not_in_the_matching(tmp_path, capsys):
    """lr=1e5: the predictions become NaN in epoch 1; scipy's matching used to end the run with a traceback."""
    coco = make_shapes(tmp_path / "shapes")
    run = tmp_path / "run"
    opts = tiny_overrides(coco, run, "lr=1e5", "epochs=3")
    assert main.main(["train", "--config", str(CONFIG), "--opts", *opts]) == 1
    error = capsys.readouterr().err
    assert "Traceback" not in error
    (line,) = error.splitlines()
    assert re.fullmatch(
        r"error: epoch \d, iteration \d: the (model's predictions are|loss is) .*; training stopped before the .*"
        rf"; the last good checkpoint is {re.escape(str(run / 'checkpoint.pth'))}\. Lower lr, set clip_max_norm, "
        r"or turn amp off\.",
        line,
    ), line


def test_ctrl_c_outside_training_is_one_line_and_status_130(monkeypatch, capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(main, "evaluate_checkpoint", interrupted)
    assert main.main(["eval", "--config", str(CONFIG), "--opts", *TINY]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"
