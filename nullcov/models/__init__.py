"""Models and samplers: what nullcov knows about a diffusion model before and while it runs.

Owns the model families and their vocabulary (which linears a family hooks, which take text
states, how a statistic is keyed: :mod:`.family`), the width of every SD3/FLUX stream from the
transformer's config alone (:mod:`.mmdit_dims`), locating and loading a model (:mod:`.model`),
the built-in random models (:mod:`.tiny_model`, :mod:`.sd15`), sampler names and timestep
schedules (:mod:`.schedule`), the sampler drivers every sampling job shares (:mod:`.sampling`),
and the device a job runs on (:mod:`.device`, :mod:`.gpu_lease`).

May import: the top-level modules of :mod:`nullcov` only.
"""
