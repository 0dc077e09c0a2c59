"""Merging per-shard moments into one file per timestep (and one for the text inputs).

The merge is a float64 sum of sufficient statistics, so it is exact and independent of how
prompts were sharded. Shards that disagree on the model, the feature config, the step, the
layers or their dimensions are refused, naming both files and both values.

Memory stays constant in the number of shards: the files' attributes are read and checked
first (no statistics), then the statistics are read, validated and added one file at a time
in prompt order (so the same inputs give the same bits). Many shards go through partial sums
over groups of shards (kind ``partial``, one job per group for all steps), then the per-step
sum over the groups' files: :func:`merge_files` reads either kind.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nullcov.docs import see
from nullcov.prompts import prompt_set_sha256
from nullcov.statistics.moments import Moments
from nullcov.statistics.store import (
    CORRUPTED,
    StatisticsFileError,
    iter_moments,
    read_attrs,
    regenerate_command,
)

log = logging.getLogger(__name__)

# Provenance fields that every shard of one merge must share.
_SHARED_FIELDS = ("model_fingerprint", "model", "config", "step")


def regenerate_hint(path) -> str:
    """The command that reruns the job owning ``path`` (a shard's or a group's folder)."""
    return f"regenerate that shard with: {regenerate_command(path)}"


def _with_hint(err: StatisticsFileError) -> StatisticsFileError:
    if "snakemake --cores all --force" in err.problem:
        return err
    return StatisticsFileError(err.path, f"{err.problem}; {regenerate_hint(err.path)}", err.pointer)


def _shared(provenance: dict, step) -> dict:
    return {
        "model": provenance["model"]["spec"],
        "model_fingerprint": provenance["model"]["fingerprint"],
        "config": provenance["config"],
        "step": step,
    }


def _headers(paths, kind: str) -> list[tuple[str, dict, dict, dict]]:
    """(path, shared fields, prompts, provenance) of every file, in prompt order, checked to agree."""
    headers = []
    for path in paths:
        try:
            attrs = read_attrs(path, kind)
            provenance = attrs["provenance"]
            shared = _shared(provenance, attrs.get("step"))
            prompts = {field: provenance["prompts"][field] for field in ("first_index", "prompts")}
        except StatisticsFileError as err:
            raise _with_hint(err) from None
        except (KeyError, TypeError) as err:
            raise StatisticsFileError(path, f"provenance lacks {err}; {regenerate_hint(path)}", CORRUPTED) from None
        headers.append((str(path), shared, prompts, provenance))
    first_path, first_shared = headers[0][0], headers[0][1]
    for path, shared, _, _ in headers[1:]:
        for field in _SHARED_FIELDS:
            if shared[field] != first_shared[field]:
                raise StatisticsFileError(
                    path,
                    f"shard disagrees with {first_path} on {field}:\n  {first_path}: {first_shared[field]}\n"
                    f"  {path}: {shared[field]}\nThese shards come from different runs; "
                    f"{regenerate_hint(path)}",
                    see("shards-from-another-run"),
                )
    headers.sort(key=lambda header: header[2]["first_index"])
    first_index = headers[0][2]["first_index"]
    expected = first_index
    for path, _, prompts, _ in headers:
        if prompts["first_index"] != expected:
            raise StatisticsFileError(
                path,
                f"covers prompts from index {prompts['first_index']}, expected {expected}: "
                "shards overlap or one is missing",
                see("shards-overlap-or-one-is-missing"),
            )
        expected += len(prompts["prompts"])
    return headers


def _covered_prompts(headers: list, first_index: int | None, expected_prompt_sha256: str | None) -> list[str]:
    """Every prompt of the files, in order, checked to start at ``first_index`` and to be the expected set."""
    start = headers[0][2]["first_index"]
    if first_index is not None and start != first_index:
        raise StatisticsFileError(headers[0][0], f"covers prompts from index {start}, expected {first_index}: "
                                  "shards overlap or one is missing", see("shards-overlap-or-one-is-missing"))
    all_prompts = [prompt for header in headers for prompt in header[2]["prompts"]]
    prompt_sha256 = prompt_set_sha256(all_prompts)
    if expected_prompt_sha256 is not None and prompt_sha256 != expected_prompt_sha256:
        raise StatisticsFileError(
            headers[0][0],
            f"the shards' prompts (sha256 {prompt_sha256}) are not the configured prompt set "
            f"(sha256 {expected_prompt_sha256}); stale shards? Rerun the feature jobs.",
            see("shards-from-another-run"),
        )
    return all_prompts


def _add_file(path: str, kind: str, total: dict[str, Moments], first_path: str) -> None:
    """Add one file's moments into ``total`` (the first file's moments start it), checking its keys and dims."""
    seen = []
    try:
        items = iter_moments(path, kind)
        next(items)
        for key, moment in items:
            seen.append(key)
            if path == first_path:
                total[key] = moment
                continue
            if key not in total:
                break
            if moment.dim != total[key].dim:
                raise StatisticsFileError(
                    path, f"{key!r} has dimension {moment.dim}, but {first_path} has {total[key].dim}",
                    see("shards-from-another-run"),
                )
            total[key].add_(moment)
    except StatisticsFileError as err:
        raise _with_hint(err) from None
    if sorted(seen) != sorted(total):
        raise StatisticsFileError(
            path,
            f"holds layers {sorted(set(seen) ^ set(total))} that {first_path} does not (or vice versa)",
            see("shards-from-another-run"),
        )


def _merged_provenance(headers: list, all_prompts: list[str], first_index: int | None) -> dict:
    first_provenance = headers[0][3]
    shards = [name for header in headers for name in header[3].get("shards", [Path(header[0]).parent.name])]
    provenance = {
        "model": first_provenance["model"],
        "config": first_provenance["config"],
        "packages": first_provenance["packages"],
        "prompts": {"count": len(all_prompts), "sha256": prompt_set_sha256(all_prompts)},
        "shards": shards,
    }
    if first_index is None:  # a partial sum: the next merge checks its coverage like a shard's
        provenance["prompts"].update(first_index=headers[0][2]["first_index"], prompts=all_prompts)
    return provenance


def merge_files(paths: list[str | Path], kind: str = "features", expected_prompt_sha256: str | None = None,
                first_index: int | None = 0) -> tuple[dict[str, Moments], dict]:
    """Sum the ``kind`` files (``features`` shards, or ``partial`` group sums) of one step.

    Returns (moments, attrs): ``attrs`` are the merged file's attributes, ``provenance`` and
    ``step``. The prompts of the files must follow each other from ``first_index`` (``None``:
    from wherever the first file starts, for a group of shards), and, when
    ``expected_prompt_sha256`` is given, make up exactly that prompt set.
    """
    if not paths:
        raise ValueError("no shard files to merge")
    headers = _headers(paths, kind)
    all_prompts = _covered_prompts(headers, first_index, expected_prompt_sha256)
    total: dict[str, Moments] = {}
    for path, _, _, _ in headers:  # summed in prompt order, so a rerun gives the same bits
        _add_file(path, kind, total, headers[0][0])
    return total, {"provenance": _merged_provenance(headers, all_prompts, first_index), "step": headers[0][1]["step"]}
