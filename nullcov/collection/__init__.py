"""Collection: the feature job that runs a model and sums the inputs of its hooked linears.

Owns the hook context manager (:mod:`.hooks`), the capture of every hooked linear's input
(:mod:`.capture`), the exact float32-to-float64 accumulation (:mod:`.accumulators`), where the
accumulators live (:mod:`.placement`), a feature job's host memory and step chunks
(:mod:`.memory`) and the job itself (:mod:`.features`).

May import: the top-level modules, :mod:`nullcov.models` and :mod:`nullcov.statistics`.
"""
