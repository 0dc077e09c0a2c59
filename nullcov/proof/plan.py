"""The fine-tune proof's variants, planned from the config alone (no torch: the Snakefile reads it at parse time)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SCOPES = ("per-timestep", "all-timesteps")
#: ``unconditional_branch`` of the statistics -> how the table names it.
BRANCH_LABELS = {False: "conditional", True: "both"}


def threshold_settings(config: dict) -> list[tuple[float, float | None]]:
    """``(nullspace_threshold, threshold_percent)`` of every projection the proof compares: the run's
    own first, then each ``finetune_nullspace_thresholds`` and each ``finetune_threshold_percents``
    that differs from it."""
    own = (config["nullspace_threshold"], config["threshold_percent"])
    others = [(float(t), None) for t in config["finetune_nullspace_thresholds"]]
    others += [(0.0, float(p)) for p in config["finetune_threshold_percents"]]
    labels = [threshold_label(*own)]
    settings = [own]
    for setting in others:
        if threshold_label(*setting) not in labels:
            labels.append(threshold_label(*setting))
            settings.append(setting)
    return settings


def own_setting(config: dict, statistics: list[str], thresholds: list[tuple[float, float | None]]) -> tuple:
    """(branches, statistic, threshold label) of the run's own projections: its CFG branches, the
    first statistic compared, the first threshold (the run's own, :func:`threshold_settings`)."""
    return BRANCH_LABELS[bool(config["unconditional_branch"])], statistics[0], threshold_label(*thresholds[0])


def compared_settings(own: tuple[str, str, str], branches: list[bool], statistics: list[str],
                      thresholds: list[tuple[float, float | None]]) -> list[tuple[str, str, str]]:
    """The (branches, statistic, threshold label) settings whose projected variants the proof runs: the
    run's own first, then one setting per other value of one knob with the other two at the run's own
    (each other CFG-branch setting, each other statistic, each other threshold), so every knob is
    compared against the same reference without the cost of every combination."""
    own_branches, own_statistic, own_threshold = own
    settings = [own]
    settings += [(BRANCH_LABELS[both], own_statistic, own_threshold) for both in branches]
    settings += [(own_branches, statistic, own_threshold) for statistic in statistics]
    settings += [(own_branches, own_statistic, threshold_label(*setting)) for setting in thresholds]
    return list(dict.fromkeys(settings))


def threshold_label(nullspace_threshold: float, threshold_percent: float | None) -> str:
    """As the table reports it: the absolute threshold, or ``p<percent>``."""
    return f"p{threshold_percent:g}" if threshold_percent is not None else f"{nullspace_threshold:g}"


@dataclass(frozen=True)
class Variant:
    """One fine-tune. ``results_dir``: the projections of a projected variant."""

    name: str
    kind: str
    scope: str = "-"
    threshold: str = "-"
    statistic: str = "-"
    branches: str = "-"
    results_dir: Path | None = None

    @property
    def projected(self) -> bool:
        return self.results_dir is not None


def plan_variants(settings_keys: list[tuple[str, str, str]], scopes=SCOPES, prior: bool = True,
                  lora: bool = True, text_only: bool = True) -> list[Variant]:
    """Every variant in the order they run. ``settings_keys``: the projection settings (branches,
    statistic, threshold) that have a results folder; the LoRA variant's setting is chosen after the
    projected runs (:func:`best_projected`), so it is planned without one. ``text_only``: the
    ``projected-kv`` variant, which trains only ``to_k``/``to_v`` (whose inputs, the frozen text
    encoder's states, no update can shift) with the first setting (the run's own)."""
    variants = [Variant("unconstrained", "unconstrained")]
    if prior:
        variants.append(Variant("prior-preservation", "prior-preservation"))
    variants += [Variant(f"projected-{scope}-{threshold}-{statistic}-{branches}", "projected", scope, threshold,
                         statistic, branches) for branches, statistic, threshold in settings_keys for scope in scopes]
    if text_only:
        variants.append(Variant("projected-kv", "projected-kv", scope="per-timestep"))
    if lora:
        variants.append(Variant("projected-lora", "projected-lora"))
    return variants
