"""The package's layout is its architecture: one subpackage per stage, imports only downward."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "nullcov"
#: The stages from the bottom up (nullcov/__init__.py says what each owns); "" is the top level.
STAGES = ["", "models", "statistics", "collection", "training", "report", "shapes", "proof", "workflow"]


def stage_of(module: str) -> str:
    """The stage of a dotted module name under ``nullcov``: its subpackage, or "" for a top-level module."""
    parts = module.split(".")
    assert parts[0] == "nullcov", module
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in STAGES) else ""


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every ``nullcov`` module a file imports (at the top or inside a function), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("nullcov")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nullcov"):
            for alias in node.names:  # `from nullcov.models import model` imports nullcov.models.model
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE / Path(*candidate.split(".")[1:])).with_suffix(".py").exists()
                found.append((node.lineno, candidate if is_module else node.module))
    return found


def package_modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if "builtin" not in path.parts)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_module_is_in_a_known_stage():
    stray = [str(path.relative_to(REPO)) for path in package_modules()
             if len(path.relative_to(PACKAGE).parts) > 2 or
             (len(path.relative_to(PACKAGE).parts) == 2 and path.parent.name not in STAGES)]
    assert stray == [], f"modules outside the stages {STAGES}: {stray}"


@pytest.mark.parametrize("path", package_modules(), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_imports_run_only_downward(path):
    own = STAGES.index(stage_of(module_name(path)))
    upward = [f"line {line}: {name} ({stage_of(name) or 'top level'})"
              for line, name in imported_modules(path) if STAGES.index(stage_of(name)) > own]
    assert upward == [], f"{path.relative_to(REPO)} ({STAGES[own] or 'top level'}) imports a stage above it: {upward}"


def test_every_stage_says_what_it_owns_and_may_import():
    for stage in STAGES[1:]:
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text())) or ""
        assert "May import" in doc and len(doc.splitlines()) >= 3, f"nullcov/{stage}/__init__.py: {doc!r}"


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: a lazy import of a higher stage inside a function is found."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from nullcov.proof import plan\n    from nullcov.files import atomic_path\n")
    found = imported_modules(source)
    assert found == [(2, "nullcov.proof.plan"), (3, "nullcov.files")]
    assert [stage_of(name) for _, name in found] == ["proof", ""]
