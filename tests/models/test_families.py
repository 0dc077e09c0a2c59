"""Every supported model family (SD-2.x, SDXL, LCM) against an independent brute force.

The reference calls each family's real diffusers pipeline once per prompt with that prompt's own
generator (seed + i), stores the raw inputs of every hooked linear (tests/collection/test_capture.py's
``RawInputs``) and computes the moments as XᵀX of the conditional rows.
"""

import json

import numpy as np
import pytest
import torch

from nullcov.collection.capture import HookNotFiredError
from nullcov.collection.features import collect_shard, collect_text_shard
from nullcov.models.family import TEXT_KEY, model_family
from nullcov.models.model import ModelError, load_pipeline
from nullcov.models.sampling import configure_scheduler
from nullcov.models.schedule import build_schedule
from nullcov.statistics.store import read_moments

from brute_force import RawInputs, assert_close_to_float64
from conftest import base_config, planned_jobs, snakemake, write_config

# family -> (the sampler its users run, number of attn2 layers of the tiny model, text state width)
FAMILIES = {
    "sd2": ("DPM++ 2M Karras", 7, 48),
    "sdxl": ("Euler a", 8, 64),
    "lcm": ("LCM", 7, 32),
}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    from nullcov.models.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("families")
    return {family: build_tiny_model(root / f"tiny-{family}", family) for family in FAMILIES}


def _configured(model_dir, strategy, num_denoising_steps=2, **overrides):
    config = base_config(sampler_strategy=strategy, num_denoising_steps=num_denoising_steps, **overrides)
    pipe = load_pipeline(model_dir, "float32", "cpu")
    schedule = build_schedule(dict(pipe.scheduler.config), strategy, config["num_denoising_steps"])
    configure_scheduler(pipe, schedule)
    return pipe, schedule, config


def _brute_force(pipe, prompts, first_index, schedule, config):
    """Per prompt: one real pipeline call with its own generator; raw inputs of every linear."""
    raw = RawInputs(pipe.unet)
    try:
        for offset, prompt in enumerate(prompts):
            pipe(prompt=[prompt], guidance_scale=config["guidance_scale"], output_type="latent",
                 generator=[torch.Generator("cpu").manual_seed(config["seed"] + first_index + offset)],
                 **schedule["set_timesteps"])
    finally:
        raw.close()
    return raw.calls


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_equals_brute_force_through_its_own_pipeline(family, family_dirs, demo_prompts):
    strategy, num_layers, text_dim = FAMILIES[family]
    pipe, schedule, config = _configured(family_dirs[family], strategy)
    prompts = demo_prompts[:3]
    steps, text, layers, _ = collect_shard(pipe, prompts, 0, schedule, config)
    calls = _brute_force(pipe, prompts, 0, schedule, config)
    num_steps = len(schedule["steps"])
    assert len(layers) == num_layers and len(calls) == num_steps * len(prompts)
    cfg = model_family(family_dirs[family]).guidance == "cfg"
    for call in calls:  # the CFG batch is [uncond, cond]; LCM's guidance embedding means no CFG batch
        assert call["states"].shape[0] == (2 if cfg else 1)
    for index, step in enumerate(schedule["steps"]):
        step_calls = calls[index::num_steps]
        assert [c["timestep"] for c in step_calls] == [step["timestep"]] * len(prompts)
        assert set(steps[index]) == {f"{layer}/{linear}" for layer in layers for linear in ("to_q", "to_out")}
        for key, moments in steps[index].items():
            rows = torch.cat([c[key][-1:].reshape(-1, c[key].shape[-1]) for c in step_calls]).numpy()
            assert moments.count == rows.shape[0]
            assert_close_to_float64(moments.sum_outer, rows.T @ rows)
            assert_close_to_float64(moments.sum, rows.sum(0))
    firsts = calls[::num_steps]
    for call in firsts:  # every attn2 to_k sees the (for SDXL concatenated) text states
        for layer in layers:
            np.testing.assert_array_equal(call[f"{layer}/to_k"].numpy(), call["states"].numpy())
    rows = torch.cat([c["states"][-1:].reshape(-1, c["states"].shape[-1]) for c in firsts]).numpy()
    assert rows.shape[1] == text_dim == model_family(family_dirs[family]).text_dim
    assert text.count == 3 * 77
    assert_close_to_float64(text.sum_outer, rows.T @ rows)


