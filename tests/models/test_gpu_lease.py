"""Device leases on a multi-GPU machine, simulated on the CPU: real processes, real flocks."""

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nullcov.models.gpu_lease import LOCK_DIR, DeviceLeaseError, lease_device

REPO = Path(__file__).resolve().parents[2]
SPAWN = multiprocessing.get_context("spawn")


def _hold(workdir, count, label, results, release, environ=None, wait_seconds=0.0):
    """Child process: lease a device in ``workdir`` and hold it until ``release`` is set."""
    os.chdir(workdir)
    try:
        with lease_device("auto", device_count=count, label=label, wait_seconds=wait_seconds, poll_seconds=0.05,
                          environ=environ or {}) as lease:
            results.put((label, lease.device, str(lease.lock_path)))
            release.wait(60)
    except DeviceLeaseError as err:
        results.put((label, "error", str(err)))


class Holders:
    """Processes that each lease a device and hold it until released (one event each)."""

    def __init__(self, workdir, count, labels, **kwargs):
        self.results = SPAWN.Queue()
        self.release = {label: SPAWN.Event() for label in labels}
        self.processes = {
            label: SPAWN.Process(target=_hold, args=(workdir, count, label, self.results, self.release[label]),
                                 kwargs=kwargs)
            for label in labels
        }
        for process in self.processes.values():
            process.start()
        self.got = {}
        for _ in labels:
            label, device, lock = self.results.get(timeout=60)
            self.got[label] = (device, lock)

    def finish(self, label):
        self.release[label].set()
        self.processes[label].join(30)
        assert self.processes[label].exitcode == 0

    def stop(self):
        for label in self.processes:
            self.release[label].set()
        for process in self.processes.values():
            process.join(30)
            if process.is_alive():
                process.kill()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_concurrent_jobs_get_distinct_devices(in_tmp):
    holders = Holders(in_tmp, 3, ["shard 0000", "shard 0001", "shard 0002"])
    got = holders.got
    try:
        assert sorted(device for device, _ in got.values()) == ["cuda:0", "cuda:1", "cuda:2"]
        locks = sorted(Path(lock) for _, lock in got.values())
        assert locks == [LOCK_DIR / f"gpu-{index}.lock" for index in range(3)]  # relative to the workdir
        assert (in_tmp / "resources" / "gpu-locks").is_dir()
        names = {(in_tmp / lock).read_text().split(": ", 1)[1].strip() for _, lock in got.values()}
        assert names == set(got)  # each lock file names its job
    finally:
        holders.stop()


def test_a_job_waits_for_a_free_device_then_fails_naming_the_locks(in_tmp, caplog):
    holders = Holders(in_tmp, 2, ["a", "b"])
    try:
        start = time.monotonic()
        with caplog.at_level(logging.INFO, logger="nullcov.models.gpu_lease"):
            with pytest.raises(DeviceLeaseError) as failure:
                with lease_device("cuda", device_count=2, wait_seconds=0.6, poll_seconds=0.1, environ={}):
                    pass
        assert 0.5 < time.monotonic() - start < 10
        message = str(failure.value)
        assert "resources/gpu-locks/gpu-0.lock" in message and "resources/gpu-locks/gpu-1.lock" in message
        assert "--resources gpu=N" in message and ": a" in message and ": b" in message
        assert any("all 2 CUDA devices are leased" in r.getMessage() and "waiting up to" in r.getMessage()
                   for r in caplog.records)
    finally:
        holders.stop()


def test_a_waiting_job_gets_the_device_a_finished_job_released(in_tmp):
    holders = Holders(in_tmp, 2, ["a", "b"])
    try:
        results, go = SPAWN.Queue(), SPAWN.Event()
        process = SPAWN.Process(target=_hold, args=(in_tmp, 2, "c", results, go), kwargs={"wait_seconds": 30})
        process.start()
        time.sleep(1.5)
        assert results.empty()  # both devices are taken: c waits
        holders.finish("b")
        label, device, _ = results.get(timeout=30)
        assert (label, device) == ("c", holders.got["b"][0])
        go.set()
        process.join(30)
        assert process.exitcode == 0
    finally:
        holders.stop()


