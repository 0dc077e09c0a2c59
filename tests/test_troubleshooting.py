"""docs/troubleshooting.md and the error messages that point to it (``nullcov.docs.see``).

Every anchor passed to ``see`` in the package, the rules and the scripts is an entry (``###``
heading) of the page; every entry is pointed at by an error site or names the test that produces
its message, and every test the page names exists. The plan and the run summary end naming the
page that explains them. Source text and two small calls only: no workflow runs.
"""

import csv
import re

import pytest

from nullcov.docs import OUTPUTS, PLANNING, TROUBLESHOOTING, see

from conftest import REPO

PAGE = REPO / TROUBLESHOOTING
SOURCES = sorted([*(REPO / "nullcov").rglob("*.py"), *(REPO / "rules").glob("*.smk"), *(REPO / "scripts").glob("*.py"),
                  REPO / "Snakefile"])
CALL = re.compile(r"(?<!def )\bsee\(")
LITERAL = re.compile(r"""(?<!def )\bsee\(\s*["']([^"'{}]+)["']\s*\)""")
NAMED_TEST = re.compile(r"(tests/(?:\w+/)?test_\w+\.py)::(test_\w+)")
PARTS = ("**What you see**", "**What it means**", "**What to do**")


def _anchor(title: str) -> str:
    """GitHub's heading anchor (as tests/test_docs.py): lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title.strip().lower()))


def _headings() -> list[tuple[int, str, list[str]]]:
    """(level, anchor, body lines) of every heading of the page, fenced code skipped."""
    headings, fenced = [], False
    for line in PAGE.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            headings.append((len(line) - len(line.lstrip("#")), _anchor(line.lstrip("#")), []))
            continue
        if headings:
            headings[-1][2].append(line)
    return headings


def _entries() -> dict[str, str]:
    return {anchor: "\n".join(body) for level, anchor, body in _headings() if level == 3}


def _pointers() -> dict[str, list[str]]:
    """anchor -> the source files whose messages point to it."""
    found: dict[str, list[str]] = {}
    for path in SOURCES:
        for anchor in LITERAL.findall(path.read_text()):
            found.setdefault(anchor, []).append(str(path.relative_to(REPO)))
    return found


def test_every_call_of_see_passes_a_literal_anchor():
    """Anchors are found by reading the source, so each must be written out at its site."""
    computed = []
    for path in SOURCES:
        text = path.read_text()
        if len(CALL.findall(text)) != len(LITERAL.findall(text)):
            computed.append(str(path.relative_to(REPO)))
    assert not computed, f"see() with an anchor that is not a string literal in {computed}"
    assert _pointers(), "no error message points to the troubleshooting page"


def test_every_pointer_names_an_entry_of_the_page():
    entries = _entries()
    missing = {anchor: files for anchor, files in _pointers().items() if anchor not in entries}
    assert not missing, f"{TROUBLESHOOTING} has no entry (### heading) for {missing}"


def test_every_entry_is_pointed_at_or_names_its_test():
    pointers = _pointers()
    orphans = [anchor for anchor, body in _entries().items()
               if anchor not in pointers and not NAMED_TEST.search(body)]
    assert not orphans, f"entries no error message points to and no test produces: {orphans}"


def test_entries_are_unique_and_say_what_you_see_what_it_means_and_what_to_do():
    anchors = [anchor for _, anchor, _ in _headings()]
    repeated = sorted({anchor for anchor in anchors if anchors.count(anchor) > 1})
    assert len(anchors) == len(set(anchors)), f"repeated headings: {repeated}"
    incomplete = {anchor: [part for part in PARTS if part not in body] for anchor, body in _entries().items()}
    assert not {anchor: parts for anchor, parts in incomplete.items() if parts}


def test_the_tests_the_page_names_exist():
    unknown = []
    for file, name in set(NAMED_TEST.findall(PAGE.read_text())):
        path = REPO / file
        if not path.is_file() or not re.search(rf"^def {name}\(", path.read_text(), re.MULTILINE):
            unknown.append(f"{file}::{name}")
    assert not unknown, f"{TROUBLESHOOTING} names tests that do not exist: {sorted(unknown)}"


def test_a_message_ends_with_its_pointer(tmp_path):
    from nullcov.prompts import PromptFileError, read_prompts

    assert see("prompt-file-does-not-exist") == f" (see {TROUBLESHOOTING}#prompt-file-does-not-exist)"
    with pytest.raises(PromptFileError) as info:
        read_prompts(tmp_path / "nope.txt")
    assert str(info.value).endswith(see("prompt-file-does-not-exist"))


def test_a_merge_keeps_the_pointer_last_after_its_regenerate_hint(tmp_path):
    from nullcov.statistics.merge import _with_hint
    from nullcov.statistics.store import CORRUPTED, StatisticsFileError

    error = _with_hint(StatisticsFileError(tmp_path / "shard_0001" / "step.h5", "no provenance attribute", CORRUPTED))
    assert str(error).endswith(f"no provenance attribute; regenerate that shard with: snakemake --cores all --force "
                               f"{tmp_path / 'shard_0001'}{CORRUPTED}")


def test_plan_and_summary_end_naming_the_page_that_explains_them(tmp_path):
    from nullcov.report.run_summary import write_summary
    from nullcov.workflow.plan import format_plan

    plan = {"model": "builtin:tiny", "prompts": 8, "shards": 1, "validation_prompts": 0, "steps": 3, "layers": 7,
            "step_keys": 14, "jobs": {"features (GPU)": 1}, "bytes": {"shard scratch": 1},
            "memory_mb": {"features": 2000},
            "feature_chunks": {"unchunked_mem_mb": 2000, "steps_per_chunk": 3, "chunks": 1, "unet_calls_per_batch": 3},
            "weights": 1, "gpu_hours": 0.01, "throughput": 10.0, "projection_cpu_hours": 0.1,
            "eigh_seconds_at_3072": 10.0}
    assert format_plan(plan).splitlines()[-1].endswith(PLANNING)
    write_summary([("model", "model", "builtin:tiny")], tmp_path / "summary.tsv", tmp_path / "summary.html")
    with open(tmp_path / "summary.tsv", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    assert rows[0] == ["section", "item", "value"] and rows[1] == ["model", "model", "builtin:tiny"]
    assert rows[-1][2].endswith(OUTPUTS)
    assert OUTPUTS in (tmp_path / "summary.html").read_text()
