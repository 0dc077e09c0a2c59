"""GPU jobs never share a GPU by accident: the default `gpu` limit of a local run, measured on real jobs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nullcov.models.gpu_lease import gpu_job_limit, visible_gpu_count

from conftest import snakemake_command, write_config

REPO = Path(__file__).resolve().parents[2]
NO_DRIVER = {"driver_dir": "/nonexistent/nvidia", "nvidia_smi": "/nonexistent/nvidia-smi"}


@pytest.mark.parametrize("visible, count", [("0", 1), ("0,1", 2), ("2, 3 ,5", 3), ("", 0), ("-1", 0), ("0,-1,1", 1)])
def test_cuda_visible_devices_is_counted_as_cuda_reads_it(visible, count):
    assert visible_gpu_count({"CUDA_VISIBLE_DEVICES": visible}, **NO_DRIVER)[0] == count


def test_without_the_variable_the_driver_counts(tmp_path):
    driver = tmp_path / "gpus"
    for bus in ("0000:17:00.0", "0000:65:00.0", "0000:ca:00.0"):
        (driver / bus).mkdir(parents=True)
    assert visible_gpu_count({}, driver_dir=driver, nvidia_smi="/nonexistent")[0] == 3
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-1)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-2)'\n")
    smi.chmod(0o755)
    listed = visible_gpu_count({}, driver_dir=tmp_path / "none", nvidia_smi=str(smi))
    assert listed == (2, f"2 GPU(s) listed by {smi} -L")
    # no GPU at all: the GPU jobs still run, on the CPU, one at a time
    assert visible_gpu_count({}, **NO_DRIVER)[0] == 0
    limit, reason = gpu_job_limit({}, **NO_DRIVER)
    assert limit == 1 and "no GPU visible" in reason


SNAKEFILE = """
import sys
sys.path.insert(0, {root!r})
from nullcov.models import gpu_lease
gpu_lease.limit_gpu_jobs(workflow, print, driver_dir="/nonexistent", nvidia_smi="/nonexistent")

rule all:
    input: expand("done_{{i}}", i=range(4))

rule job:
    output: "done_{{i}}"
    resources: gpu=1
    shell: "date +%s.%N > {{output}}.start; sleep 1.5; date +%s.%N > {{output}}"
"""


def _most_at_once(folder: Path) -> int:
    spans = [(float((folder / f"done_{i}.start").read_text()), float((folder / f"done_{i}").read_text()))
             for i in range(4)]
    return max(sum(1 for start, end in spans if start <= moment < end) for moment, _ in spans)


@pytest.mark.parametrize("visible, extra, expected", [("0,1", [], 2), ("", ["--resources", "gpu=3"], 3)])
def test_a_local_run_starts_at_most_one_gpu_job_per_visible_gpu(tmp_path, visible, extra, expected):
    (tmp_path / "Snakefile").write_text(SNAKEFILE.format(root=str(REPO)))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "4", *extra], cwd=tmp_path, capture_output=True, text=True,
        env=os.environ | {"CUDA_VISIBLE_DEVICES": visible}, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"GPU jobs: at most gpu={expected} at once" in result.stdout + result.stderr
    assert _most_at_once(tmp_path) == expected  # 4 cores would run all 4 jobs at once without the limit


def test_without_gpus_the_gpu_jobs_run_one_at_a_time(tmp_path):
    """CPU-only: the GPU jobs still run, one at a time (the limit itself is applied as above)."""
    limit, reason = gpu_job_limit({"CUDA_VISIBLE_DEVICES": ""}, **NO_DRIVER)
    assert (limit, reason) == (1, "no GPU visible (CUDA_VISIBLE_DEVICES=''): GPU jobs run on the CPU, one at a time")


def test_the_workflow_sets_the_limit_and_passes_mem_mb(tmp_path):
    """The real Snakefile: limit logged; the feature job's mem_mb from the model dims, --set-resources wins."""
    write_config(tmp_path, [f"a photo of a cat number {i}" for i in range(6)])
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "0,1"}
    output = subprocess.run(
        snakemake_command(tmp_path, "--dry-run", "--set-resources", "features:mem_mb=1234"),
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert output.returncode == 0, output.stderr
    text = output.stdout + output.stderr
    assert "GPU jobs: at most gpu=2 at once: 2 visible GPU(s) (CUDA_VISIBLE_DEVICES='0,1')" in text
    features = [block for block in text.split("\nrule ") if block.startswith("features:")]
    assert features and all("mem_mb=1234" in block for block in features)
    covariance = [block for block in text.split("\nrule ") if block.startswith("covariance:")]
    assert covariance and all("mem_mb=" in block for block in covariance)
