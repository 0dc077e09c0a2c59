"""Snakemake adapter: spectra and null-space dimension figures of the projections (report.figures_projection)."""
import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")

from nullcov.joblog import logging_to
from nullcov.models.schedule import read_schedule
from nullcov.report.figures_projection import projection_figures
from nullcov.report.plotting import keep_matplotlib_cache_in_workdir

with logging_to(snakemake.log[0]):
    keep_matplotlib_cache_in_workdir()
    projection_figures(
        figures=dict(snakemake.params.figures),
        schedule_steps=read_schedule(snakemake.input.schedule)["steps"],
        projection_files=list(snakemake.input.projections),
        step_names=list(snakemake.params.step_names),
        report_steps=list(snakemake.params.report_steps),
    )
