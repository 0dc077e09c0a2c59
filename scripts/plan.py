"""Snakemake adapter: print and write the run plan (nullcov.workflow.plan.format_plan)."""
import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")

from nullcov.files import write_text
from nullcov.joblog import logging_to
from nullcov.workflow.plan import format_plan

with logging_to(snakemake.log[0]):
    text = format_plan(dict(snakemake.params.plan))
    write_text(snakemake.output[0], text)
    print(text, end="")
