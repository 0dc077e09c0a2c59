"""`make bench-faults`: the fault table's cases (:data:`CASES`: each fault class a long run meets on a
shared cluster, how it is caused and which test causes it) and their measurement file
``docs/measurements/bench-faults.json``, which ``tools/render_docs.py`` renders into docs/performance.md.

The faults themselves are tests of ``tests/workflow/test_faults.py``
(local executor) and ``tests/workflow/test_slurm.py`` (the one-node SLURM cluster of
``tests/slurm_cluster.py``; needs root). Each causes its fault, checks what the user sees, resumes and
compares the results with an undisturbed run bit for bit. The cheap ones run in CI (``make test``); the
expensive ones are marked ``bench_faults`` and run only with ``--bench-faults``, which this tool passes:
it runs every case's test in one pytest process and records its outcome, seconds and the message the
test saw (``record_property("user_saw", ...)``, read back from pytest's JUnit XML).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nullcov.measurement import header, measurement_path, write_record  # noqa: E402

FAULTS = "tests/workflow/test_faults.py"
SLURM = "tests/workflow/test_slurm.py"
IDENTICAL = "none: resumed, results bit-identical to an undisturbed run"

#: The fault classes of issue #30 in the table's order: (class, how it is caused, test, in CI, data lost).
CASES = [
    ("time limit (TIMEOUT), SLURM",
     "running feature job stopped (SIGSTOP), `scontrol update TimeLimit=0`: slurmctld ends it as TIMEOUT",
     f"{SLURM}::test_a_feature_job_past_its_time_limit_is_resubmitted_with_twice_the_runtime", True,
     "none: retried with 2x runtime and mem_mb, results identical"),
    ("memory (OOM), SLURM",
     "`--set-resources features:mem_mb=700*attempt`, then `=100`: the job's own budget check "
     "(MemoryBudgetError, exit 1); the test cluster has no cgroups, so no kernel OOM kill (137)",
     f"{SLURM}::test_a_feature_job_short_of_memory_is_retried_with_more_then_named", False,
     "none: retry with 1400 MB identical; at 100 MB all 3 attempts fail naming the need"),
    ("preemption / requeue, SLURM",
     "`scontrol requeue` of the running (stopped) feature job, a stale file put in its folder; "
     "released with `StartTime=now`",
     f"{SLURM}::test_a_requeued_feature_job_restarts_clean_and_gives_identical_results", False,
     "none: same job id restarted in an emptied folder, results identical"),
    ("node lost: feature job", "SIGKILL of the feature job mid-shard (local executor)",
     f"{FAULTS}::test_sigkill_of_a_feature_job_then_rerun_incomplete_gives_identical_results", True, IDENTICAL),
    ("node lost: merge job", "SIGKILL of a merge (covariance) job as soon as it runs (local executor)",
     f"{FAULTS}::test_sigkill_of_a_merge_job_leaves_nothing_half_written_and_the_rerun_redoes_exactly_it", False,
     "none: that merge redone, no temporary file left, results identical"),
    ("write fails inside a step file", "ENOSPC raised in the middle of the second step file's HDF5 write",
     f"{FAULTS}::test_failing_write_leaves_no_partial_file", True, "none: the first step file complete, no other"),
    ("two runs, one results folder", "a second Snakemake started while the first runs (local executor)",
     f"{FAULTS}::test_a_second_concurrent_run_is_refused_by_the_lock", True, "none: the second run refused"),
    ("two runs, two folders, one model", "two Snakemake runs at once reading one model folder",
     f"{FAULTS}::test_two_runs_on_different_folders_sharing_one_model_both_succeed", False,
     "none: both finish, results identical"),
    ("stale lock (Snakemake SIGKILLed)", "SIGKILL of Snakemake mid-run, then `--unlock`",
     f"{FAULTS}::test_sigkill_of_snakemake_then_unlock_and_rerun_gives_identical_results", True, IDENTICAL),
    ("full disk: feature job", "results/ on a tmpfs shrunk to 100 KB free (`mount -o remount,size=`)",
     f"{FAULTS}::test_full_disk_in_a_feature_job_names_path_and_bytes_then_resumes_identical", True, IDENTICAL),
    ("full disk: merge", "results/ tmpfs shrunk to 100 KB free before the merges",
     f"{FAULTS}::test_full_disk_in_a_merge_or_projection_names_path_and_bytes_then_resumes_identical[covariance]",
     False, IDENTICAL),
    ("full disk: projection", "results/ tmpfs shrunk to 100 KB free before the projections",
     f"{FAULTS}::test_full_disk_in_a_merge_or_projection_names_path_and_bytes_then_resumes_identical[projections]",
     False, IDENTICAL),
    ("interrupted: Ctrl-C during a merge", "SIGINT to Snakemake while a merge job runs",
     f"{FAULTS}::test_snakemake_interrupted_during_a_merge_resumes_identical[ctrl-c]", False, IDENTICAL),
    ("interrupted: SIGTERM during a merge", "SIGTERM to Snakemake while a merge job runs",
     f"{FAULTS}::test_snakemake_interrupted_during_a_merge_resumes_identical[sigterm]", False, IDENTICAL),
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=measurement_path("bench-faults.json"))
    parser.add_argument("--only", nargs="*", default=None, help="run only the cases whose class contains a word")
    return parser.parse_args(argv)


def _results(junit: Path) -> dict[str, dict]:
    """``{test name with parameters: {outcome, seconds, user_saw}}`` from pytest's JUnit XML."""
    found = {}
    for case in ET.parse(junit).iter("testcase"):
        outcome = "passed"
        for child, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            element = case.find(child)
            if element is not None:
                outcome = name if child != "skipped" else f"skipped: {element.get('message', '')}"
        properties = {item.get("name"): item.get("value") for item in case.iter("property")}
        found[case.get("name")] = {"outcome": outcome, "seconds": round(float(case.get("time", 0)), 1),
                                   "user_saw": properties.get("user_saw")}
    return found


def main(argv=None) -> int:
    args = parse_args(argv)
    cases = [case for case in CASES if args.only is None or any(word in case[0] for word in args.only)]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as scratch:
        junit = Path(scratch) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", "--bench-faults",
                   f"--junitxml={junit}", "-o", "junit_family=xunit1",
                   # one module after the other: its module-scoped fixtures (the SLURM cluster) are set up once
                   *sorted((case[2] for case in cases), key=lambda test: test.split("::")[0])]
        run = subprocess.run(command, cwd=REPO, text=True, capture_output=True)
        print(run.stdout[-6000:], run.stderr[-3000:], sep="\n")
        results = _results(junit) if junit.exists() else {}
    rows = []
    for name, caused, test, in_ci, lost in cases:
        result = results.get(test.rpartition("::")[2], {"outcome": "not run", "seconds": None, "user_saw": None})
        rows.append({"class": name, "caused": caused, "test": test, "ci": in_ci, **result,
                     "data_lost": lost if result["outcome"] == "passed" else "unknown: the test did not pass"})
    record = header("tools/bench_faults.py", argv) | {
        "cases": rows, "elapsed_s": round(time.perf_counter() - start, 1), "pytest_exit_status": run.returncode}
    write_record(args.out, record)
    print(f"{sum(row['outcome'] == 'passed' for row in rows)} of {len(rows)} fault cases passed "
          f"in {record['elapsed_s']} s; wrote {args.out}")
    return 0 if all(row["outcome"] == "passed" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
