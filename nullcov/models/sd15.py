"""A Stable Diffusion 1.5-architecture pipeline with seeded random weights, built in memory.

For measuring speed and memory no trained weights are needed, only SD-1.5's exact shapes: the
UNet of ``runwayml/stable-diffusion-v1-5`` (channels 320/640/1280/1280, cross-attention dim 768,
16 ``attn2`` layers) and a CLIP ViT-L/14 text encoder (hidden 768, 12 layers, 12 heads, vocab
49408), so the UNet sees 77x768 text states. The tokenizer is the tiny model's (its ids are a
subset of the vocabulary); the VAE has SD's 4 blocks (``vae_scale_factor`` 8, so resolutions
mean what they mean for SD-1.5) but 8 channels, since ``output_type="latent"`` never runs it.
Nothing is downloaded; everything is built from the configs below with ``torch.manual_seed``.
"""

from __future__ import annotations

from pathlib import Path

from nullcov.models.tiny_model import TINY_SCHEDULER_CONFIG

#: ``unet/config.json`` of Stable Diffusion 1.5 (the keys that shape the network).
SD15_UNET_CONFIG: dict = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

#: ``text_encoder/config.json`` of Stable Diffusion 1.5 (CLIP ViT-L/14's text tower).
SD15_TEXT_CONFIG: dict = {
    "attention_dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}

#: A 4-block VAE (``vae_scale_factor`` = 2**3 = 8, like SD's) with minimal channels.
SMALL_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [8, 8, 8, 8],
    "layers_per_block": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 8,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

#: SD-1.5's 16 cross-attention layers and their input widths.
SD15_NUM_CROSS_ATTENTION_LAYERS = 16


def build_sd15_pipeline(tokenizer_dir: str | Path, *, dtype: str = "float32", device: str = "cpu", seed: int = 0):
    """An in-memory ``StableDiffusionPipeline`` with SD-1.5 shapes and seeded random weights.

    ``tokenizer_dir`` is a CLIP tokenizer folder (e.g. ``<tiny model>/tokenizer``). Weights are
    initialised on ``device`` (fast on a GPU), then cast to ``dtype``.
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    if len(tokenizer) > SD15_TEXT_CONFIG["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than SD-1.5's vocabulary")
    text_config = CLIPTextConfig(
        **SD15_TEXT_CONFIG,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch_dtype = getattr(torch, dtype)
    with torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        torch.manual_seed(seed + 1)
        text_encoder = CLIPTextModel(text_config)
        torch.manual_seed(seed + 2)
        vae = AutoencoderKL(**SMALL_VAE_CONFIG)
    for model in (unet, text_encoder, vae):
        model.to(device=device, dtype=torch_dtype).eval()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(TINY_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
