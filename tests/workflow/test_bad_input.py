"""Bad input: each case stops before any GPU work with a message naming the key, line or value.

Marked ``bad_input``; the suite's summary counts them. README's "When things go wrong" table
names every test here.
"""

import logging
import shutil

import pytest

from nullcov.collection.features import PromptTooLongError, check_prompt_lengths

from conftest import planned_jobs, snakemake, write_config

pytestmark = pytest.mark.bad_input


def _refused(workdir, *expected):
    """The run fails before any job starts, and its output names every ``expected`` string."""
    result = snakemake(workdir, check=False)
    text = result.stdout + result.stderr
    assert result.returncode != 0, text
    for item in expected:
        assert item in text, f"{item!r} not in:\n{text[-3000:]}"
    assert not (workdir / "results").exists() and not (workdir / "logs").exists()
    return text


def test_missing_prompt_file(tmp_path, demo_prompts):
    write_config(tmp_path, demo_prompts[:2], prompts=str(tmp_path / "nope.txt"))
    _refused(tmp_path, "nope.txt", "does not exist")


def test_empty_prompt_file(tmp_path):
    write_config(tmp_path, ["# a comment", "", "   "])
    _refused(tmp_path, "prompts.txt", "holds no prompts")


def test_unreadable_prompt_file(tmp_path, demo_prompts):
    (tmp_path / "a-directory").mkdir()
    write_config(tmp_path, demo_prompts[:2], prompts=str(tmp_path / "a-directory"))
    _refused(tmp_path, "a-directory", "cannot be read")


def test_non_utf8_prompt_file(tmp_path, demo_prompts):
    write_config(tmp_path, demo_prompts[:2])
    (tmp_path / "prompts.txt").write_bytes(b"a cat\n# ok\nun caf\xe9 au lait\n")
    _refused(tmp_path, "prompts.txt", "line 3: not UTF-8")


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("prompts_per_shard", 0, ["prompts_per_shard", "minimum"]),
        ("prompts_per_shard", -3, ["prompts_per_shard"]),
        ("num_denoising_steps", 0, ["num_denoising_steps"]),
        ("nullspace_threshold", -0.1, ["nullspace_threshold"]),
        ("threshold_percent", 0, ["threshold_percent"]),
        ("threshold_percent", 100, ["threshold_percent"]),
        ("threshold_percent", 150, ["threshold_percent"]),
        ("sampler_strategy", "Heun", ["sampler_strategy", "'Heun'", "'DPM++ 2M Karras'", "'PNDM'", "'early_timestep'"]),
        ("collection", "partial_denoise", ["collection", "partial_denoise"]),
        ("typo_key", 1, ["typo_key"]),
    ],
)
def test_invalid_config_value_names_the_key(tmp_path, demo_prompts, key, value, expected):
    write_config(tmp_path, demo_prompts[:2], **{key: value})
    _refused(tmp_path, *expected)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"guidance_scale": 1.0}, "guidance_scale is 1.0"),
        ({"collection": "noised"}, "collection 'noised'"),
    ],
    ids=["no-cfg", "noised"],
)
def test_unconditional_branch_without_an_unconditional_pass_is_refused(tmp_path, demo_prompts, overrides, expected):
    write_config(tmp_path, demo_prompts[:2], unconditional_branch=True, **overrides)
    _refused(tmp_path, "invalid configuration: unconditional_branch: true", expected)


def test_all_features_off(tmp_path, demo_prompts):
    write_config(tmp_path, demo_prompts[:2], collect_features={"q": False, "k": False, "v": False, "out": False})
    _refused(tmp_path, "collect_features", "all false")


def test_model_path_that_does_not_exist(tmp_path, demo_prompts):
    write_config(tmp_path, demo_prompts[:2], model=str(tmp_path / "no-such-model"))
    _refused(tmp_path, "no-such-model", "no such folder")


def test_model_folder_without_unet(tmp_path, demo_prompts, tiny_model_dir):
    model = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, model)
    shutil.rmtree(model / "unet")
    write_config(tmp_path, demo_prompts[:2], model=str(model))
    _refused(tmp_path, "broken-model", "lacks unet/config.json")


