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
import functools
import json
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
import architecture_docs  # noqa: E402  (tools/: the module, tool and test tables)
import mmdit_tables  # noqa: E402  (tools/: the SD3/FLUX stream tables at real sizes)
import workflow_docs  # noqa: E402  (tools/: the rule graph and the config reference)

DOCS = REPO / "docs"
MEASUREMENTS = DOCS / "measurements"
BLOCK = re.compile(r"(<!-- render: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /render -->)", re.S)


def _load(name: str) -> dict:
    path = MEASUREMENTS / name
    if not path.is_file():
        raise FileNotFoundError(f"{path.relative_to(REPO)} is missing: run the benchmark that writes it")
    return json.loads(path.read_text())


def _machine_words(machine: dict) -> str:
    """What the provenance line says of the machine: the torch threads, and for a record with the full
    header of :func:`nullcov.measurement.machine` also the CPU, the GPU and the load at the start."""
    if "cpu_count" not in machine:  # the files written before nullcov.measurement
        return f"{machine['torch_threads']} torch threads"
    words = [f"{machine['processor']}, {machine['cpu_count']} CPUs"]
    if machine.get("torch_threads") is not None:
        words.append(f"{machine['torch_threads']} torch thread{'s' if machine['torch_threads'] != 1 else ''}")
    if machine.get("gpu"):
        words.append(f"{machine['gpu']['name']} ({machine['gpu']['memory_gib']:g} GiB)")
    if machine.get("load_average") is not None:
        words.append(f"load average {machine['load_average']:.1f} at the start")
    return ", ".join(words)


def _provenance(record: dict, source: str) -> str:
    versions = record["versions"]
    return (f"\n<sub>Measured {record['date'][:10]} on {record['machine']['platform']} "
            f"({_machine_words(record['machine'])}), torch {versions['torch']}, diffusers "
            f"{versions['diffusers']}; `{record['command']}`; data: `{source}`.</sub>\n")


def _same_run(record: dict, source: str) -> str:
    """The source line of a second block from one measurement file (the first carries the provenance)."""
    return f"\n<sub>Same run as above ({record['date'][:10]}, `{record['command']}`); data: `{source}`.</sub>\n"


def measured(name: str, command: str, full: bool = True):
    """A renderer of ``docs/measurements/<name>``: the decorated function's text, then the provenance
    line (``full``) or the same-run line; where the file does not exist yet, a line that says so
    and which command writes it (the page still builds)."""

    def wrap(function):
        @functools.wraps(function)
        def render() -> str:
            source = f"docs/measurements/{name}"
            if not (MEASUREMENTS / name).is_file():
                return f"Not measured yet: run `{command}` (it writes `{source}`).\n"
            record = _load(name)
            return function(record).rstrip("\n") + "\n" + (_provenance if full else _same_run)(record, source)

        return render

    return wrap


def _size(value: float | None) -> str:
    """Bytes as :func:`nullcov.measurement.human_bytes` writes them; ``–`` for none."""
    from nullcov.measurement import human_bytes

    return "–" if value is None else human_bytes(value)


def _gib(value: float | None) -> str:
    """Memory (peak RSS, peak GPU memory) in a fixed unit: GiB, as RAM and cards are sized (the emulated
    24 GiB card, the table's "bare / ours" pair that names the unit once). File sizes go through :func:`_size`."""
    from nullcov.measurement import gib

    return "–" if value is None else gib(value)


def _seconds(value: float | None) -> str:
    return "–" if value is None else (f"{value:.2f} s" if value < 10 else f"{value:.1f} s")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def shapes_training() -> str:
    from nullcov.models.model import BUILTIN_SHAPES_DIR

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
    folder_bytes = sum(path.stat().st_size for path in BUILTIN_SHAPES_DIR.rglob("*") if path.is_file())
    rows.append(f"\nThe shipped folder holds {folder_bytes / 1e6:.1f} MB (every file, `SHA256SUMS` included).")
    return "\n".join(rows) + "\n" + _provenance(record | {"command": _training_command(record["command"])},
                                                "nullcov/builtin/shapes/training.json")


def _training_command(command: str) -> str:
    """The recorded training command as a user would type it; an ``--out`` elsewhere than the shipped
    folder (a scratch folder it was copied from) is named as such, not by its temporary path."""
    words = command.split()
    # The module as recorded: nullcov.train_shapes (before the package's stages) or nullcov.shapes.train.
    trainers = ("train_shapes.py", "nullcov.train_shapes", "shapes/train.py", "nullcov.shapes.train")
    module = next((i for i, word in enumerate(words) if word.endswith(trainers)), -1)
    arguments = words[module + 1:]
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
    return " ".join(["python -m nullcov.shapes.train", *shown])


def shapes_evaluator() -> str:
    record = _load("bench-shapes.json")
    renders = record["evaluator_on_renders"]
    attributes = list(next(iter(renders.values())))
    rows = ["| held-out renders | " + " | ".join(attributes) + " |", "|---" * (len(attributes) + 1) + "|"]
    rows += [f"| {kind} | " + " | ".join(_percent(values[a]) for a in attributes) + " |"
             for kind, values in renders.items()]
    return "\n".join(rows) + "\n" + _provenance(record, "docs/measurements/bench-shapes.json")


#: Accuracy measurements of shapes models: the shipped one, then earlier trainings kept for comparison.
SHAPES_ACCURACY_FILES = ("bench-shapes.json", "bench-shapes-earlier-continued-high-noise.json",
                         "bench-shapes-earlier-uniform-timesteps.json", "bench-shapes-earlier-3-levels.json",
                         "bench-shapes-earlier-2-levels.json")
def _position_errors(record: dict) -> str:
    """The sampled images whose position was misread: left/right swapped, top/bottom swapped, other."""
    from nullcov.shapes.grammar import POSITIONS, parse_caption

    def axis(position: str | None) -> str | None:  # x: left/right (centred vertically), y: top/bottom
        return None if position not in POSITIONS else ("x" if POSITIONS[position][1] == 0.5 else "y")

    swaps = {"x": 0, "y": 0, "other": 0}
    for failure in record["failures"]:
        if not failure["correct_position"]:
            asked = axis(parse_caption(failure["prompt"]).position)
            swaps[asked if axis(failure["read_position"]) == asked else "other"] += 1
    return f"{swaps['x']} / {swaps['y']} / {swaps['other']}"


