"""The shapes world: the grammar, renderer and evaluator behind the shipped trained model.

Owns the caption grammar and renderer (:mod:`.grammar`), the evaluator that reads a rendered or
sampled image (:mod:`.evaluator`), sampling the grammar's prompts and scoring them
(:mod:`.evaluation`) and training ``builtin:shapes`` (:mod:`.train`; ``python -m nullcov.shapes.train``).

May import: every stage below it (top-level modules, :mod:`nullcov.models`,
:mod:`nullcov.statistics`, :mod:`nullcov.collection`, :mod:`nullcov.training`, :mod:`nullcov.report`).
"""
