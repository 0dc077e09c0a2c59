"""The merge and projection jobs behind the Snakemake scripts (rules merge_group, covariance, projection).

The Snakemake scripts only unpack ``snakemake.input/output/params`` and call these. None of
them imports torch or diffusers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from nullcov.layout import PROJECTION_ENTRY, projection_settings, step_file
from nullcov.statistics.merge import merge_files
from nullcov.statistics.projection import null_space
from nullcov.statistics.store import iter_moments, write_moments, write_projections

log = logging.getLogger(__name__)


def merge_job(input_paths, output_path, expected_prompt_sha256: str, kind: str = "features") -> None:
    """One step's merged moments from every shard's file (``features``) or every group's partial sum."""
    moments, attrs = merge_files(sorted(map(str, input_paths)), kind, expected_prompt_sha256)
    write_moments(output_path, "covariance", moments, attrs)
    log.info("%s: merged %d %s files, %d keys, %d prompts", output_path, len(input_paths), kind, len(moments),
             attrs["provenance"]["prompts"]["count"])


def merge_group_job(shard_folders, output_folder, file_names) -> None:
    """Partial sums of a group of consecutive shards, one file per step (and text.h5), one step at a time."""
    output_folder = Path(output_folder)
    for name in file_names:
        paths = sorted(str(step_file(folder, name)) for folder in shard_folders)
        moments, attrs = merge_files(paths, "features", first_index=None)
        write_moments(step_file(output_folder, name), "partial", moments, attrs)
        del moments
    log.info("%s: partial sums of %d shards, %d files", output_folder, len(shard_folders), len(file_names))


def projection_device() -> str:
    """``cuda`` when the job can see an NVIDIA GPU (torch's float64 ``eigh`` there), else ``cpu``
    (numpy). torch is imported only where a GPU may exist (``/dev/nvidia0``)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or not os.path.exists("/dev/nvidia0"):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def projection_job(covariance_path, output_path, statistic: str, nullspace_threshold: float,
                   threshold_percent: float | None) -> None:
    """Null-space projections of one merged moments file, with the settings in its provenance
    (:func:`nullcov.layout.projection_settings`).

    The statistics are read one key at a time and freed once projected: the job holds every ``P``
    (float32, half the statistics' float64 bytes) and one statistic's eigendecomposition, not the
    whole file (at FLUX.1 size a step file is 8.6 GB of float64; :func:`nullcov.workflow.plan.projection_mem_mb`).
    """
    device = projection_device()
    log.info("%s: eigendecompositions on %s", covariance_path, device)
    spaces, attrs = {}, None
    for key, moment in iter_moments(covariance_path, "covariance"):
        if key is None:  # the file's attributes come first
            attrs = moment
            continue
        spaces[key] = null_space(moment.statistic(statistic), nullspace_threshold, threshold_percent, device)
        log.info("%s: d=%d null_dim=%d threshold=%.4g", key, moment.dim, spaces[key].null_dim, spaces[key].threshold)
        del moment
    attrs["provenance"][PROJECTION_ENTRY] = projection_settings(statistic, nullspace_threshold, threshold_percent)
    write_projections(output_path, dict(sorted(spaces.items())), attrs)
