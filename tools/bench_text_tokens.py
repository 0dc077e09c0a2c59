"""`make text-tokens`: how much of an MMDiT's text stream is T5 padding, and what `text_tokens: prompt` leaves out.

T5 pads every prompt to ``max_sequence_length`` (FLUX: 512, SD3: 256 after CLIP's 77) with no attention
mask: the transformer's joint attention reads the padding rows as keys and values in every call. This
tool collects the ``text`` stream (input of ``attn.add_q_proj``/``add_k_proj``/``add_v_proj``) of the
demo prompts on the tiny built-ins twice, ``text_tokens: all`` and ``text_tokens: prompt``, and since
the statistics are sums, the padding rows' own moments are their difference (exact). Per model:

* the real and padding token counts of the prompts (``text_token_counts``);
* the padding rows' share of the text stream's rows and of its energy (trace of the second moment);
* how much of the padding rows' energy lies in the null space computed from the real tokens alone
  (``trace(P S_pad) / trace(S_pad)``, mean over blocks and steps): what an update projected with
  ``text_tokens: prompt`` may still change in every prompt's padding rows. With ``all`` it is under the
  threshold by construction.

The tiny models have random weights: the row counts are the tokenizers' facts, the energy shares show
the mechanism, not a trained model's values. Writes ``docs/measurements/text-tokens.json`` (rendered in
docs/model-families.md).

Usage::

    python tools/bench_text_tokens.py [--steps 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODELS = ("builtin:tiny-flux", "builtin:tiny-sd3")


def parse_args(argv=None) -> argparse.Namespace:
    from nullcov.measurement import measurement_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=measurement_path("text-tokens.json"))
    return parser.parse_args(argv)


def padding_exposure(all_rows, prompt_rows, statistic: str, threshold: float) -> dict:
    """For one statistic key: the padding rows' share of rows and energy, and the share of their energy in
    the null space of the real tokens' statistic (``all_rows``/``prompt_rows``: the two runs' Moments)."""
    import numpy as np

    from nullcov.statistics.projection import null_space

    padding_outer = all_rows.sum_outer - prompt_rows.sum_outer
    padding_energy = float(np.trace(padding_outer))
    projection = null_space(prompt_rows.statistic(statistic), threshold).projection.astype(np.float64)
    return {"padding_row_share": (all_rows.count - prompt_rows.count) / all_rows.count,
            "padding_energy_share": padding_energy / float(np.trace(all_rows.sum_outer)),
            "padding_energy_in_prompt_null_space": float(np.trace(projection @ padding_outer)) / padding_energy}


def measure(spec: str, prompts: list[str], steps: int, defaults: dict) -> dict:
    from nullcov.collection.features import collect_shard
    from nullcov.models.family import model_family
    from nullcov.models.model import BUILTIN_MODELS, load_pipeline
    from nullcov.models.sampling import configure_scheduler, flow_of
    from nullcov.models.schedule import build_schedule
    from nullcov.models.tiny_model import build_tiny_model

    family, folder = BUILTIN_MODELS[spec]
    model_dir = REPO / folder
    if not (model_dir / "model_index.json").is_file():
        build_tiny_model(model_dir, family)
    pipe = load_pipeline(model_dir, "float32", "cpu")
    schedule = build_schedule(dict(pipe.scheduler.config), "Euler", steps, flow_of(pipe, None))
    configure_scheduler(pipe, schedule)
    runs, counts = {}, {}
    for choice in ("all", "prompt"):
        config = defaults | {"sampler_strategy": "Euler", "num_denoising_steps": steps, "streams": ["text"],
                             "text_tokens": choice, "batch_size": len(prompts), "device": "cpu", "dtype": "float32"}
        summary: dict = {}
        runs[choice], _, _, _ = collect_shard(pipe, prompts, 0, schedule, config, family=model_family(model_dir),
                                              summary=summary)
        counts = summary["text_token_counts"]
    rows = [padding_exposure(runs["all"][step][key], runs["prompt"][step][key], defaults["statistic"],
                             defaults["nullspace_threshold"])
            for step in range(steps) for key in runs["all"][step]]
    return {"model": spec, "pipeline": type(pipe).__name__, "text_token_counts": counts,
            "statistics": len(rows),
            **{name: sum(row[name] for row in rows) / len(rows) for name in rows[0]}}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import yaml

    from nullcov.measurement import header, write_record
    from nullcov.prompts import read_prompts
    from nullcov.schema import SCHEMA, schema_defaults

    torch.set_num_threads(1)
    record = header("tools/bench_text_tokens.py", argv, torch_threads=1)
    defaults = schema_defaults(yaml.safe_load(SCHEMA.read_text()))
    prompts = read_prompts(REPO / "config" / "prompts" / "demo.txt")
    record |= {"prompts": len(prompts), "steps": args.steps, "statistic": defaults["statistic"],
               "nullspace_threshold": defaults["nullspace_threshold"],
               "models": [measure(spec, prompts, args.steps, defaults) for spec in MODELS]}
    write_record(args.out, record)
    for model in record["models"]:
        print(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
