"""Snakemake adapter: the model's training curve from its training.json (nullcov.report)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, f"{snakemake.scriptdir}/..")

from nullcov import report
from nullcov.jobs import logging_to

with logging_to(snakemake.log[0]):
    report.keep_matplotlib_cache_in_workdir()
    report.training_curve_figure(snakemake.output[0], json.loads(Path(snakemake.input.record).read_text()))
