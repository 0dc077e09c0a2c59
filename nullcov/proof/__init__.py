"""The fine-tune proof: does a projected fine-tune learn a concept and leave the rest alone?

Owns its plan from the config alone (:mod:`.plan`, parse time, no torch: one ``ProofPlan`` the
Snakefile makes and the job receives), its prompts (:mod:`.data`), the statistics it compares made
in process as its rules make them (:mod:`.statistics`, for tests), the experiment (:mod:`.experiment`),
the null-space energy probe and table (:mod:`.null_energy`, :mod:`.energy`), its outputs
(:mod:`.report`) and the job (:mod:`.job`).

May import: every stage below it (up to :mod:`nullcov.shapes`).
"""
