"""mkdocs hook: links from docs/ to repository files outside it (``../nullcov/statistics/store.py``) work on a
code host but not in the built site; there they become the file's name as code, so ``mkdocs build
--strict`` stays clean without hiding broken links (tests/test_docs.py resolves every link)."""

from __future__ import annotations

import posixpath
import re

LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")


def on_page_markdown(markdown, page, config, files):
    folder = posixpath.dirname(page.file.src_uri)

    def outside(match):
        target = match.group("target")
        if re.match(r"[a-z]+:", target):
            return match.group(0)
        path = posixpath.normpath(posixpath.join(folder, target))
        if not path.startswith("../"):
            return match.group(0)
        name = path.removeprefix("../")
        text = match.group("text")
        return text if name in text else f"{text} (`{name}`)"

    return LINK.sub(outside, markdown)
