"""Faults: crashes, corrupted or foreign shards, non-finite activations, a full disk, concurrent runs.

Each test is marked ``fault``; the suite's summary counts them (see conftest.py). The README's
"When things go wrong" table names every test here.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import time

import h5py
import numpy as np
import psutil
import pytest

from nullcov.collection.capture import NonFiniteActivationError
from nullcov.collection.features import run_feature_job
from nullcov.models.schedule import build_schedule
from nullcov.statistics.store import read_moments, read_projections

from conftest import base_config, snakemake, snakemake_command, write_config

pytestmark = pytest.mark.fault

# Slow enough per prompt (resolution 96, batch 1) that a feature job can be killed mid-run.
FAULT_RUN = dict(prompts_per_shard=4, num_denoising_steps=4, resolution=96, batch_size=1)


def _wait_for(predicate, timeout=120, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def _feature_job_process(workdir):
    """The running feature job's Python process (Snakemake runs a copy of scripts/features.py)."""
    for process in psutil.process_iter(["cmdline", "cwd"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            if "features.py" in cmdline and process.info["cwd"] == str(workdir):
                return process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _log_says(path, text):
    return path.exists() and text in path.read_text()


def assert_identical_results(workdir, reference):
    """Every merged moment and projection equals the reference run's, bit for bit."""
    for stage in ("covariance", "projections"):
        names = sorted(p.name for p in (reference / "results" / stage).glob("*.h5"))
        assert names and names == sorted(p.name for p in (workdir / "results" / stage).glob("*.h5"))
        for name in names:
            if stage == "covariance":
                ours, _ = read_moments(workdir / "results" / stage / name, "covariance")
                theirs, _ = read_moments(reference / "results" / stage / name, "covariance")
                for key in theirs:
                    assert ours[key].count == theirs[key].count
                    np.testing.assert_array_equal(ours[key].sum_outer, theirs[key].sum_outer)
            else:
                ours, _ = read_projections(workdir / "results" / stage / name)
                theirs, _ = read_projections(reference / "results" / stage / name)
                for key in theirs:
                    np.testing.assert_array_equal(ours[key].projection, theirs[key].projection)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_prompts):
    workdir = tmp_path_factory.mktemp("reference") / "run"
    write_config(workdir, demo_prompts[:8], **FAULT_RUN)
    snakemake(workdir)
    return workdir


@pytest.fixture
def fault_run(tmp_path, demo_prompts):
    workdir = tmp_path / "run"
    write_config(workdir, demo_prompts[:8], **FAULT_RUN)
    return workdir


def test_sigkill_of_a_feature_job_then_rerun_incomplete_gives_identical_results(fault_run, reference):
    runner = subprocess.Popen(snakemake_command(fault_run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = fault_run / "logs" / "features" / "shard_0001.log"
    _wait_for(lambda: _log_says(log, "prompts 1/4"), what="shard 1 to be mid-run")
    job = _feature_job_process(fault_run)
    assert job is not None
    job.send_signal(signal.SIGKILL)
    output, _ = runner.communicate(timeout=300)
    assert runner.returncode != 0, output
    assert not (fault_run / "results" / "features" / "shard_0001").exists()  # Snakemake removed the partial output
    snakemake(fault_run, "--rerun-incomplete")
    assert_identical_results(fault_run, reference)


def test_sigkill_of_snakemake_then_unlock_and_rerun_gives_identical_results(fault_run, reference):
    runner = subprocess.Popen(snakemake_command(fault_run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = fault_run / "logs" / "features" / "shard_0000.log"
    _wait_for(lambda: _log_says(log, "prompts 1/4"), what="shard 0 to be mid-run")
    os.kill(runner.pid, signal.SIGKILL)
    runner.wait()
    # Orphaned jobs run on; wait for them so the rerun does not race them.
    _wait_for(lambda: _feature_job_process(fault_run) is None, what="orphaned feature jobs to end")
    locked = snakemake(fault_run, check=False)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    snakemake(fault_run, "--unlock")
    snakemake(fault_run, "--rerun-incomplete")
    assert_identical_results(fault_run, reference)


def _corrupt_bytes(path):
    data = bytearray(path.read_bytes())
    data[:512] = os.urandom(512)
    path.write_bytes(bytes(data))


def test_corrupted_shard_fails_the_merge_naming_file_and_fix_then_the_fix_works(reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir, symlinks=True)
    (workdir / "config.yaml").write_text((workdir / "config.yaml").read_text().replace(str(reference), str(workdir)))
    name = json.loads((workdir / "results" / "schedule.json").read_text())["steps"][1]["name"]
    shard_file = workdir / "results" / "features" / "shard_0001" / f"{name}.h5"
    _corrupt_bytes(shard_file)
    failed = snakemake(workdir, f"results/covariance/{name}.h5", "--forcerun", "covariance", check=False)
    assert failed.returncode != 0
    message = (workdir / "logs" / "covariance" / f"{name}.log").read_text()
    assert f"results/features/shard_0001/{name}.h5: not a readable HDF5 file" in message
    fix = "snakemake --cores all --force results/features/shard_0001"
    assert fix in message
    snakemake(workdir, *fix.split()[1:])
    snakemake(workdir)
    assert_identical_results(workdir, reference)


def test_shards_of_another_config_are_refused_showing_both_provenances(reference, tmp_path, demo_prompts):
    other = tmp_path / "other"
    write_config(other, demo_prompts[:8], seed=1, **FAULT_RUN)
    snakemake(other, "results/features/shard_0001")
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir, symlinks=True)
    (workdir / "config.yaml").write_text((workdir / "config.yaml").read_text().replace(str(reference), str(workdir)))
    shutil.rmtree(workdir / "results" / "features" / "shard_0001")
    shutil.copytree(other / "results" / "features" / "shard_0001", workdir / "results" / "features" / "shard_0001")
    failed = snakemake(workdir, "results/covariance/text.h5", "--forcerun", "covariance_text", check=False)
    assert failed.returncode != 0
    message = (workdir / "logs" / "covariance" / "text.log").read_text()
    assert "disagrees with results/features/shard_0000/text.h5 on config" in message
    assert "'seed': 0" in message and "'seed': 1" in message


def _fp16_overflowing_model(tiny_model_dir, tmp_path):
    """A copy of the tiny model whose first convolution overflows float16."""
    from diffusers import UNet2DConditionModel

    model = tmp_path / "overflow-model"
    shutil.copytree(tiny_model_dir, model)
    unet = UNet2DConditionModel.from_pretrained(model / "unet", local_files_only=True)
    with __import__("torch").no_grad():
        unet.conv_in.weight.mul_(3e4)
    unet.save_pretrained(model / "unet")
    return model


def _feature_job(model, tmp_path, prompts, **overrides):
    config = base_config(**overrides)
    schedule = build_schedule(json.loads((model / "scheduler" / "scheduler_config.json").read_text()),
                              config["sampler_strategy"], config["num_denoising_steps"])
    out = tmp_path / "shard_0000"
    paths = {step["name"]: str(out / f"{step['name']}.h5") for step in schedule["steps"]}
    run_feature_job(model_spec=str(model), model_dir=str(model), prompts=prompts, first_index=0, shard="0000",
                    schedule=schedule, config=config, step_paths=paths, text_path=str(out / "text.h5"))
    return out


def test_fp16_overflow_fails_the_feature_job_naming_prompt_layer_and_step_and_writes_nothing(
        tiny_model_dir, tmp_path, demo_prompts):
    model = _fp16_overflowing_model(tiny_model_dir, tmp_path)
    with pytest.raises(NonFiniteActivationError, match=r"prompt 0 .* in .*attn2/to_(q|out) at step alpha_00_0999"):
        _feature_job(model, tmp_path, demo_prompts[:2], dtype="float16")
    assert not (tmp_path / "shard_0000").exists()


def test_failing_write_leaves_no_partial_file(tiny_model_dir, tmp_path, demo_prompts, monkeypatch):
    """The disk fills up in the middle of the second step file: no trace of it remains."""
    original, calls = h5py.Group.create_dataset, {"n": 0}

    def create_until_full(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 70:  # a file holds 14 groups x 4 datasets: this is inside the second file
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_until_full)
    with pytest.raises(OSError, match="No space left"):
        _feature_job(tiny_model_dir, tmp_path, demo_prompts[:1])
    written = sorted(p.name for p in (tmp_path / "shard_0000").iterdir())
    assert written == ["alpha_00_0999.h5"]  # complete files only; no temporary file left
    read_moments(tmp_path / "shard_0000" / "alpha_00_0999.h5", "features")


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 1 MiB tmpfs: room for a few step files (~311 KB each for the tiny model), not a whole shard."""
    mount_point = tmp_path / "run" / "results"
    mount_point.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_results_disk_fails_the_job_and_leaves_nothing_taken_as_complete(tiny_filesystem, demo_prompts):
    workdir = tiny_filesystem.parent
    write_config(workdir, demo_prompts[:4], prompts_per_shard=4, num_denoising_steps=6)
    failed = snakemake(workdir, check=False)
    assert failed.returncode != 0
    log = (workdir / "logs" / "features" / "shard_0000.log").read_text()
    assert "No space left on device" in log or "Errno 28" in log or "ENOSPC" in log, log[-3000:]
    # Snakemake removed the failed job's output folder; no temporary file survives anywhere.
    assert not (workdir / "results" / "features" / "shard_0000").exists()
    assert not [p for p in workdir.rglob("*.tmp*") if "results" in p.parts]
    dry = snakemake(workdir, "--dry-run", check=False)
    assert "features" in dry.stdout


def test_a_second_concurrent_run_is_refused_by_the_lock(fault_run):
    runner = subprocess.Popen(snakemake_command(fault_run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        locks = fault_run / ".snakemake" / "locks"
        _wait_for(lambda: locks.exists() and any(locks.iterdir()), what="the first run's lock")
        second = snakemake(fault_run, check=False)
        assert second.returncode != 0
        text = second.stdout + second.stderr
        assert "Directory cannot be locked" in text and "--unlock" in text
    finally:
        runner.kill()
        runner.wait()
