"""A feature job's host memory: the bytes of one step's statistics, what the job holds for ``k``
steps at once, and how many steps fit its ``mem_mb`` (it then collects its steps in chunks, see
:func:`step_chunks`). The workflow's plan (:mod:`nullcov.workflow.plan`) sizes every rule from these.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from nullcov.docs import see

MIB = 2**20


GIB = 2**30


#: Host memory of a feature job besides the model weights and the step accumulators: the
#: interpreter with torch, diffusers, transformers and h5py, the tokenizer, the sampler's
#: activations (and on a GPU the CUDA context's host side). Measured on the CPU (SD-1.5
#: architecture, 64 px, batch 4, `make bench-feature-memory`): peak RSS − weight files − held
#: steps = 500–509 MiB; 1 GiB leaves room for larger activations and a CUDA context.
#: ``mem_mb`` is read as MiB, as SLURM reads ``--mem`` (Snakemake passes ``mem_mb`` to it).
JOB_OVERHEAD_BYTES = 1 * GIB


#: Steps' worth of host memory a feature job needs beyond the steps it holds: one step's copy
#: while it is written (a device step comes to the host one at a time) and the float32 staging
#: buffers of the host path (2 × 4 bytes × Σ d² = one float64 step).
EXTRA_STEPS = 2


#: Text encoder(s) and VAE of a builtin tiny model before it is built (each is a few MB).
UNBUILT_OTHER_WEIGHTS_BYTES = 64 * MIB


class MemoryBudgetError(RuntimeError):
    """A job's ``mem_mb`` cannot hold even one step's statistics beside the model."""


def statistics_bytes(dims: dict[str, int]) -> int:
    """In-memory float64 bytes of one step's accumulators (``sum_outer`` and ``sum`` per key); on disk
    a step is smaller (packed symmetric ``sum_outer``: :func:`nullcov.statistics.store.moments_file_bytes`)."""
    return sum(8 * (d * d + d) for d in dims.values())


def weights_bytes(model_dir: str | Path, dims: dict) -> int:
    """Bytes of the model's weight files (every component: UNet, text encoder(s), VAE); for a model
    not built yet (a builtin tiny model) its UNet's float32 parameter bytes plus
    :data:`UNBUILT_OTHER_WEIGHTS_BYTES` for its text encoder(s) and VAE."""
    folder = Path(model_dir)
    files = [path for path in folder.glob("*/*") if path.suffix in (".safetensors", ".bin")]
    if files:
        return sum(path.stat().st_size for path in files)
    return 4 * int(dims["unet_parameters"]) + UNBUILT_OTHER_WEIGHTS_BYTES


# -- feature-job memory and chunks -------------------------------------------------------------------
def feature_job_bytes(step_bytes: int, steps_held: int, weights: int) -> int:
    """Peak host bytes of a feature job that holds ``steps_held`` steps' accumulators at once."""
    return JOB_OVERHEAD_BYTES + weights + (steps_held + EXTRA_STEPS) * step_bytes


def steps_per_chunk(mem_bytes: int, step_bytes: int, weights: int, num_steps: int) -> int:
    """How many steps a feature job with ``mem_bytes`` of host memory collects per pass."""
    if num_steps <= 0 or step_bytes <= 0:
        return max(num_steps, 1)
    fit = (mem_bytes - JOB_OVERHEAD_BYTES - weights) // step_bytes - EXTRA_STEPS
    if fit < 1:
        need = math.ceil(feature_job_bytes(step_bytes, 1, weights) / MIB)
        raise MemoryBudgetError(
            f"mem_mb={mem_bytes // MIB} cannot hold one step's statistics ({step_bytes / MIB:.0f} MiB) beside the "
            f"model ({weights / MIB:.0f} MiB) and the job's overhead ({JOB_OVERHEAD_BYTES / MIB:.0f} MiB): "
            f"give the feature job at least mem_mb={need} (--set-resources features:mem_mb={need})"
            f"{see('feature-job-memory-too-small')}"
        )
    return int(min(num_steps, fit))


def step_chunks(num_steps: int, per_chunk: int) -> list[range]:
    """``range(num_steps)`` cut into the fewest chunks of at most ``per_chunk`` steps, sizes balanced."""
    if num_steps <= 0:
        return [range(0)]
    count = math.ceil(num_steps / per_chunk)
    bounds = [round(i * num_steps / count) for i in range(count + 1)]
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


def mem_mb(total_bytes: int) -> int:
    return math.ceil(total_bytes / MIB)


