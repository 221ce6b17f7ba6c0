"""The test suite itself: self-contained in the repository, and its long tests marked ``slow``."""

from __future__ import annotations

import ast
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


# What each product package may import of the project: data flows main.py -> engine -> datasets / models -> ops ->
# util; benchmarks/ and tools/ stand beside the product and nothing in it imports them.
ALLOWED_IMPORTS = {
    "util": {"util"},
    "ops": {"ops", "util"},
    "models": {"models", "ops", "util"},
    "datasets": {"datasets", "util"},
    "engine": {"engine", "models", "datasets", "ops", "util"},
}
PROJECT_PACKAGES = {*ALLOWED_IMPORTS, "main", "benchmarks", "tools", "tests"}


def project_imports(path: Path) -> set[str]:
    """The modules of this repository that the file ``path`` imports (absolute imports, any depth in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from ops import backend_cache`` imports the module ops.backend_cache, not only ops/__init__.py
            names = [
                f"{node.module}.{alias.name}"
                if (ROOT / node.module.replace(".", "/") / f"{alias.name}.py").is_file()
                else node.module
                for alias in node.names
            ]
        found.update(name for name in names if name.split(".")[0] in PROJECT_PACKAGES)
    return found


def test_each_product_package_imports_only_the_layers_below_it():
    wrong = [
        f"{path.relative_to(ROOT)} imports {name}"
        for package, allowed in ALLOWED_IMPORTS.items()
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in sorted(project_imports(path))
        if name.split(".")[0] not in allowed
    ]
    assert not wrong, wrong


def test_main_imports_no_benchmark_or_tool():
    assert not {name for name in project_imports(ROOT / "main.py") if name.split(".")[0] in {"benchmarks", "tools"}}


def test_no_import_circle_between_product_modules():
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for package in ALLOWED_IMPORTS
        for path in (ROOT / package).rglob("*.py")
    }
    graph = {module: {name for name in project_imports(path) if name in modules} for module, path in modules.items()}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return [*trail, module, target]
            if target not in state and (circle := visit(target, [*trail, module])):
                return circle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            circle = visit(module, [])
            assert circle is None, " -> ".join(circle)


def test_the_readme_is_a_door_of_at_most_8_kb_whose_links_exist():
    readme = ROOT / "README.md"
    assert readme.stat().st_size <= 8192, f"README.md is {readme.stat().st_size} bytes"
    links = re.findall(r"\]\(([^)#]+)\)", readme.read_text(encoding="utf-8"))
    assert links and all((ROOT / link).exists() for link in links if "://" not in link), links
