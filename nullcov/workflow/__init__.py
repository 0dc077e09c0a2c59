"""Workflow glue: what the Snakefile needs at parse time beyond the stages themselves.

Owns reading the config (:mod:`.config`) and the run plan: model dims, every rule's memory and
runtime, ``snakemake plan`` (:mod:`.plan`).

May import: every stage.
"""
