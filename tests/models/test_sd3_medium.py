"""The SD3-medium-architecture random model (nullcov.models.sd3_medium): its transformer is the published one
(built on the meta device: no weights), its text and latent sides give the transformer the real shapes."""

import pytest


def test_transformer_is_sd3_medium_as_published():
    import torch
    from diffusers import SD3Transformer2DModel

    from nullcov.models.mmdit_dims import PUBLISHED_CONFIGS, stream_widths
    from nullcov.models.sd3_medium import transformer_config

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**transformer_config())
    parameters = sum(p.numel() for p in transformer.parameters())
    assert parameters == pytest.approx(2.03e9, rel=0.01)  # SD3-medium's transformer: 2 B parameters
    assert len(transformer.transformer_blocks) == 24
    block = transformer.transformer_blocks[0]
    assert block.attn.to_q.in_features == block.attn.add_q_proj.in_features == 1536
    assert transformer.context_embedder.in_features == 4096
    assert transformer.time_text_embed.text_embedder.linear_1.in_features == 2048
    widths = stream_widths(PUBLISHED_CONFIGS["SD3-medium"][1])
    assert set(widths["image"].values()) == {1536} and len(widths["text_out"]) == 23  # context_pre_only last


def test_clip_towers_and_vae_give_the_transformer_its_real_input_shapes():
    import torch
    from diffusers import AutoencoderKL

    from nullcov.models.sd3_medium import CLIP_WIDTHS, VAE_CONFIG, transformer_config

    config = transformer_config()
    assert sum(CLIP_WIDTHS) == config["pooled_projection_dim"] == 2048  # pooled CLIP-L + CLIP-G projections
    with torch.device("meta"):
        vae = AutoencoderKL(**VAE_CONFIG)
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8  # SD3's vae_scale_factor
    assert vae.config.latent_channels == config["in_channels"] == 16
