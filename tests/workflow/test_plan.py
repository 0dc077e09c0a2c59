"""Model dims from configs, job memory, step chunks: a chunked feature job equals an unchunked one."""

import numpy as np
import pytest

from nullcov.collection import memory
from nullcov.collection.features import collect_shard
from nullcov.models.family import TEXT_KEY
from nullcov.models.model import BUILTIN_TINY, cross_attention_modules
from nullcov.models.sampling import configure_scheduler
from nullcov.models.schedule import build_schedule
from nullcov.statistics.store import moments_file_bytes
from nullcov.workflow import plan

from conftest import base_config

MIB = 2**20


def _dims_of(unet) -> dict:
    """Independent of nullcov.workflow.plan: read the built modules' in_features."""
    return {
        name: {"to_q": module.to_q.in_features, "to_out": module.to_out[0].in_features, "text": module.to_k.in_features}
        for name, module in cross_attention_modules(unet)
    }


def test_tiny_dims_from_config_match_the_built_model(tiny_pipe, tiny_model_dir, tmp_path):
    dims = plan.model_dims(plan.unet_config(BUILTIN_TINY, tiny_model_dir), cache_dir=tmp_path)
    assert dims["layers"] == _dims_of(tiny_pipe.unet)
    assert dims["unet_parameters"] == sum(p.numel() for p in tiny_pipe.unet.parameters())
    # the folder's own config.json (every default written out: another cache entry) gives the same
    saved = plan.unet_config("folder", tiny_model_dir)
    assert plan.model_dims(saved, cache_dir=tmp_path)["layers"] == dims["layers"]
    assert len(list(tmp_path.glob("dims-*.json"))) == 2
    # a cache hit reads the file (an edited entry shows through), never rebuilds
    for path in tmp_path.glob("dims-*.json"):
        path.write_text(path.read_text().replace('"unet_parameters"', '"edited": 1, "unet_parameters"'))
    assert plan.model_dims(saved, cache_dir=tmp_path)["edited"] == 1


def test_sd15_step_bytes(tiny_model_dir):
    from nullcov.models.sd15 import SD15_UNET_CONFIG, build_sd15_pipeline

    dims = plan.model_dims(SD15_UNET_CONFIG)
    meta = build_sd15_pipeline(tiny_model_dir / "tokenizer", device="meta")
    assert dims["layers"] == _dims_of(meta.unet)
    layers = list(dims["layers"])
    everything = {"q": True, "k": True, "v": True, "out": True}
    per_step = plan.step_dims(dims, layers, everything)
    widths = [320] * 5 + [640] * 5 + [1280] * 6  # SD-1.5: 16 attn2 layers, to_q and to_out of the same width
    assert sorted(per_step.values()) == sorted(widths * 2)
    assert memory.statistics_bytes(per_step) == 8 * sum(2 * (d * d + d) for d in widths)
    assert plan.text_dims(dims, layers, everything) == {"encoder_hidden_states": 768}
    assert plan.text_dims(dims, layers, everything | {"k": False, "v": False}) == {}