@pytest.mark.parametrize(("family", "text_tokens", "unconditional"),
                         [("sd2", "eos", False), ("sdxl", "all", False), ("lcm", "prompt", False),
                          ("sd2", "prompt", True), ("sdxl", "prompt", True)])
def test_text_only_path_equals_full_run(family, text_tokens, unconditional, family_dirs, demo_prompts):
    """Text encoders alone (no UNet, VAE or scheduler loaded) give the full run's text.h5 moments;
    with the unconditional branch too (SDXL: its negative embedding is zeros, counted all the same)."""
    strategy = FAMILIES[family][0]
    pipe, schedule, config = _configured(family_dirs[family], strategy, 1, text_tokens=text_tokens, batch_size=2,
                                         unconditional_branch=unconditional)
    prompts = demo_prompts[:3]
    _, full, _, _ = collect_shard(pipe, prompts, 0, schedule, config)
    text_pipe = load_pipeline(family_dirs[family], "float32", "cpu", text_only=True)
    assert text_pipe.unet is None and text_pipe.vae is None and text_pipe.scheduler is None
    only = collect_text_shard(text_pipe, prompts, 0, config)
    ids = pipe.tokenizer(prompts).input_ids  # BOS .. EOS, unpadded
    expected = {"all": 3 * 77, "prompt": sum(len(row) for row in ids), "eos": 3}[text_tokens]
    expected += 3 * len(pipe.tokenizer("").input_ids) if unconditional else 0  # "": BOS, EOS per prompt
    assert only.count == full.count == expected
    np.testing.assert_allclose(only.sum_outer, full.sum_outer, rtol=1e-9, atol=0)
    np.testing.assert_allclose(only.sum, full.sum, rtol=1e-9, atol=1e-12)


def test_sd2_schedule_uses_the_models_v_prediction(family_dirs):
    pipe, schedule, _ = _configured(family_dirs["sd2"], "DPM++ 2M Karras")
    assert schedule["scheduler"]["config"]["prediction_type"] == "v_prediction"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.use_linear_projection
    assert type(pipe.unet.down_blocks[0].attentions[0].proj_in).__name__ == "Linear"


def test_sdxl_layout(family_dirs):
    family = model_family(family_dirs["sdxl"])
    assert (family.pipeline, family.tokenizers, family.added_conditioning) == (
        "StableDiffusionXLPipeline", ("tokenizer", "tokenizer_2"), "text_time")
    pipe = load_pipeline(family_dirs["sdxl"], "float32", "cpu")
    names = [name for name, module in pipe.unet.named_modules() if getattr(module, "is_cross_attention", False)]
    assert not any(name.startswith("down_blocks.0.") for name in names)
    assert pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size == family.text_dim


def test_lcm_guidance_scale_feeds_the_embedding(family_dirs, demo_prompts):
    """No CFG batch; the guidance scale still changes what the UNet sees (through timestep_cond)."""
    assert model_family(family_dirs["lcm"]).guidance == "embedding"
    pipe, schedule, config = _configured(family_dirs["lcm"], "LCM", 1)
    results = [collect_shard(pipe, demo_prompts[:1], 0, schedule, config | {"guidance_scale": scale})[0]
               for scale in (2.0, 8.0)]
    key = next(iter(results[0][-1]))
    assert results[0][0][key].count == results[1][0][key].count
    assert not np.allclose(results[0][-1][key].sum_outer, results[1][-1][key].sum_outer)


@pytest.mark.parametrize("family", ["sdxl", "lcm"])
def test_noised_collection_is_refused_where_the_unet_needs_more_than_text(family, family_dirs, demo_prompts):
    pipe, schedule, config = _configured(family_dirs[family], FAMILIES[family][0], 1, collection="noised")
    with pytest.raises(ValueError, match="use collection: trajectory"):
        collect_shard(pipe, demo_prompts[:1], 0, schedule, config)


