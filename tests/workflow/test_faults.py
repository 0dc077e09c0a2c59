"""Faults: crashes, corrupted or foreign shards, non-finite activations, full disks, interrupts, concurrent runs.

Each test is marked ``fault``; the suite's summary counts them (see conftest.py). The expensive ones are
also marked ``bench_faults``: CI leaves them out, ``make bench-faults`` (tools/bench_faults.py) runs them and
renders docs/performance.md's fault table, where every test here that causes a fault class has a row.
"""

import errno
import json
import os
import re
import shutil
import signal
import subprocess

import h5py
import numpy as np
import pytest

from nullcov.collection.capture import NonFiniteActivationError
from nullcov.collection.features import run_feature_job
from nullcov.models.schedule import build_schedule
from nullcov.statistics.store import read_moments, read_projections

from conftest import base_config, job_process, planned_jobs, snakemake, snakemake_command, wait_for, write_config

pytestmark = pytest.mark.fault

# Slow enough per prompt (resolution 96, batch 1) that a feature job can be killed mid-run.
FAULT_RUN = dict(prompts_per_shard=4, num_denoising_steps=4, resolution=96, batch_size=1)


def _line_with(text, words):
    """The first line of ``text`` that contains ``words`` (for the fault table's "what the user saw")."""
    return next((line.strip() for line in text.splitlines() if words in line), None)


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


