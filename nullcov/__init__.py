"""nullcov: null-space projection statistics for the cross-attention layers of Stable Diffusion.

One subpackage per stage, each importing only the stages below it (``tests/test_architecture.py``
checks every import, the lazy ones too):

1. the top-level modules every stage uses: :mod:`.docs`, :mod:`.files`, :mod:`.layout`,
   :mod:`.joblog`, :mod:`.prompts`, :mod:`.provenance`, :mod:`.measurement`, :mod:`.schema`;
2. :mod:`.models`: families and their vocabulary, loading, schedules, samplers, devices;
3. :mod:`.statistics`: moments, null spaces, the HDF5 store, merges (no torch);
4. :mod:`.collection`: hooks, capture, accumulators, the feature job;
5. :mod:`.training`: the projection lookup, the constrained fine-tune, exports;
6. :mod:`.report`: figures, attention maps, leakage validation, the run summary;
7. :mod:`.shapes`: the shapes world behind the shipped trained model;
8. :mod:`.proof`: the fine-tune proof;
9. :mod:`.workflow`: config reading and the run plan for the Snakefile.

The parts a Snakefile imports at parse time (prompts, schedule naming, config checks) and the
merge/projection jobs never import torch or diffusers; only the model-building and
feature-collection code pays that import.
"""

__version__ = "0.1.0"