class _SkipsToV:
    """An attention processor that never calls ``to_v`` (uses to_k's output twice)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key = attn.to_q(hidden_states), attn.to_k(context)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, key))
        probs = attn.get_attention_scores(query, key, attention_mask)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def test_a_linear_that_never_runs_fails_the_job_naming_it(family_dirs, demo_prompts):
    pipe, schedule, config = _configured(family_dirs["sdxl"], "Euler a", 1)
    layer = "up_blocks.0.attentions.1.transformer_blocks.1.attn2"
    pipe.unet.get_submodule(layer).set_processor(_SkipsToV())
    with pytest.raises(HookNotFiredError, match=rf"^{layer}/to_v did not run on UNet call 0"):
        collect_shard(pipe, demo_prompts[:1], 0, schedule, config)


def test_fused_projections_are_refused_until_unfused(family_dirs, demo_prompts):
    pipe, schedule, config = _configured(family_dirs["sd2"], "DPM++ 2M Karras", 1)
    pipe.fuse_qkv_projections()
    with pytest.raises(ModelError, match="run fused projections.*call pipe.unfuse_qkv_projections"):
        collect_shard(pipe, demo_prompts[:1], 0, schedule, config)
    pipe.unfuse_qkv_projections()  # back to the default processors: every linear runs again
    assert collect_shard(pipe, demo_prompts[:1], 0, schedule, config)[1].count == 77


#: stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the keys that shape the layout).
SDXL_BASE_UNET = {
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "in_channels": 4,
    "layers_per_block": 2, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}


def test_report_figures_cope_with_sdxl_base_70_layers(tmp_path):
    from diffusers import UNet2DConditionModel
    from matplotlib.image import imread

    from nullcov.models.model import cross_attention_modules
    from nullcov.report.figures_layers import short_layer
    from nullcov.report.figures_projection import null_dim_figure, spectra_grid

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SDXL_BASE_UNET)
    modules = cross_attention_modules(unet)
    layers = [name for name, _ in modules]
    assert len(layers) == 70 and not any(name.startswith("down_blocks.0.") for name in layers)
    assert {module.to_k.in_features for _, module in modules} == {2048}
    assert len({short_layer(name) for name in layers}) == 70  # every row label distinct
    rng = np.random.default_rng(0)
    steps = [{"index": i, "name": f"alpha_{i:02d}_{t:04d}", "timestep": float(t)} for i, t in enumerate((999, 1))]
    spectra = []
    for _ in steps:
        spectrum = {}
        for name, module in modules:
            for linear, d in (("to_q", module.to_q.in_features), ("to_out", module.to_out[0].in_features)):
                values = np.sort(rng.exponential(size=d))
                spectrum[f"{name}/{linear}"] = {"eigenvalues": values, "threshold": 0.02, "d": d,
                                                "null_dim": int((values < 0.02).sum())}
        spectra.append(spectrum)
    # (the 70-panel spectra figure takes ~40 s to draw here: its grid is checked, the heatmap is drawn)
    assert spectra_grid(70) == (8, 9) and spectra_grid(7) == (2, 4)
    null_dim_figure(tmp_path / "null_dim.png", steps, spectra, None)
    height, width = imread(tmp_path / "null_dim.png").shape[:2]
    assert height <= 5000 and width <= 4000, (height, width)


def test_models_without_unet_cross_attention_are_refused_naming_what_is_supported(tmp_path):
    from nullcov.models.model import resolve_model_dir

    model = tmp_path / "pixart"
    (model / "transformer").mkdir(parents=True)
    (model / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}))
    with pytest.raises(ModelError, match="no UNet cross-attention.*supports UNet cross-attention models: SD-1.x"):
        resolve_model_dir(str(model))
    (model / "model_index.json").write_text(
        json.dumps({"_class_name": "KandinskyPipeline", "unet": ["diffusers", "x"]}))
    with pytest.raises(ModelError, match="pipeline 'KandinskyPipeline'.*is not supported"):
        resolve_model_dir(str(model))
    with pytest.raises(ModelError, match="not a built-in model; built-in models: "
                                         "builtin:shapes, builtin:tiny, builtin:tiny-sd2"):
        resolve_model_dir("builtin:tiny-pixart")


def test_workflow_runs_sdxl_end_to_end(tmp_path, demo_prompts):
    """Built-in model, schedule, feature job and merges (projections and report are family-agnostic)."""
    write_config(tmp_path, demo_prompts[:2], model="builtin:tiny-sdxl", sampler_strategy="Euler a",
                 num_denoising_steps=1)
    snakemake(tmp_path, "--until", "covariance", "covariance_text")
    schedule = json.loads((tmp_path / "results" / "schedule.json").read_text())
    assert len(schedule["layers"]) == 8
    text = read_moments(tmp_path / "results" / "covariance" / "text.h5", "covariance")[0][TEXT_KEY]
    assert text.count == 2 * 77 and text.sum_outer.shape == (64, 64)
    for step in schedule["steps"]:
        moments = read_moments(tmp_path / "results" / "covariance" / f"{step['name']}.h5", "covariance")[0]
        assert set(moments) == {f"{layer}/{linear}" for layer in schedule["layers"] for linear in ("to_q", "to_out")}


def test_text_only_feature_job_writes_text_h5_only(tmp_path, family_dirs, demo_prompts, caplog):
    """k only: the job loads no UNet, VAE or scheduler and writes text.h5 alone (eos: one row per prompt)."""
    import logging

    from nullcov.collection.features import run_feature_job
    from nullcov.models.model import cross_attention_layer_names
    from nullcov.models.schedule import build_schedule, write_schedule

    config = base_config(sampler_strategy="LCM", collect_features={"q": False, "k": True, "v": False, "out": False},
                         text_tokens="eos")
    model_dir = family_dirs["lcm"]
    scheduler_config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    write_schedule(tmp_path / "schedule.json", build_schedule(scheduler_config, "LCM", 4),
                   cross_attention_layer_names(model_dir), "builtin:tiny-lcm")
    schedule = json.loads((tmp_path / "schedule.json").read_text())
    with caplog.at_level(logging.INFO, logger="nullcov.collection.features"):
        run_feature_job(model_spec="builtin:tiny-lcm", model_dir=str(model_dir), prompts=demo_prompts[:3],
                        first_index=0, shard="0000", schedule=schedule, config=config, step_paths={},
                        text_path=str(tmp_path / "text.h5"))
    assert "text-only: 3 prompts through LatentConsistencyModelPipeline's text encoder(s)" in caplog.text
    moments, attrs = read_moments(tmp_path / "text.h5", "features")
    assert moments[TEXT_KEY].count == 3 and attrs["provenance"]["run"]["text_only"] is True


def test_text_only_workflow_plans_no_step_jobs(tmp_path, demo_prompts):
    write_config(tmp_path, demo_prompts[:6], model="builtin:tiny-sdxl",
                 collect_features={"q": False, "k": True, "v": True, "out": False})
    jobs = planned_jobs(tmp_path)
    assert sorted(output for rule, output in jobs if rule == "features") == [
        "results/features/shard_0000", "results/features/shard_0001"]
    assert sorted(output for rule, output in jobs if rule.startswith(("covariance", "projection"))) == [
        "results/covariance/text.h5", "results/projections/text.h5"]
    assert ("tiny_model", "resources/models/tiny-sdxl") in jobs


def test_unconditional_branch_is_refused_for_a_guidance_embedding_unet(family_dirs, demo_prompts):
    """LCM UNets take guidance as an embedding: no unconditional half to collect. The workflow
    refuses the config at parse time; collecting anyway fails on the first UNet call."""
    from nullcov.collection.capture import ScheduleMismatchError
    from nullcov.workflow.config import check_unconditional_branch
    from nullcov.workflow.plan import unet_config

    config = base_config(unconditional_branch=True, sampler_strategy="LCM")
    with pytest.raises(ValueError, match=r"unconditional_branch: true.*guidance as an embedding \(time_cond_proj_dim"):
        check_unconditional_branch(config, unet_config(str(family_dirs["lcm"]), family_dirs["lcm"]))
    check_unconditional_branch(config, unet_config(str(family_dirs["sd2"]), family_dirs["sd2"]))  # CFG: accepted
    pipe, schedule, config = _configured(family_dirs["lcm"], "LCM", 1, unconditional_branch=True)
    with pytest.raises(ScheduleMismatchError, match="no unconditional half"):
        collect_shard(pipe, demo_prompts[:1], 0, schedule, config)
