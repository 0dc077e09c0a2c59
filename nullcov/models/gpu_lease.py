"""One GPU per job on a multi-GPU machine: a device lease held for the job's lifetime.

Snakemake's ``--resources gpu=N`` bounds how many GPU jobs run at once, but gives them no device
ids: every job would pick ``cuda`` (device 0). :func:`lease_device` gives each concurrent job its
own device. For each candidate device it tries a non-blocking exclusive ``flock`` on
``resources/gpu-locks/gpu-<id>.lock`` (relative to the working directory, i.e. the workflow's
``--directory``) and keeps the first one it gets until the job ends. The kernel drops the lock
when the process dies, even on SIGKILL or an out-of-memory kill, so a crashed job never leaves a
device taken; the lock files themselves stay (deleting them would race with other jobs).

When it applies: the configured device is ``auto`` or ``cuda`` and more than one CUDA device is
visible. No lease (and no lock file) for ``cpu``, an explicit ``cuda:N``, a machine with one or no
CUDA device, or a job whose ``CUDA_VISIBLE_DEVICES`` already names a single device or that runs
under SLURM (``SLURM_JOB_ID`` set): there the scheduler already gave the job its GPU(s). A
``CUDA_VISIBLE_DEVICES`` listing several devices outside SLURM is honoured by leasing only among
those, with lock files named by the listed ids so that jobs with and without the variable agree.

When every device is taken (``--resources gpu=`` larger than the machine's GPU count, or GPUs
held by another run in the same directory) the job logs that it waits, polls every
``poll_seconds``, and after ``wait_seconds`` fails with :class:`DeviceLeaseError` naming the lock
files and their holders.

Every outcome is logged as one line ``device lease: CUDA_VISIBLE_DEVICES=<value> -> <device> (...)``.
torch is imported only to count devices, and only when no ``device_count`` is given.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

from nullcov.docs import see

log = logging.getLogger(__name__)

LOCK_DIR = Path("resources") / "gpu-locks"
LEASED = ("auto", "cuda")


class DeviceLeaseError(RuntimeError):
    """No device could be leased within the wait time."""


@dataclass(frozen=True)
class Lease:
    """The device a job uses and how it was chosen."""

    device: str  # what to pass to torch: "cuda:1", "cuda", "cpu", or the configured device
    visible_devices: str | None  # CUDA_VISIBLE_DEVICES at the start of the job (None: unset)
    lock_path: Path | None = None  # the lock file held (None: no lease was needed)
    reason: str = ""

    @property
    def leased(self) -> bool:
        return self.lock_path is not None


def cuda_device_count() -> int:
    """CUDA devices torch can use (0 without a CUDA build or driver); imports torch."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


#: Where the NVIDIA driver lists its GPUs (one folder each), read without initialising CUDA.
DRIVER_GPU_DIR = Path("/proc/driver/nvidia/gpus")


def visible_gpu_count(environ: Mapping[str, str] | None = None, driver_dir: str | Path = DRIVER_GPU_DIR,
                      nvidia_smi: str = "nvidia-smi") -> tuple[int, str]:
    """``(GPUs a job started from here would see, where that number comes from)``, without
    importing torch or initialising CUDA (the Snakemake process must stay light and fork-safe).

    ``CUDA_VISIBLE_DEVICES`` when set (its entries up to the first empty or negative one, as CUDA
    reads it); else the driver's GPU folders under ``driver_dir``; else ``nvidia-smi -L``; else 0.
    """
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = 0
        for item in visible.split(","):
            item = item.strip()
            if not item or item.startswith("-"):
                break
            count += 1
        return count, f"CUDA_VISIBLE_DEVICES={visible!r}"
    with contextlib.suppress(OSError):
        folders = [path for path in Path(driver_dir).iterdir() if path.is_dir()]
        if folders:
            return len(folders), f"{len(folders)} GPU(s) in {driver_dir}"
    import shutil
    import subprocess

    if shutil.which(nvidia_smi):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            listing = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
            count = sum(1 for line in listing.splitlines() if line.startswith("GPU "))
            return count, f"{count} GPU(s) listed by {nvidia_smi} -L"
    return 0, f"no CUDA_VISIBLE_DEVICES, no {driver_dir}, no working {nvidia_smi}"


def gpu_job_limit(environ: Mapping[str, str] | None = None, **where) -> tuple[int, str]:
    """The default ``gpu`` resource of a local run: how many GPU jobs may run at once, and why.

    One per visible GPU. With none visible the GPU jobs run on the CPU, one at a time (each
    holds the model and its steps' statistics in host memory and uses its ``threads``; raise it
    with ``--resources gpu=N``).
    """
    count, source = visible_gpu_count(environ, **where)
    if count:
        return count, f"{count} visible GPU(s) ({source})"
    return 1, f"no GPU visible ({source}): GPU jobs run on the CPU, one at a time"


