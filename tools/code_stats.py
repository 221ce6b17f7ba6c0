"""Size of the code, per top-level package: lines of Python, the largest file and the largest function.

    python -m tools.code_stats [ROOT]

Prints a Markdown table (lines counted as in ``wc -l``; tests apart) and the README's size in bytes.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SOURCE_SUFFIXES = (".py", ".cpp", ".cu", ".h")


def functions(path: Path) -> list[tuple[str, int]]:
    """(qualified name, lines) of every function and method in the Python file ``path``."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((f"{prefix}{child.name}", child.end_lineno - child.lineno + 1))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text(encoding="utf-8")), "")
    return found


def package_of(path: Path, root: Path) -> str:
    relative = path.relative_to(root)
    return relative.parts[0] if len(relative.parts) > 1 else relative.name


def main(root: Path) -> None:
    files = [
        path
        for path in sorted(root.rglob("*"))
        if path.suffix in SOURCE_SUFFIXES and path.is_file() and not {".git", "data", "outputs"} & set(path.parts)
    ]
    rows: dict[str, list[Path]] = {}
    for path in files:
        rows.setdefault(package_of(path, root), []).append(path)
    print("| package | files | lines | largest file | largest function |")
    print("|---|---:|---:|---|---|")
    for package, paths in sorted(rows.items()):
        lines = {path: len(path.read_text(encoding="utf-8").splitlines()) for path in paths}
        largest = max(paths, key=lines.get)
        python = [
            (f"{path.relative_to(root)}:{name}", size)
            for path in paths
            if path.suffix == ".py"
            for name, size in functions(path)
        ]
        function = max(python, key=lambda item: item[1], default=None)
        shown = f"{function[0]} ({function[1]})" if function else ""
        print(
            f"| {package} | {len(paths)} | {sum(lines.values())} | {largest.relative_to(root)} ({lines[largest]}) "
            f"| {shown} |"
        )
    readme = root / "README.md"
    if readme.is_file():
        print(f"\nREADME.md: {readme.stat().st_size} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve())
