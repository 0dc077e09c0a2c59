"""The docs: measured figures are rendered from their measurement files, and every relative link resolves."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PAGES = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md"), REPO / "config" / "README.md"])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


def test_rendered_blocks_match_their_measurement_files():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "render_docs.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: broken links {broken}"


RUNNABLE = re.compile(r"<!-- runnable -->\n```bash\n(.*?)\n```", re.S)
WORKFLOW_FILES = ("Snakefile", "rules", "scripts", "config", "report", "envs")


def test_getting_started_runnable_blocks_work_on_the_shipped_model(tmp_path):
    """Every block marked runnable in the getting-started page runs as written, in order, in a
    copy of the workflow (the commands a newcomer copies must work), and does what the page says."""
    import shutil

    blocks = RUNNABLE.findall((REPO / "docs" / "getting-started.md").read_text())
    assert len(blocks) >= 4, "the getting-started page lost its runnable blocks"
    checkout = tmp_path / "checkout"
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, checkout / name)
        else:
            checkout.mkdir(exist_ok=True)
            shutil.copy2(source, checkout / name)
    (checkout / ".venv").symlink_to(sys.prefix)
    outputs = []
    for block in blocks:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=checkout, capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, (f"block failed:\n{block}\n--- stdout\n{result.stdout[-3000:]}\n"
                                        f"--- stderr\n{result.stderr[-3000:]}")
        outputs.append(result.stdout + result.stderr)
    assert (checkout / "results" / "report.html").is_file()
    assert "null space of dimension" in outputs[3]
    rerun = outputs[-1]
    assert "Nothing to be done" in rerun, rerun[-2000:]
    assert re.search(r"^projection\s+\d+", rerun, re.M), rerun[-2000:]
    assert not re.search(r"^features\s+\d+", rerun, re.M), rerun[-2000:]


def test_docs_site_builds_strict(tmp_path):
    """`make docs`' build: mkdocs with warnings as errors (every nav page exists, every page is in the
    nav, every link and anchor inside docs/ resolves)."""
    result = subprocess.run([str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "--site-dir",
                             str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "getting-started" / "index.html").is_file()
