"""Two torchrun launchers on one machine (two "nodes" of one process each, rendezvous on 127.0.0.1, gloo):
one epoch of training and an evaluation whose detections count every validation image exactly once, although
the sampler gives one image to both processes. And a rank that stops answering: the job ends at the collective
timeout with a message naming it."""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from datasets.shapes import CATEGORY_NAMES
from tests.tiny_training import CONFIG, NUM_VAL, make_shapes, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow  # 14-68 s: two launchers, each importing torch and training
def test_two_launchers_train_and_evaluate_each_image_once(tmp_path):
    coco_path, output_dir = make_shapes(tmp_path / "shapes"), tmp_path / "out"
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{free_port()}",
        "--rdzv_id=test",
        "main.py",
        "train",
        "--config",
        str(CONFIG),
        "--opts",
        *tiny_overrides(coco_path, output_dir),
    ]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [
        subprocess.Popen(
            launcher, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=TIMEOUT_S)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n----\n".join(outputs)
    assert "2 process(es)" in "".join(outputs)
    (record,) = [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]
    assert record["epoch"] == 0 and "val_AP" in record
    per_image = collections.Counter(
        result["image_id"] for result in json.loads((output_dir / "detections.json").read_text())
    )
    # top 100 of 10 queries x 6 classes, less label 0 which is no category: 50 per image, each image once
    assert per_image == {image_id: 10 * len(CATEGORY_NAMES) for image_id in range(1, NUM_VAL + 1)}
    assert (output_dir / "metrics.json").is_file() and (output_dir / "checkpoint.pth").is_file()


@pytest.mark.slow  # 25 s at a load of 2-3: two launchers and a 15 s timeout
def test_a_rank_that_stops_answering_ends_the_job_at_the_timeout_naming_it(tmp_path):
    coco_path, output_dir = make_shapes(tmp_path / "shapes"), tmp_path / "out"
    script = tmp_path / "rank_1_hangs.py"
    script.write_text(
        textwrap.dedent(f"""
            import os, sys, time
            sys.path.insert(0, {str(ROOT)!r})
            import engine.train, main
            if os.environ["RANK"] == "1":  # stops answering before its first gradient all-reduce
                engine.train.train_one_epoch = lambda *args, **kwargs: time.sleep(3600)
            sys.exit(main.main(sys.argv[1:]))
        """)
    )
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    opts = tiny_overrides(coco_path, output_dir, "dist_timeout_minutes=0.25")
    job = subprocess.Popen(
        [*launcher, "train", "--config", str(CONFIG), "--opts", *opts],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output = job.communicate(timeout=TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        raise AssertionError(f"the job still waited after {TIMEOUT_S} s: {job.communicate()[0]}") from None
    assert job.returncode != 0
    expected = "error: rank 0 of 2 waited 0.25 minute(s) (dist_timeout_minutes) in a collective and rank 1 did not "
    assert expected in output, output
