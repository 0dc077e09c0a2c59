"""A small run end to end against the legacy method, in one invocation on one machine (issue 9).

The SD-1.5-architecture random model (``nullcov/models/sd15.py`` saved as a diffusers folder, as
``tools/feature_memory.py`` does), 64 px, 8 prompts x 8 ``noised`` steps, one shard, CPU:

1. **legacy**: the legacy tool's method (``tools/benchmark.py`` ``run_legacy``: per prompt and
   timestep a noised latent, one UNet call at batch 1, every cross-attention input dumped with
   ``np.savez_compressed``, then a second pass streaming the files back into covariances), after
   loading the same model folder, in a process of its own; its wall time is that process's, from
   start to exit (interpreter, imports and model load included), as the workflow's is.
2. **workflow**: ``snakemake --until covariance covariance_text`` (schedule, the feature job, the
   merges: the same covariances), then ``snakemake --until projection projection_text`` (the
   projections on top); wall time of each Snakemake process.

``--repeats N`` runs both N times (workflow first, then legacy, each time) and reports every run
and the median ratios: on a shared machine single runs vary by ±10 %.
Prints the table and writes ``docs/measurements/small-run.json`` (with
:func:`nullcov.measurement.header`); the model folder (3.9 GB) and the runs stay in ``--workdir``
(default ``benchmarks/small-run``). ``make bench-small-run``; not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmark import read_benchmark_prompts, run_legacy  # noqa: E402  (tools/ is this script's folder)
from feature_memory import sd15_folder  # noqa: E402

from nullcov.measurement import header, measurement_path, write_record  # noqa: E402

STEPS, PROMPTS, RESOLUTION, SAMPLER = 8, 8, 64, "DPM++ 2M Karras"


def legacy(model: Path, prompts: list[str], workdir: Path) -> dict:
    from nullcov.models.model import load_pipeline
    from nullcov.models.schedule import build_schedule

    start = time.perf_counter()
    pipe = load_pipeline(model, "float32", "cpu")
    schedule = build_schedule(dict(pipe.scheduler.config), SAMPLER, STEPS)
    config = {"seed": 0, "resolution": RESOLUTION}
    result = run_legacy(pipe, prompts, schedule, config, workdir / "legacy-scratch", amortise_prompts=len(prompts))
    result["wall_s"] = time.perf_counter() - start
    return result


def workflow(model: Path, prompts: list[str], workdir: Path) -> dict:
    run = workdir / "workflow"
    shutil.rmtree(run, ignore_errors=True)  # a first run: no results, no cached model hash or schedule
    run.mkdir(parents=True)
    (run / "prompts.txt").write_text("\n".join(prompts) + "\n")
    command = [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(run),
        "--configfile", str(REPO / "config" / "config.yaml"), "--cores", "2", "--config", f"model={model}",
        f"prompts={run / 'prompts.txt'}", f"num_denoising_steps={STEPS}", "collection=noised",
        f"resolution={RESOLUTION}", f"prompts_per_shard={PROMPTS}", f"batch_size={PROMPTS}",
        "validation_prompts=null", "attention_prompts=0", "device=cpu", f"sampler_strategy={SAMPLER}",
    ]
    times = {}
    for stage, rules in (("covariances", ["covariance", "covariance_text"]),
                         ("projections", ["projection", "projection_text"])):
        start = time.perf_counter()
        subprocess.run([*command, "--until", *rules], check=True, capture_output=True, text=True)
        times[stage] = time.perf_counter() - start
    scratch = sum(path.stat().st_size for path in (run / "results" / "features").rglob("*.h5"))
    return {"covariances_s": times["covariances"], "projections_s": times["projections"],
            "total_s": times["covariances"] + times["projections"], "scratch_bytes": scratch}


def legacy_process(workdir: Path) -> dict:
    """:func:`legacy` in a process of its own, timed from outside (start to exit)."""
    out = workdir / "legacy.json"
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--legacy-only", "--workdir", str(workdir)], check=True,
                   capture_output=True, text=True)
    result = json.loads(out.read_text())
    result["process_wall_s"] = time.perf_counter() - start
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "small-run")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=measurement_path("small-run.json"))
    parser.add_argument("--legacy-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = sd15_folder(args.workdir)
    prompts = read_benchmark_prompts(PROMPTS)
    if args.legacy_only:
        shutil.rmtree(args.workdir / "legacy-scratch", ignore_errors=True)
        (args.workdir / "legacy.json").write_text(json.dumps(legacy(model, prompts, args.workdir), default=str))
        return 0
    record = header("tools/bench_small_run.py", argv, torch_threads=2)  # the workflow's jobs' threads
    record |= {"model": "SD-1.5 architecture, random weights (nullcov/models/sd15.py), saved as a diffusers folder",
               "resolution": RESOLUTION, "prompts": PROMPTS, "steps": STEPS, "collection": "noised",
               "sampler": SAMPLER, "device": "cpu", "cores": 2}
    runs = []
    print(f"SD-1.5 architecture, {RESOLUTION} px, {PROMPTS} prompts x {STEPS} noised steps, CPU, one shard")
    for number in range(args.repeats):
        ours = workflow(model, prompts, args.workdir)
        old = legacy_process(args.workdir)
        run = {"legacy": old, "workflow": ours,
               "speedup_covariances": old["process_wall_s"] / ours["covariances_s"],
               "speedup_with_projections": old["process_wall_s"] / ours["total_s"]}
        runs.append(run)
        print(f"run {number + 1}: legacy method (process: load + dump + covariances) {old['process_wall_s']:.1f} s, "
              f"scratch {old['scratch_bytes'] / 1e6:.0f} MB; workflow to the merged covariances "
              f"{ours['covariances_s']:.1f} s ({run['speedup_covariances']:.2f}x), scratch "
              f"{ours['scratch_bytes'] / 1e6:.0f} MB; with projections {ours['total_s']:.1f} s "
              f"({run['speedup_with_projections']:.2f}x)")
    report = record | {
        "runs": runs, "median_speedup_covariances": statistics.median(r["speedup_covariances"] for r in runs),
        "median_speedup_with_projections": statistics.median(r["speedup_with_projections"] for r in runs)}
    write_record(args.out, report)
    print(f"wrote {args.out}")
    print(f"median over {len(runs)} run(s): {report['median_speedup_covariances']:.2f}x to the covariances, "
          f"{report['median_speedup_with_projections']:.2f}x with projections")
    return 0


if __name__ == "__main__":
    sys.exit(main())
