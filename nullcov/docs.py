"""Where the documentation explains what nullcov prints.

Every error message that has an entry in ``docs/troubleshooting.md`` ends with :func:`see` of
that entry's anchor; ``snakemake plan`` and the run summary end with a line naming the page that
explains them. ``tests/test_troubleshooting.py`` checks that every anchor passed to :func:`see`
is a heading of the page. No imports: the Snakefile reads this at parse time.
"""

#: The page of error messages: what each one means and the command that fixes it.
TROUBLESHOOTING = "docs/troubleshooting.md"
#: The page explaining what ``snakemake plan`` prints (``results/plan.txt``).
PLANNING = "docs/planning.md"
#: The page explaining the run's outputs, the run summary (``results/report/summary.tsv``) among them.
OUTPUTS = "docs/outputs.md"


def see(anchor: str) -> str:
    """The pointer an error message ends with: ``" (see docs/troubleshooting.md#<anchor>)"``."""
    return f" (see {TROUBLESHOOTING}#{anchor})"
