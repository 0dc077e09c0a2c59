"""Prompt files: reading, hashing and splitting into shards."""

from __future__ import annotations

import hashlib
from pathlib import Path

from nullcov.docs import see


class PromptFileError(ValueError):
    """A prompt file is missing, unreadable or has no prompts."""


def read_prompts(path: str | Path) -> list[str]:
    """Read one prompt per line; blank lines and lines starting with ``#`` are skipped.

    Surrounding whitespace is stripped. Raises :class:`PromptFileError` naming the file (and
    the line, for bytes that are not UTF-8) when the file cannot give at least one prompt.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PromptFileError(
            f"prompt file {str(path)!r} does not exist{see('prompt-file-does-not-exist')}"
        ) from None
    except OSError as err:
        raise PromptFileError(
            f"prompt file {str(path)!r} cannot be read: {err}{see('prompt-file-cannot-be-read')}"
        ) from None
    prompts = []
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise PromptFileError(
                f"prompt file {str(path)!r}, line {number}: not UTF-8 ({err.reason} at byte {err.start})"
                f"{see('prompt-file-line-is-not-utf-8')}"
            ) from None
        if text and not text.startswith("#"):
            prompts.append(text)
    if not prompts:
        raise PromptFileError(f"prompt file {str(path)!r} holds no prompts (only blank or '#' lines)"
                              f"{see('prompt-file-holds-no-prompts')}")
    return prompts


def prompt_set_sha256(prompts: list[str]) -> str:
    """A hash of an ordered prompt list; equal lists give equal hashes."""
    parts = []
    for prompt in prompts:  # one update over the joined bytes: 600k prompts in a fraction of a second
        encoded = prompt.encode("utf-8")
        parts += (len(encoded).to_bytes(8, "little"), encoded)
    return hashlib.sha256(b"".join(parts)).hexdigest()


#: ``prompts_per_shard: auto`` gives each feature job this many prompt-steps (UNet calls per
#: prompt × prompts). At SD-1.5 speed (16 prompts × 50 steps = 800 prompt-steps in ~7 s of GPU
#: work, issue 9) that is ~5 minutes per job; it keeps the shard count, and with it the shard
#: scratch (shards × steps × one step's moments), independent of the number of steps.
PROMPT_STEPS_PER_SHARD = 32768


def auto_prompts_per_shard(unet_calls_per_prompt: int) -> int:
    """Prompts per shard for ``prompts_per_shard: auto``: ``ceil(PROMPT_STEPS_PER_SHARD / calls)``.

    Depends only on the schedule, never on the number of prompts, so appending prompts still
    changes only the last shard and adds new ones.
    """
    if unet_calls_per_prompt <= 0:
        raise ValueError(f"the schedule must have at least one step, got {unet_calls_per_prompt}")
    return -(-PROMPT_STEPS_PER_SHARD // unet_calls_per_prompt)


def split_into_shards(prompts: list[str], prompts_per_shard: int) -> list[list[str]]:
    """Consecutive shards of ``prompts_per_shard`` prompts (the last may be shorter).

    Shard ``s`` starts at prompt index ``s * prompts_per_shard``, so appending prompts changes
    only the last shard and adds new ones.
    """
    if prompts_per_shard <= 0:
        raise ValueError(f"prompts_per_shard must be a positive integer, got {prompts_per_shard}"
                         f"{see('error-validating-config-file')}")
    return [prompts[i : i + prompts_per_shard] for i in range(0, len(prompts), prompts_per_shard)]


def duplicate_counts(prompts: list[str]) -> dict[str, int]:
    """Prompts that occur more than once, with their number of occurrences (first-seen order)."""
    counts: dict[str, int] = {}
    for prompt in prompts:
        counts[prompt] = counts.get(prompt, 0) + 1
    return {prompt: count for prompt, count in counts.items() if count > 1}


def apply_duplicate_policy(prompts: list[str], policy: str) -> list[str]:
    """``keep`` every occurrence, or ``drop`` all but the first occurrence of each prompt."""
    if policy == "keep":
        return list(prompts)
    if policy == "drop":
        return list(dict.fromkeys(prompts))
    raise ValueError(f"duplicate_prompts must be 'keep' or 'drop', got {policy!r}{see('error-validating-config-file')}")
