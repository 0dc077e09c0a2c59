"""Measurement files: one header for every benchmark, every `make bench-*` target writes under
docs/measurements/, and every renderer of docs/performance.md builds (also before its benchmark ran)."""

import datetime
import importlib
import json
import re
import shlex
import sys

import pytest

from nullcov import measurement

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))  # tools/bench_small_run.py imports its neighbours by name
import render_docs  # tools/render_docs.py


def _tool(name: str):
    """tools/<name>.py, imported by name (tools/ is on sys.path; not a package)."""
    return importlib.import_module(name)


def _bench_targets() -> dict[str, list[str]]:
    """``{target: [tools/x.py, arguments...]}`` of every Makefile target named bench* or proof*."""
    targets, current = {}, None
    for line in (REPO / "Makefile").read_text().splitlines():
        match = re.match(r"^([\w-]+):", line)
        if match:
            current = match.group(1)
            continue
        if line.startswith("\t") and current and current.startswith(("bench", "proof")):
            words = shlex.split(line.strip())
            tool = next((index for index, word in enumerate(words) if word.startswith("tools/")), None)
            if tool is not None:
                targets[current] = words[tool:]
    return targets


def test_header_has_the_required_keys():
    record = measurement.header("tools/some_tool.py", ["--flag", "a b"], torch_threads=3)
    assert tuple(record) == measurement.HEADER_KEYS
    assert record["command"] == "python tools/some_tool.py --flag 'a b'"
    date = datetime.datetime.strptime(record["date"], "%Y-%m-%dT%H:%M:%SZ")
    assert abs((datetime.datetime.utcnow() - date).total_seconds()) < 60
    assert set(record["machine"]) == set(measurement.MACHINE_KEYS)
    assert record["machine"]["torch_threads"] == 3 and record["machine"]["cpu_count"] >= 1
    assert record["machine"]["processor"] and record["machine"]["platform"]
    assert {"nullcov", "torch", "diffusers", "numpy", "h5py"} <= set(record["versions"])


def test_torch_threads_and_gpu_come_from_torch_when_imported():
    import torch

    machine = measurement.machine()
    assert machine["torch_threads"] == torch.get_num_threads()
    assert (machine["gpu"] is None) == (not torch.cuda.is_available())


def test_write_record_is_atomic_and_needs_the_header(tmp_path):
    path = tmp_path / "sub" / "bench-x.json"
    record = measurement.header("tools/x.py", []) | {"figure": 1.5}
    assert measurement.write_record(path, record) == path
    assert json.loads(path.read_text()) == record
    assert [p.name for p in path.parent.iterdir()] == ["bench-x.json"]  # no temporary file left
    with pytest.raises(ValueError, match="date"):
        measurement.write_record(path, {"command": "x", "machine": {}, "versions": {}, "figure": 2})
    assert json.loads(path.read_text()) == record  # the previous file stays


def test_every_bench_target_writes_under_docs_measurements():
    targets = _bench_targets()
    assert {"bench", "bench-gpu", "bench-scale", "bench-text-only", "bench-training", "bench-training-512",
            "bench-feature-memory", "bench-small-run", "bench-slurm-arrays", "bench-shapes", "proof", "proof-quick",
            "proof-capacity", "proof-ablation"} <= set(targets)
    outputs = {}
    for target, (script, *arguments) in targets.items():
        module = _tool(script.removeprefix("tools/").removesuffix(".py"))
        out = module.parse_args(arguments).out.resolve()
        assert out.parent == measurement.MEASUREMENTS, f"make {target} writes {out}"
        assert out.suffix == ".json"
        outputs[target] = out.name
        # the tool builds its record with the shared header
        assert "nullcov.measurement import" in (REPO / script).read_text(), script
    assert len(set(outputs.values())) == len(outputs), f"two targets write one file: {outputs}"
    assert outputs["bench"] == "bench-cpu.json" and outputs["bench-gpu"] == "bench-gpu.json"
    assert outputs["bench-training"] == "bench-training-128.json"
    assert outputs["bench-training-512"] == "bench-training-512.json"


def test_every_measurement_file_has_the_header():
    for path in sorted(measurement.MEASUREMENTS.glob("*.json")):
        record = json.loads(path.read_text())
        assert set(measurement.HEADER_KEYS) <= set(record), path.name
        assert {"platform", "torch_threads"} <= set(record["machine"]), path.name


def test_every_bench_target_has_a_render_block_in_performance_md():
    page = (REPO / "docs" / "performance.md").read_text()
    blocks = set(re.findall(r"<!-- render: ([\w-]+) -->", page))
    assert blocks == set(render_docs._BENCH_RENDERERS)
    for target, (script, *arguments) in _bench_targets().items():
        if target == "bench-shapes" or target.startswith("proof"):
            continue  # rendered in docs/shapes-model.md and docs/finetune-proof.md
        out = _tool(script.removeprefix("tools/").removesuffix(".py")).parse_args(arguments).out.name
        assert f"`make {target}`" in page, target
        assert f"docs/measurements/{out}" in "".join(render_docs.RENDERERS[name]() for name in blocks), target


