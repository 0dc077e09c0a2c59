"""Snakemake adapter: print and write the run plan (nullcov.workflow.plan.format_plan), warning when the
results folder has less free space than the plan writes."""
import shutil
import sys
from pathlib import Path

sys.path.insert(0, f"{snakemake.scriptdir}/..")

from nullcov.files import write_text
from nullcov.joblog import logging_to
from nullcov.workflow.plan import format_plan

with logging_to(snakemake.log[0]):
    folder = Path(snakemake.output[0]).parent
    folder.mkdir(parents=True, exist_ok=True)
    text = format_plan(dict(snakemake.params.plan), shutil.disk_usage(folder).free, f"{folder}/")
    write_text(snakemake.output[0], text)
    print(text, end="")
