"""Merging per-shard moments into one file per timestep (and one for the text inputs).

The merge is a float64 sum of sufficient statistics, so it is exact and independent of how
prompts were sharded. Shards that disagree on the model, the feature config, the step, the
layers or their dimensions are refused, naming both files and both values.
"""

from __future__ import annotations

from pathlib import Path

from nullcov.prompts import prompt_set_sha256
from nullcov.statistics import Moments
from nullcov.store import StatisticsFileError, read_moments

# Provenance fields that every shard of one merge must share.
_SHARED_FIELDS = ("model_fingerprint", "model", "config", "step")


def regenerate_hint(path) -> str:
    """The command that reruns the feature job owning ``path`` (its output is the shard folder)."""
    return f"regenerate that shard with: snakemake --cores all --force {Path(path).parent}"


def _shared(provenance: dict, step) -> dict:
    return {
        "model": provenance["model"]["spec"],
        "model_fingerprint": provenance["model"]["fingerprint"],
        "config": provenance["config"],
        "step": step,
    }


def merge_shard_files(paths: list[str | Path], expected_prompt_sha256: str | None = None
                      ) -> tuple[dict[str, Moments], dict]:
    """Sum the ``features`` files of all shards of one step; returns (moments, attrs).

    ``attrs`` are the merged file's attributes: ``provenance`` and ``step``."""
    if not paths:
        raise ValueError("no shard files to merge")
    shards = []
    for path in paths:
        try:
            moments, attrs = read_moments(path, "features")
            provenance = attrs["provenance"]
            shared = _shared(provenance, attrs.get("step"))
            prompts = provenance["prompts"]
        except StatisticsFileError as err:
            raise StatisticsFileError(err.path, f"{err.problem}; {regenerate_hint(err.path)}") from None
        except (KeyError, TypeError) as err:
            raise StatisticsFileError(path, f"provenance lacks {err}; {regenerate_hint(path)}") from None
        shards.append((str(path), moments, shared, prompts, provenance))

    first_path, first_moments, first_shared, _, first_provenance = shards[0]
    for path, moments, shared, _, _ in shards[1:]:
        for field in _SHARED_FIELDS:
            if shared[field] != first_shared[field]:
                raise StatisticsFileError(
                    path,
                    f"shard disagrees with {first_path} on {field}:\n  {first_path}: {first_shared[field]}\n"
                    f"  {path}: {shared[field]}\nThese shards come from different runs; "
                    f"{regenerate_hint(path)}",
                )
        if sorted(moments) != sorted(first_moments):
            raise StatisticsFileError(
                path,
                f"holds layers {sorted(set(moments) ^ set(first_moments))} that {first_path} does not (or vice versa)",
            )
        for key, moment in moments.items():
            if moment.dim != first_moments[key].dim:
                raise StatisticsFileError(
                    path, f"{key!r} has dimension {moment.dim}, but {first_path} has {first_moments[key].dim}"
                )

    shards.sort(key=lambda shard: shard[3]["first_index"])
    all_prompts: list[str] = []
    for path, _, _, prompts, _ in shards:
        if prompts["first_index"] != len(all_prompts):
            raise StatisticsFileError(
                path,
                f"covers prompts from index {prompts['first_index']}, expected {len(all_prompts)}: "
                "shards overlap or one is missing",
            )
        all_prompts.extend(prompts["prompts"])
    prompt_sha256 = prompt_set_sha256(all_prompts)
    if expected_prompt_sha256 is not None and prompt_sha256 != expected_prompt_sha256:
        raise StatisticsFileError(
            shards[0][0],
            f"the shards' prompts (sha256 {prompt_sha256}) are not the configured prompt set "
            f"(sha256 {expected_prompt_sha256}); stale shards? Rerun the feature jobs.",
        )

    total = {}
    for key in first_moments:  # summed in prompt order, so a rerun gives the same bits
        total[key] = shards[0][1][key]
        for shard in shards[1:]:
            total[key] = total[key] + shard[1][key]
    provenance = {
        "model": first_provenance["model"],
        "config": first_provenance["config"],
        "packages": first_provenance["packages"],
        "prompts": {"count": len(all_prompts), "sha256": prompt_sha256},
        "shards": [Path(shard[0]).parent.name for shard in shards],
    }
    return total, {"provenance": provenance, "step": first_shared["step"]}
