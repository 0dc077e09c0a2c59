"""The fine-tune proof as one job (rule ``finetune_proof``): projections to compare, the variants, the outputs.

:func:`finetune_proof_job` loads the model once, builds a results folder per projection setting
from the run's statistics files (the rule's declared inputs, :mod:`nullcov.proof.statistics`), runs
every variant (:func:`nullcov.proof.experiment.run_proof`) and writes what :mod:`nullcov.proof.report` describes.
With ``model: builtin:shapes`` the evaluator decides when a variant has learned the concept; any
other model trains every variant ``fixed_steps`` and reports losses, drift and the image grid only
(the table's evaluator columns are NaN and the log says so).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nullcov.files import write_tsv
from nullcov.proof import data as proof_data
from nullcov.proof import energy as proof_energy
from nullcov.proof import experiment as proof
from nullcov.proof import report as proof_report
from nullcov.proof import statistics as proof_statistics
from nullcov.proof.plan import BRANCH_LABELS, compared_settings, own_setting
from nullcov.proof.statistics import StatisticsFiles

log = logging.getLogger(__name__)

#: Columns of the image grid: this many preserved prompts, then this many concept prompts.
GRID_PROMPTS = 6


def grid_captions() -> list[str]:
    """The grid's prompts: preserved prompts of the concept's frame and of other frames, then concept prompts."""
    preserved = proof_data.preserved_scenes([])
    picks = [preserved[i].caption for i in np.linspace(0, len(preserved) - 1, GRID_PROMPTS).round().astype(int)]
    concept = proof_data.concept_scenes()
    picks += [proof_data.concept_caption(concept[i]) for i in range(0, len(concept), len(concept) // GRID_PROMPTS)]
    return picks[: 2 * GRID_PROMPTS]


def sample_grid(pipe, schedule: dict, settings: proof.ProofSettings) -> np.ndarray:
    """The grid's images under the pipeline's current UNet (caption ``i`` seeded ``i``, one batch)."""
    return proof.sample(pipe, grid_captions(), 0, schedule, settings)


def weights_folder(weights, variant: str) -> Path:
    """The folder a variant's weights file (:data:`nullcov.proof.report.WEIGHTS_FILE`) goes into.

    ``weights``: ``{variant: weights file}`` (the rule's declared outputs), or a folder holding one
    subfolder per variant.
    """
    if not isinstance(weights, dict):
        return Path(weights) / variant
    path = Path(weights[variant])
    if path.name != proof_report.WEIGHTS_FILE:
        raise ValueError(f"{path}: a variant's weights are written as {proof_report.WEIGHTS_FILE}")
    return path.parent


@dataclass
class VariantOutputs:
    """After each variant: its weights file and its row of the image grid."""

    weights: dict | Path  # see weights_folder
    pipe: object
    schedule: dict
    settings: proof.ProofSettings
    images: dict

    def __call__(self, variant: proof.Variant, row: dict, unet) -> None:
        proof_report.save_weights(weights_folder(self.weights, variant.name), proof.attn2_state(unet))
        base, self.pipe.unet = self.pipe.unet, unet
        self.images[variant.name] = sample_grid(self.pipe, self.schedule, self.settings)
        self.pipe.unet = base


def statistics_files(scratch: Path, run: StatisticsFiles, branches: list[bool], *, model_spec: str,
                     model_dir: str, statistics_prompts: list[str], schedule: dict, config: dict) -> dict:
    """``{branch label: StatisticsFiles}``: the run's own, and the other CFG-branch setting
    collected here when ``branches`` asks for it."""
    own = bool(config["unconditional_branch"])
    files = {}
    for both in branches:
        label = BRANCH_LABELS[both]
        if both == own:
            files[label] = run
        else:
            files[label] = proof_statistics.collect_statistics(
                Path(scratch) / f"statistics-{label}", model_spec=model_spec, model_dir=model_dir,
                prompts=statistics_prompts, schedule=schedule, config=config | {"unconditional_branch": both})
    return files


def finetune_proof_job(*, model_spec: str, model_dir: str, results_dir: str | Path | StatisticsFiles, schedule: dict,
                       statistics_prompts: list[str], config: dict, settings: proof.ProofSettings,
                       outputs: dict, scopes: list[str], statistics: list[str], branches: list[bool],
                       thresholds: list[tuple[float, float | None]], prior: bool, lora: bool,
                       text_only: bool = False) -> list[dict]:
    """Run the proof and write ``outputs`` (``table``, ``figure``, ``grid``, ``grid_images``, ``null_energy``
    (:mod:`nullcov.proof.energy`), ``weights``:
    ``{variant: file}`` or a folder, :func:`weights_folder`).

    ``results_dir``: the run's statistics, as the files the rule declares (:class:`StatisticsFiles`) or
    a results folder.
    """
    from nullcov.models.device import use_device
    from nullcov.models.gpu_lease import lease_device
    from nullcov.models.model import BUILTIN_SHAPES, load_pipeline
    from nullcov.models.sampling import configure_scheduler

    run = results_dir if isinstance(results_dir, StatisticsFiles) else StatisticsFiles.in_folder(results_dir)
    settings.evaluate = model_spec == BUILTIN_SHAPES
    if not settings.evaluate:
        log.warning("model %s is not builtin:shapes: no evaluator reads its images, so every variant trains "
                    "%d steps and the table reports losses, drift and the image grid only", model_spec,
                    settings.fixed_steps)
    with lease_device(config["device"], label="fine-tune proof") as lease, \
            tempfile.TemporaryDirectory(prefix="nullcov-proof-") as scratch:
        pipe = load_pipeline(model_dir, "float32", use_device(lease.device))
        configure_scheduler(pipe, schedule)
        sources = statistics_files(scratch, run, branches, model_spec=model_spec, model_dir=model_dir,
                                   statistics_prompts=statistics_prompts, schedule=schedule, config=config)
        compared = compared_settings(own_setting(config, statistics, thresholds), branches, statistics, thresholds)
        folders = proof_statistics.projection_folders(Path(scratch) / "projections", sources, compared, thresholds)
        base_images = {"base": sample_grid(pipe, schedule, settings)}
        recorder = VariantOutputs(outputs["weights"], pipe, schedule, settings, base_images)
        rows, base_fidelity = proof.run_proof(pipe, schedule, statistics_prompts, folders, settings, scopes, prior,
                                              lora, on_variant=recorder, text_only=text_only)
        energy = proof_energy.energy_rows(pipe, schedule, folders, scopes,
                                          proof_data.preserved_scenes(statistics_prompts), settings)
    proof_report.write_table(outputs["table"], rows)
    proof_report.write_figure(outputs["figure"], rows, base_fidelity, settings.target_fidelity)
    proof_report.write_grid(outputs["grid"], outputs["grid_images"], recorder.images, grid_captions())
    write_tsv(outputs["null_energy"], energy, proof_energy.COLUMNS)
    return rows
