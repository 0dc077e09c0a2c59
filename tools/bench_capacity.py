"""The capacity hypothesis, measured: does a wider text encoder leave the concept more null space?

Issue 29's question. The shipped ``builtin:shapes`` has a 64-wide text encoder; a model trained with the
same recipe at another width (``python -m nullcov.shapes.train --text-hidden-size 256 --out FOLDER``)
is compared with it in one invocation, each model through the same three measurements:

1. what it learned: ``tools/bench_shapes.py`` (240 grammar prompts, accuracy per attribute), its folder
   size and its training time, against the shipped model's goals (:data:`nullcov.shapes.train.SHIPPED_GOALS`).
   The training time is measured here, back to back for both widths on an otherwise idle machine: a
   short run of the same recipe (``--timing-steps`` UNet steps, a tenth of them VAE steps) gives the
   seconds per step, times the recipe's steps (the whole training's own record, ``training.json``, is
   reported beside it: it counts whatever else ran on the machine meanwhile);
2. the fine-tune proof, quick settings (``tools/bench_proof.py --quick --set model=FOLDER``): the null
   space's share of the concept prompts' and the preserved prompts' inputs (``null_energy.tsv``), and
   the drop where ``unconstrained`` and ``custom-diffusion`` first reach 40/60/80 % fidelity;
3. the null-space dimension of every statistic of that run (the merged second moments of
   the proof's statistics, at the config's ``statistic`` and ``nullspace_threshold``), per linear kind,
   as a count and as a share of the input width.

Writes ``docs/measurements/proof-capacity.json`` (rendered in docs/finetune-proof.md); the runs stay in
``--workdir`` (default ``results-capacity/``, ignored by git). The wider model replaces the shipped one
only if it meets every goal: the record says which it misses.

Usage::

    python tools/bench_capacity.py --wide FOLDER [--workdir results-capacity] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHIPPED = "builtin:shapes"
#: A linear kind's statistics, by the key in the merged moments files: the text states (``to_k``/``to_v``), or
#: the per-step ``<layer>/to_q`` and ``<layer>/to_out``.
KINDS = ("to_kv", "to_q", "to_out")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wide", type=Path, required=True,
                        help="a model folder written by "
                             "`python -m nullcov.shapes.train --text-hidden-size N --out FOLDER`")
    parser.add_argument("--workdir", type=Path, default=REPO / "results-capacity")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "measurements" / "proof-capacity.json")
    parser.add_argument("--timing-steps", type=int, default=200, help="UNet steps of the timing run (0: none)")
    parser.add_argument("--reuse", action="store_true",
                        help="use a model's bench-shapes.json and proof-quick.json already in --workdir (written "
                             "by this tool's own commands for that model) instead of running them again")
    return parser.parse_args(argv)


def _run(script: str, *arguments: str) -> None:
    subprocess.run([sys.executable, str(REPO / "tools" / script), *arguments], check=True)


def kind_of(key: str) -> str:
    """The linear kind (:data:`KINDS`) of a merged-moments key."""
    from nullcov.models.family import TEXT_KEY

    return "to_kv" if key == TEXT_KEY else key.rpartition("/")[2]


def null_dimensions(covariance_dir: Path, statistic: str, threshold: float) -> dict[str, dict]:
    """Per linear kind: the null-space dimension of every statistic of the run (every layer, and every
    step for the per-step kinds), its width, and the mean share of the width that is null."""
    from nullcov.statistics.projection import null_space
    from nullcov.statistics.store import iter_moments

    found: dict[str, list[tuple[int, int]]] = {kind: [] for kind in KINDS}
    for path in sorted(covariance_dir.glob("*.h5")):
        for key, moments in iter_moments(path, "covariance"):
            if key is None:  # the file's attributes
                continue
            space = null_space(moments.statistic(statistic), threshold)
            found[kind_of(key)].append((space.null_dim, moments.dim))
    return {kind: {"statistics": len(pairs), "widths": sorted({d for _, d in pairs}),
                   "null_dim_mean": sum(n for n, _ in pairs) / len(pairs),
                   "null_share_mean": sum(n / d for n, d in pairs) / len(pairs)}
            for kind, pairs in found.items() if pairs}


def energy_shares(null_energy: list[dict]) -> dict[str, dict]:
    """Per linear kind: the null space's share of the concept prompts' and the preserved prompts'
    (outside the statistics' prompt set) input energy, conditional CFG half, and their ratio."""
    rows = [row for row in null_energy if row["part"] == "conditional"]
    shares = {(row["group"], row["kind"]): row["null_share"] for row in rows}
    if len(shares) != len(rows):
        raise ValueError("null_energy.tsv compares several projections; the capacity run expects the proof's one")
    return {kind: {"concept": shares[("concept", kind)],
                   "preserved": shares[("preserved_not_in_statistics", kind)],
                   "ratio": shares[("concept", kind)] / shares[("preserved_not_in_statistics", kind)]}
            for kind in KINDS}


def training_time(settings, timing_steps: int, folder: Path) -> dict:
    """The recipe's training time at ``settings``' widths, from a short run of it into ``folder``: seconds per
    VAE and per UNet step, times the recipe's steps, plus the tokenizer and saving as measured."""
    from dataclasses import replace

    from nullcov.shapes.train import TRAINING_RECORD, train

    short = replace(settings, unet_steps=timing_steps, vae_steps=max(1, timing_steps // 10))
    train(folder, short, log=lambda line: None)
    seconds = json.loads((folder / TRAINING_RECORD).read_text())["seconds"]
    per_vae, per_unet = seconds["vae"] / short.vae_steps, seconds["unet_text"] / short.unet_steps
    other = seconds["total"] - seconds["vae"] - seconds["unet_text"]
    return {"timing_unet_steps": short.unet_steps, "timing_vae_steps": short.vae_steps,
            "seconds_per_vae_step": per_vae, "seconds_per_unet_step": per_unet, "other_seconds": other,
            "total": per_vae * settings.vae_steps + per_unet * settings.unet_steps + other}


def recorded_settings(model_dir: Path):
    """The :class:`~nullcov.shapes.train.ShapesTraining` a model folder was trained with (its ``training.json``)."""
    from nullcov.shapes.train import TRAINING_RECORD, ShapesTraining

    training = json.loads((model_dir / TRAINING_RECORD).read_text())
    return ShapesTraining(**{key: tuple(value) if isinstance(value, list) else value
                             for key, value in training["settings"].items()})


def measure(name: str, spec: str, model_dir: Path, workdir: Path, statistic: str, threshold: float,
            timed: dict | None, reuse: bool = False) -> dict:
    """Every measurement of one model (``name``: its folder under ``workdir``); ``timed``: its
    :func:`training_time`, if measured; ``reuse``: keep the outputs of an earlier run of the same commands."""
    from nullcov.shapes.train import SHIPPED_GOALS, TRAINING_RECORD, folder_bytes

    here = workdir / name
    here.mkdir(parents=True, exist_ok=True)
    training = json.loads((model_dir / TRAINING_RECORD).read_text())
    if not (reuse and (here / "bench-shapes.json").is_file()):
        _run("bench_shapes.py", "--model", spec, "--out", str(here / "bench-shapes.json"))
    if not (reuse and (here / "proof-quick.json").is_file()):
        _run("bench_proof.py", "--quick", "--workdir", str(here / "proof"), "--out", str(here / "proof-quick.json"),
             "--set", f"model={spec}")
    shapes = json.loads((here / "bench-shapes.json").read_text())
    proof = json.loads((here / "proof-quick.json").read_text())
    for path, record in (("bench-shapes.json", shapes), ("proof-quick.json", proof)):
        ran = record["model"] if "model" in record else record["config"].get("model")
        if ran != spec:
            raise SystemExit(f"{here / path} is of model {ran!r}, not {spec!r}: remove it or run without --reuse")
    size = folder_bytes(model_dir)
    matched = [{key: row[key] for key in ("variant", "measure", "level", "reached_runs", "accuracy_drop_points_mean",
                                          "pixel_change_mean", "concept_fidelity_mean")}
               for row in proof["matched"]]
    return {
        "model": spec if spec.startswith("builtin:") else os.path.relpath(spec, REPO),
        "text_hidden_size": training["settings"]["text_hidden_size"],
        "training_seconds": training["seconds"],  # the folder's own training, as it ran
        "training_date": training["date"],
        "training_time": timed,  # measured here, idle machine
        "folder_bytes": size,
        "accuracy": shapes["accuracy"],
        "goals_missed": SHIPPED_GOALS.failures((timed or training["seconds"])["total"], size, shapes["accuracy"]),
        "null_dimensions": null_dimensions(here / "proof" / "results" / "covariance", statistic, threshold),
        "null_energy": energy_shares(proof["null_energy"]),
        "matched": matched,
        "proof_seconds": proof["seconds"]["workflow"],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.wide / "training.json").is_file():
        raise SystemExit(f"--wide {args.wide}: no training.json there; train it first: "
                         f"python -m nullcov.shapes.train --text-hidden-size 256 --out {args.wide}")

    import yaml

    from nullcov.measurement import header, write_record
    from nullcov.models.model import resolve_model_dir
    from nullcov.shapes.train import SHIPPED_GOALS

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    statistic, threshold = config["statistic"], config["nullspace_threshold"]
    record = header("tools/bench_capacity.py", argv, torch_threads=2)
    models = [("shipped", SHIPPED, resolve_model_dir(SHIPPED)), ("wide", str(args.wide.resolve()), args.wide.resolve())]
    record |= {
        "statistic": statistic,
        "nullspace_threshold": threshold,
        "goals": {"training_seconds": SHIPPED_GOALS.training_seconds, "folder_bytes": SHIPPED_GOALS.folder_bytes,
                  "accuracy": dict(SHIPPED_GOALS.accuracy)},
    }
    # the training times first, back to back, before anything else of this run uses the cores
    timed = [training_time(recorded_settings(folder), args.timing_steps, args.workdir / name / "timing-model")
             if args.timing_steps else None for name, _, folder in models]
    record["models"] = [measure(name, spec, folder, args.workdir, statistic, threshold, times, args.reuse)
                        for (name, spec, folder), times in zip(models, timed)]
    wide = record["models"][1]
    record["replaces_shipped"] = not wide["goals_missed"]
    write_record(args.out, record)
    print(f"wrote {args.out}; the wide model {'meets every goal' if record['replaces_shipped'] else 'misses: '}"
          + "; ".join(wide["goals_missed"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
