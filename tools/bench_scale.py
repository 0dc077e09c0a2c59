"""`make bench-scale`: the storage side at SD-1.5 scale, without a UNet run.

Writes synthetic statistics of SD-1.5's shapes (16 ``attn2`` layers, ``to_q`` + ``to_out``
inputs, 320-1280 dims: 198 MB per step as full float64 matrices) through nullcov's own store
API, then measures:

* peak RSS of the merge job's code (``nullcov.statistics.jobs.merge_job`` in a fresh subprocess, its own
  ``ru_maxrss``) at 3, 12 and 48 shards of one step, and its throughput (GB/s of shard files)
  next to the disk's own sequential read speed of the same files, measured in the same run
  (each file is evicted from the page cache with ``posix_fadvise(DONTNEED)`` before each pass:
  only this tool's files, nothing global);
* ``moments_file_bytes`` against the written file, and the shard scratch of 1000 prompts × 50
  steps with the default ``prompts_per_shard: auto``;
* wall time and peak RSS of ``snakemake -n`` at 100k and 600k prompts × 50 steps, 100 prompts
  per shard (the builtin tiny model's schedule; the DAG does not depend on the model).

Files go to a temporary folder under --scratch (default: ./benchmarks/bench-scale-tmp, about
5 GB) and are deleted afterwards; results to ``docs/measurements/bench-scale.json`` (with
:func:`nullcov.measurement.header`, rendered into ``docs/performance.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nullcov.measurement import header, measurement_path, write_record  # noqa: E402
from nullcov.prompts import auto_prompts_per_shard  # noqa: E402
from nullcov.statistics.moments import Moments  # noqa: E402
from nullcov.statistics.store import moments_file_bytes, write_moments  # noqa: E402

LEGACY_BYTES_PER_PROMPT_TIMESTEP = 92e6  # the legacy tool's scratch (issue 9)


def sd15_dims() -> dict[str, int]:
    """``{<layer>/to_q|to_out: in_features}`` of SD-1.5's UNet, built on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel

    from nullcov.models.sd15 import SD15_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    dims = {}
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            dims[f"{name}/to_q"] = module.to_q.in_features
            dims[f"{name}/to_out"] = module.to_out[0].in_features
    return dims


def evict(paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read_seconds(paths) -> float:
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.read(16 << 20):
                pass
    return time.perf_counter() - start


# Peak RSS is the child's own (measurement.peak_rss_bytes: VmHWM, reset by exec; ru_maxrss is not: it
# would carry this parent's).
MERGE_CHILD = """
import json, sys, time
sys.path.insert(0, {repo!r})
from nullcov.statistics.jobs import merge_job
from nullcov.measurement import peak_rss_bytes as peak
paths = json.loads(sys.argv[1])
imported = peak()
start = time.perf_counter()
merge_job(paths, sys.argv[2], None)
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "max_rss_bytes": peak(), "rss_after_imports_bytes": imported}}))
"""


def merge_in_subprocess(paths, output) -> dict:
    child = subprocess.run([sys.executable, "-c", MERGE_CHILD.format(repo=str(REPO)), json.dumps(paths), output],
                           capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def write_shards(folder: Path, dims: dict[str, int], count: int) -> list[str]:
    rng = np.random.default_rng(0)
    base = {}
    for key, d in dims.items():
        half = rng.normal(size=(d, d))
        base[key] = half + half.T
    paths = []
    for index in range(count):
        moments = {key: Moments.about(1000, np.full(d, 0.5), np.full(d, float(index)), base[key] * (1 + index))
                   for key, d in dims.items()}
        provenance = {"model": {"spec": "sd15-synthetic", "fingerprint": "synthetic"}, "config": {},
                      "packages": {}, "prompts": {"first_index": index, "count": 1, "prompts": [f"p{index}"]}}
        path = folder / f"shard_{index:04d}" / "alpha_00_0999.h5"
        write_moments(path, "features", moments, {"provenance": provenance, "step": {"index": 0}})
        paths.append(str(path))
    return paths


def dry_run(workdir: Path, prompts: int, steps: int, per_shard: int) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    prompt_file = workdir / "prompts.txt"
    with open(prompt_file, "w") as handle:
        handle.writelines(f"a photo of object number {index} in a scene\n" for index in range(prompts))
    (workdir / "config.yaml").write_text(json.dumps({
        "prompts": str(prompt_file), "num_denoising_steps": steps, "prompts_per_shard": per_shard,
        "validation_prompts": None, "attention_prompts": 0}))
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(workdir / "config.yaml"), "-n", "--quiet", "--cores", "2"]
    subprocess.run(command, capture_output=True, text=True, check=True)  # warms the schedule cache
    start = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb %M", *command], capture_output=True, text=True,
                            check=True)
    seconds = time.perf_counter() - start
    max_rss_kb = next(int(line.split()[1]) for line in result.stderr.splitlines() if line.startswith("maxrss_kb"))
    return {"prompts": prompts, "steps": steps, "prompts_per_shard": per_shard, "seconds": seconds,
            "max_rss_bytes": max_rss_kb * 1024}


