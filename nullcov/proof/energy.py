"""Why a projected fine-tune can or cannot learn the concept without moving the rest: the null space's
share of the attn2 inputs of the concept prompts and of the preserved prompts, under each projection
the fine-tune proof compares (:func:`nullcov.proof.null_energy.null_energy`).

An update ``ΔW = ΔW P`` changes ``W x`` by ``ΔW (x P)`` only. A projected fine-tune can learn a concept
and leave the preserved prompts where they were only as far as the concept's inputs have more of
their energy in the null space than the preserved prompts' have; the statistics' own prompts have
there only what the threshold lets through, the other preserved prompts whatever they happen to have.

Measured on the base model with the statistics' sampler and CFG: the concept prompts (the proof's
own, every colour x position of the made-up token), the preserved prompts in the statistics' prompt
set and those not in it (seeds from 0 in each group); per projection setting, scope, CFG half
(``conditional``; ``unconditional``: the empty prompt's half, which only statistics collected with
``unconditional_branch: true`` protect) and linear kind (``to_q``, ``to_kv``, ``to_out``).
"""

from __future__ import annotations

import contextlib
import logging
import time

from nullcov.proof import experiment as proof
from nullcov.proof.data import PreservedPrompt
from nullcov.proof.null_energy import ENERGY_KINDS, null_energy
from nullcov.proof.plan import ProjectionSetting

log = logging.getLogger(__name__)

GROUPS = ("concept", "preserved_in_statistics", "preserved_not_in_statistics")
PARTS = ("conditional", "unconditional")
COLUMNS = ("branches", "statistic", "threshold", "scope", "group", "part", "kind", "null_energy", "energy",
           "null_share")


def group_captions(preserved: list[PreservedPrompt], settings: proof.ProofSettings) -> dict[str, list[str]]:
    """The captions of each group (:data:`GROUPS`); a group without prompts is left out."""
    groups = {"concept": [caption for _, caption in proof.concept_prompts(settings)],
              "preserved_in_statistics": [prompt.caption for prompt in preserved if prompt.in_statistics],
              "preserved_not_in_statistics": [prompt.caption for prompt in preserved if not prompt.in_statistics]}
    return {group: captions for group, captions in groups.items() if captions}


def energy_rows(pipe, schedule: dict, compared: list[ProjectionSetting], scopes: list[str],
                preserved: list[PreservedPrompt], settings: proof.ProofSettings) -> list[dict]:
    """One row (:data:`COLUMNS`) per projection setting (``compared``, each with its declared files),
    scope, group, CFG half and linear kind; every group is sampled once with the base model's
    weights, under every setting's and scope's probe at a time."""
    from nullcov.training.constraint import NullSpaceConstraint

    # a copy of the base UNet trainable as a projected variant's, so that each constraint takes
    # every attn2 linear (nothing is trained)
    probed = proof.trainable_unet(pipe.unet, "projected", settings)
    every_step = [step["timestep"] for step in schedule["steps"]]
    probes = [(setting.key, scope, constraint) for setting in compared
              for constraint in [NullSpaceConstraint.from_files(probed, setting.schedule, setting.covariance,
                                                                setting.projections, mode="nearest")]
              for scope in scopes]
    rows = []
    for group, captions in group_captions(preserved, settings).items():
        started = time.perf_counter()
        totals = [{part: {kind: [0.0, 0.0] for kind in ENERGY_KINDS} for part in PARTS} for _ in probes]
        for start in range(0, len(captions), settings.sample_batch):
            batch = captions[start: start + settings.sample_batch]
            with contextlib.ExitStack() as stack:
                sums = [stack.enter_context(null_energy(probed, constraint, scope, every_step, len(batch)))
                        for _, scope, constraint in probes]
                proof.sample(pipe, batch, start, schedule, settings, unet=probed)
            for total, found in zip(totals, sums, strict=True):
                for part in PARTS:
                    for kind in ENERGY_KINDS:
                        total[part][kind][0] += found[part][kind][0]
                        total[part][kind][1] += found[part][kind][1]
        for ((branches, statistic, threshold), scope, _), total in zip(probes, totals, strict=True):
            rows += [{"branches": branches, "statistic": statistic, "threshold": threshold, "scope": scope,
                      "group": group, "part": part, "kind": kind, "null_energy": null, "energy": energy,
                      "null_share": null / energy if energy else float("nan")}
                     for part in PARTS for kind in ENERGY_KINDS for null, energy in [total[part][kind]]]
        log.info("null-space energy of the %s prompts (%d) under %d projection(s) x scope(s): %.0f s", group,
                 len(captions), len(probes), time.perf_counter() - started)
    return rows

