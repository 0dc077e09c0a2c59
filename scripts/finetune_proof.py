"""Snakemake adapter: the fine-tune proof (nullcov.proof.job.finetune_proof_job), planned at parse time."""
import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")

import torch

from nullcov.joblog import logging_to
from nullcov.models.schedule import read_schedule
from nullcov.proof.job import finetune_proof_job
from nullcov.proof.plan import ProofPlan

with logging_to(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    # The plan's files are the rule's declared inputs (rules/finetune.smk builds both from FINETUNE_PLAN).
    plan = ProofPlan.from_dict(snakemake.params.plan)
    finetune_proof_job(
        model_dir=snakemake.params.model_dir,
        plan=plan,
        schedule=read_schedule(snakemake.input.schedule),
        statistics_prompts=list(snakemake.params.statistics_prompts),
        device=snakemake.params.device,
        outputs={
            "table": snakemake.output.table,
            "curves": snakemake.output.curves,
            "matched": snakemake.output.matched,
            "figure": snakemake.output.figure,
            "grid": snakemake.output.grid,
            "grid_images": snakemake.output.grid_images,
            "null_energy": snakemake.output.null_energy,
            "weights": dict(zip(plan.names, snakemake.output.weights, strict=True)),
        },
    )
