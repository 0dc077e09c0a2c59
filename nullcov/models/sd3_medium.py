"""A Stable Diffusion 3-medium-architecture model folder with seeded random weights, for measuring collection at scale.

For speed and memory no trained weights are needed, only SD3-medium's exact transformer: the
``SD3Transformer2DModel`` of ``stabilityai/stable-diffusion-3-medium-diffusers`` (24 joint blocks,
24 heads x 64 = 1536 wide, ``joint_attention_dim`` 4096, ``pooled_projection_dim`` 2048;
:data:`nullcov.models.mmdit_dims.PUBLISHED_CONFIGS`), 2.0 B parameters, so every statistic nullcov
collects has the real model's width and its activations the real sequence lengths. Around it:

* the two CLIP text towers at their real widths (768 and 1280, pooled projections 768 + 1280 = 2048, so
  the transformer receives the real 77 x 4096 CLIP part of ``prompt_embeds`` and 2048-wide pooled
  projections) but 2 layers each, with the tiny models' tokenizer: the text encoders' depth changes
  nothing the transformer sees but the values;
* no T5 (``text_encoder_3`` null, as SD3 allows): the pipeline pads the text sequence with 256 zero
  rows of width 4096, as the real pipeline does without T5;
* a VAE with SD3's 16 latent channels and ``vae_scale_factor`` 8 but 8 channels per level (a run that
  collects statistics returns latents and never decodes);
* SD3-medium's flow-matching scheduler config (``shift`` 3.0), verbatim.

The folder is a normal diffusers folder (``model=<folder>`` loads it; the transformer in float32, 8 GB).
Nothing is downloaded.

Usage::

    python -m nullcov.models.sd3_medium OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from nullcov.models.mmdit_dims import PUBLISHED_CONFIGS
from nullcov.models.sd15 import SMALL_VAE_CONFIG
from nullcov.models.tiny_model import (
    TINY_SD3_SCHEDULER_CONFIG,
    transformer_model_index,
    write_model_json,
    write_text_encoder,
    write_tokenizer,
)

#: The real SD3 CLIP towers' widths: CLIP ViT-L/14 and OpenCLIP bigG/14 (hidden size = projection dim).
CLIP_WIDTHS = (768, 1280)
#: SD-1.5's small 4-level VAE (``vae_scale_factor`` 2**3 = 8, as SD3's, minimal width) with SD3's 16 latent
#: channels, no quant convs, and SD3's shift and scaling factors.
VAE_CONFIG: dict = SMALL_VAE_CONFIG | {"latent_channels": 16, "sample_size": 1024, "use_quant_conv": False,
                                       "use_post_quant_conv": False, "shift_factor": 0.0609, "scaling_factor": 1.5305}


def transformer_config() -> dict:
    """SD3-medium's transformer arguments, as published."""
    config = dict(PUBLISHED_CONFIGS["SD3-medium"][1])
    config.pop("_class_name")
    return config


def build_sd3_medium_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the folder (see the module docstring) into ``out_dir``, atomically; return its path."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from diffusers import __version__ as diffusers_version

    from nullcov.files import atomic_folder

    out_dir = Path(out_dir).resolve()
    with atomic_folder(out_dir) as tmp:
        write_model_json(tmp / "model_index.json", transformer_model_index("sd35", diffusers_version))  # no T5
        write_model_json(tmp / "scheduler" / "scheduler_config.json", TINY_SD3_SCHEDULER_CONFIG)
        vocab_size = write_tokenizer(tmp / "tokenizer")
        write_tokenizer(tmp / "tokenizer_2")
        for index, width in enumerate(CLIP_WIDTHS):
            write_text_encoder(tmp / ("text_encoder" if index == 0 else "text_encoder_2"), vocab_size, width, "gelu",
                                with_projection=True, seed=seed + 1 + index, projection_dim=width)
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**transformer_config())
        transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        del transformer
        torch.manual_seed(seed)
        AutoencoderKL(**VAE_CONFIG).save_pretrained(tmp / "vae", safe_serialization=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m nullcov.models.sd3_medium OUT_DIR", file=sys.stderr)
        return 2
    print(build_sd3_medium_model(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
