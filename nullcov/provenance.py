"""Provenance recorded inside every output file: what model, prompts, config and software made it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

import nullcov

# Config keys whose values change the collected features. Shards, merges and projections that
# disagree on any of them must never be combined. Keys absent here (prompts_per_shard,
# batch_size, device, thresholds) do not change the statistics beyond float noise.
FEATURE_CONFIG_KEYS = (
    "seed",
    "sampler_strategy",
    "num_denoising_steps",
    "collection",
    "guidance_scale",
    "resolution",
    "dtype",
    "collect_features",
    "cross_attention_layers",
    "text_tokens",
)

_PACKAGES = ("torch", "diffusers", "transformers", "numpy", "h5py", "safetensors", "snakemake")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the results (read from metadata, no imports)."""
    versions = {"nullcov": nullcov.__version__}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def feature_config(config: dict) -> dict:
    """The subset of the workflow config that determines the features."""
    missing = [key for key in FEATURE_CONFIG_KEYS if key not in config]
    if missing:
        raise KeyError(f"config lacks the feature keys {missing}")
    return {key: config[key] for key in FEATURE_CONFIG_KEYS}


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the model's component configs and weight file sizes.

    Cheap (no weight hashing) yet it changes with the architecture, the scheduler config and
    any re-saved weights; used to refuse mixing statistics of different models.
    """
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for path in sorted(model_dir.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(model_dir).as_posix()
        digest.update(relative.encode())
        if path.suffix == ".json":
            digest.update(path.read_bytes())
        else:
            digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()


def to_json(value) -> str:
    """Canonical JSON used for provenance attributes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
