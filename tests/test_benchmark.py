"""The benchmark: SD-1.5 shapes, the real feature path, scratch accounting, a quick end-to-end run."""

import json
import sys

import pytest

from nullcov.collection import features
from nullcov.collection.capture import CrossAttentionCapture
from nullcov.models.model import cross_attention_modules

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import benchmark  # tools/benchmark.py: a developer tool, not in the package


def _tiny_case(**sizes) -> benchmark.Case:
    """A case of the tiny model on the CPU in float32 at its own resolution; ``sizes``: steps, prompts, batch_size."""
    return benchmark.Case(model="tiny", device="cpu", dtype="float32", resolution=None, **sizes)


def test_sd15_architecture_has_sd15_shapes(tiny_model_dir):
    """Built on the meta device (no memory, no weights): the shapes the issue asks for."""
    from nullcov.models.sd15 import SD15_NUM_CROSS_ATTENTION_LAYERS, build_sd15_pipeline

    pipe = build_sd15_pipeline(tiny_model_dir / "tokenizer", device="meta")
    layers = cross_attention_modules(pipe.unet)
    assert len(layers) == SD15_NUM_CROSS_ATTENTION_LAYERS == 16
    assert all(name.endswith("attn2") for name, _ in layers)
    widths = [module.to_q.in_features for _, module in layers]
    assert widths == [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]
    assert all(module.to_out[0].in_features == module.to_q.in_features for _, module in layers)
    assert {module.to_k.in_features for _, module in layers} == {768}
    assert list(pipe.unet.config.block_out_channels) == [320, 640, 1280, 1280]
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size == 64
    text = pipe.text_encoder.config
    shape = (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size)
    assert shape == (768, 12, 12, 3072)
    assert text.vocab_size == 49408 and len(pipe.tokenizer) <= text.vocab_size
    assert sum(p.numel() for p in pipe.unet.parameters()) == 859_520_964  # SD-1.5's UNet


def test_ours_is_the_feature_jobs_collect_shard(tiny_pipe, demo_prompts, monkeypatch):
    calls = []
    real = features.collect_shard

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "collect_shard", spy)
    case = _tiny_case(steps=2, prompts=3, batch_size=2)
    config = benchmark.case_config(case)
    schedule = benchmark.prepare_schedule(tiny_pipe, config)
    timings = {}
    release_steps = CrossAttentionCapture.release_steps
    steps, text = benchmark.run_ours(tiny_pipe, demo_prompts[:3], schedule, config, timings)[:2]
    assert len(calls) == 1 and calls[0][2] == 0 and calls[0][3] is schedule
    assert len(steps) == 2 and text.count == 3 * 77 and timings["results_s"] >= 0
    assert timings["steps"] == 2 and timings["device_steps"] == 2  # the recording capture's placement (CPU)
    assert CrossAttentionCapture.release_steps is release_steps  # recorded by a subclass: nothing patched globally


def test_case_config_is_the_schema_defaults_with_the_case(tmp_path):
    import yaml

    from nullcov.schema import schema_defaults

    case = _tiny_case(steps=2, prompts=3, batch_size=2)
    config = benchmark.case_config(case)
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    assert set(config) == set(schema["properties"])  # every key, no key of its own
    assert config["num_denoising_steps"] == 2 and config["batch_size"] == 2 and config["device"] == "cpu"
    assert config["seed"] == schema_defaults(schema)["seed"] == schema["properties"]["seed"]["default"]


def test_our_scratch_is_per_step_and_independent_of_prompt_count(tiny_pipe, demo_prompts, tmp_path):
    case = _tiny_case(steps=2, prompts=1, batch_size=2)
    config = benchmark.case_config(case)
    schedule = benchmark.prepare_schedule(tiny_pipe, config)
    sizes = []
    for count in (1, 4):
        steps, text = benchmark.run_ours(tiny_pipe, demo_prompts[:count], schedule, config)[:2]
        scratch = benchmark.write_our_scratch(steps, text, schedule, tmp_path / f"s{count}")
        assert scratch["files_written"] == 3 and not (tmp_path / f"s{count}").exists()
        sizes.append(scratch["step_file_bytes"])
    assert sizes[0] == sizes[1]  # O(d²) per step: the prompt count does not matter


