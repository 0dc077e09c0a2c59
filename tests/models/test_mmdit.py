"""SD3/SD3.5 and FLUX (MMDiT transformers): the tiny built-ins, a folder saved from diffusers' own tiny
test configs, the flow-matching schedules, and the collected streams against an independent brute force."""

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from nullcov.collection.features import collect_shard
from nullcov.models.family import DEFAULT_STREAMS, model_family
from nullcov.models.model import ModelError, check_unfused, load_pipeline, resolve_model_dir
from nullcov.models.sampling import configure_scheduler, flow_of
from nullcov.models.schedule import NAME_PATTERN, ScheduleError, build_schedule, calculate_shift
from nullcov.models.tiny_model import TRANSFORMER_FAMILIES, build_tiny_model

from brute_force import LinearInputs, assert_close_to_float64
from conftest import base_config

PROMPTS = ["a photo of a cat", "a red dog on the grass", "blue"]
RESOLUTION = 32


@pytest.fixture(scope="module")
def mmdit_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmdit")
    return {family: build_tiny_model(root / family, family) for family in TRANSFORMER_FAMILIES}


def _config(**overrides):
    return base_config(**{"sampler_strategy": "Euler", "num_denoising_steps": 2, "resolution": RESOLUTION,
                          "guidance_scale": 3.0, "streams": list(DEFAULT_STREAMS), "true_cfg_scale": 1.0} | overrides)


def _prepared(model_dir, config):
    pipe = load_pipeline(model_dir, "float32", "cpu")
    schedule = build_schedule(dict(pipe.scheduler.config), "Euler", config["num_denoising_steps"],
                              flow_of(pipe, config["resolution"]))
    configure_scheduler(pipe, schedule)
    return pipe, schedule


class RawTransformerInputs(LinearInputs):
    """Independent reference: every raw input of the blocks' linears and every transformer call's
    timestep and batch, found by walking the blocks (not through nullcov's vocabulary)."""

    def __init__(self, transformer):
        self.calls = []
        self.handles = [transformer.register_forward_pre_hook(self._call, with_kwargs=True)]
        for index, block in enumerate(transformer.transformer_blocks):
            targets = {"image": block.attn.to_q, "text": block.attn.add_q_proj, "image_out": block.attn.to_out[0]}
            if block.attn.to_add_out is not None:
                targets["text_out"] = block.attn.to_add_out
            if getattr(block, "attn2", None) is not None:  # SD3.5's image-only self-attention
                targets |= {"image_self": block.attn2.to_q, "image_self_out": block.attn2.to_out[0]}
            for stream, module in targets.items():
                self.handles.append(module.register_forward_pre_hook(self._linear(f"joint{index}/{stream}")))
        for index, block in enumerate(getattr(transformer, "single_transformer_blocks", None) or ()):
            for stream, module in (("single", block.attn.to_q), ("single_out", block.proj_out)):
                self.handles.append(module.register_forward_pre_hook(self._linear(f"single{index}/{stream}")))

    def _call(self, module, args, kwargs):
        self.calls.append({"timestep": kwargs["timestep"].clone(), "rows": kwargs["hidden_states"].shape[0]})


def _nullcov_key(key):
    """The brute force's ``joint0/image`` as nullcov names it (``transformer_blocks.0/attn.to_q``)."""
    block, stream = key.split("/")
    kind, index = re.fullmatch(r"(joint|single)(\d+)", block).groups()
    linear = {"image": "attn.to_q", "text": "attn.add_q_proj", "image_out": "attn.to_out",
              "text_out": "attn.to_add_out", "single": "attn.to_q", "single_out": "proj_out",
              "image_self": "attn2.to_q", "image_self_out": "attn2.to_out"}[stream]
    return f"{'transformer_blocks' if kind == 'joint' else 'single_transformer_blocks'}.{index}/{linear}"


def _real_tokens(pipe, text: str) -> int:
    """How many tokens of ``text`` the text sequence holds before its padding, counted by tokenizing
    without padding: SD3 CLIP (BOS..EOS) and T5 (absent: none), FLUX T5."""
    if type(pipe).__name__ == "FluxPipeline":
        return len(pipe.tokenizer_2(text).input_ids)
    return len(pipe.tokenizer(text).input_ids), (len(pipe.tokenizer_3(text).input_ids) if pipe.tokenizer_3 else 0)


