"""SLURM job arrays for the feature jobs: submit time with and without, and whether held jobs are lost.

Starts the one-node test cluster of ``tests/slurm_cluster.py`` (root; slurm-wlm + munge, ~1-3 min),
makes a workdir with the built-in tiny model and N prompts at ``prompts_per_shard=1`` (N feature
jobs), builds the local rules (tiny model, schedule) first so that only feature jobs remain, then:

``submit`` (default): drains the node so no job starts, and for each mode (``plain``: the profile
as shipped; ``array``: plus ``--slurm-array-jobs features``) starts
``snakemake --profile profiles/slurm --jobs J <the N shard folders>`` and polls ``squeue -r``
until N feature jobs (array tasks counted one by one) are queued, or until the count has not
changed for ``--settle`` seconds. It reports the seconds from Snakemake's start to the first and
to the last feature job in the queue, the number of sbatch calls (distinct SLURM job ids, an array
counting once) and the plugin's own submission log lines. Then Ctrl-C (the plugin scancels what it
submitted), ``scancel`` of anything left, next mode. Everything happens in one invocation on
one cluster, modes alternating when ``--repeats`` > 1.

``hold``: node not drained, arrays on: the jobs really run; reports whether Snakemake finishes
within ``--timeout`` seconds and which feature jobs never reached SLURM (``--jobs`` < N/2 drops the
first round: ``hold --shards 12 --jobs 4`` hangs). When it finishes (``--jobs`` >= N, e.g.
``hold --shards 6 --jobs 100``): each array task's GPU request and ``CUDA_VISIBLE_DEVICES``, pairs
of tasks that overlapped on one GPU, and whether every dataset of the shard files equals a local
run of the same shards.

Writes ``docs/measurements/slurm-arrays.json`` (``submit``) or ``slurm-arrays-hold.json`` (``hold``),
with :func:`nullcov.measurement.header`; the logs stay in ``--workdir``. ``make bench-slurm-arrays``
(root, a machine that may install slurm-wlm); not part of ``make test``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PROFILE = REPO / "profiles" / "slurm"

from nullcov.measurement import header, measurement_path, write_record  # noqa: E402


def slurm_version() -> str | None:
    """``sbatch --version`` of the test cluster's SLURM (None when it cannot be run)."""
    try:
        return subprocess.run(["sbatch", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def plugin_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("snakemake-executor-plugin-slurm")
    except importlib.metadata.PackageNotFoundError:
        return None


def load_cluster_module():
    """tests/slurm_cluster.py, imported by path (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("nullcov_slurm_cluster", REPO / "tests" / "slurm_cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_workdir(workdir: Path, shards: int, steps: int) -> list[str]:
    """config.yaml + prompts.txt for ``shards`` one-prompt shards; returns the feature targets."""
    workdir.mkdir(parents=True, exist_ok=True)
    prompts = workdir / "prompts.txt"
    prompts.write_text("".join(f"a photo of object number {index}\n" for index in range(shards)))
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(model="builtin:tiny", prompts=str(prompts), prompts_per_shard=1, num_denoising_steps=steps,
                  batch_size=1, device="auto", validation_prompts=None, attention_prompts=0)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return [f"results/features/shard_{index:04d}" for index in range(shards)]


def snakemake_command(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]


def build_local_rules(workdir: Path) -> float:
    """The tiny model and the schedule (local rules) without SLURM, so only feature jobs are left."""
    start = time.perf_counter()
    subprocess.run(snakemake_command(workdir, "results/schedule.json"), check=True, capture_output=True, text=True,
                   timeout=900)
    return time.perf_counter() - start


def feature_jobs(cluster) -> list[tuple[str, str, str]]:
    """(array/job id, job or task id, state) of every feature job SLURM knows, array tasks one per line
    (finished and cancelled ones too: the test cluster keeps them for MinJobAge)."""
    result = cluster.client("squeue", "-h", "-r", "-t", "all", "-o", "%F|%i|%T|%k")
    rows = []
    for line in result.stdout.splitlines():
        parent, job, state, comment = line.split("|", 3)
        if comment.startswith("rule_features"):
            rows.append((parent, job, state))
    return rows


def stop(process: subprocess.Popen, log) -> None:
    """Ctrl-C Snakemake (the plugin scancels its jobs), kill it if it does not exit within 90 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log.close()


def submit_once(cluster, base: Path, root: Path, targets: list[str], mode: str, jobs: int, settle: float,
                index: int) -> dict:
    workdir = root / f"{mode}-{index}"
    shutil.copytree(base, workdir, symlinks=True)
    args = ["--profile", str(PROFILE), "--jobs", str(jobs)]
    if mode == "array":
        args += ["--slurm-array-jobs", "features"]
    log_path = root / f"{mode}-{index}.log"
    known = {job for _, job, _ in feature_jobs(cluster)}  # earlier runs' jobs, cancelled
    log = open(log_path, "w")
    start = time.perf_counter()
    process = subprocess.Popen(snakemake_command(workdir, *args, *targets), stdout=log, stderr=subprocess.STDOUT)
    first = last = None
    seen = 0
    changed = time.perf_counter()
    try:
        while True:
            rows = [row for row in feature_jobs(cluster) if row[1] not in known]
            now = time.perf_counter()
            if len(rows) != seen:
                seen, changed = len(rows), now
                if first is None:
                    first = now - start
                last = now - start
            if seen >= len(targets) or process.poll() is not None:
                break
            if first is not None and now - changed > settle:
                break
            if now - start > 1800:
                break
            time.sleep(0.25)
        parents = sorted({parent for parent, _, _ in rows}, key=int)
        states = sorted({state for _, _, state in rows})
    finally:
        stop(process, log)
        cluster.cancel_all()
    text = log_path.read_text()
    return {
        "mode": mode, "jobs": jobs, "queued_feature_jobs": seen, "first_queued_s": first, "last_queued_s": last,
        "submit_window_s": (last - first) if first is not None else None, "sbatch_calls": len(parents),
        "slurm_states": states,
        "plugin_single_submissions": len(re.findall(r"submitted with SLURM jobid", text)),
        "plugin_array_submissions": re.findall(r"Submitted array job with Snakemake IDs .*? and SLURM job ID (\d+)\."
                                               r" The individual task IDs are (\d+-\d+)", text),
        "log": str(log_path),
    }


def submit(cluster, base: Path, root: Path, targets: list[str], args) -> list[dict]:
    drained = cluster.scontrol("update", f"nodename={cluster.node}", "state=drain", "reason=bench")
    assert drained.returncode == 0, drained.stderr
    results = []
    try:
        for index in range(args.repeats):
            for mode in ("plain", "array"):
                result = submit_once(cluster, base, root, targets, mode, args.jobs, args.settle, index)
                print(json.dumps({key: value for key, value in result.items() if key != "log"}), flush=True)
                results.append(result)
    finally:
        cluster.scontrol("update", f"nodename={cluster.node}", "state=resume")
    return results


def hold(cluster, base: Path, root: Path, targets: list[str], args) -> dict:
    workdir = root / "hold"
    shutil.copytree(base, workdir, symlinks=True)
    command = snakemake_command(workdir, "--profile", str(PROFILE), "--jobs", str(args.jobs), "--slurm-array-jobs",
                                "features", "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5",
                                *targets)
    log_path = root / "hold.log"
    log = open(log_path, "w")
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        process.wait(timeout=args.timeout)
        finished = True
    except subprocess.TimeoutExpired:
        finished = False
    elapsed = time.perf_counter() - start
    rows = feature_jobs(cluster)  # the hold scenario runs on a fresh cluster: every job is this run's
    done = sorted(target for target in targets if (workdir / target).exists())
    stop(process, log)
    cluster.cancel_all()
    text = log_path.read_text()
    submitted = set(re.findall(r"Submitted array job with Snakemake IDs ([\d,]+)", text))
    # Each job (array task or not) and the CUDA_VISIBLE_DEVICES its step saw (the test cluster's srun wrapper).
    # Array tasks by <array id>_<task id>: SLURM may run the first task under the array's job id.
    devices = {task or job: device for job, device, _, task in cluster.array_steps()}
    tasks = []
    for job_id, job in sorted(cluster.jobs().items(), key=lambda item: int(item[0])):
        if job.get("Comment", "").startswith("rule_features"):
            task = f"{job['ArrayJobId']}_{job['ArrayTaskId']}" if "ArrayTaskId" in job else job_id
            tasks.append({"job": job_id, "array_task": task, "state": job["JobState"], "gres": job.get("TresPerJob"),
                          "cuda_visible_devices": devices.get(task), "start": job.get("StartTime"),
                          "end": job.get("EndTime")})
    result = {
        "shards": len(targets), "jobs": args.jobs, "finished": finished, "returncode": process.returncode,
        "elapsed_s": elapsed, "shards_done": len(done), "missing": sorted(set(targets) - set(done)),
        "slurm_feature_jobs": rows, "array_submissions": sorted(submitted),
        "single_submissions": re.findall(r"Job (\d+) has been submitted with SLURM jobid (\S+)", text),
        # An array's first task has no srun step to record (plugin 2.8 runs it in the batch step; its
        # cuda_visible_devices above is null): each shard's log names the GPU its code saw.
        "feature_tasks": tasks, "overlapping_tasks_with_the_same_gpu": same_gpu_overlaps(tasks),
        "shard_devices": shard_devices(workdir),
        "log": str(log_path),
    }
    if finished and done == sorted(targets):
        result["identical_to_local_run"] = compare_with_local(base, root, workdir, targets)
    print(json.dumps({key: value for key, value in result.items() if key != "log"}), flush=True)
    return result


def shard_devices(workdir: Path) -> dict[str, str]:
    """The CUDA_VISIBLE_DEVICES each feature job's code saw, from its log ("device lease: ...")."""
    devices = {}
    for log in sorted((workdir / "logs" / "features").glob("shard_*.log")):
        match = re.search(r"device lease: CUDA_VISIBLE_DEVICES=(\S+)", log.read_text())
        devices[log.stem] = match.group(1) if match else None
    return devices


def same_gpu_overlaps(tasks: list[dict]) -> list[tuple[str, str]]:
    """Pairs of feature jobs that ran at the same time with the same CUDA_VISIBLE_DEVICES."""
    from datetime import datetime

    def seconds(stamp):
        return datetime.fromisoformat(stamp).timestamp()

    ran = [task for task in tasks if task["state"] == "COMPLETED" and task["cuda_visible_devices"]]
    return [(one["job"], two["job"]) for index, one in enumerate(ran) for two in ran[index + 1:]
            if one["cuda_visible_devices"] == two["cuda_visible_devices"]
            and min(seconds(one["end"]), seconds(two["end"])) > max(seconds(one["start"]), seconds(two["start"]))]


def dataset_names(handle) -> list[str]:
    names = []
    handle.visititems(lambda name, item: names.append(name) if isinstance(item, h5py_dataset()) else None)
    return names


def h5py_dataset():
    import h5py

    return h5py.Dataset


def compare_with_local(base: Path, root: Path, workdir: Path, targets: list[str]) -> dict:
    """The same shards run locally (4 torch threads like the profile's feature jobs): every dataset equal?"""
    import h5py
    import numpy as np

    local = root / "local"
    shutil.copytree(base, local, symlinks=True)
    subprocess.run(snakemake_command(local, *targets, "--cores", "4", "--set-threads", "features=4"), check=True,
                   capture_output=True, text=True, timeout=1800)
    files = datasets = 0
    differing = []
    for target in targets:
        for path in sorted((local / target).glob("*.h5")):
            files += 1
            with h5py.File(path) as theirs, h5py.File(workdir / target / path.name) as ours:
                for name in dataset_names(theirs):
                    datasets += 1
                    if name not in ours or not np.array_equal(ours[name][()], theirs[name][()]):
                        differing.append(f"{target}/{path.name}:{name}")
    return {"files": files, "datasets": datasets, "differing": differing}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", nargs="?", choices=("submit", "hold"), default="submit")
    parser.add_argument("--shards", type=int, default=200, help="feature jobs (one prompt each)")
    parser.add_argument("--jobs", type=int, default=200, help="snakemake --jobs (the profile says 100)")
    parser.add_argument("--steps", type=int, default=3, help="num_denoising_steps")
    parser.add_argument("--repeats", type=int, default=1, help="submit: plain/array pairs")
    parser.add_argument("--settle", type=float, default=30.0,
                        help="submit: stop waiting once the queued count has not changed for this many seconds")
    parser.add_argument("--timeout", type=float, default=600.0, help="hold: seconds before giving up on Snakemake")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new folder under /tmp")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: docs/measurements/slurm-arrays.json (submit), slurm-arrays-hold.json (hold)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = measurement_path("slurm-arrays.json" if args.scenario == "submit" else "slurm-arrays-hold.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    record = header("tools/bench_slurm_arrays.py", argv)
    module = load_cluster_module()
    module.ensure_installed()
    cluster_root = Path(tempfile.mkdtemp(prefix="nc-bench-", dir="/tmp"))  # munge's socket path must be short
    root = args.workdir or Path(tempfile.mkdtemp(prefix="nc-bench-arrays-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    base = root / "base"
    targets = make_workdir(base, args.shards, args.steps)
    built = build_local_rules(base)
    print(f"local rules (tiny model, schedule) built in {built:.1f} s under {base}", flush=True)

    cluster = module.SlurmCluster(cluster_root)
    started = time.perf_counter()
    try:
        cluster.start()
        print(f"cluster up in {time.perf_counter() - started:.1f} s (node {cluster.node})", flush=True)
        import os

        os.environ.update(cluster.env)
        for key in [key for key in os.environ if key.startswith(("SLURM_JOB", "SBATCH_", "SRUN_"))]:
            del os.environ[key]
        if args.scenario == "submit":
            results = submit(cluster, base, root, targets, args)
        else:
            results = [hold(cluster, base, root, targets, args)]
    finally:
        cluster.stop()
        shutil.rmtree(cluster_root, ignore_errors=True)
    report = record | {"scenario": args.scenario, "shards": args.shards, "jobs": args.jobs, "steps": args.steps,
                       "repeats": args.repeats, "slurm": slurm_version(), "executor_plugin": plugin_version(),
                       "results": results}
    write_record(args.out, report)
    if args.scenario == "submit":
        for mode in ("plain", "array"):
            rows = [row for row in results if row["mode"] == mode]
            for row in rows:
                if row["first_queued_s"] is None:
                    print(f"{mode:6s} queued no feature job")
                    continue
                print(f"{mode:6s} queued {row['queued_feature_jobs']:4d} feature jobs: first after "
                      f"{row['first_queued_s']:.1f} s, last after {row['last_queued_s']:.1f} s "
                      f"(window {row['submit_window_s']:.1f} s), {row['sbatch_calls']} sbatch calls")
        plain = [row["last_queued_s"] for row in results if row["mode"] == "plain" and row["last_queued_s"]]
        array = [row["last_queued_s"] for row in results if row["mode"] == "array" and row["last_queued_s"]]
        if plain and array:
            print(f"ratio plain/array (to last queued): {min(plain) / min(array):.2f}")
    print(f"report: {args.out} (logs under {root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