def test_unknown_hub_id_is_not_downloaded(tmp_path, demo_prompts, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_config(tmp_path, demo_prompts[:2], model="someone/not-in-the-cache")
    _refused(tmp_path, "someone/not-in-the-cache", "not in the local Hugging Face cache")


def test_unknown_cross_attention_layer_fails_before_any_job(tmp_path, demo_prompts):
    write_config(tmp_path, demo_prompts[:2],
                 cross_attention_layers=["mid_block.attentions.0.transformer_blocks.0.attn2", "down_blocks.9.attn2"])
    result = snakemake(tmp_path, check=False)
    assert result.returncode != 0
    # refused at parse time: the layer list comes from the UNet config (nullcov.workflow.plan), before any job
    assert "invalid configuration: cross_attention_layers" in result.stderr
    assert "no cross-attention layer 'down_blocks.9.attn2'" in result.stderr
    assert "0=down_blocks.0.attentions.0.transformer_blocks.0.attn2" in result.stderr  # lists what the model has
    assert not (tmp_path / "logs").exists()


def test_out_of_range_layer_index(tmp_path, demo_prompts):
    write_config(tmp_path, demo_prompts[:2], cross_attention_layers=[0, 7])
    result = snakemake(tmp_path, check=False)
    assert result.returncode != 0
    assert "index 7 is out of range; the model has 7" in result.stderr
    assert not (tmp_path / "logs").exists()


@pytest.fixture
def tiny_tokenizer(tiny_model_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer", local_files_only=True)


LONG_PROMPT = "a photo of " + " and ".join(["a red cat"] * 30)


def test_long_prompts_are_truncated_counted_and_logged(tiny_tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        count = check_prompt_lengths(tiny_tokenizer, ["a cat", LONG_PROMPT, "a dog", LONG_PROMPT], 10, strict=False)
    assert count == 2
    assert "prompt 11 has" in caplog.text and "prompt 13 has" in caplog.text
    assert "2 of 4 prompts in this shard are truncated to 77 tokens" in caplog.text


def test_long_prompts_are_refused_with_strict_prompts(tiny_tokenizer):
    with pytest.raises(PromptTooLongError, match=r"strict_prompts: 1 prompt\(s\) exceed .* 77 tokens: prompt 5 has"):
        check_prompt_lengths(tiny_tokenizer, ["a cat", LONG_PROMPT], 4, strict=True)


def test_strict_prompts_stops_the_feature_job_before_loading_the_model(tmp_path, demo_prompts):
    write_config(tmp_path, [demo_prompts[0], LONG_PROMPT], strict_prompts=True)
    assert snakemake(tmp_path, check=False).returncode != 0
    log = (tmp_path / "logs" / "features" / "shard_0000.log").read_text()
    assert "PromptTooLongError: strict_prompts" in log and "prompt 1 has" in log
    assert "collecting" not in log  # failed before the pipeline was loaded


@pytest.mark.parametrize("policy, shards", [("keep", 5), ("drop", 3)])
def test_duplicate_prompts_are_counted_and_kept_or_dropped(tmp_path, policy, shards):
    write_config(tmp_path, ["a cat", "a dog", "a cat", "a bird", "a cat"], prompts_per_shard=1,
                 duplicate_prompts=policy)
    result = snakemake(tmp_path, "--dry-run", check=False)
    assert "2 repeated prompt line(s) (1 distinct prompts), e.g. 'a cat' x3" in result.stdout + result.stderr
    assert sum(rule == "features" for rule, _ in planned_jobs(tmp_path)) == shards


def test_lcm_with_more_steps_than_it_allows_names_the_limit(tmp_path, demo_prompts):
    write_config(tmp_path, demo_prompts[:2], sampler_strategy="LCM", num_denoising_steps=51)
    _refused(tmp_path, "sampler_strategy 'LCM' allows at most 50 num_denoising_steps", "got num_denoising_steps 51")