def _real_mask(pipe, texts, length: int) -> torch.Tensor:
    """[B, length] real-token mask of the text sequence (SD3: 77 CLIP positions, then T5's)."""
    mask = torch.zeros(len(texts), length, dtype=torch.bool)
    for row, text in enumerate(texts):
        counts = _real_tokens(pipe, text)
        if isinstance(counts, int):
            mask[row, :counts] = True
        else:
            mask[row, : counts[0]] = True
            mask[row, 77 : 77 + counts[1]] = True
    return mask


CASES = {
    # family, config overrides, calls per step, rows per call (per prompt), branches collected
    "flux-dev-guidance-embedding": ("flux", {}, 1, 1, ("cond",)),
    "flux-schnell-true-cfg-both-real-tokens": ("flux-schnell", {"true_cfg_scale": 2.0, "unconditional_branch": True,
                                                                "text_tokens": "prompt"}, 2, 1, ("cond", "uncond")),
    "sd3-t5-cfg-conditional-real-tokens": ("sd3", {"text_tokens": "prompt"}, 1, 2, ("cond",)),
    "sd35-dual-attention-no-t5-cfg-both": ("sd35", {"unconditional_branch": True, "streams": [
        *DEFAULT_STREAMS, "image_self", "image_self_out"]}, 1, 2, ("uncond", "cond")),
    "sd35-image-self-only-real-tokens": ("sd35", {"streams": ["image_self", "image_self_out"], "text_tokens": "prompt"},
                                         1, 2, ("cond",)),
}


def _branch_rows(call: dict, key: str, calls_per_step: int, call_index: int, branches, batch: int):
    """The brute force's kept rows of one call's input and which branch each block of ``batch`` rows is."""
    x = call[key]
    if calls_per_step == 2:  # true CFG: call 0 of a step is conditional, call 1 negative
        branch = "cond" if call_index % 2 == 0 else "uncond"
        return ([x], [branch]) if branch in branches else ([], [])
    if x.shape[0] == 2 * batch:  # SD3's [uncond, cond] batch
        halves = {"uncond": x[:batch], "cond": x[batch:]}
        return [halves[b] for b in branches], list(branches)
    return [x], ["cond"]