def _timesteps_label(settings: dict) -> str:
    """How a shapes training drew its timesteps."""
    fraction = settings.get("high_noise_fraction")
    if not fraction:
        return "uniform t"
    return f"{fraction:.0%} of each batch at t ≥ {settings['high_noise_start']}"


def shapes_accuracy() -> str:
    records = [(name, _load(name)) for name in SHAPES_ACCURACY_FILES if (MEASUREMENTS / name).is_file()]
    first = records[0][1]
    sampler = first["sampler"]
    rows = ["| model (UNet channels per level, betas, loss weighting, training steps) | colour | shape | position | "
            "size (prompts that name it) | all correct | position misread: left↔right / top↔bottom / other |",
            "|---|---|---|---|---|---|---|"]
    for name, record in records:
        training = record["model_training"]
        settings = training["settings"]
        label = record.get("label") or ("shipped" if name == SHAPES_ACCURACY_FILES[0] else "earlier") + (
            f": {tuple(settings['unet_blocks'])}, {training['beta_schedule']}, "
            f"{'Min-SNR-%g' % settings['snr_gamma'] if settings.get('snr_gamma') else 'plain MSE'}, "
            f"{_timesteps_label(settings)}, {settings['unet_steps']} steps")
        rows.append(f"| {label} | " + " | ".join(_percent(record["accuracy"][k]) for k in
                                                 ("colour", "shape", "position", "size", "all"))
                    + f" | {_position_errors(record)} |")
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


PROOF_SOURCE = "docs/measurements/proof-shapes.json"
_PROJECTED_KINDS = ("projected", "projected-kv", "custom-diffusion", "projected-lora")


