"""Snakemake adapter: gather the leakage tables and draw the validation figures (nullcov.report.figures_validation)."""
import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")

from nullcov.joblog import logging_to
from nullcov.models.schedule import read_schedule
from nullcov.report.figures_validation import leakage_heatmap_figure, leakage_tradeoff_figure
from nullcov.report.plotting import keep_matplotlib_cache_in_workdir
from nullcov.report.validation import gather_tables

with logging_to(snakemake.log[0]):
    keep_matplotlib_cache_in_workdir()
    rows = gather_tables(list(snakemake.input.parts), snakemake.output.table)
    steps = read_schedule(snakemake.input.schedule)["steps"]
    leakage_tradeoff_figure(snakemake.output.tradeoff, rows)
    leakage_heatmap_figure(snakemake.output.heatmap, rows, steps)
