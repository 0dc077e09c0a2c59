"""The header every benchmark's measurement file starts with, and its atomic write.

Every ``make bench-*`` target (``tools/*.py``) writes one JSON file under ``docs/measurements/``:
its figures plus the keys of :func:`header`: ``command`` (as a user would type it), ``date``
(UTC, ISO 8601), ``machine`` (platform, processor, CPU count, torch threads, GPU if any, load)
and ``versions`` (:func:`nullcov.provenance.package_versions`). ``tools/render_docs.py`` renders
the docs' tables from these files, so every figure in the docs names the run that made it.

No torch import here: the torch threads and the GPU are read only when the caller has imported
torch already (a benchmark that measures torch has).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MEASUREMENTS = REPO / "docs" / "measurements"
#: The keys :func:`header` writes; every measurement file has them.
HEADER_KEYS = ("command", "date", "machine", "versions")
MACHINE_KEYS = ("platform", "architecture", "processor", "cpu_count", "memory_gib", "torch_threads", "gpu",
                "load_average", "python")


def measurement_path(name: str) -> Path:
    """``docs/measurements/<name>`` of this checkout (``name`` with its ``.json``)."""
    return MEASUREMENTS / name


def utc_now() -> str:
    """The current UTC time as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _processor() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    with contextlib.suppress(AttributeError, OSError, ValueError):
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return None


def load_average() -> float | None:
    """The 1-minute load average (other work on a shared machine), None where there is none."""
    with contextlib.suppress(OSError, AttributeError):
        return round(os.getloadavg()[0], 2)
    return None


def human_bytes(value: float) -> str:
    """A byte count for people: decimal units (``99.99 MB`` is 99 990 000 bytes), one decimal."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def gib(value: float) -> str:
    """Memory (peak RSS, peak GPU memory) in a fixed unit, GiB, as RAM and cards are sized; file
    sizes go through :func:`human_bytes`."""
    return f"{value / 2**30:.2f} GiB"


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes: Linux's ``VmHWM`` (exact, and reset by
    ``/proc/self/clear_refs``), else ``getrusage``'s ``ru_maxrss`` (kB on Linux). Unlike Snakemake's
    ``benchmark:`` max_rss, which is sampled, it cannot miss the peak."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine(torch_threads: int | None = None) -> dict:
    """Where the measurement ran. ``torch_threads`` defaults to ``torch.get_num_threads()`` when torch
    is imported; ``gpu`` is the first CUDA device (name, GiB) when torch is imported and sees one."""
    torch = sys.modules.get("torch")
    if torch_threads is None and torch is not None:
        torch_threads = torch.get_num_threads()
    gpu = None
    if torch is not None:
        with contextlib.suppress(Exception):  # no CUDA build, no driver: no GPU
            if torch.cuda.is_available():
                properties = torch.cuda.get_device_properties(0)
                gpu = {"name": properties.name, "memory_gib": round(properties.total_memory / 2**30, 1),
                       "count": torch.cuda.device_count()}
    return {
        "platform": platform.platform(),
        "architecture": platform.machine(),
        "processor": _processor(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "torch_threads": torch_threads,
        "gpu": gpu,
        "load_average": load_average(),
        "python": platform.python_version(),
    }


def command_line(script: str, argv: list[str] | None = None) -> str:
    """``python <script> <arguments>`` as a user types it: ``argv`` (default ``sys.argv[1:]``), quoted."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", script, *arguments])


def header(script: str, argv: list[str] | None = None, *, torch_threads: int | None = None) -> dict:
    """The common keys of a measurement file: ``command``, ``date``, ``machine``, ``versions``.

    ``script`` is the tool's path from the repository root (``tools/benchmark.py``), ``argv`` its
    arguments (default: this process's). Call it when the measurement starts, after setting torch's
    threads."""
    from nullcov.provenance import package_versions

    return {"command": command_line(script, argv), "date": utc_now(), "machine": machine(torch_threads),
            "versions": package_versions()}


def write_record(path: str | Path, record: dict) -> Path:
    """Write ``record`` as indented JSON to ``path``, atomically (a crash leaves the previous file or none);
    the header's keys must be there. Returns the path."""
    from nullcov.files import write_json

    missing = [key for key in HEADER_KEYS if key not in record]
    if missing:
        raise ValueError(f"{path}: a measurement record needs {', '.join(missing)} (nullcov.measurement.header)")
    return write_json(path, record, newline=True, indent=1, default=str)
