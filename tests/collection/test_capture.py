"""Feature collection on the tiny model against a brute-force capture of the raw inputs."""

import numpy as np
import pytest
import torch

from nullcov.collection.capture import NonFiniteActivationError, ScheduleMismatchError, prompt_of_row, text_row_mask
from nullcov.collection.features import collect_shard
from nullcov.models.model import cross_attention_modules
from nullcov.models.sampling import configure_scheduler
from nullcov.models.schedule import build_schedule

from brute_force import RawInputs, assert_close_to_float64
from conftest import base_config


def _schedule(pipe, config):
    schedule = build_schedule(dict(pipe.scheduler.config), config["sampler_strategy"], config["num_denoising_steps"])
    configure_scheduler(pipe, schedule)
    return schedule


@pytest.mark.parametrize("unconditional", [False, True], ids=["conditional", "both-branches"])
def test_collection_equals_brute_force_xtx(tiny_pipe, demo_prompts, unconditional):
    config = base_config(batch_size=2, unconditional_branch=unconditional)
    # the rows of each CFG call [uncond, cond] that the statistics hold: the second half, or all
    kept = (lambda x: x) if unconditional else (lambda x: x[x.shape[0] // 2 :])
    schedule = _schedule(tiny_pipe, config)
    prompts = demo_prompts[:5]
    raw = RawInputs(tiny_pipe.unet)
    try:
        steps, text, layers = collect_shard(tiny_pipe, prompts, 0, schedule, config)[:3]
    finally:
        raw.close()
    num_steps = len(schedule["steps"])
    batches = [prompts[i : i + 2] for i in range(0, 5, 2)]
    assert len(raw.calls) == num_steps * len(batches)
    assert len(layers) == 7
    for step_index, step in enumerate(schedule["steps"]):
        calls = [raw.calls[b * num_steps + step_index] for b in range(len(batches))]
        assert all(call["timestep"] == step["timestep"] for call in calls)
        for key, moments in steps[step_index].items():
            rows = torch.cat([kept(c[key]).reshape(-1, c[key].shape[-1]) for c in calls]).numpy()
            assert moments.count == rows.shape[0] == (1 + unconditional) * 5 * calls[0][key].shape[1]
            assert_close_to_float64(moments.sum_outer, rows.T @ rows)
            assert_close_to_float64(moments.sum, rows.sum(0))
        assert set(steps[step_index]) == {f"{layer}/{linear}" for layer in layers for linear in ("to_q", "to_out")}
    # to_k receives the UNet's encoder_hidden_states; text.h5 holds the kept rows once per prompt.
    first_calls = [raw.calls[b * num_steps] for b in range(len(batches))]
    for call in first_calls:
        key = f"{layers[0]}/to_k"
        np.testing.assert_array_equal(call[key].numpy(), call["states"].numpy())
    rows = torch.cat([kept(c["states"]).reshape(-1, c["states"].shape[-1]) for c in first_calls])
    rows = rows.numpy()
    assert text.count == (1 + unconditional) * 5 * 77
    assert_close_to_float64(text.sum_outer, rows.T @ rows)


def _collect(pipe, prompts, first_index, accumulate="auto", timestep_check="auto", **overrides):
    config = base_config(**overrides)
    schedule = _schedule(pipe, config)
    steps, text, _, _ = collect_shard(pipe, prompts, first_index, schedule, config, accumulate=accumulate,
                                      timestep_check=timestep_check)
    return steps, text


def _assert_same(a, b, rtol=1e-5):
    (steps_a, text_a), (steps_b, text_b) = a, b
    for step_a, step_b in zip(steps_a, steps_b, strict=True):
        for key in step_a:
            assert step_a[key].count == step_b[key].count
            scale = np.abs(step_a[key].sum_outer).max()
            np.testing.assert_allclose(step_a[key].sum_outer, step_b[key].sum_outer, rtol=rtol, atol=rtol * scale)
    text_scale = np.abs(text_a.sum_outer).max()
    np.testing.assert_allclose(text_a.sum_outer, text_b.sum_outer, rtol=rtol, atol=rtol * text_scale)


@pytest.mark.parametrize("strategy", ["DPM++ 2M Karras", "Euler a", None])
def test_results_do_not_depend_on_batch_size_or_sharding(tiny_pipe, demo_prompts, strategy):
    prompts = demo_prompts[:5]
    whole = _collect(tiny_pipe, prompts, 0, batch_size=5, sampler_strategy=strategy)
    one_by_one = _collect(tiny_pipe, prompts, 0, batch_size=1, sampler_strategy=strategy)
    _assert_same(whole, one_by_one)
    first = _collect(tiny_pipe, prompts[:2], 0, batch_size=2, sampler_strategy=strategy)
    rest = _collect(tiny_pipe, prompts[2:], 2, batch_size=2, sampler_strategy=strategy)
    summed = (
        [{k: a[k] + b[k] for k in a} for a, b in zip(first[0], rest[0], strict=True)],
        first[1] + rest[1],
    )
    _assert_same(whole, summed)


@pytest.mark.parametrize(
    "overrides",
    [
        {"collection": "noised"},
        {"sampler_strategy": "DPM++ 3M SDE Karras"},  # draws fresh noise at every step
        {"sampler_strategy": "LCM"},  # re-noises after every step
        {"sampler_strategy": "PNDM"},  # N + 1 UNet calls
    ],
    ids=["noised", "dpm3m-sde-karras", "lcm", "pndm"],
)
def test_noised_and_stochastic_samplers_do_not_depend_on_batch_size(tiny_pipe, demo_prompts, overrides):
    prompts = demo_prompts[:2]
    together = _collect(tiny_pipe, prompts, 0, batch_size=2, num_denoising_steps=2, **overrides)
    one_by_one = _collect(tiny_pipe, prompts, 0, batch_size=1, num_denoising_steps=2, **overrides)
    _assert_same(together, one_by_one)


def test_seeds_are_per_prompt(tiny_pipe, demo_prompts):
    """The same prompt at another index (seed + i) gives other statistics."""
    a = _collect(tiny_pipe, demo_prompts[:1], 0)
    b = _collect(tiny_pipe, demo_prompts[:1], 1)
    key = next(iter(a[0][-1]))
    assert not np.allclose(a[0][-1][key].sum_outer, b[0][-1][key].sum_outer)


def test_prompt_text_tokens_keep_bos_to_eos(tiny_pipe, demo_prompts):
    prompts = demo_prompts[:3]
    _, text_all = _collect(tiny_pipe, prompts, 0)
    _, text_prompt = _collect(tiny_pipe, prompts, 0, text_tokens="prompt")
    ids = tiny_pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    lengths = [row.index(tiny_pipe.tokenizer.eos_token_id) + 1 for row in ids]
    assert text_prompt.count == sum(lengths) < text_all.count
    mask = text_row_mask(torch.tensor(ids), tiny_pipe.tokenizer.eos_token_id)
    assert mask.sum(1).tolist() == lengths and mask[:, 0].all()
    # with the unconditional branch: also the negative prompt "" (BOS, EOS) once per prompt
    _, text_both = _collect(tiny_pipe, prompts, 0, text_tokens="prompt", unconditional_branch=True)
    assert text_both.count == sum(lengths) + 2 * len(prompts)


def test_unconditional_branch_needs_a_cfg_batch(tiny_pipe, demo_prompts):
    """Asked for the unconditional half of calls that have none: an error naming the key, not a
    silently conditional-only result (the workflow refuses this config before any job)."""
    with pytest.raises(ScheduleMismatchError, match="unconditional_branch: true, but the UNet call at step"):
        _collect(tiny_pipe, demo_prompts[:2], 0, guidance_scale=1.0, unconditional_branch=True)


def test_noised_collection_is_one_conditional_call_per_step(tiny_pipe, demo_prompts):
    config = base_config(collection="noised", batch_size=3)
    schedule = _schedule(tiny_pipe, config)
    raw = RawInputs(tiny_pipe.unet)
    try:
        steps, _, layers, _ = collect_shard(tiny_pipe, demo_prompts[:3], 0, schedule, config)
    finally:
        raw.close()
    assert [c["timestep"] for c in raw.calls] == [s["timestep"] for s in schedule["steps"]]
    key = f"{layers[-1]}/to_out"
    for call, step in zip(raw.calls, steps, strict=True):
        assert call[key].shape[0] == 3  # no CFG half
        rows = call[key].reshape(-1, call[key].shape[-1]).numpy()
        assert_close_to_float64(step[key].sum_outer, rows.T @ rows)


def test_guidance_off_collects_the_plain_batch(tiny_pipe, demo_prompts):
    """CFG off: the UNet sees B rows per call (not 2B), and every row of them is collected."""
    config = base_config(guidance_scale=1.0, batch_size=2)
    schedule = _schedule(tiny_pipe, config)
    raw = RawInputs(tiny_pipe.unet)
    try:
        steps, text = collect_shard(tiny_pipe, demo_prompts[:2], 0, schedule, config)[:2]
    finally:
        raw.close()
    assert len(raw.calls) == len(schedule["steps"])
    assert all(call["states"].shape[0] == 2 for call in raw.calls)  # with CFG on: 4 (uncond + cond)
    for step_index, call in enumerate(raw.calls):
        for key, moments in steps[step_index].items():
            rows = call[key].reshape(-1, call[key].shape[-1]).numpy()  # the whole batch, no half dropped
            assert moments.count == rows.shape[0]
            assert_close_to_float64(moments.sum_outer, rows.T @ rows)
    states = raw.calls[0]["states"].reshape(-1, raw.calls[0]["states"].shape[-1]).numpy()
    assert text.count == 2 * 77
    assert_close_to_float64(text.sum_outer, states.T @ states)


def test_layer_and_feature_selection(tiny_pipe, demo_prompts):
    names = [name for name, _ in cross_attention_modules(tiny_pipe.unet)]
    config = base_config(cross_attention_layers=[0, names[3]],
                         collect_features={"q": True, "k": False, "v": False, "out": False})
    schedule = _schedule(tiny_pipe, config)
    steps, text, layers, _ = collect_shard(tiny_pipe, demo_prompts[:1], 0, schedule, config)
    assert layers == [names[0], names[3]] and text is None
    assert set(steps[0]) == {f"{names[0]}/to_q", f"{names[3]}/to_q"}


def test_timestep_mismatch_is_an_error(tiny_pipe, demo_prompts):
    config = base_config()
    schedule = _schedule(tiny_pipe, config)
    schedule["steps"][2]["timestep"] += 5
    with pytest.raises(ScheduleMismatchError, match="UNet call 2 ran at timestep"):
        collect_shard(tiny_pipe, demo_prompts[:1], 0, schedule, config)


@pytest.mark.parametrize(("unconditional", "row", "branch"), [(False, 3, ""), (True, 3, ""),
                                                                (True, 1, ", unconditional branch")])
def test_non_finite_activation_names_prompt_layer_and_step(tiny_pipe, demo_prompts, unconditional, row, branch):
    config = base_config(batch_size=2, unconditional_branch=unconditional)
    schedule = _schedule(tiny_pipe, config)
    name, module = cross_attention_modules(tiny_pipe.unet)[2]
    calls = {"n": 0}

    def inject(mod, args):
        calls["n"] += 1
        if calls["n"] == 3:  # third step of the first batch; the second prompt's row [uncond 0, 1, cond 0, 1]
            x = args[0].clone()
            x[row, 0, 0] = float("inf")
            return (x,)

    handle = module.to_q.register_forward_pre_hook(inject)
    try:
        with pytest.raises(NonFiniteActivationError) as info:
            collect_shard(tiny_pipe, demo_prompts[:4], 10, schedule, config)
    finally:
        handle.remove()
    error = info.value
    assert error.prompt_index == 11 and error.key == f"{name}/to_q"
    assert f"({demo_prompts[1]!r}{branch}) in" in str(error)
    assert error.step_name == schedule["steps"][2]["name"]


def test_rows_map_to_prompts_and_branches():
    """Error messages name the prompt and branch of a collected row: [uncond, cond] or plain."""
    assert [prompt_of_row(row, 2, 4) for row in range(4)] == [
        (0, ", unconditional branch"), (1, ", unconditional branch"), (0, ""), (1, "")]
    assert [prompt_of_row(row, 2, 2) for row in range(2)] == [(0, ""), (1, "")]


# -- performance paths (issue 4): host accumulators, the product, the non-finite check ---------------
GIB = 2**30
SD15_OUTER_FLOATS = 2 * (5 * 320**2 + 5 * 640**2 + 6 * 1280**2)  # 16 attn2 layers, to_q and to_out


def test_host_accumulation_equals_device_accumulation(tiny_pipe, demo_prompts, monkeypatch):
    from nullcov.collection import accumulators

    device = _collect(tiny_pipe, demo_prompts[:3], 0, batch_size=2)
    flushed = []
    real_flush = accumulators._HostSteps.flush
    monkeypatch.setattr(accumulators._HostSteps, "flush",
                        lambda self, step: (flushed.append(step), real_flush(self, step)))
    host = _collect(tiny_pipe, demo_prompts[:3], 0, batch_size=2, accumulate="host")
    assert flushed == [0, 1, 2, 3] * 2  # every UNet call of both batches went through the staging path
    _assert_same(device, host, rtol=1e-12)


def test_accumulators_split_between_device_and_host(tiny_pipe, demo_prompts, monkeypatch):
    from nullcov.collection import capture

    whole = _collect(tiny_pipe, demo_prompts[:3], 0, batch_size=2)
    monkeypatch.setattr(capture.CrossAttentionCapture, "_plan", lambda self, accumulate: 2)  # 2 of 4 steps fit
    split = _collect(tiny_pipe, demo_prompts[:3], 0, batch_size=2)
    _assert_same(whole, split, rtol=1e-12)


def test_accumulator_placement_plan():
    from nullcov.collection.accumulators import plan_device_steps

    step = 8 * SD15_OUTER_FLOATS  # SD-1.5: 198 MB of float64 per step
    staging = 2 * 4 * SD15_OUTER_FLOATS
    # a 24 GB card with the fp16 model loaded: 50 steps (9.9 GB) stay on it
    assert plan_device_steps(step, 50, free_bytes=21 * GIB, total_bytes=24 * GIB, staging_bytes=staging) == 50
    # 1000 steps (198 GB) cannot: as many as fit beside the reserve and the staging buffers, the rest on the host
    fitted = plan_device_steps(step, 1000, free_bytes=21 * GIB, total_bytes=24 * GIB, staging_bytes=staging)
    assert 0 < fitted < 1000
    assert fitted * step + staging <= 21 * GIB - 0.2 * 24 * GIB < (fitted + 1) * step + staging
    # an 80 GB card: (78 - 16 reserved) GiB less staging, in 198 MB steps
    assert plan_device_steps(step, 1000, free_bytes=78 * GIB, total_bytes=80 * GIB, staging_bytes=staging) == 334
    assert plan_device_steps(step, 50, free_bytes=3 * GIB, total_bytes=24 * GIB, staging_bytes=staging) == 0
    assert plan_device_steps(step, 0, free_bytes=21 * GIB, total_bytes=24 * GIB) == 0


def test_sd15_step_accumulator_size(tiny_model_dir):
    from nullcov.collection.capture import CrossAttentionCapture
    from nullcov.models.sd15 import build_sd15_pipeline

    pipe = build_sd15_pipeline(tiny_model_dir / "tokenizer", device="meta")
    layers = cross_attention_modules(pipe.unet)
    with CrossAttentionCapture(pipe.unet, layers, {"to_q", "to_k", "to_v", "to_out"}, [999.0], ["s"], "all") as capture:
        assert capture._outer_size == SD15_OUTER_FLOATS and 8 * capture._outer_size == 198_246_400


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_product_of_half_inputs_is_float32_exact_products(dtype):
    from nullcov.collection.accumulators import gram

    generator = torch.Generator().manual_seed(0)
    a = (torch.randn(1 << 16, generator=generator) * 100).to(dtype)
    b = (torch.randn(1 << 16, generator=generator)).to(dtype)
    assert torch.equal((a.float() * b.float()).double(), a.double() * b.double())  # exact in float32
    x = (torch.randn(2048, 320, generator=generator) * 3 + 1).to(dtype)
    reference = x.double().T @ x.double()
    product = gram(x)
    assert product.dtype == torch.float32
    error = ((product.double() - reference).abs().max() / reference.abs().max()).item()
    assert error < 2e-6
    half_output = ((x.T @ x).double() - reference).abs().max().item() / reference.abs().max().item()
    assert half_output > 100 * error  # what a plain x.T @ x in the input dtype would lose
    out = torch.empty(320, 320)
    gram(x, out=out)
    assert torch.equal(out, product)


@pytest.mark.parametrize("values", [(float("nan"),), (float("inf"), float("-inf"))])
def test_non_finite_check_catches_nan_and_cancelling_infinities(tiny_pipe, demo_prompts, values):
    config = base_config(batch_size=2)
    schedule = _schedule(tiny_pipe, config)
    name, module = cross_attention_modules(tiny_pipe.unet)[4]
    calls = {"n": 0}

    def inject(mod, args):
        calls["n"] += 1
        if calls["n"] == 4 + 3:  # second batch (4 steps each), third step; its first prompt's conditional row
            x = args[0].clone()
            for offset, value in enumerate(values):
                x[2, offset, 0] = value
            return (x,)

    handle = module.to_out[0].register_forward_pre_hook(inject)
    try:
        with pytest.raises(NonFiniteActivationError) as info:
            collect_shard(tiny_pipe, demo_prompts[:4], 20, schedule, config)
    finally:
        handle.remove()
    assert info.value.prompt_index == 22 and info.value.key == f"{name}/to_out"
    assert info.value.step_name == schedule["steps"][2]["name"]


def test_timesteps_checked_once_per_batch_are_still_checked(tiny_pipe, demo_prompts):
    """On a GPU the timesteps are compared in end_batch (no sync per UNet call): same error."""
    config = base_config()
    schedule = _schedule(tiny_pipe, config)
    assert len(_collect(tiny_pipe, demo_prompts[:1], 0, timestep_check="batch")[0]) == len(schedule["steps"])
    schedule["steps"][2]["timestep"] += 5
    with pytest.raises(ScheduleMismatchError, match="UNet call 2 ran at timestep"):
        collect_shard(tiny_pipe, demo_prompts[:1], 0, schedule, config, timestep_check="batch")