def test_a_missing_measurement_renders_as_not_measured_yet(tmp_path, monkeypatch):
    monkeypatch.setattr(render_docs, "MEASUREMENTS", tmp_path)
    for name in render_docs._BENCH_RENDERERS:
        text = render_docs.RENDERERS[name]()
        assert text.startswith("Not measured yet: run `"), name
        assert not re.search(r"\d+\.\d", text), name  # no figure without a file


# Records shaped like the tools' output, for the benchmarks that cannot run in the test suite.
def _header() -> dict:
    return measurement.header("tools/x.py", [], torch_threads=2)


SYNTHETIC = {
    "bench-scale.json": lambda: _header() | {
        "projection": [{"d": 1280, "threshold": "inside the spectrum", "null_dim": 707, "full_eigh_seconds": 0.38,
                        "null_space_seconds": 0.35, "max_abs_projection_difference": 4.7e-10}],
        "store": {"layers": 16, "step_bytes_full_float64": 198e6, "step_file_bytes": 99.99e6,
                  "moments_file_bytes_estimate": 99.99e6, "auto_prompts_per_shard_at_50_steps": 656,
                  "scratch_1000x50_bytes": 10e9, "legacy_1000x50_bytes": 4.6e12, "ratio_legacy_over_scratch": 460.0},
        "merge": {"runs": [{"shards": n, "bytes_read": n * 1e8, "max_rss_bytes": 378e6, "rss_after_imports_bytes": 48e6,
                            "rss_above_imports_over_step_bytes": 1.67, "merge_seconds": 2.0, "merge_gb_per_s": 0.15,
                            "disk_sequential_read_gb_per_s": 0.6} for n in (3, 12)]},
        "dry_run": [{"prompts": 100000, "steps": 50, "prompts_per_shard": 100, "seconds": 5.9,
                     "max_rss_bytes": 4e8}]},
    "feature-memory.json": lambda: _header() | {
        "model": "SD-1.5", "weight_file_bytes": 3.9e9, "resolution": 64, "prompts": 4, "steps": 8,
        "collection": "noised", "device": "cpu",
        "runs": [{"name": "unchunked", "mem_mb": None, "max_rss_mb": 5572.0, "peak_rss_mb": 5767.0, "job_s": 120.6,
                  "snakemake_wall_s": 130.0, "memory_log": "memory: 1 chunk of 8 steps", "mem_mb_seen": 6665,
                  "folder": "/tmp/x"},
                 {"name": "mem_5600", "mem_mb": 5600, "max_rss_mb": 4509.0, "peak_rss_mb": 4627.0, "job_s": 116.5,
                  "snakemake_wall_s": 125.0, "memory_log": "memory: 4 chunks of 2 steps", "mem_mb_seen": 5600,
                  "folder": "/tmp/y", "equals_unchunked": True, "under_budget": True}]},
    "small-run.json": lambda: _header() | {
        "model": "SD-1.5 architecture", "resolution": 64, "prompts": 8, "steps": 8, "collection": "noised",
        "sampler": "DPM++ 2M Karras", "device": "cpu", "cores": 2,
        "runs": [{"legacy": {"process_wall_s": 120.0 + i, "scratch_bytes": 535e6},
                  "workflow": {"covariances_s": 60.0, "projections_s": 35.0, "total_s": 95.0, "scratch_bytes": 802e6},
                  "speedup_covariances": (120.0 + i) / 60, "speedup_with_projections": (120.0 + i) / 95}
                 for i in range(2)],
        "median_speedup_covariances": 2.0, "median_speedup_with_projections": 1.27},
    "slurm-arrays.json": lambda: _header() | {
        "scenario": "submit", "shards": 200, "jobs": 200, "steps": 3, "repeats": 1, "slurm": "slurm 22.05.8",
        "executor_plugin": "2.8.0",
        "results": [{"mode": mode, "jobs": 200, "queued_feature_jobs": 200, "first_queued_s": 2.0,
                     "last_queued_s": last, "submit_window_s": last - 2.0, "sbatch_calls": calls,
                     "slurm_states": ["PENDING"], "plugin_single_submissions": 0, "plugin_array_submissions": [],
                     "log": "/tmp/x"} for mode, last, calls in (("plain", 4.4, 200), ("array", 4.0, 2))]},
    "slurm-arrays-hold.json": lambda: _header() | {
        "scenario": "hold", "shards": 6, "jobs": 100, "steps": 3, "repeats": 1, "slurm": None, "executor_plugin": None,
        "results": [{"shards": 6, "jobs": 100, "finished": True, "returncode": 0, "elapsed_s": 80.0, "shards_done": 6,
                     "missing": [], "slurm_feature_jobs": [], "array_submissions": ["1,2,3,4,5,6"],
                     "single_submissions": [], "feature_tasks": [], "overlapping_tasks_with_the_same_gpu": [],
                     "shard_devices": {}, "log": "/tmp/x",
                     "identical_to_local_run": {"files": 24, "datasets": 1032, "differing": []}}]},
}


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_renderers_of_benchmarks_not_run_here(name, tmp_path, monkeypatch):
    monkeypatch.setattr(render_docs, "MEASUREMENTS", tmp_path)
    (tmp_path / name).write_text(json.dumps(SYNTHETIC[name]()))
    texts = [render() for render in render_docs._BENCH_RENDERERS.values()]
    mine = [text for text in texts if f"docs/measurements/{name}`" in text and not text.startswith("Not measured")]
    assert mine, name
    for text in mine:
        assert "| " in text or "Snakemake" in text
        assert "Measured " in text and "python tools/x.py" in text


