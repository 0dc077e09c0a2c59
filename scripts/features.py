"""Snakemake adapter: one prompt shard's feature statistics (nullcov.collection.features.run_feature_job).

Also runs the validation prompts (rule validation_inputs): same job, its own shard name and
first prompt index (which sets the seeds). The log's first line names the job's mem_mb and
runtime (both grow with each retry). A job SLURM requeued (preemption, `scontrol requeue`)
starts again in the same output folder: what the interrupted run wrote there is removed first,
so nothing of it is adopted.
"""
import logging
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, f"{snakemake.scriptdir}/..")

from nullcov.collection.features import run_feature_job
from nullcov.joblog import logging_to
from nullcov.layout import TEXT_NAME, step_file
from nullcov.models.schedule import read_schedule

with logging_to(snakemake.log[0]):
    folder = Path(snakemake.output[0])
    log = logging.getLogger("features")
    log.info("job resources: mem_mb=%s, runtime=%s min (both x attempt on a retry)",
             snakemake.resources.get("mem_mb"), snakemake.resources.get("runtime"))
    if folder.exists():  # Snakemake removes outputs before a job: only a restart in place leaves one
        restarts = os.environ.get("SLURM_RESTART_COUNT")
        log.warning("%s exists from an interrupted run of this job%s: removed, the shard is collected from scratch",
                    folder, f" (SLURM requeued it, restart {restarts})" if restarts else "")
        shutil.rmtree(folder)
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
