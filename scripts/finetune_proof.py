"""Snakemake adapter: the fine-tune proof (nullcov.finetune.run_finetune_proof)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, f"{snakemake.scriptdir}/..")

import torch

from nullcov.finetune import draw_figure, run_finetune_proof, write_curves, write_table
from nullcov.jobs import logging_to

with logging_to(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    rows, curves = run_finetune_proof(
        model_dir=snakemake.params.model_dir,
        results_dir=Path(snakemake.input.schedule).parent,
        schedule=json.loads(Path(snakemake.input.schedule).read_text()),
        preserved={
            "held_out": (list(snakemake.params.held_out_prompts), snakemake.params.held_out_first_index),
            "trained": (list(snakemake.params.trained_prompts), 0),
        },
        config=dict(snakemake.params.config),
        steps=snakemake.params.steps,
        max_steps=snakemake.params.max_steps,
        learning_rate=snakemake.params.learning_rate,
        projected_learning_rate=snakemake.params.projected_learning_rate,
        threshold_percents=list(snakemake.params.threshold_percents),
    )
    write_table(snakemake.output.table, rows)
    write_curves(snakemake.output.curves, curves)
    draw_figure(snakemake.output.figure, rows, curves)