def test_the_lock_of_a_sigkilled_job_is_free_again(in_tmp):
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import time\nfrom nullcov.models.gpu_lease import lease_device\n"
         "with lease_device('auto', device_count=2, environ={}) as lease:\n"
         "    print(lease.device, flush=True)\n    time.sleep(600)\n"],
        cwd=in_tmp, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    try:
        assert child.stdout.readline().strip() == "cuda:0"
        with lease_device("auto", device_count=2, environ={}) as mine:
            assert mine.device == "cuda:1"
            with pytest.raises(DeviceLeaseError):
                with lease_device("auto", device_count=2, wait_seconds=0, environ={}):
                    pass
            child.send_signal(signal.SIGKILL)
            child.wait(30)
            with lease_device("auto", device_count=2, wait_seconds=0, environ={}) as again:
                assert again.device == "cuda:0"
    finally:
        child.kill()
        child.wait()


def test_a_released_lease_can_be_taken_again(in_tmp):
    with lease_device("auto", device_count=2, environ={}) as first:
        assert first.device == "cuda:0" and first.leased
    with lease_device("auto", device_count=2, environ={}) as second:
        assert second.device == "cuda:0"


@pytest.mark.parametrize(
    "configured, count, environ, device, reason",
    [
        ("cpu", 4, {}, "cpu", "configured: no lease"),
        ("cuda:1", 4, {}, "cuda:1", "configured: no lease"),
        ("auto", 0, {}, "cpu", "no CUDA device"),
        ("cuda", 0, {}, "cuda", "no CUDA device"),  # left to fail where the model is loaded
        ("auto", 1, {}, "cuda", "one CUDA device"),
        ("auto", 1, {"CUDA_VISIBLE_DEVICES": "3"}, "cuda", "one CUDA device"),
        ("auto", 2, {"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_JOB_ID": "42"}, "cuda", "SLURM job 42"),
        ("auto", 0, {"CUDA_VISIBLE_DEVICES": "1", "SLURM_JOB_ID": "42"}, "cpu", "no CUDA device"),
    ],
)
def test_no_lease_and_no_lock_file_when_the_device_is_given(in_tmp, caplog, configured, count, environ, device, reason):
    with caplog.at_level(logging.INFO, logger="nullcov.models.gpu_lease"):
        with lease_device(configured, device_count=count, environ=environ) as lease:
            assert lease.device == device and not lease.leased
    assert not (in_tmp / "resources").exists()
    visible = environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"device lease: CUDA_VISIBLE_DEVICES={visible} -> {device} ({lease.reason})"]
    assert reason in lease.reason


def test_a_multi_device_cuda_visible_devices_outside_slurm_is_leased_among_its_devices(in_tmp, caplog):
    environ = {"CUDA_VISIBLE_DEVICES": "2,3"}
    with caplog.at_level(logging.INFO, logger="nullcov.models.gpu_lease"):
        with lease_device("auto", device_count=2, environ=environ) as first, \
                lease_device("auto", device_count=2, environ=environ) as second:
            assert (first.device, second.device) == ("cuda:0", "cuda:1")  # positions within the visible set
            assert (first.lock_path.name, second.lock_path.name) == ("gpu-2.lock", "gpu-3.lock")
    assert caplog.records[0].getMessage().startswith(
        "device lease: CUDA_VISIBLE_DEVICES=2,3 -> cuda:0 (leased device 2 of 2")


def test_the_leased_device_is_logged(in_tmp, caplog):
    with caplog.at_level(logging.INFO, logger="nullcov.models.gpu_lease"):
        with lease_device("auto", device_count=3, environ={}, label="shard 0007"):
            pass
    assert caplog.records[0].getMessage() == (
        "device lease: CUDA_VISIBLE_DEVICES=<unset> -> cuda:0 "
        "(leased device 0 of 3, lock resources/gpu-locks/gpu-0.lock)"
    )


def test_importable_and_usable_without_torch(tmp_path):
    code = (
        "import sys\nsys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
        "from nullcov.models.gpu_lease import lease_device\n"
        "with lease_device('auto', device_count=2, environ={}) as lease:\n    print(lease.device)\n"
        "try:\n    lease_device('auto', environ={}).__enter__()\nexcept ImportError:\n    print('torch asked')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["cuda:0", "torch", "asked"]
