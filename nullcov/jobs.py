"""Job-level entry points behind the Snakemake scripts (schedule, merge, projection).

The Snakemake scripts only unpack ``snakemake.input/output/params`` and call these. None of
them imports torch or diffusers except :func:`write_schedule` (which runs the real scheduler).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from nullcov.merge import merge_files
from nullcov.model import cross_attention_layer_names, select_layers
from nullcov.projection import null_space
from nullcov.provenance import package_versions
from nullcov.schedule import build_schedule
from nullcov.store import atomic_path, read_moments, write_moments, write_projections

log = logging.getLogger(__name__)


@contextlib.contextmanager
def logging_to(path):
    """Send stderr and ``logging`` (INFO) to a job's log file for the duration of the job."""
    with open(path, "w", buffering=1) as handle:
        saved = sys.stderr
        sys.stderr = handle
        logging.basicConfig(
            stream=handle, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
        )
        try:
            yield
        except BaseException:
            log.exception("job failed")
            raise
        finally:
            sys.stderr = saved


def write_schedule(path, scheduler_config: dict, strategy, num_steps: int, model_spec: str, model_dir,
                   layer_selection) -> dict:
    """The schedule, plus the cross-attention layers to collect, checked against the model's UNet.

    Runs before any feature job, on the CPU, so a bad ``cross_attention_layers`` fails before
    any GPU work (the UNet is built on the meta device: no weights are read).
    """
    available = cross_attention_layer_names(model_dir)
    schedule = build_schedule(scheduler_config, strategy, num_steps)
    schedule["layers"] = select_layers(available, layer_selection)
    schedule["provenance"] = {"model": model_spec, "packages": package_versions()}
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(schedule, indent=1, sort_keys=True))
    log.info("%s: %d steps of %s (%s); %d of %d cross-attention layers", path, len(schedule["steps"]), strategy,
             schedule["scheduler"]["class"], len(schedule["layers"]), len(available))
    return schedule


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
        paths = sorted(f"{folder}/{name}.h5" for folder in shard_folders)
        moments, attrs = merge_files(paths, "features", first_index=None)
        write_moments(output_folder / f"{name}.h5", "partial", moments, attrs)
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
    moments, attrs = read_moments(covariance_path, "covariance")
    device = projection_device()
    log.info("%s: eigendecompositions on %s", covariance_path, device)
    spaces = {}
    for key, moment in sorted(moments.items()):
        spaces[key] = null_space(moment.statistic(statistic), nullspace_threshold, threshold_percent, device)
        log.info("%s: d=%d null_dim=%d threshold=%.4g", key, moment.dim, spaces[key].null_dim, spaces[key].threshold)
    attrs["provenance"]["projection"] = {
        "statistic": statistic,
        "nullspace_threshold": nullspace_threshold,
        "threshold_percent": threshold_percent,
    }
    write_projections(output_path, spaces, attrs)