def test_legacy_baseline_dumps_raw_inputs_and_streams_them_back(tiny_pipe, demo_prompts, tmp_path):
    case = _tiny_case(steps=3, prompts=2, batch_size=1)
    config = benchmark.case_config(case, batch_size=1)
    schedule = benchmark.prepare_schedule(tiny_pipe, config)
    subset = dict(schedule, steps=schedule["steps"][:2])
    legacy = benchmark.run_legacy(tiny_pipe, demo_prompts[:2], subset, config, tmp_path / "legacy")
    layers = len(cross_attention_modules(tiny_pipe.unet))
    assert legacy["prompt_timesteps"] == 4 and legacy["arrays_per_file"] == 4 * layers
    raw_floats = 0
    for _, module in cross_attention_modules(tiny_pipe.unet):
        raw_floats += 2 * 77 * module.to_k.in_features
    assert legacy["scratch_bytes_per_prompt_timestep"] > 0.2 * 4 * raw_floats  # compressed float32 dumps
    assert legacy["prompt_timesteps_per_s"] > 0 and not (tmp_path / "legacy").exists()


def test_default_outputs_are_the_measurement_file_and_side_files_in_benchmarks():
    from nullcov.measurement import MEASUREMENTS

    args = benchmark.parse_args(["--device", "cpu", "--profile"])
    assert args.out == MEASUREMENTS / "bench-cpu.json" and args.side_dir == REPO / "benchmarks"
    assert benchmark.parse_args(["--device", "cuda"]).out == MEASUREMENTS / "bench-gpu.json"
    assert benchmark.parse_args(["--quick"]).out == REPO / "benchmarks" / "bench-cpu-quick.json"  # not a measurement


def test_quick_benchmark_writes_table_and_json(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "tools"))
    import render_docs

    from nullcov.measurement import HEADER_KEYS

    out = tmp_path / "bench-cpu.json"
    assert benchmark.main(["--quick", "--models", "tiny", "--profile", "--out", str(out), "--side-dir",
                           str(tmp_path / "side")]) == 0
    report = json.loads(out.read_text())
    assert set(HEADER_KEYS) <= set(report) and report["machine"]["torch_threads"] == 1
    assert report["command"] == f"python tools/benchmark.py --quick --models tiny --profile --out {out} " \
                                f"--side-dir {tmp_path / 'side'}"
    assert report["machine"]["load_average_end"] is not None
    assert (tmp_path / "side" / "profile-cpu.txt").is_file() and report["profile"]["top"]
    (result,) = report["cases"]
    assert {"bare", "ours", "legacy"} <= set(result)
    assert result["ratio_ours_bare"] > 0 and result["ratio_ours_legacy"] > 0
    assert result["ours"]["scratch"]["step_file_bytes"] > 0 and result["ours"]["peak_rss_bytes"] > 0
    assert report["precision"]["float16_products_exact_in_float32"] is True
    assert max(report["precision"]["errors"]["float16/gram"]) < 2e-6
    table = (tmp_path / "side" / "bench-cpu.txt").read_text()
    assert "ours/bare" in table and "legacy" in table
    # docs/performance.md's blocks render from it (and from the same record taken as a GPU run)
    monkeypatch.setattr(render_docs, "MEASUREMENTS", tmp_path)
    rendered = {name: render_docs.RENDERERS[name]()
                for name in ("bench-cpu", "bench-cpu-profile", "bench-cpu-precision")}
    assert f"| {result['ratio_ours_bare']:.3f}" not in rendered["bench-cpu"]  # bold: **ratio**
    assert f"**{result['ratio_ours_bare']:.3f}**" in rendered["bench-cpu"]
    assert "Measured " in rendered["bench-cpu"] and "Same run as above" in rendered["bench-cpu-profile"]
    assert "`gram`" in rendered["bench-cpu-precision"]
    gpu = report | {"device": "cuda", "best_batch": 8,
                    "memory_check": {"batch_size": 8, "steps": 50, "peak_gpu_bytes": 9e9, "pass": True},
                    "projection": benchmark.projection_1000x50(result)}
    (tmp_path / "bench-gpu.json").write_text(json.dumps(gpu))
    assert "peak GPU memory" in render_docs.RENDERERS["bench-gpu"]()
    assert "**pass**" in render_docs.RENDERERS["bench-gpu-checks"]()


def test_projection_counts_per_shard_costs():
    best = {"ours": {"steady_prompt_timesteps_per_s": 100.0, "results_s": 1.0,
                     "scratch": {"write_s": 4.0, "shard_bytes": 10e9}}}
    projection = benchmark.projection_1000x50(best)
    assert projection["compute_s"] == pytest.approx(500.0)
    assert projection["prompts_per_shard_1000"]["seconds"] == pytest.approx(505.0)
    assert projection["prompts_per_shard_16"]["seconds"] == pytest.approx(500.0 + 63 * 5.0)
    assert projection["prompts_per_shard_16"]["scratch_bytes"] == pytest.approx(63 * 10e9)