def _brute_force_rows(pipe, family_name, config, key, calls, found, batches, calls_per_step, branches) -> np.ndarray:
    """The rows of ``key`` the statistics should hold at one step: the collected branches' rows of every
    call, with ``text_tokens: prompt`` only the real text tokens (single blocks: then every image row)."""
    parts = []
    stream = key.split("/")[1]
    for (b, c), call in zip(calls, found, strict=True):
        blocks, names = _branch_rows(call, key, calls_per_step, c, branches, len(batches[b]))
        for block, branch in zip(blocks, names, strict=True):
            texts = batches[b] if branch == "cond" else [""] * len(batches[b])
            if config["text_tokens"] != "prompt" or stream.startswith("image"):
                parts.append(block.reshape(-1, block.shape[-1]))
                continue
            length = pipe.tokenizer_max_length + 256 if family_name.startswith("sd3") else 512
            mask = _real_mask(pipe, texts, length)
            if stream.startswith("single"):  # text rows first, then every image row
                mask = torch.cat([mask, torch.ones(len(texts), block.shape[1] - length, dtype=torch.bool)], dim=1)
            parts.append(block[mask])
    return torch.cat(parts).numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_streams_equal_brute_force(mmdit_dirs, case, record_property):
    """Every collected stream's moments at every step within 1e-6 (relative to the largest entry) of
    float64 sums of the raw inputs; the timesteps the transformer receives are the schedule's (FLUX:
    / 1000); calls per step and rows per call follow the family's CFG."""
    family_name, overrides, calls_per_step, rows_per_prompt, branches = CASES[case]
    config = _config(batch_size=2, **overrides)
    if family_name == "flux":
        config["streams"] = [*DEFAULT_STREAMS, "single_out"]
    model_dir = mmdit_dirs[family_name]
    family = model_family(model_dir)
    pipe, schedule = _prepared(model_dir, config)
    raw = RawTransformerInputs(pipe.transformer)
    summary = {}
    try:
        steps, text, layers, _ = collect_shard(pipe, PROMPTS, 0, schedule, config, family=family, summary=summary)
    finally:
        raw.close()
    assert text is None  # the text path (streams context, pooled) is not selected
    num_steps, batches = len(schedule["steps"]), [PROMPTS[:2], PROMPTS[2:]]
    assert len(raw.calls) == len(batches) * num_steps * calls_per_step
    divisor = 1000.0 if family_name.startswith("flux") else 1.0
    worst = 0.0
    for step_index, step in enumerate(schedule["steps"]):
        calls = [(b, c) for b in range(len(batches)) for c in range(calls_per_step)]
        found = [raw.calls[(b * num_steps + step_index) * calls_per_step + c] for b, c in calls]
        expected_t = torch.tensor(step["timestep"], dtype=torch.float32) / divisor
        for (b, _), call in zip(calls, found, strict=True):
            assert call["rows"] == rows_per_prompt * len(batches[b])
            assert torch.all(call["timestep"] == expected_t), (call["timestep"], expected_t)
        keys = [key for key in found[0] if "/" in key and key.split("/")[1] in config["streams"]]
        assert {_nullcov_key(key) for key in keys} == set(steps[step_index])
        for key in keys:
            rows = _brute_force_rows(pipe, family_name, config, key, calls, found, batches, calls_per_step, branches)
            moments = steps[step_index][_nullcov_key(key)]
            assert moments.count == rows.shape[0]
            reference = rows.T @ rows
            assert_close_to_float64(moments.sum_outer, reference, rtol=1e-6)
            assert_close_to_float64(moments.sum, rows.sum(0), rtol=1e-6)
            worst = max(worst, float(np.abs(moments.sum_outer - reference).max() / np.abs(reference).max()))
    if "image_self" in config["streams"]:  # SD3.5's attn2: in the dual-attention blocks only
        dual = pipe.transformer.config.dual_attention_layers
        assert dual and {key.split("/")[0] for key in steps[0] if "/attn2." in key} == {
            f"transformer_blocks.{index}" for index in dual}
    record_property("max_relative_error", worst)
    print(f"{case}: max relative error of sum_outer vs brute force {worst:.2e}")
    real = sum(int(_real_mask(pipe, texts, 512 if family_name.startswith("flux") else 333).sum())
               for batch in batches for texts in ([batch] + ([[""] * len(batch)] if "uncond" in branches else [])))
    counts = summary["text_token_counts"]
    assert counts["real"] == real
    length = 512 if family_name.startswith("flux") else 333
    assert counts["real"] + counts["padding"] == len(PROMPTS) * len(branches) * length


@pytest.mark.parametrize("family_name", ["sd3", "flux-schnell"])
def test_conditional_half_equals_a_run_without_cfg(mmdit_dirs, family_name):
    """At the first step (the same latents) the conditional half of SD3's CFG batch, and FLUX's
    conditional call of true CFG, give what a run without CFG gives."""
    model_dir = mmdit_dirs[family_name]
    family = model_family(model_dir)
    guided = _config(num_denoising_steps=1, **({"true_cfg_scale": 2.0} if family_name != "sd3" else {}))
    plain = _config(num_denoising_steps=1, guidance_scale=1.0)
    results = []
    for config in (guided, plain):
        pipe, schedule = _prepared(model_dir, config)
        results.append(collect_shard(pipe, PROMPTS[:2], 0, schedule, config, family=family)[0][0])
    assert set(results[0]) == set(results[1])
    for key, moments in results[0].items():
        other = results[1][key]
        assert moments.count == other.count
        assert_close_to_float64(moments.sum_outer, other.sum_outer, rtol=1e-6)


