"""`make bench-sd3-collection`: collection at SD3-medium size on the CPU, against the bare pipeline.

Builds (once) the SD3-medium-architecture random model (:mod:`nullcov.models.sd3_medium`: the real
2.0 B-parameter transformer, 24 joint blocks 1536 wide) into ``--model-dir`` (default
``benchmarks/sd3-medium-random``, 8 GB, kept for the next run), loads it as the workflow does
(``load_pipeline``), installs the sampler of the schedule, then in one process and one invocation:

1. **bare**: the pipeline's own call (``output_type="latent"``, same prompts, seeds, steps, CFG) with no hooks;
2. **ours**: :func:`nullcov.collection.features.collect_shard` with the default streams (image, text,
   image_out, text_out: 95 statistics of 1536², 1.8 GB of float64 per step), all steps held.

Writes seconds per step of each and their ratio, the peak RSS (``VmHWM``) after loading, after the bare
run and after ours, the statistics' bytes per step, and what the plan asks for such a feature job
(:func:`nullcov.collection.memory.feature_job_bytes`: the weights, the steps held, the overhead), to
``docs/measurements/bench-sd3-collection.json`` (rendered into docs/performance.md).

Usage::

    python tools/bench_sd3_collection.py [--resolution 256] [--steps 2] [--prompts 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    from nullcov.measurement import measurement_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "benchmarks" / "sd3-medium-random")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--guidance-scale", type=float, default=7.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=measurement_path("bench-sd3-collection.json"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import yaml

    from nullcov.collection.features import collect_shard
    from nullcov.collection.memory import feature_job_bytes, statistics_bytes, weights_bytes
    from nullcov.measurement import header, peak_rss_bytes, write_record
    from nullcov.models.family import DEFAULT_STREAMS, model_family
    from nullcov.models.mmdit_dims import stream_widths
    from nullcov.models.model import load_pipeline
    from nullcov.models.sampling import configure_scheduler, flow_of
    from nullcov.models.schedule import build_schedule
    from nullcov.models.sd3_medium import build_sd3_medium_model
    from nullcov.prompts import read_prompts
    from nullcov.schema import SCHEMA, schema_defaults

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if not (args.model_dir / "model_index.json").is_file():
        build_sd3_medium_model(args.model_dir)
    build_seconds = time.perf_counter() - started
    record = header("tools/bench_sd3_collection.py", argv, torch_threads=args.threads)
    started = time.perf_counter()
    pipe = load_pipeline(args.model_dir, "float32", "cpu")
    load_seconds = time.perf_counter() - started
    loaded_rss = peak_rss_bytes()
    config = schema_defaults(yaml.safe_load(SCHEMA.read_text())) | {
        "sampler_strategy": "Euler", "num_denoising_steps": args.steps, "resolution": args.resolution,
        "batch_size": args.prompts, "guidance_scale": args.guidance_scale, "streams": list(DEFAULT_STREAMS),
        "device": "cpu", "dtype": "float32"}
    schedule = build_schedule(dict(pipe.scheduler.config), "Euler", args.steps, flow_of(pipe, args.resolution))
    configure_scheduler(pipe, schedule)
    prompts = read_prompts(REPO / "config" / "prompts" / "demo.txt")[: args.prompts]

    started = time.perf_counter()
    with torch.no_grad():
        pipe(prompt=prompts, num_inference_steps=args.steps, height=args.resolution, width=args.resolution,
             guidance_scale=args.guidance_scale, output_type="latent",
             generator=[torch.Generator().manual_seed(index) for index in range(len(prompts))])
    bare_seconds = time.perf_counter() - started
    bare_rss = peak_rss_bytes()

    started = time.perf_counter()
    steps, _, layers, _ = collect_shard(pipe, prompts, 0, schedule, config, family=model_family(args.model_dir))
    ours_seconds = time.perf_counter() - started
    ours_rss = peak_rss_bytes()

    dims = {key: moments.dim for key, moments in steps[0].items()}
    widths = stream_widths(dict(pipe.transformer.config))
    collected = [stream for stream in DEFAULT_STREAMS if set(widths.get(stream, {})) & set(dims)]
    step_bytes = statistics_bytes(dims)
    weights = weights_bytes(args.model_dir, {})
    record |= {
        "model": "SD3-medium architecture, random weights (nullcov.models.sd3_medium)",
        "parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "resolution": args.resolution, "steps": args.steps, "prompts": len(prompts),
        "guidance_scale": args.guidance_scale, "streams": collected, "layers": len(layers),
        "statistics": len(dims), "widths": sorted(set(dims.values())), "step_statistics_bytes": step_bytes,
        "weights_bytes": weights,
        "seconds": {"build": round(build_seconds, 1), "load": round(load_seconds, 1), "bare": bare_seconds,
                    "ours": ours_seconds},
        "seconds_per_step": {"bare": bare_seconds / args.steps, "ours": ours_seconds / args.steps},
        "overhead_ratio": ours_seconds / bare_seconds,
        "peak_rss_bytes": {"loaded": loaded_rss, "bare": bare_rss, "ours": ours_rss},
        "plan_feature_job_bytes": feature_job_bytes(step_bytes, args.steps, weights),
    }
    write_record(args.out, record)
    print(f"bare {bare_seconds:.1f} s, ours {ours_seconds:.1f} s ({ours_seconds / bare_seconds:.2f}x), "
          f"peak RSS {ours_rss / 2**30:.1f} GiB; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