def test_peak_rss_is_the_process_high_water_mark():
    import mmap
    from pathlib import Path

    import numpy as np

    from nullcov.measurement import peak_rss_bytes

    Path("/proc/self/clear_refs").write_text("5")  # Linux: the high-water mark restarts at today's RSS
    before = peak_rss_bytes()
    # 64 MiB of fresh pages (an anonymous mapping: not free memory the allocator already holds, which an
    # earlier test in this worker may have left resident), every page touched
    block = mmap.mmap(-1, 64 * 2**20)
    np.frombuffer(block, dtype=np.uint8)[::4096] = 1
    after = peak_rss_bytes()
    assert after >= before + 60 * 2**20, (before, after)
    block.close()
    assert peak_rss_bytes() >= after - 2**20  # a high-water mark (the kernel syncs its counters lazily: ~kB)


def test_human_bytes_uses_decimal_units_with_one_decimal():
    from nullcov.measurement import human_bytes

    assert [human_bytes(value) for value in (0, 999, 1000, 99_990_000, 4.6e12)] == [
        "0 B", "999 B", "1.0 kB", "100.0 MB", "4.6 TB"]


def test_bench_capacity_counts_null_dimensions_as_eigvalsh_does(tmp_path):
    """The capacity table's null dimensions: per linear kind, the eigenvalues under the threshold of every
    statistic (numpy's eigvalsh of the second moment built from the rows, not nullcov's projection code)."""
    import numpy as np

    from nullcov.models.family import TEXT_KEY
    from nullcov.statistics.moments import Moments
    from nullcov.statistics.store import write_moments

    bench_capacity = _tool("bench_capacity")
    generator = np.random.default_rng(0)
    rows = {TEXT_KEY: generator.normal(size=(40, 3)) @ generator.normal(size=(3, 8)),  # rank 3 of 8
            "down.attn2/to_q": generator.normal(size=(50, 6)) * [1, 1, 1, 1, 1e-3, 1e-3],
            "down.attn2/to_out": generator.normal(size=(50, 6)) * [1, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3]}
    write_moments(tmp_path / "text.h5", "covariance", {TEXT_KEY: Moments.of_rows(rows[TEXT_KEY])}, {"provenance": {}})
    write_moments(tmp_path / "alpha_00_0999.h5", "covariance",
                  {key: Moments.of_rows(value) for key, value in rows.items() if key != TEXT_KEY}, {"provenance": {}})
    found = bench_capacity.null_dimensions(tmp_path, "second_moment", 0.02)
    for key, kind in ((TEXT_KEY, "to_kv"), ("down.attn2/to_q", "to_q"), ("down.attn2/to_out", "to_out")):
        values = np.linalg.eigvalsh(rows[key].T @ rows[key] / len(rows[key]))
        expected = int((values < 0.02).sum())
        assert found[kind]["null_dim_mean"] == expected and found[kind]["widths"] == [rows[key].shape[1]]
        assert found[kind]["null_share_mean"] == expected / rows[key].shape[1]
    assert [found[kind]["null_dim_mean"] for kind in ("to_kv", "to_q", "to_out")] == [5, 2, 5]


def test_text_tokens_padding_moments_are_the_runs_difference():
    """make text-tokens: the padding rows' share and their energy in the real tokens' null space, from the two
    runs' moments alone, against the padding rows themselves (numpy, eigh of the real rows' second moment)."""
    import numpy as np

    from nullcov.statistics.moments import Moments

    bench_text_tokens = _tool("bench_text_tokens")
    generator = np.random.default_rng(3)
    real = generator.normal(size=(30, 6)) * [3, 2, 1, 0.01, 0.01, 0.01]  # three directions nearly unused
    padding = generator.normal(size=(90, 6))
    found = bench_text_tokens.padding_exposure(Moments.of_rows(np.vstack([real, padding])), Moments.of_rows(real),
                                               "second_moment", 0.02)
    values, vectors = np.linalg.eigh(real.T @ real / len(real))
    basis = vectors[:, values < 0.02]
    assert basis.shape[1] == 3
    assert found["padding_row_share"] == 0.75
    assert found["padding_energy_share"] == pytest.approx((padding**2).sum() / ((real**2).sum() + (padding**2).sum()))
    assert found["padding_energy_in_prompt_null_space"] == pytest.approx(((padding @ basis) ** 2).sum()
                                                                         / (padding**2).sum(), rel=1e-6)
