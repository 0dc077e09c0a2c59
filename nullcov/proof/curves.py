"""Learning-vs-forgetting curves of the fine-tune proof, and the variants compared at matched concept fidelity.

Every run is evaluated at checkpoints (step 0, the base model, then every ``eval_every`` steps):
its concept fidelity, and on a fixed subset of the preserved prompts the evaluator's accuracy drop
and the images' pixel change (:data:`CURVE_COLUMNS`, ``curves.tsv``). A method that changes the
model less always forgets less, so the variants are compared where their curves reach the same
fidelity (:func:`matched_rows`, ``matched.tsv``):

- ``at_fidelity``: at each level of :data:`nullcov.proof.plan.MATCHED_FIDELITIES`, the drop and pixel
  change where a run's curve first reaches it, **interpolated** linearly in fidelity between the
  checkpoint before and the first checkpoint at or above the level (:func:`at_level`); a run that
  never reaches it is counted in ``runs`` but not in ``reached_runs`` and leaves the means;
- ``best_within_1_point``: the highest fidelity a run reaches at a checkpoint whose drop is at most
  :data:`PRESERVED_DROP_POINTS` (step 0, the base model, always qualifies), and the drop and pixel
  change there.

Runs are grouped by variant and learning rate (the seeds of one variant at one rate): each row
gives the mean, min and max over the group's runs. Pure numpy, no torch: tested on hand-made curves.
"""

from __future__ import annotations

import math

import numpy as np

from nullcov.proof.plan import MATCHED_FIDELITIES
from nullcov.shapes import evaluator

#: The goal's bound on the preserved prompts' accuracy drop (points): a run within it "preserved".
PRESERVED_DROP_POINTS = 1.0
#: The ``measure`` of :func:`matched_rows`' rows of :func:`best_within`.
BEST_MEASURE = f"best_within_{PRESERVED_DROP_POINTS:g}_point"
CURVE_COLUMNS = (
    "run", "variant", "kind", "seed", "learning_rate", "step", "concept_fidelity",
    *(f"accuracy_{attribute}" for attribute in evaluator.ATTRIBUTES),
    *(f"accuracy_drop_points_{attribute}" for attribute in evaluator.ATTRIBUTES),
    "accuracy_drop_points", "pixel_change", "loss",
)
#: What :func:`matched_rows` averages, each as ``<name>_mean``, ``_min`` and ``_max``.
MEASURES = ("concept_fidelity", "accuracy_drop_points", "pixel_change", "step")
MATCHED_COLUMNS = (
    "variant", "kind", "learning_rate", "measure", "level", "runs", "reached_runs",
    *(f"{name}_{stat}" for name in MEASURES for stat in ("mean", "min", "max")),
)


def runs_of(curves: list[dict]) -> dict[str, list[dict]]:
    """``{run: its checkpoints in step order}``."""
    runs: dict[str, list[dict]] = {}
    for row in curves:
        runs.setdefault(row["run"], []).append(row)
    return {run: sorted(rows, key=lambda row: row["step"]) for run, rows in runs.items()}


def at_level(curve: list[dict], level: float) -> dict | None:
    """Where ``curve`` (checkpoints in step order) first reaches ``level`` fidelity: each measure
    interpolated linearly in fidelity between the checkpoint before and the first at or above it
    (the first checkpoint's own values if it is already there); None if it never does."""
    for index, point in enumerate(curve):
        if point["concept_fidelity"] >= level:
            if index == 0:
                return {name: float(point[name]) for name in MEASURES} | {"concept_fidelity": level}
            before = curve[index - 1]
            span = point["concept_fidelity"] - before["concept_fidelity"]
            weight = (level - before["concept_fidelity"]) / span
            return {name: float(before[name] + weight * (point[name] - before[name])) for name in MEASURES} \
                | {"concept_fidelity": level}
    return None


def best_within(curve: list[dict], points: float = PRESERVED_DROP_POINTS) -> dict:
    """The checkpoint with the highest fidelity whose drop is at most ``points`` (the earliest of equals)."""
    within = [point for point in curve if point["accuracy_drop_points"] <= points]  # NaN (no evaluator): none
    if not within:
        return {name: math.nan for name in MEASURES}
    best = max(within, key=lambda point: (point["concept_fidelity"], -point["step"]))
    return {name: float(best[name]) for name in MEASURES}


def _summary(values: list[dict]) -> dict:
    row = {}
    for name in MEASURES:
        numbers = [value[name] for value in values]
        row |= {f"{name}_{stat}": (float(function(numbers)) if numbers else math.nan)
                for stat, function in (("mean", np.mean), ("min", np.min), ("max", np.max))}
    return row


def matched_rows(curves: list[dict], levels=MATCHED_FIDELITIES) -> list[dict]:
    """One row per (variant, learning rate) and measure: ``at_fidelity`` at each of ``levels``, then
    ``best_within_1_point`` (see the module docstring), in the order the variants first appear."""
    runs = runs_of(curves)
    groups: dict[tuple[str, float], list[list[dict]]] = {}
    for curve in runs.values():
        groups.setdefault((curve[0]["variant"], float(curve[0]["learning_rate"])), []).append(curve)
    rows = []
    for (variant, rate), members in groups.items():
        head = {"variant": variant, "kind": members[0][0]["kind"], "learning_rate": rate, "runs": len(members)}
        for level in levels:
            found = [point for point in (at_level(curve, level) for curve in members) if point is not None]
            rows.append(head | {"measure": "at_fidelity", "level": level, "reached_runs": len(found)} | _summary(found))
        best = [point for point in (best_within(curve) for curve in members)
                if math.isfinite(point["concept_fidelity"])]
        rows.append(head | {"measure": BEST_MEASURE, "level": math.nan, "reached_runs": len(best)} | _summary(best))
    return rows
