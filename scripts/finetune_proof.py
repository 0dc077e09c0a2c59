"""Snakemake adapter: the fine-tune proof (nullcov.proof.job.finetune_proof_job)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, f"{snakemake.scriptdir}/..")

import torch

from nullcov.joblog import logging_to
from nullcov.proof.experiment import ProofSettings
from nullcov.proof.job import finetune_proof_job
from nullcov.proof.statistics import StatisticsFiles

with logging_to(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    settings = dict(snakemake.params.settings)
    plan = {key: settings.pop(key) for key in ("scopes", "statistics", "branches", "thresholds", "prior", "text_only")}
    finetune_proof_job(
        model_spec=snakemake.params.model_spec,
        model_dir=snakemake.params.model_dir,
        results_dir=StatisticsFiles.declared(
            snakemake.input.schedule, snakemake.input.covariance, snakemake.input.projections
        ),
        schedule=json.loads(Path(snakemake.input.schedule).read_text()),
        statistics_prompts=list(snakemake.params.statistics_prompts),
        config=dict(snakemake.params.config),
        settings=ProofSettings(**settings),
        outputs={
            "table": snakemake.output.table,
            "figure": snakemake.output.figure,
            "grid": snakemake.output.grid,
            "grid_images": snakemake.output.grid_images,
            "null_energy": snakemake.output.null_energy,
            "weights": dict(zip(snakemake.params.variants, snakemake.output.weights, strict=True)),
        },
        lora=settings["lora_rank"] > 0,
        **plan,
    )
