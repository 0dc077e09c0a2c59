"""The storage side through the workflow: grouped merges, keep_shards: false, model identity."""

import shutil

import pytest

from nullcov.prompts import prompt_set_sha256
from nullcov.provenance import model_fingerprint
from nullcov.statistics.store import read_moments

from conftest import planned_jobs, snakemake, write_config


def _change_a_weight(model_dir):
    """Change one UNet weight in place: the lowest mantissa bit of a float32 in the data region
    (same size, still a valid safetensors file, still finite), as an in-place fine-tune re-save would."""
    path = model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    with open(path, "r+b") as handle:
        data_start = 8 + int.from_bytes(handle.read(8), "little")
        offset = data_start + 4 * 1000
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 1]))


def test_changed_weights_change_the_fingerprint(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    cache = tmp_path / "cache.json"
    before = model_fingerprint(model, cache)
    assert model_fingerprint(model, cache) == before == model_fingerprint(model, None)  # cached = uncached
    size = (model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    _change_a_weight(model)
    assert (model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size == size  # sizes cannot tell
    assert model_fingerprint(model, cache) != before
    assert model_fingerprint(model, cache) == model_fingerprint(model, None)


@pytest.fixture(scope="module")
def grouped_run(tmp_path_factory, tiny_model_dir, demo_prompts):
    """3 one-prompt shards merged through groups of 2, one step, keep_shards: false, a local model folder."""
    workdir = tmp_path_factory.mktemp("grouped") / "run"
    model = workdir.parent / "model"
    shutil.copytree(tiny_model_dir, model)
    write_config(workdir, demo_prompts[:3], model=str(model), prompts_per_shard=1, shards_per_merge_group=2,
                 num_denoising_steps=1, keep_shards=False)
    targets = ["results/covariance/alpha_00_0999.h5", "results/covariance/text.h5"]
    snakemake(workdir, *targets)
    return workdir, targets


def test_grouped_merges_cover_every_shard_and_keep_shards_false_deletes_the_scratch(grouped_run, demo_prompts):
    """Grouped and direct merges agree to 1e-12 (tests/statistics/test_store_merge.py); here the workflow's wiring."""
    workdir, targets = grouped_run
    for target in targets:
        _, attrs = read_moments(workdir / target, "covariance")
        assert attrs["provenance"]["shards"] == ["shard_0000", "shard_0001", "shard_0002"]
        assert attrs["provenance"]["prompts"] == {"count": 3, "sha256": prompt_set_sha256(demo_prompts[:3])}
    log = (workdir / "logs" / "covariance" / "alpha_00_0999.log").read_text()
    assert "merged 2 partial files" in log
    assert not list((workdir / "results" / "features").glob("shard_*"))  # temp: deleted once merged
    assert not list((workdir / "results" / "partial").glob("group_*"))
    assert planned_jobs(workdir, *targets) == []  # deleted scratch does not rerun anything


def test_changed_weights_rerun_the_feature_jobs(grouped_run):
    """Runs last in this module: it changes the run's model in place (a copy elsewhere would be another model path)."""
    workdir, targets = grouped_run
    assert planned_jobs(workdir, *targets) == []
    _change_a_weight(workdir.parent / "model")
    jobs = planned_jobs(workdir, *targets)
    assert sorted(output for rule, output in jobs if rule == "features") == [
        f"results/features/shard_{index:04d}" for index in range(3)]
