"""HDF5 round trips, atomic writes, validated reads and the shard merge."""

import h5py
import numpy as np
import pytest

from nullcov.merge import merge_shard_files
from nullcov.projection import null_space
from nullcov.prompts import prompt_set_sha256
from nullcov.statistics import Moments
from nullcov.store import (
    StatisticsFileError,
    _checksummed,
    atomic_path,
    read_moments,
    read_projections,
    write_moments,
    write_projections,
)

LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


def _provenance(first_index, prompts, config=None, fingerprint="abc"):
    return {
        "model": {"spec": "builtin:tiny", "path": "x", "fingerprint": fingerprint},
        "config": config or {"seed": 0},
        "prompts": {"first_index": first_index, "count": len(prompts), "prompts": prompts},
        "packages": {"nullcov": "test"},
    }


def _write_shard(path, rows, first_index, prompts, **kwargs):
    moments = {f"{LAYER}/to_q": Moments.of_rows(rows), f"{LAYER}/to_out": Moments.of_rows(rows[:, ::-1] * 2)}
    step = kwargs.pop("step", {"index": 0, "name": "alpha_00_0999", "timestep": 999.0})
    write_moments(path, "features", moments, {"provenance": _provenance(first_index, prompts, **kwargs), "step": step})
    return moments


def test_moments_round_trip_and_layout(tmp_path):
    rows = np.random.default_rng(0).normal(size=(30, 6))
    written = _write_shard(tmp_path / "a.h5", rows, 0, ["p"])
    read, attrs = read_moments(tmp_path / "a.h5", "features")
    assert attrs["step"]["name"] == "alpha_00_0999" and attrs["provenance"]["model"]["spec"] == "builtin:tiny"
    for key in written:
        assert read[key].count == written[key].count
        np.testing.assert_array_equal(read[key].sum_outer, written[key].sum_outer)
    with h5py.File(tmp_path / "a.h5") as handle:
        assert handle[LAYER]["to_q"]["sum_outer"].dtype == np.float64
        assert handle[LAYER]["to_q"]["sum_outer"].shape == (6 * 7 // 2,)  # packed upper triangle
        assert handle[LAYER]["to_q"]["count"].dtype == np.int64


def test_projection_round_trip(tmp_path):
    rows = np.random.default_rng(1).normal(size=(40, 5))
    space = null_space(Moments.of_rows(rows).second_moment(), 0.5)
    write_projections(tmp_path / "p.h5", {f"{LAYER}/to_q": space}, {"provenance": {"x": 1}})
    spaces, attrs = read_projections(tmp_path / "p.h5")
    got = spaces[f"{LAYER}/to_q"]
    assert got.projection.dtype == np.float32 and got.eigenvalues.dtype == np.float64
    assert got.null_dim == space.null_dim and got.threshold == 0.5
    np.testing.assert_array_equal(got.projection, space.projection)


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.h5"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"partial")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def _corrupt(path, how):
    if how == "bytes":
        data = bytearray(path.read_bytes())
        data[0:64] = b"\0" * 64
        path.write_bytes(bytes(data))
        return
    with h5py.File(path, "a") as handle:  # rewritten datasets carry checksums: the content check must catch them
        group = handle[LAYER]["to_q"]
        if how == "missing":
            del group["sum_outer"]
        elif how == "dims":
            del group["sum_outer"]
            _checksummed(group, "sum_outer", np.zeros(12))
        elif how == "dtype":
            data = group["sum"][()]
            del group["sum"]
            _checksummed(group, "sum", data.astype(np.float32))
        elif how == "count":
            del group["count"]
            _checksummed(group, "count", np.int64(0))
        elif how == "nan":
            group["sum_outer"][0] = np.nan


@pytest.mark.parametrize(
    "how, message",
    [
        ("bytes", "not a readable HDF5 file"),
        ("missing", "lacks dataset"),
        ("dims", "inconsistent shapes"),
        ("dtype", "float64"),
        ("count", "count must be a positive integer"),
        ("nan", "non-finite"),
    ],
)
def test_corrupted_shard_is_refused_by_the_merge_naming_file_and_fix(tmp_path, how, message):
    rows = np.random.default_rng(2).normal(size=(20, 6))
    _write_shard(tmp_path / "shard_0000.h5", rows[:10], 0, ["a"])
    _write_shard(tmp_path / "shard_0001.h5", rows[10:], 1, ["b"])
    _corrupt(tmp_path / "shard_0001.h5", how)
    with pytest.raises(StatisticsFileError, match=message) as info:
        merge_shard_files([tmp_path / "shard_0000.h5", tmp_path / "shard_0001.h5"])
    assert "shard_0001.h5" in str(info.value)
    assert "snakemake --cores all --force" in str(info.value)


def test_merge_equals_brute_force_and_checks_prompt_coverage(tmp_path):
    rows = np.random.default_rng(3).normal(size=(30, 6))
    prompts = ["a", "b", "c"]
    paths = [tmp_path / f"s{i}.h5" for i in range(3)]
    for i, path in enumerate(paths):
        _write_shard(path, rows[10 * i : 10 * (i + 1)], i, [prompts[i]])
    merged, attrs = merge_shard_files(list(reversed(paths)), prompt_set_sha256(prompts))
    whole = Moments.of_rows(rows)
    np.testing.assert_allclose(merged[f"{LAYER}/to_q"].sum_outer, whole.sum_outer, rtol=1e-13)
    assert merged[f"{LAYER}/to_q"].count == 30
    assert attrs["provenance"]["prompts"] == {"count": 3, "sha256": prompt_set_sha256(prompts)}
    with pytest.raises(StatisticsFileError, match="not the configured prompt set"):
        merge_shard_files(paths, prompt_set_sha256(["a", "b", "x"]))
    with pytest.raises(StatisticsFileError, match="overlap or one is missing"):
        merge_shard_files([paths[0], paths[2]])


@pytest.mark.parametrize(
    "override, field",
    [({"config": {"seed": 1}}, "config"), ({"fingerprint": "other"}, "model_fingerprint"),
     ({"step": {"index": 1, "name": "alpha_01_0900", "timestep": 900.0}}, "step")],
)
def test_merge_refuses_shards_of_other_runs_showing_both(tmp_path, override, field):
    rows = np.random.default_rng(4).normal(size=(20, 6))
    _write_shard(tmp_path / "a.h5", rows[:10], 0, ["a"])
    _write_shard(tmp_path / "b.h5", rows[10:], 1, ["b"], **override)
    with pytest.raises(StatisticsFileError, match=f"disagrees .* on {field}") as info:
        merge_shard_files([tmp_path / "a.h5", tmp_path / "b.h5"])
    text = str(info.value)
    assert "a.h5:" in text and "b.h5:" in text


def test_merge_refuses_other_dimensions(tmp_path):
    rng = np.random.default_rng(5)
    _write_shard(tmp_path / "a.h5", rng.normal(size=(10, 6)), 0, ["a"])
    _write_shard(tmp_path / "b.h5", rng.normal(size=(10, 5)), 1, ["b"])
    with pytest.raises(StatisticsFileError, match="dimension 5"):
        merge_shard_files([tmp_path / "a.h5", tmp_path / "b.h5"])


def test_wrong_kind_is_refused(tmp_path):
    _write_shard(tmp_path / "a.h5", np.ones((3, 2)), 0, ["a"])
    with pytest.raises(StatisticsFileError, match="expected a nullcov 'covariance' file"):
        read_moments(tmp_path / "a.h5", "covariance")
