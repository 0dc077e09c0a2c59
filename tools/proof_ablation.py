"""Which attn2 linears of a fine-tune proof variant change the preserved prompts: its saved weights
applied one linear kind at a time (``to_q``, ``to_k``, ``to_v``, ``to_out``) and all together.

Each projection ``P`` is computed from the *base* model's inputs. Changing one kind of linear alone
keeps every other linear's inputs as the statistics saw them; changing them together does not
(``to_v`` feeds ``to_out``, every layer feeds the next). So a variant that is harmless per linear
but harmful as a whole shows that interaction, not a leaking projection.

Reads ``make proof``'s outputs (``results-proof/results/report/finetune/<variant>/unet_attn2.safetensors``)
and the shipped model; samples every third preserved prompt of the proof (its seeds, the proof's
20-step DPM++ 2M Karras, CFG 7.5) and reads each image with the evaluator. Writes
``docs/measurements/proof-ablation.json``.

Usage::

    python tools/proof_ablation.py [VARIANT ...] [--workdir results-proof]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PARTS = ("all", "to_q", "to_k", "to_v", "to_out")
DEFAULT_VARIANTS = ("projected-all-timesteps-0.02-second_moment-conditional", "projected-kv", "unconstrained")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--workdir", type=Path, default=REPO / "results-proof")
    parser.add_argument("--every", type=int, default=3, help="sample every N-th preserved prompt")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "measurements" / "proof-ablation.json")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    import numpy as np
    import torch
    from safetensors.torch import load_file

    from nullcov.measurement import header, write_record
    from nullcov.models.model import load_pipeline, resolve_model_dir
    from nullcov.models.sampling import configure_scheduler
    from nullcov.models.schedule import build_schedule
    from nullcov.prompts import read_prompts
    from nullcov.proof import data as proof_data
    from nullcov.proof import experiment as proof
    from nullcov.shapes import evaluator

    torch.set_num_threads(2)
    record = header("tools/proof_ablation.py", argv, torch_threads=2)
    started = time.perf_counter()
    pipe = load_pipeline(resolve_model_dir("builtin:shapes"), "float32", "cpu")
    schedule = build_schedule(dict(pipe.scheduler.config), "DPM++ 2M Karras", 20)
    configure_scheduler(pipe, schedule)
    base = {key: value.clone() for key, value in pipe.unet.state_dict().items()}
    statistics_prompts = read_prompts(REPO / "config" / "prompts" / "shapes-demo.txt")
    prompts = proof_data.preserved_scenes(statistics_prompts)[:: args.every]

    settings = proof.ProofSettings()  # the proof's CFG, sampling batch and seeds (preserved prompt i: seed i)

    def all_correct() -> float:
        images = proof.sample(pipe, [prompt.caption for prompt in prompts], 0, schedule, settings)
        return float(np.mean([all(evaluator.score(evaluator.read_image(image), prompt.scene).values())
                              for prompt, image in zip(prompts, images, strict=True)]))

    record |= {"model": "builtin:shapes", "prompts": len(prompts), "every": args.every, "base": all_correct(),
               "variants": {}}
    for variant in args.variants:
        path = args.workdir / "results" / "report" / "finetune" / variant / "unet_attn2.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no weights of variant {variant!r}; run `make proof` first")
        weights = load_file(path)
        record["variants"][variant] = {}
        for part in PARTS:
            pipe.unet.load_state_dict(base)
            pipe.unet.load_state_dict({key: value for key, value in weights.items()
                                       if part == "all" or f".{part}." in key}, strict=False)
            record["variants"][variant][part] = all_correct()
            print(f"{variant} [{part}]: {record['variants'][variant][part]:.1%} all correct", flush=True)
    record["seconds"] = round(time.perf_counter() - started, 1)
    write_record(args.out, record)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
