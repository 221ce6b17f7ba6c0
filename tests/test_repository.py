"""The test suite itself: self-contained in the repository, and its long tests marked ``slow``."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from tests.conftest import REFERENCE_KEYS

ROOT = Path(__file__).resolve().parents[1]
SLOW = {
    "tests/test_ops_build.py::test_cuda_kernel_compiles_with_nvcc",
    "tests/test_ops_build.py::test_compile_error_is_raised_as_kernel_build_error",
    "tests/test_distributed_torchrun.py::test_two_launchers_train_and_evaluate_each_image_once",
    "tests/test_distributed_torchrun.py::test_a_rank_that_stops_answering_ends_the_job_at_the_timeout_naming_it",
    "tests/test_main.py::test_a_resumed_run_ends_with_the_weights_of_a_run_that_never_stopped",
}


def test_the_reference_checkpoint_keys_ship_inside_the_repository():
    assert REFERENCE_KEYS.resolve().is_relative_to(ROOT) and REFERENCE_KEYS.is_file()


def test_no_test_reads_a_path_above_the_repository():
    """``Path(__file__).parents[1]`` is the repository; a higher parent is not part of a fresh clone."""
    for path in sorted((ROOT / "tests").glob("*.py")):
        depths = [int(depth) for depth in re.findall(r"parents\[(\d+)\]", path.read_text())]
        assert max(depths, default=0) <= 1, f"{path.name} reads above the repository"


def test_the_long_tests_are_marked_slow_and_still_run_by_default():
    for test_id in SLOW:
        file, name = test_id.split("::")
        test = getattr(importlib.import_module(file.removesuffix(".py").replace("/", ".")), name)
        assert "slow" in [mark.name for mark in getattr(test, "pytestmark", [])], test_id
    addopts = re.findall(r"^addopts\s*=.*$", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert not [line for line in addopts if "slow" in line], "make test must run the slow tests too"
