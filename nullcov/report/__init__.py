"""The report: figures, tables, attention maps and the leakage check of a run.

Owns figure setup (:mod:`.plotting`), the projection, attention, validation and training-curve
figures (``figures_*``), the attention-map job (:mod:`.attention`), the leakage validation
(:mod:`.validation`) and the run summary (:mod:`.run_summary`).

May import: the top-level modules, :mod:`nullcov.models`, :mod:`nullcov.statistics`,
:mod:`nullcov.collection` and :mod:`nullcov.training`.
"""
