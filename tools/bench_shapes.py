"""Has ``builtin:shapes`` learned its world? Sample every grammar prompt, read the images, measure attention.

Samples the 240 prompts of :func:`nullcov.shapes.evaluation.evaluation_scenes` (every colour x shape x
position in each of the grammar's 4 templates) with the workflow's default sampler (DPM++ 2M
Karras, 20 steps, the config's CFG scale; the one image sampler,
:func:`nullcov.models.sampling.sample_images`, through :func:`nullcov.shapes.evaluation.evaluate`), reads
each image with :mod:`nullcov.shapes.evaluator`, and reports accuracy per attribute
(:func:`nullcov.shapes.evaluator.accuracy`) and, per cross-attention layer, how much of the colour and shape
words' attention lands on the object (ratio to the object's share of the image). The evaluator's
own accuracy on held-out renders (clean, noisy, blurred) is measured first, in the same run.

Writes ``docs/measurements/bench-shapes.json`` (figures and :func:`nullcov.measurement.header`) and a
grid of the first samples beside it (``bench-shapes.png``).

Usage::

    python tools/bench_shapes.py [--model builtin:shapes] [--steps 20] [--guidance-scale 7.5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def sample_grid(path: Path, images, prompts: list[str], columns: int = 8, count: int = 32) -> None:
    from nullcov.report.plotting import pyplot, save

    plt = pyplot()
    count = min(count, len(images))
    rows = (count + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.9))
    for ax, image, prompt in zip(axes.flat, images[:count], prompts[:count]):
        ax.imshow(image)
        ax.set_title(prompt.replace(" there is", "").replace("a photo of ", "photo: "), fontsize=5.5)
    for ax in axes.flat:
        ax.axis("off")
    save(fig, path)


def _training_settings(model_dir: Path) -> dict | None:
    """What the model folder says of its training (``training.json``), without the loss curve."""
    record = Path(model_dir) / "training.json"
    if not record.is_file():
        return None
    training = json.loads(record.read_text())
    scheduler = json.loads((Path(model_dir) / "scheduler" / "scheduler_config.json").read_text())
    return {"settings": training["settings"], "seconds": training["seconds"], "date": training["date"],
            "beta_schedule": scheduler["beta_schedule"]}


def parse_args(argv=None) -> argparse.Namespace:
    import yaml

    defaults = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:shapes")
    parser.add_argument("--steps", type=int, default=20, help="DPM++ 2M Karras steps")
    parser.add_argument("--guidance-scale", type=float, default=defaults["guidance_scale"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "measurements" / "bench-shapes.json")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    import torch

    from nullcov.measurement import header, write_record
    from nullcov.models.model import load_pipeline, resolve_model_dir
    from nullcov.models.sampling import configure_scheduler
    from nullcov.models.schedule import build_schedule
    from nullcov.shapes import evaluation as shapes_eval
    from nullcov.shapes import evaluator

    torch.set_num_threads(args.threads)
    record = header("tools/bench_shapes.py", argv, torch_threads=args.threads)
    started = time.perf_counter()
    renders = evaluator.render_accuracy()
    model_dir = resolve_model_dir(args.model)
    pipe = load_pipeline(model_dir, "float32", "cpu")
    schedule = build_schedule(dict(pipe.scheduler.config), "DPM++ 2M Karras", args.steps)
    configure_scheduler(pipe, schedule)
    config = {"seed": args.seed, "collection": "trajectory", "guidance_scale": args.guidance_scale,
              "resolution": None, "batch_size": args.batch_size}
    scenes = shapes_eval.evaluation_scenes()
    sampling_started = time.perf_counter()
    result = shapes_eval.evaluate(pipe, scenes, schedule, config)
    sampling_seconds = time.perf_counter() - sampling_started
    record |= {
        "model": args.model,
        "model_training": _training_settings(model_dir),
        "sampler": {"strategy": "DPM++ 2M Karras", "steps": args.steps, "guidance_scale": args.guidance_scale,
                    "seed": args.seed},
        "prompts": len(scenes),
        "evaluator_on_renders": renders,
        "accuracy": result["accuracy"],
        "attention": result["attention"],
        "seconds": {"sampling": round(sampling_seconds, 1), "total": round(time.perf_counter() - started, 1)},
        "failures": [row for row in result["rows"] if not all(v for k, v in row.items() if k.startswith("correct_"))],
    }
    write_record(args.out, record)
    sample_grid(args.out.with_suffix(".png"), result["images"], [scene.caption for scene in scenes])
    print(f"evaluator on held-out renders: {json.dumps(renders)}")
    print(f"{len(scenes)} prompts, {sampling_seconds:.0f} s sampling; accuracy: "
          + ", ".join(f"{k} {v:.1%}" for k, v in result["accuracy"].items()))
    for layer, words in result["attention"].items():
        print(f"  {layer}: " + ", ".join(f"{w} word {v['share']:.0%} on the object ({v['ratio']:.2f}x its area)"
                                         for w, v in words.items()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
