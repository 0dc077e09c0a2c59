"""`make bench-mmdit-scale`: merge, projection and eigendecomposition at FLUX.1 size, from synthetic statistics.

FLUX.1 is 19 joint and 38 single blocks at width 3072: with the default streams (image, text, image_out,
text_out, single) one step is 114 statistics of 3072 x 3072, 8.6 GB of float64. This tool writes
synthetic statistics of exactly those keys and widths (:func:`nullcov.models.mmdit_dims.stream_widths` of
the published FLUX.1 config, ``nullcov.models.mmdit_dims.PUBLISHED_CONFIGS``) through nullcov's own store API, then
measures, each job in a fresh subprocess with its own peak RSS (``nullcov.measurement.peak_rss_bytes``):

* the merge job (``nullcov.statistics.jobs.merge_job``) of ``--shards`` shard files of one whole step:
  seconds, GB/s of shard files, peak RSS and its ratio to the step's float64 bytes;
* the projection job (``nullcov.statistics.jobs.projection_job``) of one merged step file holding the
  first ``--projection-keys`` statistics (a PSD spectrum, the threshold inside it): seconds per key, peak
  RSS; a whole step's time is that per-key time times its 114 keys (said as arithmetic in the docs);
* float64 ``eigh`` (numpy, the projection job's CPU path) and ``eigvalsh`` at d = 3072 and, with
  ``--proj-out``, at 15,360 (a FLUX single block's ``proj_out``), and torch's float64 ``eigh`` on the GPU
  (the projection job's path when it sees one) where there is a GPU.

Files go to ``--scratch`` (default ``benchmarks/bench-mmdit-scale-tmp``, ~18 GB at 3 shards), deleted
afterwards; results to ``docs/measurements/bench-mmdit-scale.json`` (rendered into docs/model-families.md).

Usage::

    python tools/bench_mmdit_scale.py [--shards 3] [--projection-keys 12] [--proj-out] [--scratch DIR]
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
sys.path.insert(0, str(REPO / "tools"))

from bench_scale import MERGE_CHILD, evict  # noqa: E402  (tools/bench_scale.py: the SD-1.5 storage bench)

from nullcov.measurement import header, measurement_path, write_record  # noqa: E402
from nullcov.models.family import DEFAULT_STREAMS  # noqa: E402
from nullcov.models.mmdit_dims import PUBLISHED_CONFIGS, stream_widths  # noqa: E402
from nullcov.statistics.moments import Moments  # noqa: E402
from nullcov.statistics.store import moments_file_bytes, write_moments  # noqa: E402

MODEL = "FLUX.1-dev / FLUX.1-schnell"
PROJECTION_CHILD = """
import json, sys, time
sys.path.insert(0, {repo!r})
from nullcov.statistics.jobs import projection_job
from nullcov.measurement import peak_rss_bytes as peak
imported = peak()
start = time.perf_counter()
projection_job(sys.argv[1], sys.argv[2], "second_moment", float(sys.argv[3]), None)
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "max_rss_bytes": peak(), "rss_after_imports_bytes": imported}}))
"""


def flux_dims(streams=DEFAULT_STREAMS) -> dict[str, int]:
    """``{statistic key: width}`` of one FLUX.1 step's ``streams`` (the block streams: one statistic per step)."""
    widths = stream_widths(PUBLISHED_CONFIGS[MODEL][1])
    return {key: width for stream in streams for key, width in widths[stream].items()}