def projection_timings() -> list[dict]:
    """Seconds of today's full float64 ``eigh`` + ``U0 U0ᵀ`` against ``null_space`` at d = 1280, for
    a threshold inside the spectrum and outside it (below and above), and the largest |ΔP|."""
    from nullcov.statistics.projection import null_space

    rng = np.random.default_rng(1)
    d = 1280
    rows = rng.normal(size=(2 * d, d)) * np.geomspace(1e-3, 10, d)  # a spread spectrum, full rank
    statistic = rows.T @ rows / rows.shape[0]
    timings = []
    for label, threshold in (("inside the spectrum", 0.02), ("under the spectrum", 1e-12), ("over it", 1e6)):
        start = time.perf_counter()
        values, vectors = np.linalg.eigh((statistic + statistic.T) / 2)
        basis = vectors[:, values < threshold]
        full = (basis @ basis.T).astype(np.float32)
        full_seconds = time.perf_counter() - start
        start = time.perf_counter()
        space = null_space(statistic, threshold)
        seconds = time.perf_counter() - start
        timings.append({"d": d, "threshold": label, "null_dim": space.null_dim, "full_eigh_seconds": full_seconds,
                        "null_space_seconds": seconds,
                        "max_abs_projection_difference": float(np.abs(space.projection - full).max())})
        print(json.dumps(timings[-1]), flush=True)
    return timings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scratch", default=str(REPO / "benchmarks" / "bench-scale-tmp"))
    parser.add_argument("--out", "--output", dest="out", type=Path, default=measurement_path("bench-scale.json"))
    parser.add_argument("--shards", default="3,12,48")
    parser.add_argument("--dry-run-prompts", default="100000,600000", help="empty: no dry-runs")
    parser.add_argument("--no-projections", dest="projections", action="store_false")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    scratch = Path(args.scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    results: dict = header("tools/bench_scale.py", argv)
    results["projection"] = projection_timings() if args.projections else []
    try:
        dims = sd15_dims()
        step_bytes = sum(8 * d * d for d in dims.values())
        counts = [int(n) for n in args.shards.split(",")]
        paths = write_shards(scratch / "features", dims, max(counts))
        file_bytes = os.path.getsize(paths[0])
        per_shard = auto_prompts_per_shard(50)
        shards_1000 = -(-1000 // per_shard)
        scratch_1000 = shards_1000 * 50 * moments_file_bytes(dims)
        results["store"] = {
            "layers": len(dims) // 2, "step_bytes_full_float64": step_bytes, "step_file_bytes": file_bytes,
            "moments_file_bytes_estimate": moments_file_bytes(dims),
            "auto_prompts_per_shard_at_50_steps": per_shard,
            "scratch_1000x50_bytes": scratch_1000,
            "legacy_1000x50_bytes": LEGACY_BYTES_PER_PROMPT_TIMESTEP * 1000 * 50,
            "ratio_legacy_over_scratch": LEGACY_BYTES_PER_PROMPT_TIMESTEP * 1000 * 50 / scratch_1000,
        }
        results["merge"] = {"runs": []}
        for count in counts:
            chosen = paths[:count]
            evict(chosen)
            read_seconds = sequential_read_seconds(chosen)
            evict(chosen)
            output = str(scratch / f"merged_{count}.h5")
            merged = merge_in_subprocess(chosen, output)
            total = sum(os.path.getsize(p) for p in chosen)
            results["merge"]["runs"].append({
                "shards": count, "bytes_read": total, "max_rss_bytes": merged["max_rss_bytes"],
                "rss_after_imports_bytes": merged["rss_after_imports_bytes"],
                "rss_above_imports_over_step_bytes": (merged["max_rss_bytes"] - merged["rss_after_imports_bytes"])
                / step_bytes,
                "merge_seconds": merged["seconds"], "merge_gb_per_s": total / merged["seconds"] / 1e9,
                "disk_sequential_read_gb_per_s": total / read_seconds / 1e9,
            })
            os.remove(output)
            print(json.dumps(results["merge"]["runs"][-1]), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["dry_run"] = []
    for prompts in [int(n) for n in args.dry_run_prompts.split(",") if n]:
        workdir = Path(args.scratch + f"-dry-{prompts}")
        try:
            results["dry_run"].append(dry_run(workdir, prompts, 50, 100))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        print(json.dumps(results["dry_run"][-1]), flush=True)
    results["machine"]["load_average_end"] = os.getloadavg()[0]
    write_record(args.out, results)
    print(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
