"""main.py end to end on a tiny shapes set: train one epoch, evaluate, resume, predict, stop on a bad loss; a run
is never overwritten by accident, its log survives a stop in the evaluation, and predict writes what it can."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine.train
import main
from engine.train import NonFiniteLossError
from tests.tiny_training import CONFIG, NUM_TRAIN, run_main, tiny_overrides
from util.checkpoint import load_checkpoint
from util.config import load_config
from util.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FILES = {"config.yaml", "checkpoint.pth", "checkpoint0000.pth", "log.txt", "detections.json", "metrics.json"}


def log_lines(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]


def test_training_writes_checkpoints_log_config_and_evaluation(first_run):
    assert TRAIN_FILES <= {path.name for path in first_run.iterdir()}
    (record,) = log_lines(first_run)
    assert record["epoch"] == 0 and record["lr"] == pytest.approx(2e-4)
    assert {"train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou", "val_AP", "val_ARl"} <= set(record)
    assert "device: cpu" in (first_run / "config.yaml").read_text()


def test_checkpoint_holds_everything_to_resume(first_run):
    checkpoint = load_checkpoint(first_run / "checkpoint.pth")
    assert {"model", "optimizer", "lr_scheduler", "scaler", "epoch", "config", "category_names"} <= set(checkpoint)
    assert checkpoint["epoch"] == 0 and checkpoint["config"]["hidden_dim"] == 32
    assert checkpoint["category_names"][1] == "circle"


def test_resume_continues_at_the_next_epoch_with_the_optimizer_state(first_run, coco_path, tmp_path, capsys):
    opts = tiny_overrides(coco_path, tmp_path, "epochs=2", f"resume={first_run / 'checkpoint.pth'}")
    assert run_main("train", opts=opts) == 0
    assert "continuing at epoch 1 of 2" in capsys.readouterr().out
    assert [record["epoch"] for record in log_lines(tmp_path)] == [1]
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pth")
    assert checkpoint["epoch"] == 1
    steps_per_epoch = NUM_TRAIN // 2
    assert all(int(state["step"]) == 2 * steps_per_epoch for state in checkpoint["optimizer"]["state"].values())


def final_weights(output_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(output_dir / "checkpoint.pth")["model"]


@pytest.mark.slow  # three trainings a case: 36-69 s at a load of 5 on 2 cores
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_run_ends_with_the_weights_of_a_run_that_never_stopped(coco_path, tmp_path, num_workers):
    # Three scales and a flip per image: enough random draws that other augmentations would change the weights.
    opts = [f"num_workers={num_workers}", "train_scales=[80,88,96]", "max_size=112"]
    first, straight, resumed = tmp_path / "first", tmp_path / "straight", tmp_path / "resumed"
    assert run_main("train", opts=tiny_overrides(coco_path, first, *opts)) == 0
    assert run_main("train", opts=tiny_overrides(coco_path, straight, *opts, "epochs=3")) == 0
    resume = f"resume={first / 'checkpoint.pth'}"
    assert run_main("train", opts=tiny_overrides(coco_path, resumed, *opts, "epochs=3", resume)) == 0
    expected, actual = final_weights(straight), final_weights(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


TIMES = ("epoch_time_s", "epoch_cpu_s")


def without_times(records: list[dict]) -> list[dict]:
    """The records without the measured times (``epoch_time_s``, ``epoch_cpu_s``), which no two runs share."""
    return [{key: value for key, value in record.items() if key not in TIMES} for record in records]


@pytest.mark.slow  # one or two trainings, one of them in a new process: 15-40 s on 2 loaded cores
@pytest.mark.parametrize("amp", ["none", "bfloat16"])
def test_the_same_seed_in_another_process_gives_the_same_weights_losses_and_ap(amp, first_run, coco_path, tmp_path):
    """docs/training.md's claim: same seed, machine, thread count and attention backend (here pytorch, the tiny
    config's) give bit-identical weights, in float32 and in bfloat16 autocast; the other process has its own
    string hashing (PYTHONHASHSEED), memory layout and oneDNN kernel cache."""
    if amp == "none":
        here = first_run  # the tiny config trains in float32
    else:
        here = tmp_path / "here"
        assert run_main("train", opts=tiny_overrides(coco_path, here, f"amp={amp}")) == 0
    there = tmp_path / "there"
    environment = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [sys.executable, "main.py", "train", "--config", str(CONFIG), "--opts"]
    command += tiny_overrides(coco_path, there, f"amp={amp}")
    subprocess.run(command, cwd=ROOT, env=environment, check=True, capture_output=True)
    expected, actual = final_weights(here), final_weights(there)
    assert expected.keys() == actual.keys()
    assert [name for name in expected if not torch.equal(expected[name], actual[name])] == []
    assert without_times(log_lines(here)) == without_times(log_lines(there))


def test_finetune_from_starts_a_new_run_from_the_weights_with_new_class_heads(first_run, coco_path, tmp_path, capsys):
    opts = tiny_overrides(coco_path, tmp_path, "num_classes=9", f"finetune_from={first_run / 'checkpoint.pth'}")
    assert run_main("train", opts=opts) == 0
    assert "class-head tensors (another num_classes) keep their initialisation" in capsys.readouterr().out
    assert [record["epoch"] for record in log_lines(tmp_path)] == [0]
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pth")
    assert checkpoint["model"]["class_embed.0.bias"].shape == (9,)
    steps_per_epoch = NUM_TRAIN // 2  # a fresh optimizer: one epoch of steps, not two
    assert all(int(state["step"]) == steps_per_epoch for state in checkpoint["optimizer"]["state"].values())


def test_resume_and_finetune_from_together_are_refused(first_run, coco_path, tmp_path, capsys):
    path = first_run / "checkpoint.pth"
    output_dir = tmp_path / "run"
    assert run_main("train", opts=tiny_overrides(coco_path, output_dir, f"resume={path}", f"finetune_from={path}")) == 2
    assert "not both" in capsys.readouterr().err
    assert not output_dir.exists()  # refused before the folder was claimed


def test_eval_of_a_checkpoint_of_another_variant_names_both(first_run, coco_path, tmp_path, capsys):
    opts = tiny_overrides(coco_path, tmp_path, "with_box_refine=true", f"resume={first_run / 'checkpoint.pth'}")
    assert run_main("eval", opts=opts) == 2
    error = capsys.readouterr().err
    assert re.search("The checkpoint: one-stage, no box refinement.*This model: one-stage, box", error)


@pytest.mark.parametrize("command", ["eval", "finetune", "resume"])
def test_a_checkpoint_replaces_the_backbone_so_imagenet_weights_are_not_fetched(
    first_run, coco_path, tmp_path, monkeypatch, command
):
    import torchvision

    def no_download(*args, **kwargs):
        raise AssertionError("ImageNet weights were fetched although the checkpoint replaces them")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", no_download)
    path = first_run / "checkpoint.pth"
    key = "finetune_from" if command == "finetune" else "resume"
    opts = tiny_overrides(coco_path, tmp_path, "pretrained_backbone=true", "epochs=2", f"{key}={path}")
    assert run_main("eval" if command == "eval" else "train", opts=opts) == 0
    with pytest.raises(RuntimeError, match="could not download"):  # without a checkpoint they are fetched
        run_main("train", opts=tiny_overrides(coco_path, tmp_path / "fresh", "pretrained_backbone=true"))


def test_resume_with_no_epoch_left_says_so(first_run, coco_path, tmp_path, capsys):
    opts = tiny_overrides(coco_path, tmp_path, "epochs=1", f"resume={first_run / 'checkpoint.pth'}")
    assert run_main("train", opts=opts) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert not (tmp_path / "log.txt").exists()


def test_eval_of_a_checkpoint_reproduces_the_training_evaluation(first_run, coco_path, tmp_path):
    opts = tiny_overrides(coco_path, tmp_path, f"resume={first_run / 'checkpoint.pth'}")
    assert run_main("eval", opts=opts) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == pytest.approx(json.loads((first_run / "metrics.json").read_text()))
    assert len(json.loads((tmp_path / "detections.json").read_text())) > 0


def test_eval_without_a_checkpoint_is_refused_without_a_traceback(coco_path, tmp_path, capsys):
    assert run_main("eval", opts=tiny_overrides(coco_path, tmp_path)) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: eval needs a checkpoint: --opts resume=PATH") and "Traceback" not in error


def predict_images(opts: list[str], images: list, out) -> int:
    return main.main(
        ["predict", "--config", str(CONFIG), "--opts", *opts, "--image", *map(str, images), "--out", str(out)]
        + ["--threshold", "0"]
    )


def test_predict_writes_json_and_drawn_images(first_run, coco_path, tmp_path):
    images = sorted((coco_path / "val2017").iterdir())[:2]
    opts = tiny_overrides(coco_path, tmp_path, f"resume={first_run / 'checkpoint.pth'}")
    assert predict_images(opts, images, tmp_path / "pred") == 0
    predictions = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert [entry["file"] for entry in predictions] == list(map(str, images))
    first = predictions[0]["detections"][0]
    assert set(first) == {"label", "name", "score", "box"} and first["name"] in {
        "circle",
        "square",
        "triangle",
        "star",
        "cross",
        "class 0",
    }
    assert len(list((tmp_path / "pred").glob("*.png"))) == 2


def test_predict_writes_the_readable_images_and_names_the_others(first_run, coco_path, tmp_path, capsys):
    good = sorted((coco_path / "val2017").iterdir())[0]
    broken, missing = tmp_path / "broken.png", tmp_path / "missing.png"
    broken.write_text("not an image")
    opts = tiny_overrides(coco_path, tmp_path, f"resume={first_run / 'checkpoint.pth'}")
    assert predict_images(opts, [broken, good, missing], tmp_path / "pred") == 1
    error = capsys.readouterr().err
    assert error.startswith("error: 2 of 3 image(s) could not be predicted (")
    assert f"{broken}: cannot identify image file" in error and f"{missing}: [Errno 2] No such file" in error
    predictions = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert [entry["file"] for entry in predictions] == [str(good)]
    assert [path.name for path in (tmp_path / "pred").glob("*.png")] == [f"001_{good.stem}.png"]


def test_training_into_a_finished_run_is_refused_and_leaves_it_as_it_was(first_run, coco_path, tmp_path, capsys):
    output_dir = tmp_path / "run"
    shutil.copytree(first_run, output_dir)
    before = {path.name: path.read_bytes() for path in output_dir.iterdir()}
    assert run_main("train", opts=tiny_overrides(coco_path, output_dir)) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: output_dir {output_dir} already holds a training run")
    assert f"resume={output_dir / 'checkpoint.pth'}" in error and "overwrite=true" in error
    assert {path.name: path.read_bytes() for path in output_dir.iterdir()} == before


def test_overwrite_replaces_the_earlier_run(first_run, coco_path, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(first_run, output_dir)
    shutil.copy(output_dir / "checkpoint.pth", output_dir / "checkpoint0004.pth")  # the earlier run was longer
    assert run_main("train", opts=tiny_overrides(coco_path, output_dir, "overwrite=true")) == 0
    assert [record["epoch"] for record in log_lines(output_dir)] == [0]
    assert not (output_dir / "checkpoint0004.pth").exists()


def test_a_run_stopped_in_its_evaluation_completes_its_log_when_resumed(first_run, coco_path, tmp_path, monkeypatch):
    output_dir = tmp_path / "run"
    shutil.copytree(first_run, output_dir)
    checkpoint = output_dir / "checkpoint.pth"

    def stop(*args, **kwargs):
        raise RuntimeError("stopped during the evaluation")

    with monkeypatch.context() as patched:
        patched.setattr(engine.train, "evaluate", stop)
        with pytest.raises(RuntimeError, match="stopped during the evaluation"):
            run_main("train", opts=tiny_overrides(coco_path, output_dir, "epochs=2", f"resume={checkpoint}"))
    assert load_checkpoint(checkpoint)["epoch"] == 1  # epoch 1's training is kept
    assert [record["epoch"] for record in log_lines(output_dir)] == [0]
    assert run_main("train", opts=tiny_overrides(coco_path, output_dir, "epochs=3", f"resume={checkpoint}")) == 0
    records = log_lines(output_dir)
    assert [record["epoch"] for record in records] == [0, 1, 2]
    assert all({"train_loss", "lr", "val_AP", "epoch_time_s", "epoch_cpu_s"} <= set(record) for record in records)


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(first_run, coco_path, tmp_path, monkeypatch, capsys):
    output_dir = tmp_path / "run"
    shutil.copytree(first_run, output_dir)

    def diverge(*args, **kwargs):
        raise NonFiniteLossError("epoch 1, iteration 0: the loss is nan")

    monkeypatch.setattr(engine.train, "train_one_epoch", diverge)
    opts = tiny_overrides(coco_path, output_dir, "epochs=2", f"resume={output_dir / 'checkpoint.pth'}")
    assert run_main("train", opts=opts) == 1
    error = capsys.readouterr().err
    assert "the loss is nan" in error and f"the last good checkpoint is {output_dir / 'checkpoint.pth'}" in error
    assert load_checkpoint(output_dir / "checkpoint.pth")["epoch"] == 0


def test_unknown_override_is_printed_with_a_close_key_and_exit_status_2(capsys):
    assert run_main("train", opts=["lr_dorp=3"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: unknown config key 'lr_dorp' in --opts lr_dorp=3; did you mean 'lr_drop'?")
    assert "Traceback" not in error


def test_yaml_syntax_error_is_printed_with_the_file_and_exit_status_2(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: [1e-4\n")
    assert main.main(["train", "--config", str(broken)]) == 2
    assert f"error: {broken} is not valid YAML: line" in capsys.readouterr().err


@pytest.mark.parametrize("override", ["lr=-1", "epochs=-1", "epochs=0", "batch_size=0"])
def test_out_of_range_value_exits_2_before_anything_is_built(override, monkeypatch, capsys):
    def must_not_run(cfg):
        raise AssertionError("training started with an invalid config")

    monkeypatch.setattr(main, "train", must_not_run)
    assert run_main("train", opts=[override]) == 2
    key = override.partition("=")[0]
    assert f"error: config key '{key}' in --opts {override} must be >= " in capsys.readouterr().err


# Config mistakes, each one error line and exit status 2 before anything is built: (files written into a
# folder, the first one given as --config, or None for the published config; --opts; the message, {dir}: the folder).
CONFIG_MISTAKES = {
    "infinite lr": (None, ["lr=1e400"], "config key 'lr' in --opts lr=1e400 must be a finite number, got inf"),
    "nan weight_decay": (
        None,
        ["weight_decay=.nan"],
        "config key 'weight_decay' in --opts weight_decay=.nan must be a finite number, got nan",
    ),
    "nan in a file": (
        {"run.yaml": "clip_max_norm: .nan\n"},
        [],
        "config key 'clip_max_norm' in {dir}/run.yaml must be a finite number, got nan",
    ),
    "key twice": (
        {"run.yaml": "lr: 1.0e-4\nepochs: 3\nlr: 2.0e-4\n"},
        [],
        "{dir}/run.yaml is not valid YAML: line 3, column 1: key 'lr' stated twice (first on line 1); keep one",
    ),
    "base cycle": (
        {"run.yaml": "_base_: base.yaml\n", "base.yaml": "_base_: run.yaml\n"},
        ["epochs=1"],
        "{dir}/base.yaml: its _base_ chain comes back to a file of its own "
        "({dir}/run.yaml -> {dir}/base.yaml -> {dir}/run.yaml); remove one of these _base_ lines",
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIG_MISTAKES))
def test_a_config_mistake_is_one_error_line_and_exit_status_2(case, tmp_path, monkeypatch, capsys):
    files, opts, message = CONFIG_MISTAKES[case]
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text)
    config = tmp_path / next(iter(files)) if files else CONFIG

    def must_not_run(cfg):
        raise AssertionError("training started with an invalid config")

    monkeypatch.setattr(main, "train", must_not_run)
    assert main.main(["train", "--config", str(config), "--opts", *opts]) == 2
    assert capsys.readouterr().err == f"error: {message.format(dir=tmp_path)}\n"


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main.main(["eval", "--config", str(tmp_path / "nothing.yaml")]) == 2
    assert "nothing.yaml does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "points",
    [
        ["--points", "-100,-100", "5,7.5"],
        ["--points=-100,-100", "--points=5,7.5"],
        ["--points", "-100,-100", "--points", "5,7.5"],
    ],
)
def test_visualize_takes_points_with_negative_coordinates(points, monkeypatch):
    seen = {}

    def record(cfg, images, out_dir, threshold, top_k, points, layer, *rest):
        seen.update(images=images, points=points, layer=layer)

    monkeypatch.setattr(main, "visualize", record)
    assert main.main(["visualize", "--image", "a.png", *points, "--layer", "1"]) == 0
    assert seen == {"images": ["a.png"], "points": [(-100.0, -100.0), (5.0, 7.5)], "layer": 1}


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--image", "a.png"],
        ["eval", "--threshold", "0.3"],
        ["predict", "--image", "a.png", "--points", "1,2"],
        ["predict", "--config", "c.yaml"],  # no --image
        ["predict", "--image", "a.png", "--threshold", "1.5"],
        ["visualize", "--image", "a.png", "--top-k", "0"],
        ["visualize", "--image", "a.png", "--points", "1;2"],
    ],
)
def test_each_command_takes_only_its_own_valid_flags(argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        main.main(argv)
    assert stopped.value.code == 2
    assert "error:" in capsys.readouterr().err


def readme_commands() -> list[list[str]]:
    """The arguments of every ``main.py`` command in README.md's bash blocks, without the optional ``[...]``."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.DOTALL)
    commands = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        if "main.py " in line:
            arguments = line.split("main.py ", 1)[1].split("#")[0]
            commands.append(shlex.split(re.sub(r"\[[^]]*\]", "", arguments)))
    return commands


def test_the_readme_commands_parse_and_their_configs_load():
    commands = readme_commands()
    assert {arguments[0] for arguments in commands} == {"train", "eval", "predict", "visualize", "export", "convert"}
    for arguments in commands:
        args = main.build_parser().parse_args(main.glue_point_values(arguments))
        config = Path(__file__).resolve().parents[1] / args.config if args.config else None
        load_config(config, overrides=args.opts)


def test_a_user_error_from_a_data_loader_worker_is_shown_without_the_workers_traceback():
    from torch.utils.data import DataLoader, Dataset

    class Unreadable(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            raise UserError("cannot read image a.png: the file does not exist")

    with pytest.raises(UserError) as caught:
        next(iter(DataLoader(Unreadable(), num_workers=1)))
    assert "Traceback" in str(caught.value)
    assert main.user_message(caught.value) == "cannot read image a.png: the file does not exist"


def test_eval_of_a_missing_checkpoint_is_an_error_without_a_traceback(tmp_path, capsys):
    missing = tmp_path / "nothing.pth"
    assert main.main(["eval", "--config", "configs/demo_shapes.yaml", "--opts", f"resume={missing}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: checkpoint {missing} does not exist") and "Traceback" not in error
