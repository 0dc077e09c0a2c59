"""Snakemake adapter: the run summary table (nullcov.report.run_summary.summary_rows), TSV and HTML."""
import sys
from pathlib import Path

sys.path.insert(0, f"{snakemake.scriptdir}/..")

from nullcov.joblog import logging_to
from nullcov.models.schedule import read_schedule
from nullcov.report import run_summary
from nullcov.statistics.store import read_spectra

with logging_to(snakemake.log[0]):
    schedule = read_schedule(snakemake.input.schedule)
    provenance = run_summary.read_provenance(Path(snakemake.input.first_shard) / snakemake.params.shard_file_name)
    spectra = {path: read_spectra(path) for path in snakemake.input.projections}
    rows = run_summary.summary_rows(
        config=dict(snakemake.config) | {"prompts_per_shard": snakemake.params.prompts_per_shard},
        schedule=schedule,
        provenance=provenance,
        num_prompts=snakemake.params.num_prompts,
        prompt_sha256=snakemake.params.prompt_sha256,
        num_shards=snakemake.params.num_shards,
        num_validation=snakemake.params.num_validation,
        validation_file=snakemake.params.validation_file,
        benchmarks=dict(snakemake.params.benchmarks),
        folders=dict(snakemake.params.folders),
        projection_stats=run_summary.projection_statistics(spectra),
    )
    run_summary.write_summary(rows, snakemake.output.tsv, snakemake.output.html)
