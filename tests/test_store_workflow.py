"""The storage side through the workflow: grouped merges, keep_shards: false, model identity."""

import shutil

import numpy as np
import pytest

from nullcov.merge import merge_shard_files
from nullcov.provenance import model_fingerprint
from nullcov.store import read_moments

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
    """5 one-prompt shards merged through groups of 2 (3 partial-sum jobs), a local model folder."""
    workdir = tmp_path_factory.mktemp("grouped") / "run"
    model = workdir.parent / "model"
    shutil.copytree(tiny_model_dir, model)
    write_config(workdir, demo_prompts[:5], model=str(model), prompts_per_shard=1, shards_per_merge_group=2,
                 num_denoising_steps=2)
    targets = [f"results/covariance/{name}.h5" for name in ("alpha_00_0999", "alpha_01_0000", "text")]
    snakemake(workdir, *targets)
    return workdir, targets


def test_grouped_merges_equal_the_direct_merge_of_the_shards(grouped_run):
    workdir, targets = grouped_run
    assert sorted(p.name for p in (workdir / "results" / "partial").iterdir()) == [
        "group_0000", "group_0001", "group_0002"]
    for target in targets:
        name = target.split("/")[-1]
        merged, attrs = read_moments(workdir / target, "covariance")
        direct, direct_attrs = merge_shard_files(sorted((workdir / "results" / "features").glob(f"shard_*/{name}")))
        assert attrs["provenance"]["shards"] == direct_attrs["provenance"]["shards"]
        assert attrs["provenance"]["prompts"] == direct_attrs["provenance"]["prompts"]
        for key, moment in direct.items():
            assert merged[key].count == moment.count
            for statistic in ("second_moment", "covariance"):
                expected = moment.statistic(statistic)
                assert np.abs(merged[key].statistic(statistic) - expected).max() <= 1e-12 * np.abs(expected).max()


def test_changed_weights_rerun_the_feature_jobs(grouped_run, tmp_path):
    workdir, targets = grouped_run
    assert planned_jobs(workdir, *targets) == []
    copy = tmp_path / "run"
    shutil.copytree(workdir.parent, tmp_path, dirs_exist_ok=True, symlinks=True)
    config = (copy / "config.yaml").read_text().replace(str(workdir.parent), str(tmp_path))
    (copy / "config.yaml").write_text(config)
    _change_a_weight(tmp_path / "model")
    jobs = planned_jobs(copy, *targets)
    assert sorted(output for rule, output in jobs if rule == "features") == [
        f"results/features/shard_{index:04d}" for index in range(5)]


def test_keep_shards_false_deletes_the_scratch_once_merged(tmp_path, demo_prompts):
    write_config(tmp_path, demo_prompts[:2], prompts_per_shard=1, num_denoising_steps=1, keep_shards=False)
    targets = ["results/covariance/alpha_00_0999.h5", "results/covariance/text.h5"]
    snakemake(tmp_path, *targets)
    assert not list((tmp_path / "results" / "features").glob("shard_*"))
    read_moments(tmp_path / targets[0], "covariance")
    assert planned_jobs(tmp_path, *targets) == []
