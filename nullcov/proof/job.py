"""The fine-tune proof as one job (rule ``finetune_proof``): the planned variants, the outputs.

:func:`finetune_proof_job` gets the proof planned at parse time (:class:`nullcov.proof.plan.ProofPlan`:
settings, the projection settings compared with the declared files of each, the variants), loads
the model once, runs every variant (:func:`nullcov.proof.experiment.run_proof`) and writes what
:mod:`nullcov.proof.report` describes; it reads the plan's files and plans nothing itself. With
``model: builtin:shapes`` the evaluator decides when a variant has learned the concept; any other
model trains every variant ``fixed_steps`` and reports losses, drift and the image grid only (the
table's evaluator columns are NaN and the log says so). An SD3/FLUX model runs the training mechanics
only (:func:`flow_proof_job`, :mod:`nullcov.proof.flow`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nullcov.files import write_tsv
from nullcov.proof import curves as proof_curves
from nullcov.proof import data as proof_data
from nullcov.proof import energy as proof_energy
from nullcov.proof import experiment as proof
from nullcov.proof import report as proof_report
from nullcov.proof.plan import ProofPlan

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


def sample_grid(pipe, schedule: dict, settings: proof.ProofSettings, unet=None) -> np.ndarray:
    """The grid's images under ``unet`` (None: the pipeline's; caption ``i`` seeded ``i``, one batch)."""
    return proof.sample(pipe, grid_captions(), 0, schedule, settings, unet=unet)


def weights_folder(weights, run: str) -> Path:
    """The folder of a run's weights (:data:`nullcov.proof.report.WEIGHTS_FILE` and one
    ``step_NNNN/`` per checkpoint).

    ``weights``: ``{run: folder}`` (the rule's declared ``directory()`` outputs), or a folder holding
    one subfolder per run.
    """
    return Path(weights[run]) if isinstance(weights, dict) else Path(weights) / run


@dataclass
class VariantOutputs:
    """After each run: its weights and, for each variant's first run, its row of the image grid; at
    each checkpoint, the weights of that step."""

    weights: dict | Path  # see weights_folder
    pipe: object
    schedule: dict
    settings: proof.ProofSettings
    images: dict
    #: the weights' file in a run's folder: a UNet's attn2 weights, or an SD3/FLUX run's trained linears
    weights_file: str = proof_report.WEIGHTS_FILE

    def __call__(self, variant: proof.Variant, row: dict, unet, state: dict | None = None) -> None:
        """After a run: its weights (``state``; None: the UNet's attn2 weights) and its row of the grid."""
        identifier = proof.identifier_state(self.pipe, unet) if state is None else {}
        self.checkpoint(variant.name, None, proof.attn2_state(unet) if state is None else state, identifier)
        if not variant.group:
            self.images[variant.name] = sample_grid(self.pipe, self.schedule, self.settings, unet)

    def checkpoint(self, run: str, step: int | None, state: dict, identifier: dict) -> None:
        """The run's weights at ``step`` (None: its final ones): attn2 and, for Custom Diffusion, its identifier."""
        folder = weights_folder(self.weights, run)
        folder = folder if step is None else folder / proof_report.checkpoint_folder(step)
        proof_report.save_weights(folder, state, self.weights_file)
        if identifier:
            proof_report.save_weights(folder, identifier, proof_report.IDENTIFIER_FILE)


def finetune_proof_job(*, model_dir: str, plan: ProofPlan | dict, schedule: dict, statistics_prompts: list[str],
                       device: str, outputs: dict) -> list[dict]:
    """Run the planned proof (``plan``: a :class:`ProofPlan` or its :meth:`~ProofPlan.to_dict`) and write
    ``outputs`` (``table``, ``curves``, ``matched`` (:mod:`nullcov.proof.curves`), ``figure`` (the
    frontier), ``grid``, ``grid_images``, ``null_energy`` (:mod:`nullcov.proof.energy`), ``weights``:
    ``{run: folder}`` or a folder, :func:`weights_folder`).
    ``device``: the config key ``device`` (the job leases one GPU of it)."""
    from nullcov.models.device import use_device
    from nullcov.models.family import model_family
    from nullcov.models.gpu_lease import lease_device
    from nullcov.models.model import load_pipeline
    from nullcov.models.sampling import configure_scheduler

    plan = plan if isinstance(plan, ProofPlan) else ProofPlan.from_dict(plan)
    settings = plan.settings
    if model_family(model_dir).denoiser == "transformer":
        return flow_proof_job(model_dir=model_dir, plan=plan, schedule=schedule, device=device, outputs=outputs)
    if not settings.evaluate:
        log.warning("the model is not builtin:shapes: no evaluator reads its images, so every variant trains "
                    "%d steps and the table reports losses, drift and the image grid only", settings.fixed_steps)
    with lease_device(device, label="fine-tune proof") as lease:
        pipe = load_pipeline(model_dir, "float32", use_device(lease.device))
        configure_scheduler(pipe, schedule)
        base_images = {"base": sample_grid(pipe, schedule, settings)}
        recorder = VariantOutputs(outputs["weights"], pipe, schedule, settings, base_images)
        rows, curves, _ = proof.run_proof(pipe, schedule, statistics_prompts, plan, on_variant=recorder,
                                          on_checkpoint=recorder.checkpoint)
        energy = proof_energy.energy_rows(pipe, schedule, list(plan.compared), list(plan.scopes),
                                          proof_data.preserved_scenes(statistics_prompts), settings)
    proof_report.write_table(outputs["table"], rows)
    write_tsv(outputs["curves"], curves, proof_curves.CURVE_COLUMNS)
    matched = proof_curves.matched_rows(curves)
    write_tsv(outputs["matched"], matched, proof_curves.MATCHED_COLUMNS)
    proof_report.write_frontier(outputs["figure"], curves, matched)
    proof_report.write_grid(outputs["grid"], outputs["grid_images"], recorder.images, grid_captions())
    write_tsv(outputs["null_energy"], energy, proof_energy.COLUMNS)
    return rows


def flow_proof_job(*, model_dir: str, plan: ProofPlan, schedule: dict, device: str, outputs: dict) -> list[dict]:
    """The proof on an SD3/FLUX model (:func:`nullcov.proof.flow.run_flow_proof`: the training mechanics, no
    evaluator), writing what applies of :func:`finetune_proof_job`'s ``outputs``: the table, each run's
    trained linears (:data:`nullcov.layout.FINETUNE_TRANSFORMER_WEIGHTS`, no checkpoints) and the image grid
    (the base model and each variant's first run); ``curves``, ``matched`` and ``null_energy`` hold their
    header only (no checkpoints are measured, and the null-space energy is the UNet's attn2 inputs'), the
    figure has no curve."""
    from nullcov.layout import FINETUNE_TRANSFORMER_WEIGHTS
    from nullcov.models.device import use_device
    from nullcov.models.gpu_lease import lease_device
    from nullcov.models.model import load_pipeline
    from nullcov.models.sampling import configure_scheduler
    from nullcov.proof.flow import check_flow_variants, run_flow_proof

    check_flow_variants(plan)  # before the model loads
    log.warning("an SD3/FLUX model: no evaluator reads its images, so every run trains %d steps; the table reports "
                "losses and updates, the grid the images; no curves, matched fidelity or null-space energy",
                plan.settings.fixed_steps)
    with lease_device(device, label="fine-tune proof") as lease:
        pipe = load_pipeline(model_dir, "float32", use_device(lease.device))
        configure_scheduler(pipe, schedule)
        base_images = {"base": sample_grid(pipe, schedule, plan.settings)}
        recorder = VariantOutputs(outputs["weights"], pipe, schedule, plan.settings, base_images,
                                  FINETUNE_TRANSFORMER_WEIGHTS)
        rows = run_flow_proof(pipe, model_dir, schedule, plan, on_variant=recorder)
    proof_report.write_table(outputs["table"], rows)
    write_tsv(outputs["curves"], [], proof_curves.CURVE_COLUMNS)
    write_tsv(outputs["matched"], [], proof_curves.MATCHED_COLUMNS)
    proof_report.write_frontier(outputs["figure"], [], [])
    proof_report.write_grid(outputs["grid"], outputs["grid_images"], recorder.images, grid_captions())
    write_tsv(outputs["null_energy"], [], proof_energy.COLUMNS)
    return rows
