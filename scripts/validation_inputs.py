"""Snakemake adapter: the validation prompts' exact moments, through the feature job itself
(nullcov.features.run_feature_job); prompt j is seeded seed + validation_seed_offset + j."""
import json
import sys
from pathlib import Path

sys.path.insert(0, f"{snakemake.scriptdir}/..")

from nullcov.features import run_feature_job
from nullcov.jobs import logging_to

RUN_KEYS = ("batch_size", "device", "strict_prompts")  # keys that do not change the statistics

with logging_to(snakemake.log[0]):
    folder = Path(snakemake.output[0])
    paths = {name: str(folder / f"{name}.h5") for name in snakemake.params.file_names}
    text_path = paths.pop("text", None)
    run_feature_job(
        model_spec=snakemake.params.model,
        model_dir=snakemake.params.model_dir,
        prompts=list(snakemake.params.prompts),
        first_index=snakemake.params.first_index,
        shard="validation",
        schedule=json.loads(Path(snakemake.input.schedule).read_text()),
        config=dict(snakemake.params.config) | {k: snakemake.config[k] for k in RUN_KEYS if k in snakemake.config},
        step_paths=paths,
        text_path=text_path,
        threads=snakemake.threads,
    )
