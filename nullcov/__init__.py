"""nullcov: null-space projection statistics for the cross-attention layers of Stable Diffusion.

The package is split so that the parts a Snakefile imports at parse time (prompts, schedule
naming, config checks) and the merge/projection jobs never import torch or diffusers; only the
model-building and feature-collection code pays that import.
"""

__version__ = "0.1.0"
