"""Text-only k/v statistics vs today's k/v-only feature job, SD-1.5 architecture (random weights).

Both paths collect the ``to_k``/``to_v`` input statistics (text.h5) of the same prompts:

- ``full``: :func:`nullcov.collection.features.collect_shard` with ``collect_features`` k/v only: the whole
  pipeline (text encoder, UNet sampler with CFG) runs, the text states are taken at the UNet;
- ``text-only``: :func:`nullcov.collection.features.collect_text_shard`: the text encoder alone.

Prints wall times, prompts/s, the speed-up and the largest relative difference of the two
``sum_outer`` matrices, and writes them to ``docs/measurements/bench-text-only.json`` (with
:func:`nullcov.measurement.header`). Fewer steps / a lower resolution make ``full`` cheaper, so the
speed-up measured with them understates the one at 50 steps and 512 px. About 4 minutes on 2 CPU
threads at the defaults (most of it the full run).

Usage::

    python tools/bench_text_only.py --prompts 8 --steps 4 --resolution 256 --text-prompts 512
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    from nullcov.measurement import measurement_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8, help="prompts through both paths")
    parser.add_argument("--steps", type=int, default=4, help="sampler steps of the full run (DPM++ 2M Karras)")
    parser.add_argument("--resolution", type=int, default=256, help="image size of the full run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--text-prompts", type=int, default=512, help="prompts for the text-only throughput")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=measurement_path("bench-text-only.json"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    import numpy as np
    import torch

    from nullcov.collection.features import collect_shard, collect_text_shard
    from nullcov.measurement import header, peak_rss_bytes, write_record
    from nullcov.models.sampling import configure_scheduler
    from nullcov.models.schedule import build_schedule
    from nullcov.models.sd15 import build_sd15_pipeline
    from nullcov.models.tiny_model import build_tiny_model
    from nullcov.prompts import read_prompts

    torch.set_num_threads(args.threads)
    record = header("tools/bench_text_only.py", argv)
    root = Path(__file__).resolve().parent.parent
    demo = read_prompts(root / "config" / "prompts" / "demo.txt")
    prompts = [demo[i % len(demo)] + ("" if i < len(demo) else f" number {i}") for i in range(args.text_prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = build_tiny_model(Path(tmp) / "tiny") / "tokenizer"
        pipe = build_sd15_pipeline(tokenizer_dir)
    config = {
        "seed": 0, "sampler_strategy": "DPM++ 2M Karras", "num_denoising_steps": args.steps,
        "collection": "trajectory", "guidance_scale": 7.5, "unconditional_branch": False, "resolution": args.resolution,
        "batch_size": args.batch_size, "dtype": "float32", "device": "cpu",
        "collect_features": {"q": False, "k": True, "v": True, "out": False},
        "cross_attention_layers": "all", "text_tokens": "all",
    }
    schedule = build_schedule(dict(pipe.scheduler.config), config["sampler_strategy"], args.steps)
    configure_scheduler(pipe, schedule)
    few = prompts[: args.prompts]
    start = time.perf_counter()
    _, full, _, _ = collect_shard(pipe, few, 0, schedule, config)
    full_s = time.perf_counter() - start
    start = time.perf_counter()
    only = collect_text_shard(pipe, few, 0, config)
    text_s = time.perf_counter() - start
    difference = float(np.abs(only.sum_outer - full.sum_outer).max() / np.abs(full.sum_outer).max())
    start = time.perf_counter()
    many = collect_text_shard(pipe, prompts, 0, config)
    many_s = time.perf_counter() - start
    result = {
        "prompts": args.prompts, "steps": args.steps, "resolution": args.resolution, "batch_size": args.batch_size,
        "threads": args.threads, "full_kv_only_s": round(full_s, 2), "text_only_s": round(text_s, 3),
        "speedup": round(full_s / text_s, 1), "max_relative_difference": difference,
        "text_only_prompts": len(prompts), "text_only_prompts_s": round(many_s, 2),
        "text_only_prompts_per_s": round(len(prompts) / many_s, 1), "count": many.count,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    print(json.dumps(result, indent=1))
    write_record(args.out, record | result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