def test_sigkill_of_a_feature_job_then_rerun_incomplete_gives_identical_results(fault_run, reference, record_property):
    runner = subprocess.Popen(snakemake_command(fault_run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = fault_run / "logs" / "features" / "shard_0001.log"
    wait_for(lambda: _log_says(log, "prompts 1/4"), what="shard 1 to be mid-run")
    job = job_process(fault_run)
    assert job is not None
    job.send_signal(signal.SIGKILL)
    output, _ = runner.communicate(timeout=300)
    assert runner.returncode != 0, output
    assert not (fault_run / "results" / "features" / "shard_0001").exists()  # Snakemake removed the partial output
    snakemake(fault_run, "--rerun-incomplete")
    assert_identical_results(fault_run, reference)
    record_property("user_saw", _line_with(output, "Error in rule features"))


def test_sigkill_of_snakemake_then_unlock_and_rerun_gives_identical_results(fault_run, reference, record_property):
    runner = subprocess.Popen(snakemake_command(fault_run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = fault_run / "logs" / "features" / "shard_0000.log"
    wait_for(lambda: _log_says(log, "prompts 1/4"), what="shard 0 to be mid-run")
    os.kill(runner.pid, signal.SIGKILL)
    runner.wait()
    # Orphaned jobs run on; wait for them so the rerun does not race them.
    wait_for(lambda: job_process(fault_run) is None, what="orphaned feature jobs to end")
    locked = snakemake(fault_run, check=False)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    snakemake(fault_run, "--unlock")
    snakemake(fault_run, "--rerun-incomplete")
    assert_identical_results(fault_run, reference)
    record_property("user_saw", _line_with(locked.stdout + locked.stderr, "--unlock"))


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


def test_failing_write_leaves_no_partial_file(tiny_model_dir, tmp_path, demo_prompts, monkeypatch, record_property):
    """The disk fills up in the middle of the second step file: no trace of it remains."""
    original, calls = h5py.Group.create_dataset, {"n": 0}

    def create_until_full(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 70:  # a file holds 14 groups x 4 datasets: this is inside the second file
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_until_full)
    with pytest.raises(OSError, match="No space left") as failed:
        _feature_job(tiny_model_dir, tmp_path, demo_prompts[:1])
    written = sorted(p.name for p in (tmp_path / "shard_0000").iterdir())
    assert written == ["alpha_00_0999.h5"]  # complete files only; no temporary file left
    read_moments(tmp_path / "shard_0000" / "alpha_00_0999.h5", "features")
    record_property("user_saw", str(failed.value).replace(str(tmp_path), "…"))


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A tmpfs as the run's results/ (64 MiB; :func:`_resize` shrinks it to what is in use plus a margin)."""
    mount_point = tmp_path / "run" / "results"
    mount_point.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _resize(mount_point, free_bytes):
    """Remount the tmpfs so that ``free_bytes`` (rounded up to pages) are free; None: 64 MiB in all."""
    size = "64m" if free_bytes is None else str(shutil.disk_usage(mount_point).used + free_bytes)
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount_point)], check=True)


#: A quick run (one shard of 4 prompts, 3 steps, the model's own resolution) for the full-disk, merge and
#: interrupt cases.
QUICK_RUN = dict(prompts_per_shard=4, num_denoising_steps=3)


@pytest.fixture(scope="module")
def quick_reference(tmp_path_factory, demo_prompts):
    workdir = tmp_path_factory.mktemp("quick-reference") / "run"
    write_config(workdir, demo_prompts[:4], **QUICK_RUN)
    snakemake(workdir)
    return workdir


@pytest.fixture
def quick_run(tmp_path, demo_prompts):
    workdir = tmp_path / "run"
    write_config(workdir, demo_prompts[:4], **QUICK_RUN)
    return workdir


def _fill_disk_then_resume(workdir, mount_point, stage, reference):
    """Shrink the results tmpfs below one step file, run until the ``stage`` job fails, check its message and
    that no temporary file remains, free the space, resume: the results equal ``reference``'s. Returns the
    message."""
    _resize(mount_point, 100 * 1024)  # less than one step file (~311 KB for the tiny model)
    failed = snakemake(workdir, check=False)
    assert failed.returncode != 0
    logs = "".join(path.read_text() for path in (workdir / "logs" / stage).glob("*.log"))
    match = re.search(r"DiskFullError: \[Errno 28\] No space left on device writing (\S+): the file needs about "
                      r"(\d+) bytes, (\d+) bytes are free", logs)
    assert match and match.group(1).startswith(f"results/{stage}/"), logs[-3000:]
    assert int(match.group(2)) > int(match.group(3))
    assert not [p for p in mount_point.rglob("*") if ".tmp" in p.name]  # no temporary file survives
    _resize(mount_point, None)
    snakemake(workdir)
    assert_identical_results(workdir, reference)
    return match.group(0)


def test_full_disk_in_a_feature_job_names_path_and_bytes_then_resumes_identical(tiny_filesystem, quick_reference,
                                                                                demo_prompts, record_property):
    """`snakemake plan` warns that results/ is too small; the feature job fails naming the file and the bytes it
    needs, nothing partial remains; after space is freed the run resumes to identical results."""
    workdir = tiny_filesystem.parent
    write_config(workdir, demo_prompts[:4], **QUICK_RUN)
    _resize(tiny_filesystem, 64 * 1024)
    planned = snakemake(workdir, "plan")
    assert "WARNING: results/ has" in planned.stdout and "no-space-left-on-device" in planned.stdout
    record_property("user_saw", _fill_disk_then_resume(workdir, tiny_filesystem, "features", quick_reference))


@pytest.mark.bench_faults
@pytest.mark.parametrize("stage", ["covariance", "projections"])
def test_full_disk_in_a_merge_or_projection_names_path_and_bytes_then_resumes_identical(
        tiny_filesystem, quick_reference, demo_prompts, stage, record_property):
    workdir = tiny_filesystem.parent
    write_config(workdir, demo_prompts[:4], **QUICK_RUN)
    snakemake(workdir)
    stages = ["covariance", "projections"]
    for folder in stages[stages.index(stage):]:
        shutil.rmtree(workdir / "results" / folder)
    record_property("user_saw", _fill_disk_then_resume(workdir, tiny_filesystem, stage, quick_reference))


def test_a_second_concurrent_run_is_refused_by_the_lock(fault_run, record_property):
    runner = subprocess.Popen(snakemake_command(fault_run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        locks = fault_run / ".snakemake" / "locks"
        wait_for(lambda: locks.exists() and any(locks.iterdir()), what="the first run's lock")
        second = snakemake(fault_run, check=False)
        assert second.returncode != 0
        text = second.stdout + second.stderr
        assert "Directory cannot be locked" in text and "--unlock" in text
        assert str(fault_run) in text  # the locked directory is named
        record_property("user_saw", _line_with(text, "Directory cannot be locked"))
    finally:
        runner.kill()
        runner.wait()


@pytest.mark.bench_faults
def test_sigkill_of_a_merge_job_leaves_nothing_half_written_and_the_rerun_redoes_exactly_it(
        quick_run, quick_reference, record_property):
    """A node lost while merging: the merge job is SIGKILLed as soon as it runs; no merged file or temporary
    file remains, the next dry-run plans that merge (and what needs it) again, and the rerun is identical."""
    runner = subprocess.Popen(snakemake_command(quick_run), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    job = wait_for(lambda: job_process(quick_run, "covariance.py"), timeout=600, interval=0.01,
                   what="a merge job")
    job.kill()
    output, _ = runner.communicate(timeout=300)
    assert runner.returncode != 0, output
    killed = re.search(r"Error in rule (covariance\w*):.*?output: (\S+)", output, re.S)
    assert killed, output
    assert not (quick_run / killed.group(2)).exists()
    planned = {output for rule, output in planned_jobs(quick_run) if rule.startswith("covariance")}
    assert killed.group(2) in planned
    snakemake(quick_run, "--rerun-incomplete")
    assert not [p for p in (quick_run / "results").rglob("*") if ".tmp" in p.name]  # a killed write's temporary too
    assert_identical_results(quick_run, quick_reference)
    record_property("user_saw", f"Error in rule {killed.group(1)}: ... output: {killed.group(2)}")


@pytest.mark.bench_faults
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_snakemake_interrupted_during_a_merge_resumes_identical(quick_run, quick_reference, signal_number,
                                                             record_property):
    """Ctrl-C (SIGINT) or SIGTERM of Snakemake while a merge runs: it stops its jobs and removes their outputs;
    the same command resumes and gives identical results."""
    runner = subprocess.Popen(snakemake_command(quick_run), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: job_process(quick_run, "covariance.py"), timeout=600, interval=0.01, what="a merge job")
    runner.send_signal(signal_number)
    output, _ = runner.communicate(timeout=300)
    assert runner.returncode != 0, output
    assert not [p for p in (quick_run / "results").rglob("*") if ".tmp" in p.name]
    snakemake(quick_run)  # no --unlock: an interrupted Snakemake releases its lock
    assert_identical_results(quick_run, quick_reference)
    record_property("user_saw", output.strip().splitlines()[-1])


@pytest.mark.bench_faults
def test_two_runs_on_different_folders_sharing_one_model_both_succeed(tmp_path, tiny_model_dir, demo_prompts,
                                                                      record_property):
    """Two Snakemake runs at once in two results folders that read the same model folder: no lock conflict,
    equal results."""
    workdirs = [tmp_path / name for name in ("first", "second")]
    for workdir in workdirs:
        write_config(workdir, demo_prompts[:4], model=str(tiny_model_dir))
    runs = [subprocess.Popen(snakemake_command(workdir, "--cores", "1"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for workdir in workdirs]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert_identical_results(workdirs[1], workdirs[0])
    record_property("user_saw", "both runs: " + outputs[0].strip().splitlines()[-1])