def proof_table() -> str:
    """Every run at its end (every preserved prompt): the measurement's ``variants.tsv``."""
    record, rows = _proof_rows()
    unconstrained = next(row for row in rows if row["kind"] == "unconstrained")
    lines = ["| run | learning rate | steps | time | concept fidelity | reached | preserved accuracy drop (points) | "
             "pixel change (x unconstrained) | attn2 change: all / same frame / not in statistics |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = row["pixel_change_all"] / unconstrained["pixel_change_all"]
        lines.append(
            f"| `{row['variant']}` | {row['learning_rate']:g} | {row['steps']:.0f} | {row['seconds']:.0f} s | "
            f"{_percent(row['concept_fidelity'])} | "
            f"{row['reached_target']} | {row['accuracy_drop_points_all']:+.1f} | {row['pixel_change_all']:.4f} "
            f"({ratio:.2f}x) | {row['attn2_change_all']:.3f} / {row['attn2_change_same_frame']:.3f} / "
            f"{row['attn2_change_not_in_statistics']:.3f} |")
    head = (f"{len(rows)} runs; the proof job took {record['seconds']['proof_job'] / 60:.1f} min, the whole "
            f"`make proof` {record['seconds']['workflow'] / 60:.1f} min, max RSS {record['max_rss_mb']:.0f} MB "
            "(the job's `benchmark:` file).\n\n")
    return head + "\n".join(lines) + "\n" + _same_run(record, PROOF_SOURCE)


def _matched(record: dict) -> dict:
    """``{(variant, learning_rate, measure, level): row}`` of the measurement's ``matched.tsv``
    (level None for the best-within-1-point rows)."""
    return {(row["variant"], row["learning_rate"], row["measure"],
             None if row["measure"] != "at_fidelity" else round(row["level"], 3)): row for row in record["matched"]}


def _levels(record: dict) -> list[float]:
    return sorted({round(row["level"], 3) for row in record["matched"] if row["measure"] == "at_fidelity"})


def _groups(record: dict) -> list[tuple[str, float, str]]:
    """(variant, learning rate, kind) of every group, in the order of the runs."""
    return list(dict.fromkeys((row["variant"], row["learning_rate"], row["kind"]) for row in record["matched"]))


def _spread(row: dict, name: str, digits: int = 1, sign: bool = True) -> str:
    mean, low, high = (row[f"{name}_{stat}"] for stat in ("mean", "min", "max"))
    form = f"{{:{'+' if sign else ''}.{digits}f}}"
    text = form.format(mean)
    if row["reached_runs"] > 1:
        text += " [" + form.format(low) + ", " + form.format(high) + "]"
    return text


def proof_matched() -> str:
    """The variants at matched concept fidelity (``matched.tsv``): per level the preserved accuracy drop
    and pixel change where the curves reach it, and the highest fidelity with a drop of at most 1 point."""
    record = _load("proof-shapes.json")
    matched, levels = _matched(record), _levels(record)
    header = ["variant", "learning rate", "seeds",
              *(f"at {100 * level:.0f} %: drop (points) / pixel change" for level in levels),
              "highest fidelity with drop <= 1 point"]
    rows = []
    for variant, rate, _ in _groups(record):
        cells = []
        for level in levels:
            row = matched[(variant, rate, "at_fidelity", level)]
            if not row["reached_runs"]:
                cells.append("not reached")
                continue
            reached = "" if row["reached_runs"] == row["runs"] else f" ({row['reached_runs']:.0f} of {row['runs']:.0f})"
            cells.append(f"{_spread(row, 'accuracy_drop_points')} / {_spread(row, 'pixel_change', 4, False)}{reached}")
        best = next(row for key, row in matched.items() if key[:2] == (variant, rate) and key[2] != "at_fidelity")
        cells.append(f"{_spread(best, 'concept_fidelity', 2, False)} (step {best['step_mean']:.0f})")
        rows.append([f"`{variant}`", f"{rate:g}", f"{matched[(variant, rate, 'at_fidelity', levels[0])]['runs']:.0f}",
                     *cells])
    head = ("Where each variant's curves first reach each concept fidelity (interpolated linearly between the two "
            "checkpoints around the crossing), on the 48 checkpoint prompts: mean over its seeds, [min, max] when it "
            "has several; `(k of n)`: only k of its n runs got there. Last column: the highest fidelity at a "
            "checkpoint whose drop was at most 1 point (mean [min, max]).\n\n")
    return head + _table(header, rows) + _provenance(record, PROOF_SOURCE)


def _proof_level(level: float, matched: dict, at, least, name) -> tuple[str, bool]:
    """The verdict's sentence at one fidelity level, and whether a projected variant met the goal there."""
    base = least(("unconstrained",), level)
    if base is None:
        return f"At {100 * level:.0f} % no unconstrained run got there.", False
    text = (f"**At {100 * level:.0f} % fidelity** the unconstrained fine-tune ({name(base)}) dropped the preserved "
            f"accuracy {_spread(base[0], 'accuracy_drop_points')} points (pixel change "
            f"{base[0]['pixel_change_mean']:.4f})")
    prior = least(("prior-preservation",), level)
    if prior is not None:
        text += f", prior preservation ({name(prior)}) {_spread(prior[0], 'accuracy_drop_points')}"
    candidates = least(_PROJECTED_KINDS, level, every=True)
    if not candidates:
        return text + "; no projected variant got there in every seed.", False

    def meets(item):
        return item[0]["accuracy_drop_points_mean"] <= 1.0 and \
            item[0]["pixel_change_mean"] <= 0.2 * base[0]["pixel_change_mean"]

    meeting = [item for item in candidates if meets(item)]
    best = min(meeting, key=lambda item: item[0]["pixel_change_mean"]) if meeting else \
        min(candidates, key=lambda item: item[0]["accuracy_drop_points_mean"])
    ratio = best[0]["pixel_change_mean"] / base[0]["pixel_change_mean"]
    text += (f"; {'meeting the goal' if meeting else 'the least-forgetting projected variant'}, {name(best)}, "
             f"{_spread(best[0], 'accuracy_drop_points')} (pixel change {ratio:.2f}x the unconstrained run's)")
    control = "random-" + best[1].removeprefix("projected-")
    if (control, best[2], "at_fidelity", level) in matched:  # the control ran at its variant's first rate
        found = at(control, best[2], level)
        text += (f"; its same-rank random control {_spread(found, 'accuracy_drop_points')}" if found
                 else "; its same-rank random control did not get there")
    return text + ".", bool(meeting)


def proof_goal(provenance: bool = True) -> str:
    """The verdict at matched concept fidelity, computed from the measurement, never typed; without
    ``provenance`` (the README: no dated measurements there) it names the data file instead.

    The goal at a fidelity level: a projected variant whose every seed reaches it with a mean
    preserved accuracy drop of at most 1 point and a mean pixel change of at most 1/5 of the
    unconstrained run's at that level (the unconstrained variant at its least-forgetting rate)."""
    record = _load("proof-shapes.json")
    matched, levels = _matched(record), _levels(record)
    groups = _groups(record)

    def at(variant, rate, level):
        row = matched[(variant, rate, "at_fidelity", level)]
        return row if row["reached_runs"] == row["runs"] else None

    def least(kinds, level, every=False):
        """The group of ``kinds`` that forgot least at ``level`` (every seed there); ``every``: all such groups."""
        found = [(at(v, r, level), v, r) for v, r, kind in groups if kind in kinds and at(v, r, level)]
        if every:
            return found
        return min(found, key=lambda item: item[0]["accuracy_drop_points_mean"]) if found else None

    def name(item):
        rows = [row for row in record["rows"] if row["group"] in ("", None) and row["variant"] == item[1]]
        own = rows[0]["learning_rate"] if rows else item[2]
        return f"`{item[1]}`" + ("" if item[2] == own else f" at learning rate {item[2]:g}")

    sentences, met = [], []
    for level in levels:
        sentence, reached_goal = _proof_level(level, matched, at, least, name)
        sentences.append(sentence)
        if reached_goal:
            met.append(f"{100 * level:.0f} %")
    verdict = (f"**Met** at {', '.join(met)} fidelity" if met else "**Not met** at any matched fidelity") + \
        " (a projected variant within 1 point of the base model's preserved accuracy and moving the preserved images " \
        "at most 1/5 as much as the unconstrained fine-tune at the same fidelity, every seed). "
    within = [(matched[key], key[0], key[1]) for key in matched if key[2] != "at_fidelity"]
    best_within = max(within, key=lambda item: item[0]["concept_fidelity_mean"])
    text = verdict + " ".join(sentences) + (
        f" Highest fidelity reached with a drop of at most 1 point: {name(best_within)}, "
        f"{_percent(best_within[0]['concept_fidelity_mean'])} (mean over its seeds).")
    if "null_energy" in record:
        low, high = _energy_ratios(record)
        text += (f" Across the projections compared, the concept prompts put {low:.2f}x to {high:.2f}x as much of "
                 "their attn2 inputs' energy into the null space as the preserved prompts outside the statistics "
                 "do (every linear kind and scope).")
    if not provenance:
        return text + f" (data: `{PROOF_SOURCE}`)\n"
    return text + "\n" + _provenance(record, PROOF_SOURCE)


_ENERGY_GROUPS = ("concept", "preserved_in_statistics", "preserved_not_in_statistics")
_ENERGY_KINDS = ("to_q", "to_kv", "to_out")


def _energy_shares(record: dict) -> dict:
    return {(row["branches"], row["statistic"], row["threshold"], row["scope"], row["group"], row["part"],
             row["kind"]): row["null_share"] for row in record["null_energy"]}


def _energy_ratios(record: dict) -> tuple[float, float]:
    """The smallest and largest ratio, over every setting, scope and kind, of the concept prompts'
    null share to the preserved prompts' outside the statistics (conditional CFG half)."""
    shares = _energy_shares(record)
    pairs = [(value, shares[(*key[:4], "preserved_not_in_statistics", "conditional", key[6])])
             for key, value in shares.items() if key[4:6] == ("concept", "conditional")]
    ratios = [concept / preserved for concept, preserved in pairs if preserved > 0]
    return min(ratios), max(ratios)


def proof_null_energy() -> str:
    """The null space's share of the concept's and the preserved prompts' attn2 inputs per compared
    projection (``null_energy.tsv`` of ``make proof``), and how far apart they are at most."""
    record = _load("proof-shapes.json")
    if "null_energy" not in record:
        return "Not measured yet: run `make proof`.\n"
    shares = _energy_shares(record)
    settings = list(dict.fromkeys(key[:4] for key in shares))
    header = ["projection (branches, statistic, threshold, scope)",
              *(f"`{kind}`: concept / preserved in / not in statistics" for kind in _ENERGY_KINDS),
              "unconditional half, `to_q` (any prompt)"]
    rows = []
    for setting in settings:
        cells = [" / ".join(f"{100 * shares[(*setting, group, 'conditional', kind)]:.2f} %" for group in _ENERGY_GROUPS)
                 for kind in _ENERGY_KINDS]
        cells.append(f"{100 * shares[(*setting, 'concept', 'unconditional', 'to_q')]:.2f} %")
        rows.append([", ".join(setting), *cells])
    low, high = _energy_ratios(record)
    head = (f"Share of the inputs' energy in the null space, `Σ‖xP‖² / Σ‖x‖²`, on the base model (conditional CFG "
            f"half unless said). Over every setting, scope and kind, the concept prompts' share is "
            f"{low:.2f}x to {high:.2f}x that of the preserved prompts outside the statistics' prompt set.\n\n")
    return head + _table(header, rows) + _provenance(record, "docs/measurements/proof-shapes.json")


# -- make bench / make bench-gpu (tools/benchmark.py) ----------------------------------------------------
_MODELS = {"tiny": "tiny", "sd15": "SD-1.5 architecture"}


def _case_label(case: dict) -> str:
    return (f"{_MODELS.get(case['model'], case['model'])}, {case['resolution']} px, {case['dtype']}, "
            f"{case['prompts']} prompts × {case['steps']} steps, batch {case['batch_size']}")


def _bench_table(record: dict) -> str:
    gpu = record["device"].startswith("cuda")
    header = ["model, work", "bare pt/s", "ours pt/s", "ours / bare: wall (CPU s)", "legacy pt/s", "ours / legacy",
              "peak RSS bare / ours"] + (["peak GPU memory ours"] if gpu else []) + ["scratch per pt: ours / legacy"]
    rows = []
    for result in record["cases"]:
        bare, ours, legacy = result["bare"], result["ours"], result.get("legacy")
        cpu_ratio = f" ({result['ratio_ours_bare_cpu']:.3f})" if result.get("ratio_ours_bare_cpu") else ""
        row = [_case_label(result["case"]), f"{bare['prompt_timesteps_per_s']:.3g}",
               f"{ours['prompt_timesteps_per_s']:.3g}", f"**{result['ratio_ours_bare']:.3f}**{cpu_ratio}",
               f"{legacy['prompt_timesteps_per_s']:.3g}" if legacy else "–",
               f"{result['ratio_ours_legacy']:.3g}×" if legacy else "–",
               f"{bare['peak_rss_bytes'] / 2**30:.2f} / {_gib(ours['peak_rss_bytes'])}"]
        if gpu:
            row.append(_gib(ours.get("peak_gpu_bytes")))
        row.append(f"{_size(ours.get('scratch_bytes_per_prompt_timestep'))} / "
                   f"{_size(legacy['scratch_bytes_per_prompt_timestep']) if legacy else '–'}")
        rows.append(row)
    repeats = {result["case"]["repeats"] for result in record["cases"]}
    text = _table(header, rows)
    text += (f"\nA prompt-timestep (pt) is one prompt at one scheduled UNet call, CFG included; bare and ours "
             f"alternate {'/'.join(map(str, sorted(repeats)))} times and the fastest run of each counts.")
    notes = []
    for result in record["cases"]:
        ours, legacy = result["ours"], result.get("legacy")
        parts = []
        if "scratch" in ours:
            scratch = ours["scratch"]
            parts.append(f"ours writes {_size(scratch['step_file_bytes'])} per step file and "
                         f"{_size(scratch['text_file_bytes'])} of `text.h5` per shard, whatever its prompt count "
                         f"(per pt: divided by the shard's {result['case']['prompts']} prompts and the steps)")
        if legacy:
            parts.append(f"legacy measured on {legacy['prompts']} prompts × {legacy['timesteps']} timesteps "
                         f"({_size(legacy['scratch_bytes_per_prompt_timestep'])} of compressed dumps per pt)")
        if parts:
            model = _MODELS.get(result["case"]["model"], result["case"]["model"])
            notes.append(f"- {model}: " + "; ".join(parts) + ".")
    if notes:
        text += "\n\n" + "\n".join(notes)
    if record.get("errors"):
        text += "\n\nFailed studies in this run: " + "; ".join(f"{k}: {v}" for k, v in record["errors"].items())
    return text + "\n"


def _bench_profile(record: dict) -> str:
    profile = record.get("profile")
    if not profile:
        return "This run has no profile (`--profile` was not given, or the profile failed).\n"
    rows = [[f"`{entry['op']}`", f"{entry['self_us'] / 1e3:.1f} ms",
             _percent(entry["share"]) if entry["share"] else "–", entry["calls"]] for entry in profile["top"]]
    text = (f"`torch.profiler` over one feature collection ({profile['case']}, {profile['steps']} steps), "
            f"sorted by {profile['sort']}; the whole table is `{profile['table']}` (not kept in the repository).\n\n")
    text += _table(["op", "self time", "share", "calls"], rows)
    if profile.get("nullcov_labels"):
        text += "\n" + _table(["nullcov's own code (with children)", "CPU time", "calls"], [
            [f"`{label}`", f"{entry['cpu_time_total_us'] / 1e3:.1f} ms", entry["calls"]]
            for label, entry in profile["nullcov_labels"].items()])
    return text


def _bench_precision(record: dict) -> str:
    precision = record.get("precision")
    if not precision:
        return "This run has no precision check.\n"
    sizes = [f"{n}×{d}" for n, d in precision["sizes"]]
    rows = [[f"`{label}`"] + [f"{error:.2g}" for error in errors] for label, errors in precision["errors"].items()]
    text = (f"Max \\|error\\| / max \\|entry\\| of XᵀX against float64, on `{precision['device']}`; `gram` is "
            "nullcov's product (float32 accumulation), `upcast` converts to float32 first, `*_output` keeps the "
            "input dtype for the result.\n\n")
    text += _table(["inputs / product"] + [f"X of {size}" for size in sizes], rows)
    text += (f"\nProducts of two float16 numbers exact in float32: {precision['float16_products_exact_in_float32']}; "
             f"bfloat16: {precision['bfloat16_products_exact_in_float32']}.\n")
    return text


def _bench_gpu_checks(record: dict) -> str:
    lines = []
    check = record.get("memory_check")
    if check:  # in decimal units, like its target (benchmark_case.GPU_MEMORY_TARGET, 20e9 bytes)
        lines.append(f"- Peak GPU memory at batch {check['batch_size']}, {check['steps']} steps, every layer and "
                     f"q/k/v/out: {_size(check['peak_gpu_bytes'])}: **{'pass' if check['pass'] else 'fail'}** "
                     "(target: under 20 GB).")
    check = record.get("timesteps_1000")
    if check:
        lines.append(f"- 1000-timestep schedule on an emulated {check['emulated_card_gib']:g} GiB card "
                     f"({check['layers']} layers): {'ran' if check.get('ok') else 'FAILED: ' + check.get('error', '')}"
                     f", {check.get('device_steps')} steps' accumulators on the GPU, "
                     f"{check.get('steps', 0) - (check.get('device_steps') or 0)} on the host, peak "
                     f"{_gib(check.get('peak_gpu_bytes'))}, {_seconds(check.get('wall_s'))}.")
    projection = record.get("projection")
    if projection:
        shards = [f"{key.removeprefix('prompts_per_shard_')} prompts per shard: {value['seconds'] / 60:.1f} min, "
                  f"scratch {_size(value['scratch_bytes'])}" for key, value in projection.items()
                  if key.startswith("prompts_per_shard_")]
        lines.append(f"- Projected {projection['prompts']} prompts × {projection['steps']} steps on this GPU at the "
                     f"best batch ({record.get('best_batch')}): compute {projection['compute_s'] / 60:.1f} min; "
                     + "; ".join(shards) + f" ({projection['note']}).")
    return "\n".join(lines) + "\n" if lines else "This run has none of the GPU-only studies.\n"


# -- make bench-scale (tools/bench_scale.py) ------------------------------------------------------------
def _bench_scale(record: dict) -> str:
    rows = []
    store = record.get("store")
    if store:
        rows.append(["one SD-1.5 step file (packed, checksummed)",
                     f"{_size(store['step_file_bytes'])} (`moments_file_bytes` predicts "
                     f"{_size(store['moments_file_bytes_estimate'])}; full float64 matrices: "
                     f"{_size(store['step_bytes_full_float64'])})"])
        rows.append([f"shard scratch, 1000 prompts × 50 steps, `prompts_per_shard: auto` "
                     f"({store['auto_prompts_per_shard_at_50_steps']} prompts per shard)",
                     f"{_size(store['scratch_1000x50_bytes'])}: {store['ratio_legacy_over_scratch']:.0f}× below the "
                     f"legacy tool's {_size(store['legacy_1000x50_bytes'])} (92 MB per prompt-timestep, its users' "
                     "figure)"])
    runs = record.get("merge", {}).get("runs", [])
    if runs:
        counts = " / ".join(str(run["shards"]) for run in runs)
        rows.append([f"merge job's peak RSS (VmHWM) at {counts} shards of one step",
                     " / ".join(f"{run['max_rss_bytes'] / 1e6:.1f}" for run in runs) + " MB ("
                     + " / ".join(f"{run['rss_above_imports_over_step_bytes']:.2f}" for run in runs)
                     + " × one step's statistics above the imports)"])
        rows.append([f"merge throughput at {counts} shards vs the disk's sequential read of the same files "
                     "(page cache evicted before each)",
                     " / ".join(f"{run['merge_gb_per_s']:.2f}" for run in runs) + " GB/s vs "
                     + " / ".join(f"{run['disk_sequential_read_gb_per_s']:.2f}" for run in runs) + " GB/s"])
    for run in record.get("dry_run", []):
        rows.append([f"`snakemake -n`, {run['prompts']:,} prompts × {run['steps']} steps, "
                     f"{run['prompts_per_shard']} per shard", f"{_seconds(run['seconds'])}, "
                     f"max RSS {_size(run['max_rss_bytes'])}"])
    for timing in record.get("projection", []):
        rows.append([f"projection of one {timing['d']}² matrix, threshold {timing['threshold']} "
                     f"({timing['null_dim']} null): full `eigh` + `U0U0ᵀ` vs `null_space`",
                     f"{timing['full_eigh_seconds']:.2f} s vs {timing['null_space_seconds']:.2f} s "
                     f"(max \\|ΔP\\| {timing['max_abs_projection_difference']:.1e})"])
    return _table(["what", "measured"], rows)


# -- make bench-text-only (tools/bench_text_only.py) ----------------------------------------------------
def _bench_mmdit_scale(record: dict) -> str:
    merge, projection = record["merge"], record["projection"]
    held = (projection["max_rss_bytes"] - projection["rss_after_imports_bytes"]) / projection["statistics_bytes"]
    eigh = {row["d"]: row for row in record["eigh"]}
    rows = [
        [f"one FLUX.1 step file, default streams ({merge['keys']} statistics of 3072², packed, checksummed)",
         f"{_size(merge['step_file_bytes'])} (`moments_file_bytes` predicts "
         f"{_size(merge['moments_file_bytes_estimate'])}; "
         f"full float64 matrices: {_size(merge['step_bytes_full_float64'])})"],
        [f"merge job, {merge['shards']} shards of that step (page cache evicted)",
         f"{_seconds(merge['merge_seconds'])}, {merge['merge_gb_per_s']:.2f} GB/s of shard files, peak RSS "
         f"{_gib(merge['max_rss_bytes'])} ({merge['rss_above_imports_over_step_bytes']:.2f} × one step's statistics "
         "above the imports)"],
        [f"projection job, one merged file of {projection['keys']} statistics of "
         f"{'/'.join(map(str, projection['widths']))}², threshold {projection['threshold']:g}",
         f"{_seconds(projection['seconds'])} ({_seconds(projection['seconds_per_key'])} per statistic), peak RSS "
         f"{_gib(projection['max_rss_bytes'])} ({held:.2f} × its statistics above the imports: it reads them one "
         f"at a time); a whole step's {projection['step_keys']} statistics at that rate: "
         f"{projection['step_seconds_at_this_rate'] / 60:.1f} min of CPU"],
    ]
    for d, row in sorted(eigh.items()):
        gpu = row.get("torch_cuda_eigh_seconds")
        rows.append([f"float64 `eigh` / `eigvalsh` of one {d:,}² statistic (numpy, the CPU path)"
                     + (" — a FLUX single block's `proj_out`" if d == 15360 else ""),
                     f"{_seconds(row['numpy_eigh_seconds'])} / {_seconds(row['numpy_eigvalsh_seconds'])}; on the GPU "
                     "(torch, the projection job's path when it sees one): "
                     + (_seconds(gpu) if gpu is not None else "not measured yet (no GPU here)")])
    if 15360 not in eigh:
        rows.append(["float64 `eigh` of one 15,360² statistic (`proj_out`)", "not measured in this run (`--proj-out`)"])
    return _table(["what", "measured"], rows)


def _bench_sd3_collection(record: dict) -> str:
    seconds, rss = record["seconds_per_step"], record["peak_rss_bytes"]
    rows = [
        ["model", f"{record['model']}: {record['parameters'] / 1e9:.2f} B transformer parameters, "
                  f"{record['layers']} joint blocks"],
        ["run", f"{record['prompts']} prompt(s) × {record['steps']} steps, {record['resolution']} px, CFG "
                f"{record['guidance_scale']:g} (a [uncond, cond] batch), float32"],
        ["statistics", f"{record['statistics']} per step (the default streams SD3 has: "
                       f"{', '.join(f'`{s}`' for s in record['streams'])}), "
                       f"d = {'/'.join(map(str, record['widths']))}: {_size(record['step_statistics_bytes'])} "
                       "of float64 per step"],
        ["seconds per step: bare pipeline / nullcov", f"{_seconds(seconds['bare'])} / {_seconds(seconds['ours'])} "
                                                      f"(**{record['overhead_ratio']:.2f}×**)"],
        ["peak RSS: loaded / after the bare run / after nullcov's",
         f"{_gib(rss['loaded'])} / {_gib(rss['bare'])} / {_gib(rss['ours'])}"],
        ["what the plan asks for this feature job (weights + steps held + overhead)",
         _gib(record["plan_feature_job_bytes"])],
    ]
    return _table(["what", "measured"], rows)


def _text_tokens(record: dict) -> str:
    rows = [[f"`{model['model']}` ({model['pipeline']})",
             f"{model['text_token_counts']['real']:,} / {model['text_token_counts']['padding']:,}",
             _percent(model["padding_row_share"]), _percent(model["padding_energy_share"]),
             _percent(model["padding_energy_in_prompt_null_space"])]
            for model in record["models"]]
    return (f"The {record['prompts']} demo prompts, `text` stream, {record['steps']} steps, `{record['statistic']}` "
            f"at threshold {record['nullspace_threshold']:g}; random-weight tiny models: the token counts are the "
            "tokenizers' and pipelines', the energy shares only show the mechanism.\n\n"
            + _table(["model", "real / padding tokens", "padding share of the rows",
                      "padding share of the energy", "padding energy in the real tokens' null space"], rows))


def _bench_text_only(record: dict) -> str:
    rows = [[f"k/v-only feature job (whole pipeline: text encoder, DPM++ 2M Karras {record['steps']} steps at "
             f"{record['resolution']} px with CFG)", record["prompts"], _seconds(record["full_kv_only_s"]),
             f"{record['prompts'] / record['full_kv_only_s']:.3g}"],
            ["text-only (the text encoder alone), same prompts", record["prompts"], _seconds(record["text_only_s"]),
             f"{record['prompts'] / record['text_only_s']:.3g}"],
            ["text-only, throughput", record["text_only_prompts"], _seconds(record["text_only_prompts_s"]),
             f"{record['text_only_prompts_per_s']:.3g}"]]
    return _table(["path (SD-1.5 architecture, random weights, CPU)", "prompts", "wall", "prompts/s"], rows) + (
        f"\nText-only is **{record['speedup']:g}× faster** on the same prompts; the two `text.h5` statistics "
        + (f"differ by at most {record['max_relative_difference']:.1e} (relative, `sum_outer`)"
           if record["max_relative_difference"] else "are equal (`sum_outer`: largest relative difference 0)")
        + ". Fewer steps and a "
        "smaller image make the whole-pipeline job cheaper than at 50 steps and 512 px, so this understates the "
        "gain.\n")


# -- make bench-training / bench-training-512 (tools/bench_training.py) --------------------------------
def _bench_training(record: dict) -> str:
    rows = []
    for row in record["training"]:
        forms = ", ".join(f"`{form}` × {count}" for form, count in row["forms"].items())
        rows.append([f"{row['mode']}, {record['resolution']} px, batch {record['batch']}", _seconds(row["step_s"]),
                     f"{row['project_s']:.3f} s", f"**{_percent(row['overhead'])}**",
                     f"{row['dense_project_s']:.3f} s, {_percent(row['dense_overhead'])}", f"{row['speedup']:.2f}×",
                     f"{row['max_relative_difference']:.1e}", forms])
    text = _table(["SD-1.5 architecture, CPU", "training step", "`project()`", "overhead",
                   "dense `ΔW P` (before)", "dense / `project()`", "max relative difference", "factored forms"], rows)
    steps = record["training"][0]["steps"]
    text += (f"\nMedian of {steps} steps after a warm-up, {record['threads']} threads; load average "
             f"{record['loadavg_before'][0]:.2f} before, {record['loadavg_after'][0]:.2f} after")
    if record.get("peak_rss_bytes"):
        text += f"; peak RSS {_size(record['peak_rss_bytes'])}"
    text += "."
    interpolate = record.get("interpolate")
    if interpolate:
        text += (f" A cache miss of `mode=\"interpolate\"` took {interpolate['cache_miss_s']:.2f} s "
                 f"({interpolate['matrices']} matrices); the cache holds {_size(interpolate['bytes_per_timestep'])} "
                 "per timestep.")
    return text + "\n"


# -- make bench-feature-memory (tools/feature_memory.py) -------------------------------------------------
def _feature_memory(record: dict) -> str:
    rows = []
    for run in record["runs"]:
        equal = run.get("equals_unchunked")
        rows.append([f"`features:mem_mb={run['mem_mb']}`" if run["mem_mb"] else "the rule's own `mem_mb`",
                     run["memory_log"].removeprefix("memory: ") or "–", f"{run['max_rss_mb']:.0f} MB",
                     f"{run['peak_rss_mb']:.0f} MiB" if run.get("peak_rss_mb") else "–", _seconds(run["job_s"]),
                     "–" if equal is None else ("bit for bit" if equal else "**differ**"),
                     "–" if "under_budget" not in run else ("yes" if run["under_budget"] else "**no**")])
    head = (f"{record['prompts']} prompts × {record['steps']} `{record['collection']}` steps, "
            f"{record['resolution']} px, one shard, CPU, through `snakemake results/features/shard_0000`; "
            f"model weights {record['weight_file_bytes'] / 2**20:.0f} MiB.\n\n")
    return head + _table(["run", "job log", "benchmark `max_rss`", "peak RSS (VmHWM)", "job", "step files equal the "
                          "unchunked run's", "within `mem_mb`"], rows)


# -- make bench-small-run (tools/bench_small_run.py) -----------------------------------------------------
def _small_run(record: dict) -> str:
    runs = record["runs"]
    numbers = [f"run {index + 1}" for index in range(len(runs))]

    def median(values):
        return statistics.median(values)

    legacy = [run["legacy"]["process_wall_s"] for run in runs]
    covariances = [run["workflow"]["covariances_s"] for run in runs]
    total = [run["workflow"]["total_s"] for run in runs]
    speedups = [run["speedup_covariances"] for run in runs]
    with_projections = [run["speedup_with_projections"] for run in runs]

    def spread(values):
        return f" ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else ""

    rows = [["legacy method (model load, per prompt-timestep dumps, covariances)", *map(_seconds, legacy), "1",
             _size(median([run["legacy"]["scratch_bytes"] for run in runs]))],
            ["workflow to the merged covariances (`snakemake --until covariance covariance_text`)",
             *map(_seconds, covariances), f"**{median(speedups):.2f}×**{spread(speedups)}",
             _size(median([run["workflow"]["scratch_bytes"] for run in runs])) + " of step files"],
            ["workflow with the projections (then `--until projection projection_text`)", *map(_seconds, total),
             f"**{median(with_projections):.2f}×**{spread(with_projections)}", ""]]
    head = (f"{record['model']}, {record['resolution']} px, {record['prompts']} prompts × {record['steps']} "
            f"`{record['collection']}` {record['sampler']} steps, one shard, {record['device'].upper()}, "
            f"{record['cores']} cores; each side timed from start to exit, the workflow from an empty working "
            "directory.\n\n")
    return head + _table(["what", *numbers, "vs legacy (median)", "scratch"], rows)


# -- make bench-slurm-arrays (tools/bench_slurm_arrays.py) -----------------------------------------------
def _slurm_arrays(record: dict) -> str:
    modes = {"plain": "as shipped (one job per shard)", "array": "`--slurm-array-jobs features`"}
    repeats = max(sum(1 for row in record["results"] if row["mode"] == mode) for mode in modes)
    rows = []
    for mode, label in modes.items():
        runs = [row for row in record["results"] if row["mode"] == mode]
        if not runs:
            continue
        cells = [_seconds(row["last_queued_s"]) if row["first_queued_s"] is not None else "none queued" for row in runs]
        cells += [""] * (repeats - len(runs))
        rows.append([label, *cells, " / ".join(str(row["queued_feature_jobs"]) for row in runs),
                     " / ".join(str(row["sbatch_calls"]) for row in runs),
                     " / ".join(_seconds(row["submit_window_s"]) for row in runs)])
    head = (f"{record['shards']} one-prompt feature jobs (tiny model; model and schedule built first), node drained "
            f"so none starts, `--profile profiles/slurm --jobs {record['jobs']}`; seconds from Snakemake's start until "
            f"the last feature job is in `squeue -r`. SLURM: {record.get('slurm') or 'unknown'}, executor plugin "
            f"{record.get('executor_plugin') or 'unknown'}.\n\n")
    text = head + _table(["mode", *[f"run {index + 1}" for index in range(repeats)], "feature jobs queued",
                          "sbatch calls", "first → last queued"], rows)
    plain = [row["last_queued_s"] for row in record["results"] if row["mode"] == "plain" and row["last_queued_s"]]
    array = [row["last_queued_s"] for row in record["results"] if row["mode"] == "array" and row["last_queued_s"]]
    if plain and array:
        text += f"\nRatio plain / array (best of each, to the last job queued): {min(plain) / min(array):.2f}.\n"
    return text


def _slurm_arrays_hold(record: dict) -> str:
    (result,) = record["results"]
    text = (f"{result['shards']} shards, `--jobs {result['jobs']}`, arrays on, node not drained: Snakemake "
            f"{'finished' if result['finished'] else '**did not finish**'} in {_seconds(result['elapsed_s'])} "
            f"(exit status {result['returncode']}), {result['shards_done']} of {result['shards']} shards done")
    if result["missing"]:
        text += f"; never reached SLURM or never finished: {len(result['missing'])} shards"
    text += f"; array submissions: {len(result['array_submissions'])}, single: {len(result['single_submissions'])}."
    overlaps = result.get("overlapping_tasks_with_the_same_gpu")
    if overlaps is not None and result["finished"]:
        text += f" Tasks that overlapped on one GPU: {len(overlaps)}."
    identical = result.get("identical_to_local_run")
    if identical:
        text += (f" Against a local run of the same shards: {identical['files']} files, {identical['datasets']} "
                 f"datasets, {len(identical['differing'])} differing.")
    return text + "\n"


def _faults(record: dict) -> str:
    header = ["fault", "how it was caused", "what the user saw", "data lost", "time", "in CI", "test"]

    def cell(text) -> str:
        return (text or "–").replace("|", "\\|").replace("\n", " ")

    rows = [[case["class"], cell(case["caused"]),
             f"`{cell(case['user_saw'])}`" if case["user_saw"] not in (None, "None") else "– (not recorded)",
             case["data_lost"] if case["outcome"] == "passed" else f"**{case['outcome']}**",
             _seconds(case["seconds"]), "yes" if case["ci"] else "bench",
             f"`{case['test'].rpartition('::')[2].split('[')[0]}`"] for case in record["cases"]]
    passed = sum(case["outcome"] == "passed" for case in record["cases"])
    return (f"{passed} of {len(record['cases'])} fault cases passed, {_seconds(record['elapsed_s'])} in all.\n\n"
            + _table(header, rows))


_BENCH_RENDERERS = {
    "bench-cpu": measured("bench-cpu.json", "make bench")(_bench_table),
    "bench-cpu-profile": measured("bench-cpu.json", "make bench", full=False)(_bench_profile),
    "bench-cpu-precision": measured("bench-cpu.json", "make bench", full=False)(_bench_precision),
    "bench-gpu": measured("bench-gpu.json", "make bench-gpu")(_bench_table),
    "bench-gpu-checks": measured("bench-gpu.json", "make bench-gpu", full=False)(_bench_gpu_checks),
    "bench-gpu-profile": measured("bench-gpu.json", "make bench-gpu", full=False)(_bench_profile),
    "bench-gpu-precision": measured("bench-gpu.json", "make bench-gpu", full=False)(_bench_precision),
    "bench-scale": measured("bench-scale.json", "make bench-scale")(_bench_scale),
    "bench-text-only": measured("bench-text-only.json", "make bench-text-only")(_bench_text_only),
    "bench-mmdit-scale": measured("bench-mmdit-scale.json", "make bench-mmdit-scale")(_bench_mmdit_scale),
    "bench-sd3-collection": measured("bench-sd3-collection.json", "make bench-sd3-collection")(_bench_sd3_collection),
    "bench-training-128": measured("bench-training-128.json", "make bench-training")(_bench_training),
    "bench-training-512": measured("bench-training-512.json", "make bench-training-512")(_bench_training),
    "feature-memory": measured("feature-memory.json", "make bench-feature-memory")(_feature_memory),
    "small-run": measured("small-run.json", "make bench-small-run")(_small_run),
    "slurm-arrays": measured("slurm-arrays.json", "make bench-slurm-arrays")(_slurm_arrays),
    "bench-faults": measured("bench-faults.json", "make bench-faults")(_faults),
    "slurm-arrays-hold": measured("slurm-arrays-hold.json",
                                  "python tools/bench_slurm_arrays.py hold --shards 6 --jobs 100")(_slurm_arrays_hold),
}


def _proof_ablation(record: dict) -> str:
    parts = list(next(iter(record["variants"].values())))  # "all", then each linear, as the tool measured them
    header = ["variant's attn2 change applied to", *(part if part == "all" else f"`{part}` only" for part in parts)]
    rows = [[f"`{variant}`", *(_percent(values[part]) for part in parts)]
            for variant, values in record["variants"].items()]
    return (f"Preserved prompts drawn and read correctly (every attribute), {record['prompts']} of the proof's "
            f"preserved prompts: **base model {_percent(record['base'])}**.\n\n" + _table(header, rows))


def _proof_capacity(record: dict) -> str:
    """The shipped model against one trained wider (``tools/bench_capacity.py``): what each learned, its
    null spaces, the concept's share of them, and the matched-fidelity drops of the quick proof."""
    models = record["models"]

    def drop(model: dict, variant: str, level: float) -> str:
        rows = [row for row in model["matched"] if row["variant"] == variant and row["measure"] == "at_fidelity"
                and row["level"] == level]
        if not rows or not rows[0]["reached_runs"]:
            return "not reached"
        return f"{rows[0]['accuracy_drop_points_mean']:+.1f}"

    kinds = ("to_kv", "to_q", "to_out")
    measures = [
        ("training (2 CPU cores): measured idle / the folder's own run",
         lambda m: f"{m['training_time']['total'] / 60:.1f} min / {m['training_seconds']['total'] / 60:.1f} min"),
        ("model folder", lambda m: f"{m['folder_bytes'] / 1024**2:.1f} MiB"),
        ("read correctly: colour / position / shape",
         lambda m: " / ".join(_percent(m["accuracy"][name]) for name in ("colour", "position", "shape"))),
        *((f"null dimensions of `{kind}` (share of the width)",
           lambda m, kind=kind: f"{m['null_dimensions'][kind]['null_dim_mean']:.1f} of "
                                f"{'/'.join(map(str, m['null_dimensions'][kind]['widths']))} "
                                f"({_percent(m['null_dimensions'][kind]['null_share_mean'])})") for kind in kinds),
        *((f"`{kind}` null energy: concept / preserved (ratio)",
           lambda m, kind=kind: f"{100 * m['null_energy'][kind]['concept']:.3g} % / "
                                f"{100 * m['null_energy'][kind]['preserved']:.3g} % "
                                f"({m['null_energy'][kind]['ratio']:.2f}x)") for kind in kinds),
        *((f"`{variant}` drop at 40 / 60 % fidelity",
           lambda m, variant=variant: " / ".join(drop(m, variant, level) for level in (0.4, 0.6)))
          for variant in ("unconstrained", "custom-diffusion")),
        ("goals missed", lambda m: "; ".join(m["goals_missed"]) or "none"),
    ]
    header = ["", *(f"text width {m['text_hidden_size']}" + (" (shipped)" if m["model"] == "builtin:shapes" else "")
                    for m in models)]
    rows = [[label, *(cell(m) for m in models)] for label, cell in measures]
    wide = models[-1]
    verdict = (f"The {wide['text_hidden_size']}-wide model meets every goal of the shipped one."
               if record["replaces_shipped"] else
               f"The {wide['text_hidden_size']}-wide model does not replace the shipped one: it misses "
               + "; ".join(wide["goals_missed"]) + ".")
    timing = models[0]["training_time"]
    return (f"Training time: seconds per step of a {timing['timing_unet_steps']}-step run of the recipe "
            "(both widths back to back, nothing else running) times the recipe's steps; the folder's own "
            "training time is beside it (it counts what else ran on the machine). "
            f"Null dimensions at the config's `{record['statistic']}`, threshold {record['nullspace_threshold']:g}, "
            "mean over every layer (and step); null energy: share of the inputs' energy in the null space, "
            "concept prompts vs preserved prompts outside the statistics (conditional half); drops in points "
            "of preserved accuracy where the quick proof's curve first reaches 40 / 60 % fidelity (one seed).\n\n"
            + _table(header, rows) + "\n" + verdict + "\n")


RENDERERS = {
    "rulegraph": workflow_docs.rulegraph,
    "modules": architecture_docs.modules,
    "config-reference": workflow_docs.config_reference,
    "mmdit-streams": mmdit_tables.streams_tables,
    "proof-table": proof_table,
    "proof-matched": proof_matched,
    "proof-goal": proof_goal,
    "proof-verdict": functools.partial(proof_goal, provenance=False),
    "proof-null-energy": proof_null_energy,
    "proof-ablation": measured("proof-ablation.json", "make proof-ablation")(_proof_ablation),
    "proof-capacity": measured("proof-capacity.json", "make proof-capacity")(_proof_capacity),
    "text-tokens": measured("text-tokens.json", "make text-tokens")(_text_tokens),
    "shapes-training": shapes_training,
    "shapes-evaluator": shapes_evaluator,
    "shapes-accuracy": shapes_accuracy,
    "shapes-attention": shapes_attention,
    **_BENCH_RENDERERS,
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
