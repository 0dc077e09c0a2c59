"""Writing and reading plain files, one way for every module: an atomic file (:func:`atomic_path`),
an atomic folder (:func:`atomic_folder`), text (:func:`write_text`), JSON (:func:`write_json`,
:func:`read_json`) and TSV tables (:func:`write_tsv`, :func:`read_tsv`). A file that exists is always
complete: a crash or an error leaves the old file (or none), never half of a new one. No dependency
beyond the standard library, so every stage can import it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

from nullcov.docs import see


class DiskFullError(OSError):
    """The file system filled up while a file was written (``errno`` is ``ENOSPC``); the message names
    the file, the bytes it needs and the bytes free there."""


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` says the file system is full (``ENOSPC``; HDF5 puts it only in its message text)."""
    text = str(err)
    return isinstance(err, OSError) and (err.errno == errno.ENOSPC or "No space left on device" in text
                                         or "errno = 28" in text)


def disk_full_error(path: Path, size: int | None, temporary: Path) -> DiskFullError:
    """The :class:`DiskFullError` of writing ``path`` (``size``: the bytes the whole file needs, when known)."""
    free = shutil.disk_usage(path.parent).free
    if size is None:
        written = temporary.stat().st_size if temporary.exists() else 0
        need = f"at least {written} bytes (written when the disk filled)"
    else:
        need = f"about {size} bytes"
    return DiskFullError(
        errno.ENOSPC,
        f"No space left on device writing {path}: the file needs {need}, {free} bytes are free on the file "
        f"system of {path.parent}; nothing partial was kept. Free space there (df -h, du -sh results/*), then rerun "
        f"the same command: this job is redone{see('no-space-left-on-device')}",
    )


def _remove_stale_temporaries(path: Path) -> None:
    """Remove temporaries of ``path`` left by a writer that was killed (SIGKILL, a lost node): their pid is gone."""
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        pid = stale.name.rpartition(".tmp")[2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        except PermissionError:  # alive, someone else's
            continue


@contextlib.contextmanager
def atomic_path(path: str | Path, size: int | None = None):
    """Yield a temporary path beside ``path``; on success fsync it and rename it into place.

    A crash or error leaves no file at ``path`` (the temporary one is removed on error; one a
    killed process left is removed by the next write of ``path``), so a file that exists is
    always complete. A full disk raises :class:`DiskFullError` naming ``path``, ``size`` (the
    bytes the file needs, when the caller knows them) and the free bytes: before anything is
    written when fewer than ``size`` bytes are free (HDF5 does not survive running out of space
    inside a write: it crashes the process), else when a write fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _remove_stale_temporaries(path)
    if size is not None and shutil.disk_usage(path.parent).free < size:
        raise disk_full_error(path, size, temporary)
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as err:
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            raise disk_full_error(path, size, temporary) from err
        raise
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


