"""Writing and reading plain files, one way for every module: an atomic file (:func:`atomic_path`),
an atomic folder (:func:`atomic_folder`), text (:func:`write_text`), JSON (:func:`write_json`,
:func:`read_json`) and TSV tables (:func:`write_tsv`, :func:`read_tsv`). A file that exists is always
complete: a crash or an error leaves the old file (or none), never half of a new one. No dependency
beyond the standard library, so every stage can import it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success fsync it and rename it into place.

    A crash or error leaves no file at ``path`` (the temporary one is removed on error), so a
    file that exists is always complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


@contextlib.contextmanager
def atomic_folder(path: str | Path):
    """Yield a temporary folder beside ``path``; on success make its files world-readable (0644, folders
    0755: safetensors writes 0600, mkdtemp makes 0700) and replace ``path`` with it. An error leaves
    ``path`` as it was and removes the temporary folder."""
    import shutil
    import tempfile

    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield temporary
        for member in [temporary, *temporary.rglob("*")]:
            member.chmod(0o755 if member.is_dir() else 0o644)
        if path.exists():
            shutil.rmtree(path)
        temporary.rename(path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """``text`` as UTF-8 in ``path``, written atomically (:func:`atomic_path`); returns the path."""
    path = Path(path)
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path


def write_json(path: str | Path, data, *, newline: bool = False, **json_kwargs) -> Path:
    """``data`` as ``json.dumps(data, **json_kwargs)`` (``newline``: plus a final newline), written
    atomically; returns the path. The text is made before the file is opened, so a value JSON cannot
    hold (or any error) leaves the old file as it was."""
    return write_text(path, json.dumps(data, **json_kwargs) + ("\n" if newline else ""))


def read_json(path: str | Path):
    """The JSON value in ``path``. A missing or unreadable file raises ``OSError`` (naming it); text
    that is not UTF-8 JSON raises ``ValueError`` naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not valid JSON ({err})") from None


def read_tsv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a tab-separated table with a header line, as ``{column: text}``."""
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def write_tsv(path: str | Path, rows: list[dict], columns) -> None:
    """A tab-separated table of ``rows`` under ``columns`` (floats as ``repr``), written atomically."""
    import csv

    with atomic_path(path) as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, list(columns), delimiter="\t", lineterminator="\n")
            writer.writeheader()
            for row in rows:
                writer.writerow({column: repr(row[column]) if isinstance(row[column], float) else str(row[column])
                                 for column in columns})


# What `--config key=null` gives: Snakemake passes the text after '=' as a string (an empty
# value, `key=`, is already None). YAML's null spellings and Python's None all mean null.
NULL_WORDS = frozenset({"null", "Null", "NULL", "~", "None", "none"})