def test_flow_schedules_are_keyed_by_sigma(mmdit_dirs):
    """FLUX's dynamic shift comes from the image sequence length (diffusers' calculate_shift), so its grid
    depends on the resolution; schnell's and SD3's static shift do not. Names, sigma and timestep =
    1000 sigma are recorded; only 'Euler' applies."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_shift

    schedules = {}
    for family_name in ("flux", "flux-schnell", "sd3"):
        pipe = load_pipeline(mmdit_dirs[family_name], "float32", "cpu")
        for resolution in (32, 64):
            flow = flow_of(pipe, resolution)
            schedules[family_name, resolution] = build_schedule(dict(pipe.scheduler.config), "Euler", 4, flow)
        for strategy in ("DPM++ 2M", "Euler a", None, "early_timestep"):
            with pytest.raises(ScheduleError, match="does not apply to a flow-matching model.*'Euler'"):
                build_schedule(dict(pipe.scheduler.config), strategy, 4, flow_of(pipe, 32))
    flux = schedules["flux", 32]
    assert flux["flow_matching"]["image_seq_len"] == (32 // 2 // 2) ** 2
    assert flux["flow_matching"]["mu"] == diffusers_shift(64, 256, 4096, 0.5, 1.15) == calculate_shift(64)
    assert flux["set_timesteps"]["sigmas"] == [1.0, 0.75, 0.5, 0.25]
    for schedule in schedules.values():
        for step in schedule["steps"]:
            assert re.fullmatch(NAME_PATTERN, step["name"]) and step["name"].startswith("sigma_")
            assert step["timestep"] == float(np.float32(np.float32(step["sigma"]) * 1000))
            assert step["name"] == f"sigma_{step['index']:02d}_{round(1000 * step['sigma']):04d}"
    timesteps = {key: [s["timestep"] for s in schedule["steps"]] for key, schedule in schedules.items()}
    assert timesteps["flux", 32] != timesteps["flux", 64]
    assert timesteps["flux-schnell", 32] == timesteps["flux-schnell", 64] == [1000.0, 750.0, 500.0, 250.0]
    assert timesteps["sd3", 32] == timesteps["sd3", 64]
    assert schedules["sd3", 64]["flow_matching"] | {"mu": None} == {
        "pipeline": "StableDiffusion3Pipeline", "resolution": 64, "image_seq_len": 32 * 32, "shift": 3.0,
        "use_dynamic_shifting": False, "mu": None}


def test_fused_qkv_projections_are_refused(mmdit_dirs):
    pipe = load_pipeline(mmdit_dirs["sd3"], "float32", "cpu")
    pipe.transformer.fuse_qkv_projections()
    with pytest.raises(ModelError, match=r"fused QKV projections.*unfuse_qkv_projections\(\)"):
        check_unfused(pipe.transformer)
    config = _config(num_denoising_steps=1)
    schedule = build_schedule(dict(pipe.scheduler.config), "Euler", 1, flow_of(pipe, RESOLUTION))
    with pytest.raises(ModelError, match="fused QKV"):
        collect_shard(pipe, PROMPTS[:1], 0, schedule, config, family=model_family(mmdit_dirs["sd3"]))


def test_keys_of_the_other_kind_of_family_and_eos_are_refused(mmdit_dirs):
    model_dir = mmdit_dirs["flux"]
    family = model_family(model_dir)
    pipe, schedule = _prepared(model_dir, _config(num_denoising_steps=1))
    bad = [({"collect_features": {"q": True, "k": False, "v": False, "out": True}}, "select with streams"),
           ({"text_tokens": "eos"}, "text_tokens must be one of all, prompt"),
           ({"unconditional_branch": True}, "no negative branch"),
           ({"resolution": 64}, "built for resolution 32")]
    for overrides, message in bad:
        with pytest.raises(Exception, match=message):
            collect_shard(pipe, PROMPTS[:1], 0, schedule, _config(num_denoising_steps=1) | overrides, family=family)


def _digest(folder):
    return sorted((str(p.relative_to(folder)), hashlib.sha256(p.read_bytes()).hexdigest())
                  for p in folder.rglob("*") if p.is_file())


def test_tiny_transformer_builds_are_byte_identical(mmdit_dirs, tmp_path):
    for family_name in ("sd3", "flux"):
        again = build_tiny_model(tmp_path / family_name, family_name)
        assert _digest(again) == _digest(mmdit_dirs[family_name])
    names = [name for name, _ in _digest(mmdit_dirs["sd35"])]
    assert "transformer/config.json" in names and not any(n.startswith(("text_encoder_3", "tokenizer_3"))
                                                          for n in names)
    config = json.loads((mmdit_dirs["sd35"] / "transformer" / "config.json").read_text())
    assert config["dual_attention_layers"] == [0] and config["qk_norm"] == "rms_norm"


def _diffusers_test_folder(root, kind):
    """A model folder saved with ``save_pretrained`` from diffusers' own tiny test configs (FLUX with 2
    joint and 2 single blocks), text encoders from transformers' configs: not nullcov's builder."""
    import string

    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    from nullcov.models.tiny_model import write_tokenizer

    write_tokenizer(root / "clip-tokenizer")
    clip_tokenizer = CLIPTokenizer.from_pretrained(root / "clip-tokenizer")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -5.0)]
    vocab += [(c, -6.0) for c in string.ascii_lowercase + string.punctuation]
    t5_tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0)
    torch.manual_seed(0)
    size = len(clip_tokenizer)
    clip = {"bos_token_id": size - 2, "eos_token_id": size - 1, "hidden_size": 32, "intermediate_size": 37,
            "num_attention_heads": 4, "num_hidden_layers": 5, "vocab_size": size, "hidden_act": "gelu",
            "projection_dim": 32, "pad_token_id": size - 1}
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_ff=37, d_kv=8, num_heads=4,
                                 num_layers=2, is_encoder_decoder=False))
    scheduler = FlowMatchEulerDiscreteScheduler()
    if kind == "sd3":
        transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=4,
                                            attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                            joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
        vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                            latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                            shift_factor=0.0609, scaling_factor=1.5035)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, vae=vae, scheduler=scheduler,
            text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**clip)), tokenizer=clip_tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip)), tokenizer_2=clip_tokenizer,
            text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    else:
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
        vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                            latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                            shift_factor=0.0609, scaling_factor=1.5035)
        pipe = FluxPipeline(transformer=transformer, vae=vae, scheduler=scheduler,
                            text_encoder=CLIPTextModel(CLIPTextConfig(**clip)), tokenizer=clip_tokenizer,
                            text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    folder = root / kind
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_a_folder_saved_from_diffusers_test_configs_loads_and_collects(tmp_path, kind):
    folder = _diffusers_test_folder(tmp_path, kind)
    model_dir = resolve_model_dir(str(folder))  # model: <folder>
    family = model_family(model_dir)
    assert (family.name, family.denoiser) == (kind, "transformer")
    config = _config(num_denoising_steps=1, batch_size=1)
    pipe, schedule = _prepared(model_dir, config)
    steps, _, layers, _ = collect_shard(pipe, PROMPTS[:1], 0, schedule, config, family=family)
    joint = 4 if kind == "sd3" else 2
    assert layers[:joint] == [f"transformer_blocks.{i}" for i in range(joint)]
    assert len(layers) == joint + (0 if kind == "sd3" else 2)
    # SD3's last block is context_pre_only: no to_add_out there
    expected_out = joint - 1 if kind == "sd3" else joint
    assert sum(key.endswith("/attn.to_add_out") for key in steps[0]) == expected_out
    assert all(np.isfinite(m.sum_outer).all() and m.count > 0 for m in steps[0].values())


@pytest.mark.parametrize("model", ["builtin:tiny-flux", "builtin:tiny-sd3"])
def test_workflow_runs_features_covariance_projection(tmp_path, demo_prompts, model):
    """The workflow on a tiny transformer: sigma-keyed steps, one merged statistic and projection per step
    holding every stream of every block (no text.h5: the text stream is per step), and the safetensors
    export of them; the report parts that read UNet keys are off (and refused when asked for, the
    NullBooth export among them)."""
    from nullcov.layout import ROOT, TEXT_NAME, Results
    from nullcov.statistics.store import read_moments
    from nullcov.training.export import safetensors_keys

    from conftest import snakemake, write_config

    write_config(tmp_path, demo_prompts[:3], model=model, sampler_strategy="Euler", num_denoising_steps=2,
                 resolution=RESOLUTION, text_tokens="prompt", exports=["safetensors"])
    dry = snakemake(tmp_path, "--dry-run").stdout
    assert "features" in dry and "projection" in dry and "export_safetensors" in dry and "report_figures" not in dry
    snakemake(tmp_path)
    schedule = json.loads((tmp_path / ROOT / "schedule.json").read_text())
    flux = model.endswith("flux")
    assert schedule["flow_matching"]["resolution"] == RESOLUTION
    assert [step["name"][:9] for step in schedule["steps"]] == ["sigma_00_", "sigma_01_"]
    assert schedule["layers"] == ["transformer_blocks.0", "transformer_blocks.1"] + (
        ["single_transformer_blocks.0", "single_transformer_blocks.1"] if flux else [])
    expected = {f"transformer_blocks.{i}/{linear}" for i in range(2)
                for linear in ("attn.to_q", "attn.add_q_proj", "attn.to_out", "attn.to_add_out")}
    if flux:
        expected |= {f"single_transformer_blocks.{i}/attn.to_q" for i in range(2)}
    else:
        expected.remove("transformer_blocks.1/attn.to_add_out")  # SD3's last block is context_pre_only
    results = Results(tmp_path / ROOT)
    assert not results.covariance(TEXT_NAME).exists()
    for step in schedule["steps"]:
        moments = read_moments(results.covariance(step["name"]), "covariance")[0]
        assert set(moments) == expected and all(m.count > 0 for m in moments.values())
        assert results.projection(step["name"]).is_file()
        assert safetensors_keys(results.export("nullcov_projections.safetensors"))[step["name"]] == sorted(expected)
    write_config(tmp_path, demo_prompts[:3], model=model, sampler_strategy="Euler", attention_prompts=2,
                 exports=["safetensors", "nullbooth"])
    refused = snakemake(tmp_path, "--dry-run", check=False)
    text = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "invalid configuration: attention_prompts: 2, exports: ['nullbooth']: the " \
        "validation" in text and """exports='["safetensors"]'""" in text, text
    assert "report-parts-do-not-run-transformer-families-yet" in text


@pytest.mark.parametrize(("model", "overrides", "message"), [
    ("builtin:tiny-flux", {"collection": "noised"}, "collection: noised calls a UNet directly"),
    ("builtin:tiny-flux", {"unconditional_branch": True}, "unconditional_branch: true needs a negative branch"),
    ("builtin:tiny-sd3", {"true_cfg_scale": 2.0}, "true_cfg_scale is FLUX's negative call"),
    ("builtin:tiny-sd3", {"text_tokens": "eos"}, "text_tokens: eos is a UNet's option"),
    ("builtin:tiny", {"streams": ["image"]}, "this model is a UNet: select with collect_features"),
])
def test_the_workflow_refuses_settings_of_the_other_kind_of_family(tmp_path, demo_prompts, model, overrides, message):
    """Before any job starts, what a feature job would refuse."""
    from conftest import snakemake, write_config

    write_config(tmp_path, demo_prompts[:2], model=model, sampler_strategy="Euler", **overrides)
    result = snakemake(tmp_path, "--dry-run", check=False)
    text = result.stdout + result.stderr
    assert result.returncode != 0 and "invalid configuration: " in text and message in text, text[-3000:]


# -- the timestep-independent text path (streams context, pooled) -------------------------------------
TEXT_PATH_CASES = {
    # family, config overrides, which branches the statistics hold
    "flux-dev-all-tokens": ("flux", {}, ("cond",)),
    "flux-schnell-true-cfg-both-real-tokens": ("flux-schnell", {"true_cfg_scale": 2.0, "unconditional_branch": True,
                                                                "text_tokens": "prompt"}, ("cond", "uncond")),
    "sd3-t5-cfg-both-real-tokens": ("sd3", {"unconditional_branch": True, "text_tokens": "prompt"}, ("cond", "uncond")),
    "sd35-no-t5-cfg-conditional-all-tokens": ("sd35", {}, ("cond",)),
    "sd35-no-t5-real-tokens": ("sd35", {"text_tokens": "prompt"}, ("cond",)),
}


def _encoded(pipe, texts):
    """Brute force: the text sequence and the pooled projections of ``texts``, float64, from the pipeline's
    own ``encode_prompt`` called here (each text as a prompt; a negative prompt is ``""``)."""
    with torch.no_grad():
        if type(pipe).__name__ == "FluxPipeline":
            states, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=texts, device="cpu", max_sequence_length=512)
        else:
            states, _, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=texts, prompt_3=texts, device="cpu",
                                                      do_classifier_free_guidance=False, max_sequence_length=256)
    return states.double(), pooled.double()


def _text_path_reference(pipe, family_name, config, branches):
    """Brute force of ``context_embedder`` and ``time_text_embed.text_embedder.linear_1`` over every prompt
    and collected branch: the rows (real tokens only with ``text_tokens: prompt``, counted here by
    tokenizing without padding), as float64 arrays."""
    context, pooled = [], []
    for branch in branches:
        texts = PROMPTS if branch == "cond" else [""] * len(PROMPTS)
        states, pooled_states = _encoded(pipe, texts)
        if config["text_tokens"] == "prompt":
            states = states[_real_mask(pipe, texts, states.shape[1])]
        context.append(states.reshape(-1, states.shape[-1]))
        pooled.append(pooled_states)
    return {"context_embedder": torch.cat(context).numpy(),
            "time_text_embed.text_embedder.linear_1": torch.cat(pooled).numpy()}


class TextPathInputs(LinearInputs):
    """What the transformer's ``context_embedder`` and pooled-text projection receive in a real pipeline run:
    every call's raw inputs, float64."""

    def __init__(self, transformer):
        self.calls = []
        self.handles = [transformer.register_forward_pre_hook(lambda module, args: self.calls.append({}))]
        for key in ("context_embedder", "time_text_embed.text_embedder.linear_1"):
            self.handles.append(transformer.get_submodule(key).register_forward_pre_hook(self._linear(key)))