def psd_statistic(d: int, seed: int) -> np.ndarray:
    """A positive semi-definite d x d matrix with a spread spectrum (rows scaled from 1e-3 to 10)."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(d, d)) * np.geomspace(1e-3, 10, d)
    return rows.T @ rows / d


def write_step(path: Path, dims: dict[str, int], scale: float, bases: dict[int, np.ndarray], kind: str,
               prompt_index: int) -> None:
    """One step file of ``dims`` (every key of a width shares one matrix: the values do not matter to the cost)."""
    moments = {key: Moments.about(1000, np.zeros(d), np.full(d, scale), bases[d] * scale) for key, d in dims.items()}
    provenance = {"model": {"spec": "flux-synthetic", "fingerprint": "synthetic"}, "config": {}, "packages": {},
                  "prompts": {"first_index": prompt_index, "count": 1, "prompts": [f"p{prompt_index}"]}}
    write_moments(path, kind, moments, {"provenance": provenance, "step": {"index": 0}})


def child(code: str, *arguments: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code.format(repo=str(REPO)), *arguments],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def merge_timing(scratch: Path, dims: dict[str, int], shards: int) -> dict:
    """Write ``shards`` shard files of one whole step, then merge them in a fresh process."""
    bases = {d: psd_statistic(d, 0) for d in set(dims.values())}
    paths = []
    started = time.perf_counter()
    for index in range(shards):
        path = scratch / f"shard_{index:04d}" / "alpha_00_0999.h5"
        write_step(path, dims, 1.0 + index, bases, "features", index)
        paths.append(str(path))
    write_seconds = time.perf_counter() - started
    del bases
    evict(paths)
    output = scratch / "merged.h5"
    merged = child(MERGE_CHILD, json.dumps(paths), str(output))
    step_bytes = sum(8 * d * d for d in dims.values())
    file_bytes = os.path.getsize(paths[0])
    total = sum(os.path.getsize(p) for p in paths)
    os.remove(output)
    for path in paths:
        os.remove(path)
    return {"shards": shards, "keys": len(dims), "step_bytes_full_float64": step_bytes,
            "step_file_bytes": file_bytes,
            "moments_file_bytes_estimate": moments_file_bytes(dims), "write_seconds": write_seconds,
            "merge_seconds": merged["seconds"], "merge_gb_per_s": total / merged["seconds"] / 1e9,
            "max_rss_bytes": merged["max_rss_bytes"], "rss_after_imports_bytes": merged["rss_after_imports_bytes"],
            "rss_above_imports_over_step_bytes": (merged["max_rss_bytes"] - merged["rss_after_imports_bytes"])
            / step_bytes}


def projection_timing(scratch: Path, dims: dict[str, int], keys: int, threshold: float) -> dict:
    """The projection job of one merged step file holding the first ``keys`` statistics."""
    chosen = dict(list(dims.items())[:keys])
    bases = {d: psd_statistic(d, 1) for d in set(chosen.values())}
    path = scratch / "covariance.h5"
    write_step(path, chosen, 1.0, bases, "covariance", 0)
    del bases
    projected = child(PROJECTION_CHILD, str(path), str(scratch / "projection.h5"), str(threshold))
    return {"keys": keys, "widths": sorted(set(chosen.values())), "threshold": threshold,
            "seconds": projected["seconds"], "seconds_per_key": projected["seconds"] / keys,
            "max_rss_bytes": projected["max_rss_bytes"],
            "rss_after_imports_bytes": projected["rss_after_imports_bytes"],
            "statistics_bytes": sum(8 * d * d for d in chosen.values()),
            "step_keys": len(dims), "step_seconds_at_this_rate": projected["seconds"] / keys * len(dims)}


def eigh_timings(d: int, gpu: bool) -> dict:
    """Seconds of float64 ``eigh`` and ``eigvalsh`` of one d x d PSD statistic: numpy (CPU), torch on the GPU."""
    statistic = psd_statistic(d, 2)
    found = {"d": d}
    for name, function in (("numpy_eigh_seconds", np.linalg.eigh), ("numpy_eigvalsh_seconds", np.linalg.eigvalsh)):
        started = time.perf_counter()
        function(statistic)
        found[name] = time.perf_counter() - started
        print(json.dumps({name: found[name], "d": d}), flush=True)
    if gpu:
        import torch

        matrix = torch.from_numpy(statistic).cuda()
        torch.linalg.eigh(matrix)  # warm-up (cuSOLVER handles)
        torch.cuda.synchronize()
        started = time.perf_counter()
        torch.linalg.eigh(matrix)
        torch.cuda.synchronize()
        found["torch_cuda_eigh_seconds"] = time.perf_counter() - started
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scratch", type=Path, default=REPO / "benchmarks" / "bench-mmdit-scale-tmp")
    parser.add_argument("--out", type=Path, default=measurement_path("bench-mmdit-scale.json"))
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--projection-keys", type=int, default=12)
    parser.add_argument("--proj-out", action="store_true", help="also eigh at d = 15,360 (~10 min on 2 CPU cores)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    gpu = torch.cuda.is_available()
    shutil.rmtree(args.scratch, ignore_errors=True)
    args.scratch.mkdir(parents=True)
    record = header("tools/bench_mmdit_scale.py", argv)
    dims = flux_dims()
    record |= {"model": MODEL, "streams": list(DEFAULT_STREAMS)}
    try:
        record["eigh"] = [eigh_timings(3072, gpu)]
        record["merge"] = merge_timing(args.scratch, dims, args.shards)
        print(json.dumps(record["merge"]), flush=True)
        record["projection"] = projection_timing(args.scratch, dims, args.projection_keys, 0.02)
        print(json.dumps(record["projection"]), flush=True)
        if args.proj_out:
            record["eigh"].append(eigh_timings(15360, gpu))
    finally:
        shutil.rmtree(args.scratch, ignore_errors=True)
    record["machine"]["load_average_end"] = os.getloadavg()[0]
    write_record(args.out, record)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