def test_steps_per_chunk_fit_the_budget():
    step, weights = 198 * MIB, 3000 * MIB
    for mem_mb in (6000, 8000, 16000, 40000):
        fit = memory.steps_per_chunk(mem_mb * MIB, step, weights, 1000)
        assert (memory.feature_job_bytes(step, fit, weights) <= mem_mb * MIB
                < memory.feature_job_bytes(step, fit + 1, weights))
    assert memory.steps_per_chunk(10**6 * MIB, step, weights, 50) == 50
    need = memory.feature_job_bytes(step, 1, weights)
    with pytest.raises(memory.MemoryBudgetError, match=r"mem_mb=4000 .*features:mem_mb=") as info:
        memory.steps_per_chunk(4000 * MIB, step, weights, 50)
    assert f"mem_mb={-(-need // MIB)}" in str(info.value)
    # the rule asks the unchunked need, capped, never less than one step's need
    assert plan.feature_job_mem_mb(step, 50, weights, 10**6) == -(-memory.feature_job_bytes(step, 50, weights) // MIB)
    assert plan.feature_job_mem_mb(step, 1000, weights, 32000) == 32000
    assert plan.feature_job_mem_mb(step, 1000, weights, 10) == -(-need // MIB)


@pytest.mark.parametrize("steps, per_chunk", [(5, 2), (50, 7), (1000, 334), (3, 3), (1, 1)])
def test_step_chunks_cover_the_steps_once(steps, per_chunk):
    chunks = memory.step_chunks(steps, per_chunk)
    assert [i for chunk in chunks for i in chunk] == list(range(steps))
    assert len(chunks) == -(-steps // per_chunk) and max(map(len, chunks)) - min(map(len, chunks)) <= 1
    assert max(map(len, chunks)) <= per_chunk


def _collect_with(pipe, prompts, config, steps_fitting=None):
    """Collect with a host budget that holds exactly ``steps_fitting`` steps (None: no budget)."""
    schedule = build_schedule(dict(pipe.scheduler.config), config["sampler_strategy"], config["num_denoising_steps"])
    configure_scheduler(pipe, schedule)
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    delivered = []
    try:
        if steps_fitting is None:
            steps, text, _, _ = collect_shard(pipe, prompts, 0, schedule, config)
        else:
            dims = {f"{name}/{linear}": width for name, layer in _dims_of(pipe.unet).items()
                    for linear, width in layer.items() if linear != "text"}
            step_bytes = sum(8 * (d * d + d) for d in dims.values())
            mem_mb = 4096
            weights = mem_mb * MIB - memory.JOB_OVERHEAD_BYTES - (steps_fitting + memory.EXTRA_STEPS) * step_bytes
            _, text, _, _ = collect_shard(pipe, prompts, 0, schedule, config, mem_mb=mem_mb, weights=weights,
                                          on_step=lambda index, moments: delivered.append((index, moments)))
            assert [index for index, _ in delivered] == list(range(len(schedule["steps"])))
            steps = [moments for _, moments in delivered]
    finally:
        handle.remove()
    return steps, text, len(calls)


@pytest.mark.parametrize("collection, strategy", [("trajectory", "Euler a"), ("noised", "DPM++ 2M Karras")])
def test_chunked_collection_equals_unchunked(tiny_pipe, demo_prompts, collection, strategy):
    """Five steps in chunks of 2, 1, 2 (the trajectory replayed with its stochastic sampler noise)."""
    config = base_config(collection=collection, sampler_strategy=strategy, num_denoising_steps=5, batch_size=2)
    prompts = demo_prompts[:3]  # two prompt batches
    whole_steps, whole_text, whole_calls = _collect_with(tiny_pipe, prompts, config)
    steps, text, calls = _collect_with(tiny_pipe, prompts, config, steps_fitting=2)
    assert whole_calls == 2 * 5
    # chunks [0, 2), [2, 3), [3, 5): the trajectory replays from step 0 and stops after each chunk
    assert calls == (2 * (2 + 3 + 5) if collection == "trajectory" else 2 * 5)
    assert len(steps) == len(whole_steps) == 5
    for chunked, unchunked in zip(steps, whole_steps, strict=True):
        assert chunked.keys() == unchunked.keys()
        for key in unchunked:
            assert chunked[key].count == unchunked[key].count
            np.testing.assert_array_equal(chunked[key].sum, unchunked[key].sum)
            np.testing.assert_array_equal(chunked[key].sum_outer, unchunked[key].sum_outer)
    assert text.count == whole_text.count
    np.testing.assert_array_equal(text.sum_outer, whole_text.sum_outer)


def test_run_plan_counts_bytes_memory_and_gpu_hours(tiny_pipe, tiny_model_dir):
    dims = plan.model_dims(plan.unet_config(BUILTIN_TINY, tiny_model_dir))
    layers = list(dims["layers"])
    widths = [w for layer in _dims_of(tiny_pipe.unet).values() for w in (layer["to_q"], layer["to_out"])]
    text_width = next(iter(_dims_of(tiny_pipe.unet).values()))["text"]
    # on-disk sizes: the store's estimate (tests/statistics/test_store_merge.py checks it against written files)
    step_file = moments_file_bytes(plan.step_dims(dims, layers, {"q": True, "out": True}))
    text_file = moments_file_bytes({TEXT_KEY: text_width})
    common = {"model": "m", "dims": dims, "layers": layers,
              "collect_features": {"q": True, "k": True, "v": True, "out": True}, "num_steps": 4,
              "shards": [4, 4, 2], "validation_prompts": 2, "weights": 0, "throughput": 2.0,
              "jobs_per_rule": {"features (GPU)": 3}, "eigh_seconds_at_3072": 27.0}
    whole = plan.run_plan(collection="trajectory", feature_mem_mb=10**5, **common)
    assert whole["bytes"]["step file"] == step_file and whole["bytes"]["text file"] == text_file
    assert whole["bytes"]["shard scratch"] == 3 * (4 * step_file + text_file)
    assert whole["bytes"]["merged moments"] == 4 * step_file + text_file
    assert whole["bytes"]["projections"] == (sum(4 * (4 * d * d + 8 * d) for d in widths)
                                             + 4 * text_width**2 + 8 * text_width)
    assert whole["gpu_hours"] == pytest.approx((10 + 2) * 4 / 2.0 / 3600)
    # one eigh per statistic: 27 s at d = 3072, d^3 (4 steps of every to_q/to_out, the text statistic once)
    assert whole["projection_cpu_hours"] == pytest.approx(
        (4 * sum(27.0 * (d / 3072) ** 3 for d in widths) + 27.0 * (text_width / 3072) ** 3) / 3600)
    assert whole["feature_chunks"]["chunks"] == 1
    # a budget that holds 2 of 4 steps: two chunks; the trajectory replays 2 + 4 calls, noised calls 4
    step_bytes = sum(8 * (d * d + d) for d in widths)
    weights = 4096 * MIB - memory.JOB_OVERHEAD_BYTES - (2 + memory.EXTRA_STEPS) * step_bytes
    tight = common | {"weights": weights, "feature_mem_mb": 4096}
    chunked = plan.run_plan(collection="trajectory", **tight)
    assert chunked["feature_chunks"]["steps_per_chunk"] == 2 and chunked["feature_chunks"]["chunks"] == 2
    assert chunked["feature_chunks"]["unet_calls_per_batch"] == 2 + 4
    assert chunked["gpu_hours"] == pytest.approx(12 * 6 / 2.0 / 3600)
    assert plan.run_plan(collection="noised", **tight)["feature_chunks"]["unet_calls_per_batch"] == 4
    text = plan.format_plan(whole)
    assert "features (GPU)" in text and "0.01 GPU-hours" in text and "shard scratch" in text
    assert "projection CPU time: 0.00 CPU-hours" in text and "27 s at d = 3072" in text
    # the free space of results/: no warning with enough, a warning naming both byte counts without
    needed = plan.disk_needed(whole)
    assert needed == sum(whole["bytes"][name] for name in ("shard scratch", "partial sums (merge groups)",
                                                             "merged moments", "projections"))
    assert "WARNING" not in plan.format_plan(whole, needed, "results/")
    warned = plan.format_plan(whole, needed - 1, "results/").splitlines()[-1]
    assert warned.startswith("WARNING: results/ has") and f"({needed - 1} bytes)" in warned
    assert f"({needed} bytes)" in warned and warned.endswith("#no-space-left-on-device)")


# -- a transformer's bytes per stream choice ---------------------------------------------------------------
def _walked_widths(transformer) -> dict[str, int]:
    """Independent of nullcov.models.mmdit_dims: every hooked input's width, read off the built modules."""
    widths = {"context_embedder": transformer.context_embedder.in_features,
              "time_text_embed.text_embedder.linear_1": transformer.time_text_embed.text_embedder.linear_1.in_features}
    for index, block in enumerate(transformer.transformer_blocks):
        name = f"transformer_blocks.{index}"
        linears = {"attn.to_q": block.attn.to_q, "attn.add_q_proj": block.attn.add_q_proj,
                   "attn.to_out": block.attn.to_out[0], "attn.to_add_out": block.attn.to_add_out}
        if getattr(block, "attn2", None) is not None:
            linears |= {"attn2.to_q": block.attn2.to_q, "attn2.to_out": block.attn2.to_out[0]}
        widths |= {f"{name}/{linear}": module.in_features for linear, module in linears.items() if module is not None}
    for index, block in enumerate(getattr(transformer, "single_transformer_blocks", None) or ()):
        widths |= {f"single_transformer_blocks.{index}/attn.to_q": block.attn.to_q.in_features,
                   f"single_transformer_blocks.{index}/proj_out": block.proj_out.in_features}
    return widths


def _meta_transformer(config):
    import diffusers
    import torch

    with torch.device("meta"):
        return getattr(diffusers, config["_class_name"]).from_config(config)


def _real_configs() -> dict:
    """The published transformer configs of docs/model-families.md's tables (tools/mmdit_tables.py)."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "tools"))
    import mmdit_tables

    return {title: config for title, (_, config) in mmdit_tables.CONFIGS.items()}


@pytest.mark.parametrize("spec", ["builtin:tiny-sd3", "builtin:tiny-sd35", "builtin:tiny-flux",
                                  "builtin:tiny-flux-schnell", *_real_configs()])
def test_stream_widths_from_the_config_equal_the_built_transformer(spec):
    """The arithmetic of nullcov.models.mmdit_dims gives every key and width a meta-device transformer built
    from the same config has (and no other), for the tiny built-ins and the real models' published configs
    the docs' tables are computed from; each stream's keys are its kind's."""
    from nullcov.models.mmdit_dims import stream_widths

    config = plan.transformer_config(spec, None)[1] if spec.startswith("builtin:") else _real_configs()[spec]
    widths = stream_widths(config)
    flat = {key: width for keys in widths.values() for key, width in keys.items()}
    assert flat == _walked_widths(_meta_transformer(config))
    assert sum(len(keys) for keys in widths.values()) == len(flat)
    assert all(key.endswith("/attn2.to_q") for key in widths.get("image_self", {}))
    assert ("image_self" in widths) == bool(config.get("dual_attention_layers"))


@pytest.fixture(scope="module")
def mmdit_models(tmp_path_factory):
    from nullcov.models.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("mmdit-plan")
    return {family: build_tiny_model(root / family, family) for family in ("sd35", "flux")}


@pytest.mark.parametrize("family", ["sd35", "flux"])
def test_stream_bytes_match_collected_statistics(mmdit_models, family, tmp_path):
    """Every stream collected on a tiny model (all of them, text path included): the plan's keys and widths are
    the collected statistics' own, its bytes in memory are their float64 matrices, and a file of each
    stream's statistics is as large as the plan says (the store's estimate, within its tolerance)."""
    from nullcov.models.family import STREAMS, model_family
    from nullcov.models.mmdit_dims import stream_widths
    from nullcov.models.model import load_pipeline
    from nullcov.models.sampling import flow_of
    from nullcov.statistics.store import write_moments

    model_dir = mmdit_models[family]
    pipe = load_pipeline(model_dir, "float32", "cpu")
    config = base_config(sampler_strategy="Euler", num_denoising_steps=1, resolution=32, guidance_scale=3.0,
                         streams=list(STREAMS), true_cfg_scale=1.0, batch_size=2)
    schedule = build_schedule(dict(pipe.scheduler.config), "Euler", 1, flow_of(pipe, 32))
    configure_scheduler(pipe, schedule)
    steps, text, layers, _ = collect_shard(pipe, ["a red cat", "blue"], 0, schedule, config,
                                           family=model_family(model_dir))
    collected = steps[0] | text
    widths = stream_widths(dict(pipe.transformer.config))
    rows = plan.stream_bytes(widths, layers, num_steps=7, eigh_seconds_at_3072=8.0)
    assert {key for keys in widths.values() for key in keys} == set(collected)
    for stream, keys in widths.items():
        dims = {key: collected[key].dim for key in keys}
        assert dims == keys
        row = rows[stream]
        assert row["keys"] == len(keys) and row["widths"] == sorted(set(dims.values()))
        assert row["memory_bytes"] == sum(8 * (d * d + d) for d in dims.values())
        assert row["files"] == (1 if stream in ("context", "pooled") else 7)
        assert row["total_bytes"] == row["files"] * row["file_bytes"]
        assert row["projection_cpu_hours"] == pytest.approx(
            row["files"] * sum(8.0 * (d / 3072) ** 3 for d in dims.values()) / 3600)
        path = tmp_path / f"{stream}.h5"
        write_moments(path, "covariance", {key: collected[key] for key in keys}, {"provenance": {}})
        size = path.stat().st_size
        assert abs(row["file_bytes"] + moments_file_bytes({}) - size) <= 0.02 * size + 8192, (stream, size)
    # a selection of blocks keeps only their keys; the text path stays
    first = plan.stream_bytes(widths, layers[:1], num_steps=7, eigh_seconds_at_3072=8.0)
    assert first["image"]["keys"] == 1 and first["context"] == rows["context"]


def test_plan_gives_bytes_per_stream_choice():
    """run_plan's streams block: each stream's bytes, and those of the selection, the defaults and every
    stream add up from the rows; format_plan prints a line per stream, the selection marked."""
    from nullcov.models.family import DEFAULT_STREAMS
    from nullcov.models.mmdit_dims import stream_widths

    spec = "builtin:tiny-flux"
    dims = plan.transformer_dims(spec, None)
    widths = stream_widths(plan.transformer_config(spec, None)[1])
    layers = list(dims["layers"])
    common = {"model": spec, "dims": dims, "layers": layers, "num_steps": 3, "collection": "trajectory",
              "shards": [2], "validation_prompts": 0, "weights": 0, "feature_mem_mb": 10**5, "throughput": 1.0,
              "jobs_per_rule": {}, "stream_widths": widths, "eigh_seconds_at_3072": 8.0}
    for selected in (["text"], list(DEFAULT_STREAMS), ["single_out", "context"]):
        result = plan.run_plan(collect_features=selected, **common)
        rows, totals = result["streams"]["rows"], result["streams"]["totals"]
        assert list(rows) == list(widths) and result["streams"]["selected"] == [s for s in widths if s in selected]
        step_streams = [s for s in selected if s not in ("context", "pooled")]
        assert totals["selected"]["step_file_bytes"] == sum(rows[s]["file_bytes"] for s in step_streams)
        assert totals["selected"]["total_bytes"] == sum(rows[s]["total_bytes"] for s in selected)
        assert totals["every stream"]["total_bytes"] == sum(row["total_bytes"] for row in rows.values())
        assert totals["default"]["step_memory_bytes"] == sum(rows[s]["memory_bytes"] for s in DEFAULT_STREAMS)
        assert totals["selected"]["projection_cpu_hours"] == pytest.approx(
            sum(rows[s]["projection_cpu_hours"] for s in selected))
        # the plan's own per-step matrices are the selected streams' keys
        assert result["step_keys"] == sum(rows[s]["keys"] for s in step_streams)
        text = plan.format_plan(result)
        for stream in widths:
            mark = "*" if stream in selected else " "
            assert any(line.startswith(f"  {mark} {stream} ") for line in text.splitlines()), (stream, text)
        assert "  every stream: " in text


def test_snakemake_plan_prints_the_streams(tmp_path, demo_prompts):
    from conftest import snakemake, write_config

    write_config(tmp_path, demo_prompts[:2], model="builtin:tiny-flux", sampler_strategy="Euler",
                 num_denoising_steps=2, resolution=32, streams=["text", "context"])
    printed = snakemake(tmp_path, "plan").stdout
    assert "  * text " in printed and "  * context " in printed and "    single_out " in printed, printed
