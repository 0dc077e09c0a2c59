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
              "jobs_per_rule": {"features (GPU)": 3}}
    whole = plan.run_plan(collection="trajectory", feature_mem_mb=10**5, **common)
    assert whole["bytes"]["step file"] == step_file and whole["bytes"]["text file"] == text_file
    assert whole["bytes"]["shard scratch"] == 3 * (4 * step_file + text_file)
    assert whole["bytes"]["merged moments"] == 4 * step_file + text_file
    assert whole["bytes"]["projections"] == (sum(4 * (4 * d * d + 8 * d) for d in widths)
                                             + 4 * text_width**2 + 8 * text_width)
    assert whole["gpu_hours"] == pytest.approx((10 + 2) * 4 / 2.0 / 3600)
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
    # the free space of results/: no warning with enough, a warning naming both byte counts without
    needed = plan.disk_needed(whole)
    assert needed == sum(whole["bytes"][name] for name in ("shard scratch", "partial sums (merge groups)",
                                                             "merged moments", "projections"))
    assert "WARNING" not in plan.format_plan(whole, needed, "results/")
    warned = plan.format_plan(whole, needed - 1, "results/").splitlines()[-1]
    assert warned.startswith("WARNING: results/ has") and f"({needed - 1} bytes)" in warned
    assert f"({needed} bytes)" in warned and warned.endswith("#no-space-left-on-device)")
