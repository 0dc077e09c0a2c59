"""The module, tool and test tables of docs/architecture.md, generated from the files' own docstrings.

A render block of ``tools/render_docs.py`` (``<!-- render: modules -->``), checked by the test suite
like the others, so a new file appears in the table by existing: every Python file under
``nullcov/`` (stage by stage, in the import order ``tests/test_architecture.py`` checks), ``tools/``
and ``tests/`` is listed with the first paragraph of its docstring; a file without a docstring is an
error naming it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "nullcov"
#: The stages from the bottom up; "" is the top level (the same order as tests/test_architecture.py).
STAGES = ("", "models", "statistics", "collection", "training", "report", "shapes", "proof", "workflow")
MAKE_TARGET = re.compile(r"^([\w-]+):.*\n((?:\t.*\n)+)", re.M)


def docstring(path: Path) -> str:
    """The docstring of a Python file; a missing one is an error naming the file."""
    text = ast.get_docstring(ast.parse(path.read_text()))
    if not text:
        raise ValueError(f"{path.relative_to(REPO)} has no docstring: say what it owns in its first paragraph")
    return text


def first_paragraph(text: str) -> str:
    """The first paragraph of a docstring, on one line, with ``|`` escaped for a Markdown table."""
    paragraph = text.strip().split("\n\n")[0]
    return _markdown(" ".join(line.strip() for line in paragraph.splitlines())).replace("|", "\\|")


def _markdown(text: str) -> str:
    """reStructuredText's roles (``:mod:`x```) and double backticks as Markdown code."""
    return re.sub(r"``([^`]+)``", r"`\1`", re.sub(r":\w+:`~?\.?([^`]+)`", r"`\1`", text))


def _link(path: Path) -> str:
    relative = path.relative_to(REPO).as_posix()
    return f"[`{path.name}`](../{relative})"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def _modules(folder: Path) -> list[Path]:
    return sorted(path for path in folder.glob("*.py") if path.name != "__init__.py")


def package_section() -> str:
    """One part per stage: what the stage owns and may import (its ``__init__`` docstring), then its modules."""
    parts = []
    for stage in STAGES:
        folder = PACKAGE / stage if stage else PACKAGE
        init = docstring(folder / "__init__.py")
        title = f"`nullcov/{stage}/`" if stage else "`nullcov/` (top level)"
        intro = ("\n\n".join(_markdown(paragraph.replace("\n", " ")) for paragraph in init.strip().split("\n\n"))
                 if stage else "The modules every stage uses; the stages follow from the bottom up.")
        rows = [(_link(path), first_paragraph(docstring(path))) for path in _modules(folder)]
        parts.append(f"#### {title}\n\n{intro}\n\n" + _table(("module", "owns"), rows))
    return "\n".join(parts)


def _make_targets() -> dict[str, list[str]]:
    """tool file name -> the make targets whose recipe runs it."""
    targets: dict[str, list[str]] = {}
    for match in MAKE_TARGET.finditer((REPO / "Makefile").read_text()):
        for name in re.findall(r"tools/(\w+\.py)", match.group(2)):
            targets.setdefault(name, []).append(f"`make {match.group(1)}`")
    return targets


def _importers(tools: list[Path]) -> dict[str, list[str]]:
    """tool module name -> the tools that import it."""
    names = {path.stem for path in tools}
    importers: dict[str, list[str]] = {}
    for path in tools:
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                       else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for module in modules:
                if module in names and module != path.stem:
                    importers.setdefault(module, []).append(f"`{path.name}`")
    return importers


def tools_section() -> str:
    """Every tool, what it does and what runs it (a make target, or the tools that import it)."""
    tools = _modules(REPO / "tools")
    targets, importers = _make_targets(), _importers(tools)
    rows = []
    for path in tools:
        runs = targets.get(path.name) or [f"through {name}" for name in sorted(set(importers.get(path.stem, [])))]
        rows.append((_link(path), first_paragraph(docstring(path)), ", ".join(runs) or "by hand"))
    return _table(("tool", "what it does", "run by"), rows)


def tests_section() -> str:
    """Every test file and helper, folder by folder (the folders mirror the package's stages)."""
    tests = REPO / "tests"
    files = sorted(tests.rglob("*.py"), key=lambda path: (path.parent != tests, path.relative_to(tests).as_posix()))
    rows = [(_link(path) if path.parent == tests else f"[`{path.parent.name}/{path.name}`]"
             f"(../{path.relative_to(REPO).as_posix()})", first_paragraph(docstring(path))) for path in files]
    return _table(("file", "what it checks"), rows)


def modules() -> str:
    """The whole block: the package stage by stage, the tools, the tests."""
    return (f"### `nullcov/`\n\n{package_section()}\n### `tools/`\n\n{tools_section()}\n"
            f"### `tests/`\n\n{tests_section()}")