def limit_gpu_jobs(workflow, info: Callable[[str], None], **where) -> int | None:
    """Set the ``gpu`` resource of a local Snakemake run to :func:`gpu_job_limit` unless the user
    gave ``--resources gpu=N``, and say which limit holds; returns the limit set (None: none set).

    Called while the Snakefile is parsed (the scheduler reads ``workflow.global_resources`` after
    that). Not for remote executors (``--jobs``, e.g. SLURM: the cluster gives each job its GPU,
    and the submit host may have none) nor in jobs re-parsing the Snakefile.
    """
    if not workflow.is_main_process or workflow.resource_settings.nodes is not None:
        return None
    if "gpu" in workflow.global_resources:
        info(f"GPU jobs: at most gpu={workflow.global_resources['gpu'].value} at once (--resources)")
        return None
    limit, reason = gpu_job_limit(**where)
    workflow.global_resources["gpu"] = limit
    info(f"GPU jobs: at most gpu={limit} at once: {reason}; --resources gpu=N overrides")
    return limit


def _safe_id(device_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", device_id)


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "unknown holder"
    return text or "unknown holder"


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive flock on ``path``, or None if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def _log_lease(lease: Lease, logger: logging.Logger) -> None:
    visible = "<unset>" if lease.visible_devices is None else lease.visible_devices
    logger.info("device lease: CUDA_VISIBLE_DEVICES=%s -> %s (%s)", visible, lease.device, lease.reason)


def _no_lease(configured: str, count: int, visible: str | None, listed: list[str] | None,
              environ: Mapping[str, str]) -> Lease | None:
    """The :class:`Lease` of a leased configuration (``auto``/``cuda``) that needs no lock, or None."""
    if count == 0:
        # auto falls back to the CPU; an explicit cuda is left to fail where the model is loaded.
        device = "cpu" if configured == "auto" else "cuda"
        return Lease(device, visible, reason="no CUDA device visible: no lease")
    if environ.get("SLURM_JOB_ID") and visible is not None:
        return Lease("cuda", visible, reason=f"SLURM job {environ['SLURM_JOB_ID']} owns its GPUs: no lease")
    if count == 1 or (listed is not None and len(listed) == 1):
        return Lease("cuda", visible, reason="one CUDA device visible: no lease")
    return None


def _acquire(paths: list[Path], wait_seconds: float, poll_seconds: float, logger: logging.Logger) -> tuple[int, int]:
    """``(position in paths, open descriptor)`` of the first lock file this process could flock,
    polling every ``poll_seconds``; :class:`DeviceLeaseError` after ``wait_seconds``."""
    deadline = time.monotonic() + wait_seconds
    waiting_logged = False
    while True:
        for position, path in enumerate(paths):
            fd = _try_lock(path)
            if fd is not None:
                return position, fd
        holders = "; ".join(f"{path} held by {_holder(path)}" for path in paths)
        if time.monotonic() >= deadline:
            raise DeviceLeaseError(
                f"all {len(paths)} CUDA devices stayed leased by other jobs for {wait_seconds:.0f} s: {holders}. "
                f"Run with --resources gpu=N where N is at most the number of GPUs ({len(paths)}), "
                f"or remove a stale holder's process (a lock file alone never blocks: locks die with their process)"
                f"{see('all-cuda-devices-stayed-leased')}"
            )
        if not waiting_logged:
            logger.warning("device lease: all %d CUDA devices are leased (%s); waiting up to %.0f s, "
                           "polling every %.0f s", len(paths), holders, wait_seconds, poll_seconds)
            waiting_logged = True
        time.sleep(max(0.0, min(poll_seconds, deadline - time.monotonic())))


@contextlib.contextmanager
def lease_device(
    configured: str,
    *,
    device_count: int | Callable[[], int] | None = None,
    lock_dir: str | Path = LOCK_DIR,
    label: str = "",
    wait_seconds: float = 600.0,
    poll_seconds: float = 5.0,
    environ: Mapping[str, str] | None = None,
    logger: logging.Logger | None = None,
) -> Iterator[Lease]:
    """Yield the :class:`Lease` of the device this job uses; the device stays leased inside the block.

    ``configured`` is the config's ``device`` (``auto``, ``cuda``, ``cuda:N``, ``cpu``, ...).
    ``device_count``: the number of CUDA devices torch sees (an int or a callable; default: ask
    torch). ``label`` (e.g. ``shard 0003``) is written into the lock file so that a waiting job
    can name the holder. ``environ`` defaults to ``os.environ``.
    """
    environ = os.environ if environ is None else environ
    logger = logger or log
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if configured in LEASED:
        count = device_count() if callable(device_count) else device_count
        if count is None:
            count = cuda_device_count()
        listed = None if visible is None else [item.strip() for item in visible.split(",") if item.strip()]
        lease = _no_lease(configured, count, visible, listed, environ)
    else:
        lease = Lease(configured, visible, reason=f"device {configured!r} configured: no lease")
    if lease is not None:
        _log_lease(lease, logger)
        yield lease
        return
    device_ids = listed[:count] if listed is not None else [str(index) for index in range(count)]
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    paths = [lock_dir / f"gpu-{_safe_id(device_id)}.lock" for device_id in device_ids]
    position, fd = _acquire(paths, wait_seconds, poll_seconds, logger)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}{': ' + label if label else ''}\n".encode())
        lease = Lease(f"cuda:{position}", visible, paths[position],
                      reason=f"leased device {device_ids[position]} of {len(paths)}, lock {paths[position]}")
        _log_lease(lease, logger)
        yield lease
    finally:
        # Closing the descriptor releases the flock (the kernel does the same if we die).
        os.close(fd)
