"""A feature job held to a mem_mb below its unchunked need: its peak RSS and its results.

On the SD-1.5-architecture random model (nullcov/models/sd15.py, saved once as a diffusers folder
under --workdir), one shard through the real workflow (`snakemake ... results/features/shard_0000`),
first with the rule's own mem_mb (every step held at once), then with
`--set-resources features:mem_mb=N` for each N given: Snakemake's `benchmark:` max_rss of each
job (sampled: every 0.5 s for 15 s, then every 30 s) and its exact peak RSS (VmHWM, from its log),
its chunks (from its log), and whether every step file equals the unchunked run's bit for bit.
Writes ``docs/measurements/feature-memory.json`` (with :func:`nullcov.measurement.header`); the
model folder and the runs stay in --workdir. Not part of `make test` (minutes, ~8 GB of RAM
and disk). Usage (`make bench-feature-memory`):

    python tools/feature_memory.py --workdir /tmp/nullcov-feature-memory --mem-mb 5600 6000
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nullcov.measurement import header, measurement_path, write_record  # noqa: E402
from nullcov.statistics.store import read_moments  # noqa: E402


def sd15_folder(workdir: Path) -> Path:
    """The SD-1.5-architecture random model as a diffusers folder (built once)."""
    folder = workdir / "sd15-random"
    if (folder / "model_index.json").exists():
        return folder
    from nullcov.models.sd15 import build_sd15_pipeline
    from nullcov.models.tiny_model import build_tiny_model

    tiny = build_tiny_model(workdir / "tiny-sd")
    build_sd15_pipeline(tiny / "tokenizer").save_pretrained(folder, safe_serialization=True)
    return folder


def run_job(workdir: Path, model: Path, name: str, args, mem_mb: int | None) -> dict:
    run = workdir / name
    run.mkdir(parents=True, exist_ok=True)
    prompts = [f"a photo of object number {i} on a table" for i in range(args.prompts)]
    (run / "prompts.txt").write_text("\n".join(prompts) + "\n")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text()) | {
        "model": str(model), "prompts": str(run / "prompts.txt"), "prompts_per_shard": args.prompts,
        "num_denoising_steps": args.steps, "collection": args.collection, "resolution": args.resolution,
        "batch_size": args.prompts, "device": "cpu", "dtype": "float32", "validation_prompts": None,
        "attention_prompts": 0,
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(run),
               "--configfile", str(run / "config.yaml"), "--cores", "2", "--forceall",
               "results/features/shard_0000"]
    if mem_mb is not None:
        command += ["--set-resources", f"features:mem_mb={mem_mb}"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    bench = (run / "benchmarks/features/shard_0000.tsv").read_text().splitlines()
    row = dict(zip(bench[0].split("\t"), bench[1].split("\t")))
    log = (run / "logs/features/shard_0000.log").read_text()
    memory = re.search(r"memory: .*", log)
    peak = re.search(r"peak RSS of this job (\d+) MB", log)
    asked = re.search(r"mem_mb=(\d+)", result.stdout + result.stderr + log)
    return {"name": name, "mem_mb": mem_mb, "max_rss_mb": float(row["max_rss"]),
            "peak_rss_mb": float(peak.group(1)) if peak else None, "job_s": float(row["s"]),
            "snakemake_wall_s": wall, "memory_log": memory.group(0) if memory else "",
            "mem_mb_seen": int(asked.group(1)) if asked else None, "folder": str(run / "results/features/shard_0000")}


def same_files(a: str, b: str) -> bool:
    names = sorted(path.name for path in Path(a).glob("*.h5"))
    assert names == sorted(path.name for path in Path(b).glob("*.h5")) and names
    for name in names:
        first, _ = read_moments(Path(a) / name, "features")
        second, _ = read_moments(Path(b) / name, "features")
        if first.keys() != second.keys():
            return False
        for key in first:
            if first[key].count != second[key].count or not (
                np.array_equal(first[key].sum, second[key].sum)
                and np.array_equal(first[key].sum_outer, second[key].sum_outer)
            ):
                return False
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nullcov-feature-memory"))
    parser.add_argument("--mem-mb", type=int, nargs="*", default=[], help="budgets below the unchunked need")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--collection", default="noised", choices=["noised", "trajectory"])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--out", type=Path, default=measurement_path("feature-memory.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    record = header("tools/feature_memory.py", argv, torch_threads=2)  # the feature rule's threads
    model = sd15_folder(args.workdir)
    runs = [run_job(args.workdir, model, "unchunked", args, None)]
    for mem_mb in args.mem_mb:
        runs.append(run_job(args.workdir, model, f"mem_{mem_mb}", args, mem_mb))
        runs[-1]["equals_unchunked"] = same_files(runs[0]["folder"], runs[-1]["folder"])
        runs[-1]["under_budget"] = max(runs[-1]["max_rss_mb"], runs[-1]["peak_rss_mb"] or 0) <= mem_mb
    print(f"SD-1.5 architecture, {args.resolution} px, {args.prompts} prompts x {args.steps} {args.collection} "
          "steps, CPU")
    print("run | mem_mb | benchmark max_rss MB | peak RSS (VmHWM) MB | job s | equal to unchunked | job log")
    for run in runs:
        print(f"{run['name']} | {run['mem_mb'] or 'rule'} | {run['max_rss_mb']:.0f} | {run['peak_rss_mb']} | "
              f"{run['job_s']:.1f} | "
              f"{run.get('equals_unchunked', '-')} | {run['memory_log']}")
    weights = sum(path.stat().st_size for path in model.rglob("*.safetensors"))
    write_record(args.out, record | {
        "model": "SD-1.5 architecture, random weights (nullcov/models/sd15.py), saved as a diffusers folder",
        "weight_file_bytes": weights, "resolution": args.resolution, "prompts": args.prompts, "steps": args.steps,
        "collection": args.collection, "device": "cpu", "runs": runs})
    print(f"wrote {args.out}")
    return 0 if all(run.get("equals_unchunked", True) and run.get("under_budget", True) for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
