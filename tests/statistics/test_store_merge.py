"""HDF5 round trips, atomic writes, validated reads and the shard merge."""

import functools

import h5py
import numpy as np
import pytest

from nullcov.files import atomic_path
from nullcov.prompts import prompt_set_sha256
from nullcov.statistics.merge import merge_files
from nullcov.statistics.moments import Moments
from nullcov.statistics.projection import null_space
from nullcov.statistics.store import (
    StatisticsFileError,
    _checksummed,
    moments_file_bytes,
    read_arrays,
    read_moments,
    read_projections,
    write_arrays,
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
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
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
        merge_files([tmp_path / "shard_0000.h5", tmp_path / "shard_0001.h5"])
    assert "shard_0001.h5" in str(info.value)
    assert "snakemake --cores all --force" in str(info.value)


def test_merge_equals_brute_force_and_checks_prompt_coverage(tmp_path):
    rows = np.random.default_rng(3).normal(size=(30, 6))
    prompts = ["a", "b", "c"]
    paths = [tmp_path / f"s{i}.h5" for i in range(3)]
    for i, path in enumerate(paths):
        _write_shard(path, rows[10 * i : 10 * (i + 1)], i, [prompts[i]])
    merged, attrs = merge_files(list(reversed(paths)), expected_prompt_sha256=prompt_set_sha256(prompts))
    whole = Moments.of_rows(rows)
    np.testing.assert_allclose(merged[f"{LAYER}/to_q"].sum_outer, whole.sum_outer, rtol=1e-13)
    assert merged[f"{LAYER}/to_q"].count == 30
    assert attrs["provenance"]["prompts"] == {"count": 3, "sha256": prompt_set_sha256(prompts)}
    with pytest.raises(StatisticsFileError, match="not the configured prompt set"):
        merge_files(paths, expected_prompt_sha256=prompt_set_sha256(["a", "b", "x"]))
    with pytest.raises(StatisticsFileError, match="overlap or one is missing"):
        merge_files([paths[0], paths[2]])


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
        merge_files([tmp_path / "a.h5", tmp_path / "b.h5"])
    text = str(info.value)
    assert "a.h5:" in text and "b.h5:" in text


def test_merge_refuses_other_dimensions(tmp_path):
    rng = np.random.default_rng(5)
    _write_shard(tmp_path / "a.h5", rng.normal(size=(10, 6)), 0, ["a"])
    _write_shard(tmp_path / "b.h5", rng.normal(size=(10, 5)), 1, ["b"])
    with pytest.raises(StatisticsFileError, match="dimension 5"):
        merge_files([tmp_path / "a.h5", tmp_path / "b.h5"])


def test_wrong_kind_is_refused(tmp_path):
    _write_shard(tmp_path / "a.h5", np.ones((3, 2)), 0, ["a"])
    with pytest.raises(StatisticsFileError, match="expected a nullcov 'covariance' file"):
        read_moments(tmp_path / "a.h5", "covariance")


def _flip_data_bytes(path, key, dataset):
    """Flip bytes in the middle of ``dataset``'s first chunk, located on disk (the data region, not the header)."""
    with h5py.File(path, "r") as handle:
        info = handle[key][dataset].id.get_chunk_info(0)
    with open(path, "r+b") as handle:
        handle.seek(info.byte_offset + info.size // 2)
        original = handle.read(4)
        handle.seek(info.byte_offset + info.size // 2)
        handle.write(bytes(b ^ 0xFF for b in original))


@pytest.mark.parametrize("kind", ["features", "covariance", "projection"])
def test_flipped_bytes_in_the_data_region_stop_the_reader_naming_file_and_fix(tmp_path, kind):
    rows = np.random.default_rng(6).normal(size=(40, 24))
    folder = tmp_path / "shard_0001"
    folder.mkdir()
    path = folder / "alpha_00_0999.h5"
    if kind == "projection":
        space = null_space(Moments.of_rows(rows).second_moment(), 0.5)
        write_projections(path, {f"{LAYER}/to_q": space}, {"provenance": {"x": 1}})
        read, dataset = functools.partial(read_projections, path), "P"
    else:
        moments = {f"{LAYER}/to_q": Moments.of_rows(rows)}
        write_moments(path, kind, moments, {"provenance": _provenance(0, ["a"]), "step": {"index": 0}})
        read, dataset = functools.partial(read_moments, path, kind), "sum_outer"
    read()  # intact: reads
    _flip_data_bytes(path, f"{LAYER}/to_q", dataset)
    with pytest.raises(StatisticsFileError, match="checksum") as info:
        read()
    assert str(path) in str(info.value)
    assert f"snakemake --cores all --force {folder}" in str(info.value)  # a shard: its job's folder


def test_flipped_bytes_in_a_shard_stop_the_merge(tmp_path):
    rows = np.random.default_rng(7).normal(size=(20, 6))
    paths = [tmp_path / "shard_0000" / "s.h5", tmp_path / "shard_0001" / "s.h5"]
    for index, path in enumerate(paths):
        path.parent.mkdir()
        _write_shard(path, rows[10 * index : 10 * index + 10], index, [str(index)])
    _flip_data_bytes(paths[1], f"{LAYER}/to_out", "sum")
    with pytest.raises(StatisticsFileError, match="fails its checksum") as info:
        merge_files(paths)
    assert str(paths[1]) in str(info.value) and f"--force {paths[1].parent}" in str(info.value)


def test_files_without_checksums_are_refused(tmp_path):
    """A format-1 file (plain datasets, as nullcov wrote before checksums) is refused, not read."""
    rows = np.random.default_rng(8).normal(size=(10, 4))
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["nullcov_kind"] = "covariance"
        handle.attrs["provenance"] = '{"x": 1}'
        group = handle.create_group(f"{LAYER}/to_q")
        group["count"] = np.int64(10)
        group["shift"] = np.zeros(4)
        group["sum"] = rows.sum(axis=0)
        group["sum_outer"] = (rows.T @ rows)[np.triu_indices(4)]
    with pytest.raises(StatisticsFileError, match="carries no checksum") as info:
        read_moments(path, "covariance")
    assert "old.h5" in str(info.value) and f"snakemake --cores all --force {path}" in str(info.value)


def test_packed_storage_round_trips_and_moments_file_bytes_predicts_the_size(tmp_path):
    rng = np.random.default_rng(9)
    dims = {f"{LAYER}/to_q": 320, f"{LAYER}/to_out": 96, "b/to_q": 7}
    moments = {key: Moments.of_rows(rng.normal(size=(50, d)), shift=rng.normal(size=d)) for key, d in dims.items()}
    path = tmp_path / "m.h5"
    write_moments(path, "covariance", moments, {"provenance": {}})
    read, _ = read_moments(path, "covariance")
    for key, moment in moments.items():
        np.testing.assert_array_equal(read[key].shifted_outer, moment.shifted_outer)
        np.testing.assert_array_equal(read[key].shift, moment.shift)
        np.testing.assert_allclose(read[key].sum_outer, moment.sum_outer, rtol=1e-13)
    full_bytes = sum(8 * d * d for d in dims.values())
    size = path.stat().st_size
    assert size < 0.56 * full_bytes  # packed: about half the full float64 matrices
    assert abs(moments_file_bytes(dims) - size) <= 0.02 * size + 8192


def _shards(folder, count, dim=300, rows_per_shard=4, seed=10):
    """``count`` shard files of two keys, moments about each shard's own mean (as the capture does)."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(count * rows_per_shard, dim)) + 50.0
    paths = []
    for index in range(count):
        part = rows[index * rows_per_shard : (index + 1) * rows_per_shard]
        moments = {key: Moments.of_rows(part * scale, shift=(part * scale).mean(axis=0))
                   for key, scale in ((f"{LAYER}/to_q", 1.0), (f"{LAYER}/to_out", -2.0))}
        path = folder / f"shard_{index:04d}" / "s.h5"
        attrs = {"provenance": _provenance(index, [f"p{index}"]), "step": {"index": 0}}
        write_moments(path, "features", moments, attrs)
        paths.append(path)
    return paths, rows


def test_merge_memory_does_not_grow_with_shard_count(tmp_path):
    import tracemalloc

    step_bytes = 2 * 300 * 300 * 8  # one step's statistics, full float64 matrices
    peaks = {}
    for count in (3, 12):
        paths, _ = _shards(tmp_path / str(count), count)
        merge_files(paths[:2])  # warm caches (triangle indices) outside the measurement
        tracemalloc.start()
        merge_files(paths)
        peaks[count] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[12] <= 1.1 * peaks[3], peaks
    assert peaks[12] <= 3 * step_bytes, (peaks, step_bytes)


def test_grouped_merge_equals_the_direct_merge_and_repeats_bit_for_bit(tmp_path):
    from nullcov.statistics.merge import merge_files

    paths, rows = _shards(tmp_path, 12, dim=40)
    direct, direct_attrs = merge_files(paths)
    groups = []
    for index, start in enumerate(range(0, 12, 5)):
        partial, attrs = merge_files(paths[start : start + 5], "features", first_index=None)
        groups.append(tmp_path / f"group_{index:04d}" / "s.h5")
        write_moments(groups[-1], "partial", partial, attrs)
    grouped, grouped_attrs = merge_files(list(reversed(groups)), "partial",
                                         prompt_set_sha256([f"p{i}" for i in range(12)]))
    assert grouped_attrs["provenance"] == direct_attrs["provenance"]
    whole = Moments.of_rows(rows)
    for key in direct:
        scale = 1.0 if key.endswith("to_q") else 4.0
        for statistic in ("second_moment", "covariance"):
            a, b = direct[key].statistic(statistic), grouped[key].statistic(statistic)
            assert np.abs(a - b).max() <= 1e-12 * np.abs(a).max()
        np.testing.assert_allclose(direct[key].covariance(), whole.covariance() * scale, rtol=1e-9, atol=1e-9)
    again, _ = merge_files(list(reversed(paths)))
    for key in direct:
        assert np.array_equal(again[key].shifted_outer, direct[key].shifted_outer)
        assert np.array_equal(again[key].shift, direct[key].shift)


def test_a_changed_provenance_attribute_fails_its_checksum(tmp_path):
    path = tmp_path / "shard_0000" / "s.h5"
    _write_shard(path, np.ones((3, 2)), 0, ["a cat"])
    with h5py.File(path, "a") as handle:  # same length, one prompt character changed
        handle.attrs["provenance"] = handle.attrs["provenance"].replace("a cat", "a car")
    with pytest.raises(StatisticsFileError, match="attributes .* fail their checksum") as info:
        read_moments(path, "features")
    assert f"snakemake --cores all --force {path.parent}" in str(info.value)


def _arrays():
    rng = np.random.default_rng(9)
    return {"prompt_0001/alpha_00_0999/layer.attn2/maps": rng.random((5, 8, 8), dtype=np.float32),
            "prompt_0001/image": rng.random((16, 16, 3)).astype(np.float32),
            "top": np.float64(2.5)}


def test_named_arrays_round_trip_checksummed_with_their_attributes(tmp_path):
    arrays = _arrays()
    attrs = {"provenance": {"model": {"path": "m"}}, "prompts": [{"index": 1, "tokens": ["<bos>", "ü"]}]}
    write_arrays(tmp_path / "a.h5", "attention", arrays, attrs)
    read, read_attrs = read_arrays(tmp_path / "a.h5", "attention")
    assert sorted(read) == sorted(arrays) and read_attrs == attrs
    for name, array in arrays.items():
        assert read[name].dtype == array.dtype
        np.testing.assert_array_equal(read[name], np.asarray(array).reshape(read[name].shape))
    assert read["top"].shape == (1,)  # a scalar is stored as a 1-element array, checksummed too
    with h5py.File(tmp_path / "a.h5", "r") as handle:
        assert handle.attrs["nullcov_kind"] == "attention" and "nullcov_attrs_sha256" in handle.attrs
        assert all(handle[name].fletcher32 for name in arrays)
    with pytest.raises(StatisticsFileError, match="expected a nullcov 'projection' file, found kind 'attention'"):
        read_arrays(tmp_path / "a.h5", "projection")


def test_named_arrays_refuse_what_they_do_not_store(tmp_path):
    with pytest.raises(StatisticsFileError, match="without a provenance attribute"):
        write_arrays(tmp_path / "a.h5", "attention", _arrays(), {})
    with pytest.raises(StatisticsFileError, match="only non-empty float arrays"):
        write_arrays(tmp_path / "a.h5", "attention", {"g/d": np.arange(3)}, {"provenance": {}})
    assert list(tmp_path.iterdir()) == []


def test_flipped_bytes_in_named_arrays_stop_the_reader_naming_file_and_fix(tmp_path):
    path = tmp_path / "attention_maps.h5"
    write_arrays(path, "attention", _arrays(), {"provenance": {"x": 1}})
    _flip_data_bytes(path, "prompt_0001/alpha_00_0999/layer.attn2", "maps")
    with pytest.raises(StatisticsFileError, match="fails its checksum") as info:
        read_arrays(path, "attention")
    assert str(path) in str(info.value) and f"snakemake --cores all --force {path}" in str(info.value)


def test_named_arrays_with_a_changed_attribute_or_without_checksums_are_refused(tmp_path):
    path = tmp_path / "a.h5"
    write_arrays(path, "attention", _arrays(), {"provenance": {"prompt": "a cat"}})
    with h5py.File(path, "a") as handle:
        handle.attrs["provenance"] = handle.attrs["provenance"].replace("a cat", "a car")
    with pytest.raises(StatisticsFileError, match="attributes .* fail their checksum"):
        read_arrays(path, "attention")
    write_arrays(path, "attention", _arrays(), {"provenance": {"x": 1}})
    with h5py.File(path, "a") as handle:  # a plain dataset slipped in: no Fletcher32
        handle["prompt_0002/image"] = np.zeros((2, 2, 3), dtype=np.float32)
    with pytest.raises(StatisticsFileError, match="'prompt_0002/image' carries no checksum"):
        read_arrays(path, "attention")
