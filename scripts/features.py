"""Snakemake adapter: one prompt shard's feature statistics (nullcov.collection.features.run_feature_job).

Also runs the validation prompts (rule validation_inputs): same job, its own shard name and
first prompt index (which sets the seeds). The log's first line names the job's mem_mb and
runtime (both grow with each retry, e.g. after a SLURM time limit).
"""
import logging
import sys
from pathlib import Path

sys.path.insert(0, f"{snakemake.scriptdir}/..")

from nullcov.collection.features import run_feature_job
from nullcov.joblog import logging_to
from nullcov.layout import TEXT_NAME, step_file
from nullcov.models.schedule import read_schedule

with logging_to(snakemake.log[0]):
    folder = Path(snakemake.output[0])
    logging.getLogger("features").info("job resources: mem_mb=%s, runtime=%s min (both x attempt on a retry)",
                                       snakemake.resources.get("mem_mb"), snakemake.resources.get("runtime"))
    paths = {name: str(step_file(folder, name)) for name in snakemake.params.file_names}
    text_path = paths.pop(TEXT_NAME, None)
    run_feature_job(
        model_spec=snakemake.params.model,
        model_dir=snakemake.params.model_dir,
        prompts=list(snakemake.params.prompts),
        first_index=snakemake.params.first_index,
        shard=snakemake.params.shard,
        schedule=read_schedule(snakemake.input.schedule),
        config=dict(snakemake.params.config)
        | {key: snakemake.config[key] for key in ("batch_size", "device", "strict_prompts")},
        step_paths=paths,
        text_path=text_path,
        threads=snakemake.threads,
        mem_mb=snakemake.resources.mem_mb,
    )