def _assert_moments_equal_rows(moments, rows):
    assert moments.count == rows.shape[0]
    assert_close_to_float64(moments.sum_outer, rows.T @ rows, rtol=1e-6)
    assert_close_to_float64(moments.sum, rows.sum(0), rtol=1e-6)


@pytest.mark.parametrize("case", list(TEXT_PATH_CASES))
def test_text_path_equals_brute_force(mmdit_dirs, case):
    """streams: [context, pooled]: the text encoders alone (no transformer weights, no sampler) give the
    inputs of ``context_embedder`` and of the pooled-text projection, once per prompt (and per negative
    prompt with unconditional_branch), equal within 1e-6 to float64 sums of ``encode_prompt``'s states
    called here; with ``text_tokens: prompt`` only the real tokens (T5's padding dropped). A run with a
    per-step stream too gives the same text moments, and they are what the transformer receives."""
    from nullcov.collection.features import collect_text_path

    family_name, overrides, branches = TEXT_PATH_CASES[case]
    model_dir = mmdit_dirs[family_name]
    family = model_family(model_dir)
    config = _config(batch_size=2, num_denoising_steps=1, streams=["context", "pooled"], **overrides)
    full, schedule = _prepared(model_dir, config)
    reference = _text_path_reference(full, family_name, config, branches)

    text_pipe = load_pipeline(model_dir, "float32", "cpu", text_only=True)
    assert text_pipe.vae is None and text_pipe.scheduler is None
    assert not isinstance(text_pipe.transformer, torch.nn.Module)  # config only: no weights loaded
    only = collect_text_path(text_pipe, PROMPTS, 0, config, family)
    assert list(only) == list(reference)
    for key, rows in reference.items():
        _assert_moments_equal_rows(only[key], rows)
    expected_rows = len(PROMPTS) * len(branches)
    assert only["time_text_embed.text_embedder.linear_1"].count == expected_rows

    # With a per-step stream too, collect_shard runs the sampler and gives the same text moments; the
    # transformer's own context_embedder / pooled projection inputs are the brute force's rows.
    mixed = config | {"streams": ["image", "context", "pooled"]}
    hooks = TextPathInputs(full.transformer)
    try:
        steps, text, _, _ = collect_shard(full, PROMPTS, 0, schedule, mixed, family=family)
    finally:
        hooks.close()
    assert all(key.endswith("/attn.to_q") for key in steps[0])
    for key, rows in reference.items():
        _assert_moments_equal_rows(text[key], rows)
    received = {key: [] for key in reference}
    for call in hooks.calls:
        for key in received:
            received[key].append(call[key])
    batch_sizes = [len(PROMPTS[:2]), len(PROMPTS[2:])]
    calls = len(hooks.calls) // len(batch_sizes)  # per batch: 1, or 2 with FLUX's true CFG
    for key, seen in received.items():
        # each branch's rows of each batch (SD3: the halves of [uncond, cond]; FLUX: the first call, then the negative)
        if family_name.startswith("sd3"):
            halves = {"cond": [x[b:] for x, b in zip(seen, batch_sizes, strict=True)],
                      "uncond": [x[:b] for x, b in zip(seen, batch_sizes, strict=True)]}
        else:
            halves = {"cond": seen[::calls], "uncond": seen[1::calls]}
        for branch in branches:
            got = torch.cat(halves[branch]).numpy()
            encoded = _encoded(full, PROMPTS if branch == "cond" else [""] * len(PROMPTS))
            expected = encoded[0 if key == "context_embedder" else 1].numpy()
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_text_path_only_loads_no_transformer_and_writes_text_h5(mmdit_dirs, tmp_path, caplog):
    """A feature job with only the text path: the transformer is not loaded, no sampler runs, no step file
    is written; text.h5 holds the two module-path keys."""
    import logging

    from nullcov.collection.features import run_feature_job
    from nullcov.models.model import transformer_layer_names
    from nullcov.models.schedule import write_schedule
    from nullcov.statistics.store import read_moments

    model_dir = mmdit_dirs["flux"]
    config = _config(streams=["context"], text_tokens="prompt")
    pipe, schedule = _prepared(model_dir, config)
    write_schedule(tmp_path / "schedule.json", schedule, transformer_layer_names(model_dir), "builtin:tiny-flux")
    schedule = json.loads((tmp_path / "schedule.json").read_text())
    with caplog.at_level(logging.INFO, logger="nullcov.collection.features"):
        run_feature_job(model_spec="builtin:tiny-flux", model_dir=str(model_dir), prompts=PROMPTS, first_index=0,
                        shard="0000", schedule=schedule, config=config, step_paths={},
                        text_path=str(tmp_path / "text.h5"))
    assert "text path ['context_embedder']: 3 prompts through FluxPipeline's text encoder(s)" in caplog.text
    moments, attrs = read_moments(tmp_path / "text.h5", "features")
    assert list(moments) == ["context_embedder"]
    assert moments["context_embedder"].count == sum(_real_tokens(pipe, prompt) for prompt in PROMPTS)
    assert attrs["provenance"]["run"]["text_only"] is True
    with pytest.raises(ValueError, match="only the text path is collected"):
        run_feature_job(model_spec="builtin:tiny-flux", model_dir=str(model_dir), prompts=PROMPTS, first_index=0,
                        shard="0000", schedule=schedule, config=config,
                        step_paths={schedule["steps"][0]["name"]: str(tmp_path / "step.h5")}, text_path=None)


