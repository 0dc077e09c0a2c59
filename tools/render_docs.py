"""Render the docs' measured figures from the measurement files, so no number in the docs is typed by hand.

A docs page marks a generated block with ``<!-- render: NAME -->`` ... ``<!-- /render -->``; this
script replaces each block's body by ``RENDERERS[NAME]()``, built from a measurement file
(``docs/measurements/*.json``, written by the ``make bench-*`` targets) or from the shipped model's
``training.json``. ``--check`` changes nothing and exits 1 naming every stale block (the test suite
runs it).

Usage::

    python tools/render_docs.py [--check]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DOCS = REPO / "docs"
MEASUREMENTS = DOCS / "measurements"
BLOCK = re.compile(r"(<!-- render: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /render -->)", re.S)


def _load(name: str) -> dict:
    path = MEASUREMENTS / name
    if not path.is_file():
        raise FileNotFoundError(f"{path.relative_to(REPO)} is missing: run the benchmark that writes it")
    return json.loads(path.read_text())


def _provenance(record: dict, source: str) -> str:
    versions = record["versions"]
    return (f"\n<sub>Measured {record['date'][:10]} on {record['machine']['platform']} "
            f"({record['machine']['torch_threads']} torch threads), torch {versions['torch']}, diffusers "
            f"{versions['diffusers']}; `{record['command']}`; data: `{source}`.</sub>\n")


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def shapes_training() -> str:
    from nullcov.model import BUILTIN_SHAPES_DIR

    record = json.loads((BUILTIN_SHAPES_DIR / "training.json").read_text())
    settings, seconds, loss = record["settings"], record["seconds"], record["loss"]
    rows = [
        "| stage | steps | batch | learning rate | final loss | time |",
        "|---|---|---|---|---|---|",
        f"| VAE | {settings['vae_steps']} | {settings['batch_size']} | {settings['vae_learning_rate']:g} | "
        f"{loss['vae'][-1][1]:.5f} | {seconds['vae'] / 60:.1f} min |",
        f"| text encoder + UNet | {settings['unet_steps']} | {settings['batch_size']} | "
        f"{settings['unet_learning_rate']:g} | {loss['unet_text'][-1][1]:.4f} | {seconds['unet_text'] / 60:.1f} min |",
        f"| **total** | | | | | **{seconds['total'] / 60:.1f} min** |",
    ]
    return "\n".join(rows) + "\n" + _provenance(record | {"command": _training_command(record["command"])},
                                                "nullcov/builtin/shapes/training.json")


def _training_command(command: str) -> str:
    """The recorded training command as a user would type it; an ``--out`` elsewhere than the shipped
    folder (a scratch folder it was copied from) is named as such, not by its temporary path."""
    words = command.split()
    arguments = words[1:] if words and words[0].endswith(("train_shapes.py", "nullcov.train_shapes")) else words
    shown, skip = [], False
    for index, word in enumerate(arguments):
        if skip:
            skip = False
            continue
        if word == "--out" and index + 1 < len(arguments) and "nullcov/builtin/shapes" not in arguments[index + 1]:
            shown.append("--out <scratch folder>, then copied to nullcov/builtin/shapes")
            skip = True
        else:
            shown.append(word)
    return " ".join(["python -m nullcov.train_shapes", *shown])


def shapes_evaluator() -> str:
    record = _load("bench-shapes.json")
    renders = record["evaluator_on_renders"]
    attributes = list(next(iter(renders.values())))
    rows = ["| held-out renders | " + " | ".join(attributes) + " |", "|---" * (len(attributes) + 1) + "|"]
    rows += [f"| {kind} | " + " | ".join(_percent(values[a]) for a in attributes) + " |"
             for kind, values in renders.items()]
    return "\n".join(rows) + "\n" + _provenance(record, "docs/measurements/bench-shapes.json")


#: Accuracy measurements of shapes models: the shipped one, then earlier trainings kept for comparison.
SHAPES_ACCURACY_FILES = ("bench-shapes.json", "bench-shapes-earlier-3-levels.json", "bench-shapes-earlier-2-levels.json")


def shapes_accuracy() -> str:
    records = [(name, _load(name)) for name in SHAPES_ACCURACY_FILES if (MEASUREMENTS / name).is_file()]
    first = records[0][1]
    sampler = first["sampler"]
    rows = ["| model (UNet channels per level, betas, loss weighting, training steps) | colour | shape | position | "
            "size (prompts that name it) | all correct |", "|---|---|---|---|---|---|"]
    for name, record in records:
        training = record["model_training"]
        settings = training["settings"]
        label = ("shipped" if name == SHAPES_ACCURACY_FILES[0] else "earlier") + (
            f": {tuple(settings['unet_blocks'])}, {training['beta_schedule']}, "
            f"{'Min-SNR-%g' % settings['snr_gamma'] if settings.get('snr_gamma') else 'plain MSE'}, "
            f"{settings['unet_steps']} steps")
        rows.append(f"| {label} | " + " | ".join(_percent(record["accuracy"][k]) for k in
                                                 ("colour", "shape", "position", "size", "all")) + " |")
    head = (f"{first['prompts']} prompts, {sampler['strategy']}, {sampler['steps']} steps, CFG "
            f"{sampler['guidance_scale']:g}, seeds {sampler['seed']}..{sampler['seed'] + first['prompts'] - 1}; "
            f"sampling took {first['seconds']['sampling']:.0f} s.\n\n")
    sources = ", ".join(f"docs/measurements/{name}" for name, _ in records)
    return head + "\n".join(rows) + "\n" + _provenance(first, sources)


def shapes_attention() -> str:
    record = _load("bench-shapes.json")
    rows = ["| layer | colour word on the object | shape word on the object | object's share of the image |",
            "|---|---|---|---|"]
    for layer, words in record["attention"].items():
        colour, shape = words["colour"], words["shape"]
        rows.append(f"| `{layer.removesuffix('.transformer_blocks.0.attn2')}` | {_percent(colour['share'])} "
                    f"({colour['ratio']:.2f}x) | {_percent(shape['share'])} ({shape['ratio']:.2f}x) | "
                    f"{_percent(colour['mask_fraction'])} |")
    return "\n".join(rows) + "\n" + _provenance(record, "docs/measurements/bench-shapes.json")


def _proof_rows() -> tuple[dict, list[dict]]:
    record = _load("proof-shapes.json")
    return record, record["rows"]


def proof_table() -> str:
    record, rows = _proof_rows()
    unconstrained = next(row for row in rows if row["kind"] == "unconstrained")
    lines = ["| variant | steps | time | concept fidelity | reached | preserved accuracy drop (points) | "
             "pixel change (x unconstrained) | attn2 change: all / same frame / not in statistics |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = row["pixel_change_all"] / unconstrained["pixel_change_all"]
        lines.append(
            f"| `{row['variant']}` | {row['steps']:.0f} | {row['seconds']:.0f} s | {_percent(row['concept_fidelity'])} | "
            f"{row['reached_target']} | {row['accuracy_drop_points_all']:+.1f} | {row['pixel_change_all']:.4f} "
            f"({ratio:.2f}x) | {row['attn2_change_all']:.3f} / {row['attn2_change_same_frame']:.3f} / "
            f"{row['attn2_change_not_in_statistics']:.3f} |")
    head = (f"{len(rows)} variants; the proof job took {record['seconds']['proof_job'] / 60:.1f} min, max RSS "
            f"{record['max_rss_mb']:.0f} MB (its `benchmark:` file).\n\n")
    return head + "\n".join(lines) + "\n" + _provenance(record, "docs/measurements/proof-shapes.json")


def proof_goal() -> str:
    """Whether a projected variant met the goal, computed from the measurement, never typed."""
    record, rows = _proof_rows()
    unconstrained = next(row for row in rows if row["kind"] == "unconstrained")
    prior = next((row for row in rows if row["kind"] == "prior-preservation"), None)
    projected = [row for row in rows if row["kind"].startswith("projected")]

    def meets(row):
        return (row["reached_target"] == "yes" and row["accuracy_drop_points_all"] <= 1.0
                and row["pixel_change_all"] <= unconstrained["pixel_change_all"] / 5
                and (prior is None or row["pixel_change_all"] <= prior["pixel_change_all"]))

    met = [row["variant"] for row in projected if meets(row)]
    reached = [row for row in projected if row["reached_target"] == "yes"]
    if met:
        text = f"**Met** by {len(met)} of {len(projected)} projected variants: " + ", ".join(f"`{m}`" for m in met) + "."
    else:
        text = f"**Not met**: no projected variant meets every part ({len(reached)} of {len(projected)} reached the target)."
    if reached:
        best = min(reached, key=lambda row: row["pixel_change_all"])
        text += (f" The least disruptive projected variant that reached the target, `{best['variant']}`, moved the "
                 f"preserved prompts' pixels {best['pixel_change_all'] / unconstrained['pixel_change_all']:.2f}x as "
                 f"much as the unconstrained run and dropped their accuracy {best['accuracy_drop_points_all']:+.1f} "
                 "points")
        if prior is not None:
            text += (f"; prior preservation moved them {prior['pixel_change_all'] / unconstrained['pixel_change_all']:.2f}x"
                     f" and dropped accuracy {prior['accuracy_drop_points_all']:+.1f} points")
        text += "."
    return text + "\n" + _provenance(record, "docs/measurements/proof-shapes.json")


RENDERERS = {
    "proof-table": proof_table,
    "proof-goal": proof_goal,
    "shapes-training": shapes_training,
    "shapes-evaluator": shapes_evaluator,
    "shapes-accuracy": shapes_accuracy,
    "shapes-attention": shapes_attention,
}


def render_text(text: str, where: str) -> str:
    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise KeyError(f"{where}: unknown render block {name!r}; known: {', '.join(RENDERERS)}")
        return match.group(1) + RENDERERS[name]() + match.group(4)

    return BLOCK.sub(replace, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    args = parser.parse_args(argv)
    stale = []
    for page in sorted([REPO / "README.md", *DOCS.rglob("*.md")]):
        text = page.read_text()
        rendered = render_text(text, str(page.relative_to(REPO)))
        if rendered != text:
            stale.append(str(page.relative_to(REPO)))
            if not args.check:
                page.write_text(rendered)
    if args.check and stale:
        print(f"stale rendered blocks in {', '.join(stale)}: run `python tools/render_docs.py`", file=sys.stderr)
        return 1
    print(("rendered " if not args.check else "up to date: ") + (", ".join(stale) or "nothing to change"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
