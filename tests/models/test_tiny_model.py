"""Tests for the tiny, reproducible Stable Diffusion 1.x pipeline builder."""

import hashlib
import json

import pytest
import torch

from nullcov.models.tiny_model import BOS_TOKEN, EOS_TOKEN, TINY_SCHEDULER_CONFIG, build_tiny_model


def _digest(root):
    """Sorted (relative path, sha256) pairs of every file under ``root``."""
    return sorted(
        (p.relative_to(root).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest())
        for p in root.rglob("*")
        if p.is_file()
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def pipe(model_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True, use_safetensors=True)


def test_builds_are_byte_identical(model_dir, tmp_path):
    other = build_tiny_model(tmp_path / "again")
    first, second = _digest(model_dir), _digest(other)
    assert first == second
    assert [name for name, _ in first] == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]


def test_rebuild_replaces_existing_dir(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert build_tiny_model(out) == out.resolve()
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp dir left behind


def test_no_absolute_paths_in_files(model_dir):
    needle = str(model_dir.parent).encode()
    for path in model_dir.rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), path


def test_pipeline_generates_finite_latents(pipe):
    generators = [torch.Generator("cpu").manual_seed(0), torch.Generator("cpu").manual_seed(1)]
    out = pipe(
        ["a photo of a cat", "a red car"],
        num_inference_steps=2,
        guidance_scale=7.5,
        output_type="latent",
        generator=generators,
    )
    assert out.images.shape == (2, 4, 16, 16)
    assert torch.isfinite(out.images).all()


def test_unet_cross_attention_layout(pipe):
    cfg = pipe.unet.config
    hidden = pipe.text_encoder.config.hidden_size
    n_down = sum(t.startswith("CrossAttn") for t in cfg.down_block_types) * cfg.layers_per_block
    n_up = sum(t.startswith("CrossAttn") for t in cfg.up_block_types) * (cfg.layers_per_block + 1)
    expected = n_down + n_up + 1  # + the mid block's transformer
    cross = [m for m in pipe.unet.modules() if getattr(m, "is_cross_attention", False)]
    assert len(cross) == expected == 7
    assert all(m.to_k.in_features == m.to_v.in_features == hidden == cfg.cross_attention_dim for m in cross)
    assert sorted({m.to_q.in_features for m in cross}) == list(cfg.block_out_channels)


def test_tokenizer_round_trip(pipe, model_dir):
    tok = pipe.tokenizer
    merges = (model_dir / "tokenizer" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2"
    vocab = json.loads((model_dir / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == len(tok) == 512 + (len(merges) - 1) + 2
    assert pipe.text_encoder.config.vocab_size == len(vocab)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS_TOKEN, EOS_TOKEN, EOS_TOKEN)
    assert pipe.text_encoder.config.eos_token_id == tok.eos_token_id

    ids = tok("a photo of a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == tok.model_max_length == 77
    assert ids[0] == tok.bos_token_id
    eos_at = ids.index(tok.eos_token_id)
    assert eos_at > 1 and set(ids[eos_at:]) == {tok.eos_token_id}
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"


def test_scheduler_config_is_sd15(model_dir):
    cfg = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    assert cfg == TINY_SCHEDULER_CONFIG
    assert "timestep_spacing" not in cfg