def test_text_path_refusals(mmdit_dirs):
    """Unknown streams, eos and an unconditional branch without a negative branch are refused by name."""
    from nullcov.collection.features import collect_text_path

    model_dir = mmdit_dirs["flux"]
    family = model_family(model_dir)
    pipe = load_pipeline(model_dir, "float32", "cpu", text_only=True)
    bad = [({"streams": ["context", "t5"]}, r"streams: \['t5'\] are not streams of a transformer"),
           ({"streams": ["context"], "text_tokens": "eos"}, "text_tokens must be one of all, prompt, got 'eos'"),
           ({"streams": ["context"], "unconditional_branch": True}, "no negative branch"),
           ({"streams": ["image"]}, r"name none of the text path's streams \(context, pooled\)")]
    for overrides, message in bad:
        with pytest.raises(ValueError, match=message):
            collect_text_path(pipe, PROMPTS[:1], 0, _config() | overrides, family)
    with pytest.raises(RuntimeError, match="loaded text-only"):
        pipe.transformer()


@pytest.mark.parametrize("model", ["builtin:tiny-sd3"])
def test_text_path_workflow(tmp_path, demo_prompts, model):
    """streams: [context, pooled] through the workflow: the feature jobs write text.h5 only, one merge and
    one projection (text), keyed by module path; the plan counts no step file."""
    from nullcov.layout import ROOT, TEXT_NAME, Results
    from nullcov.statistics.store import read_moments, read_projections

    from conftest import planned_jobs, snakemake, write_config

    write_config(tmp_path, demo_prompts[:3], model=model, sampler_strategy="Euler", num_denoising_steps=2,
                 resolution=RESOLUTION, streams=["context", "pooled"], text_tokens="prompt", prompts_per_shard=2)
    jobs = planned_jobs(tmp_path)
    assert sorted(output for rule, output in jobs if rule.startswith(("covariance", "projection"))) == [
        "results/covariance/text.h5", "results/projections/text.h5"]
    snakemake(tmp_path)
    results = Results(tmp_path / ROOT)
    moments = read_moments(results.covariance(TEXT_NAME), "covariance")[0]
    assert list(moments) == ["context_embedder", "time_text_embed.text_embedder.linear_1"]
    pipe = load_pipeline(tmp_path / "resources" / "models" / "tiny-sd3", "float32", "cpu", text_only=True)
    real = sum(sum(_real_tokens(pipe, prompt)) for prompt in demo_prompts[:3])
    assert moments["context_embedder"].count == real
    assert moments["time_text_embed.text_embedder.linear_1"].count == 3
    assert set(read_projections(results.projection(TEXT_NAME))[0]) == set(moments)
    assert not list((tmp_path / ROOT / "covariance").glob("sigma_*"))
