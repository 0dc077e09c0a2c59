"""Provenance recorded inside every output file: what model, prompts, config and software made it."""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import nullcov
from nullcov.files import read_json, write_json

# Config keys whose values change the collected features. Shards, merges and projections that
# disagree on any of them must never be combined. Keys absent here (prompts_per_shard,
# batch_size, device, thresholds) do not change the statistics beyond float noise.
FEATURE_CONFIG_KEYS = (
    "seed",
    "sampler_strategy",
    "num_denoising_steps",
    "collection",
    "guidance_scale",
    "unconditional_branch",
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


#: Where :func:`file_sha256` keeps the hashes of files it has read (relative to the working directory).
HASH_CACHE = "resources/cache/file_sha256.json"


def model_files(model_dir: str | Path) -> list[Path]:
    """The files that make the model: ``model_index.json`` and every file in the component
    folders it names (unet, text_encoder, tokenizer, scheduler, ...), sorted."""
    model_dir = Path(model_dir)
    index = model_dir / "model_index.json"
    components = [name for name, value in read_json(index).items()
                  if not name.startswith("_") and isinstance(value, list)]
    files = [index]
    for component in sorted(components):
        folder = model_dir / component
        if folder.is_dir():
            files += sorted(path for path in folder.rglob("*") if path.is_file())
    return files


def file_sha256(path: str | Path, cache_path: str | Path | None = HASH_CACHE) -> str:
    """sha256 of a file's contents; remembered in ``cache_path`` (JSON) under the file's resolved
    path, size and mtime_ns, so an unchanged multi-GB weight file is hashed once per machine."""
    path = Path(path)
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache: dict[str, str] = {}
    if cache_path is not None and Path(cache_path).is_file():
        try:
            cache = read_json(cache_path)
        except (OSError, ValueError):
            cache = {}  # a damaged cache only costs re-hashing
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    if cache_path is not None:
        cache[key] = digest.hexdigest()
        write_json(cache_path, cache, sort_keys=True, indent=0)  # concurrent jobs: the last writer wins, no torn file
    return digest.hexdigest()


def model_fingerprint(model_dir: str | Path, cache_path: str | Path | None = HASH_CACHE) -> str:
    """sha256 over the relative paths and the contents (sha256) of the model's files
    (:func:`model_files`: configs, tokenizer and every weight file of its components).

    Weight files are hashed in full, once: hashes are cached by path, size and mtime_ns in
    ``cache_path`` (None: no cache). Any change of a weight, config or tokenizer file changes
    it; used to refuse mixing statistics of different models.
    """
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for path in model_files(model_dir):
        digest.update(path.relative_to(model_dir).as_posix().encode())
        digest.update(file_sha256(path, cache_path).encode())
    return digest.hexdigest()

