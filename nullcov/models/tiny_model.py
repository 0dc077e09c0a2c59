"""Build tiny, randomly initialised, byte-reproducible Stable Diffusion pipelines, one per family.

The folder written by :func:`build_tiny_model` has the exact layout of a diffusers checkpoint
of its family, with the family's real classes and config shape and every dimension scaled down,
so the whole workflow can be exercised on a CPU without network access:

- ``sd1`` (``builtin:tiny``): ``StableDiffusionPipeline``, CLIP text encoder (32-dim states for
  SD-1.5's 768), conv ``proj_in``/``proj_out``, epsilon prediction, PNDM scheduler.
- ``sd2`` (``builtin:tiny-sd2``): ``StableDiffusionPipeline`` with an OpenCLIP-style text encoder
  (gelu, 48-dim states for SD-2's 1024), linear projections, ``upcast_attention``, v-prediction
  (SD-2.1's DDIM scheduler config).
- ``sdxl`` (``builtin:tiny-sdxl``): ``StableDiffusionXLPipeline``: two tokenizers and text encoders
  (the second with a projection), concatenated 64-dim states (SDXL's 2048), ``text_time`` added
  conditioning, no cross-attention in ``down_blocks.0``, 2 transformer layers per block in the
  last level, SDXL's Euler scheduler config.
- ``lcm`` (``builtin:tiny-lcm``): ``LatentConsistencyModelPipeline`` whose UNet has
  ``time_cond_proj_dim`` (guidance enters as an embedding), LCM scheduler config.

All families share one tokenizer (the same BPE files). Every file is written from code in this
module: two builds on the same machine with the same package versions are byte-identical.

Usage::

    python -m nullcov.models.tiny_model OUT_DIR [FAMILY]
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from nullcov.files import write_json, write_text

#: Stable Diffusion 1.5's ``scheduler/scheduler_config.json``, verbatim. Written by hand
#: (not via ``save_pretrained``) so that no newer defaults such as ``timestep_spacing``
#: get pinned into the file.
TINY_SCHEDULER_CONFIG: dict = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

#: Stable Diffusion 2.1's ``scheduler/scheduler_config.json`` (v-prediction), verbatim.
TINY_SD2_SCHEDULER_CONFIG: dict = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

#: Stable Diffusion XL base 1.0's ``scheduler/scheduler_config.json``, verbatim.
TINY_SDXL_SCHEDULER_CONFIG: dict = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

#: An LCM-distilled SD-1.5's (LCM_Dreamshaper_v7) ``scheduler/scheduler_config.json``, verbatim.
TINY_LCM_SCHEDULER_CONFIG: dict = {
    "_class_name": "LCMScheduler",
    "_diffusers_version": "0.22.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

#: Stable Diffusion 3 medium's ``scheduler/scheduler_config.json`` (flow matching, static shift 3), verbatim.
TINY_SD3_SCHEDULER_CONFIG: dict = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.29.0.dev0",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}

#: FLUX.1-dev's ``scheduler/scheduler_config.json`` (flow matching, resolution-dependent dynamic shift), verbatim.
TINY_FLUX_SCHEDULER_CONFIG: dict = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

#: FLUX.1-schnell's ``scheduler/scheduler_config.json`` (no shift), verbatim.
TINY_FLUX_SCHNELL_SCHEDULER_CONFIG: dict = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}

#: Scheduler config per family (read at parse time without building the model).
SCHEDULER_CONFIGS: dict[str, dict] = {
    "sd1": TINY_SCHEDULER_CONFIG,
    "sd2": TINY_SD2_SCHEDULER_CONFIG,
    "sdxl": TINY_SDXL_SCHEDULER_CONFIG,
    "lcm": TINY_LCM_SCHEDULER_CONFIG,
    "sd3": TINY_SD3_SCHEDULER_CONFIG,
    "sd35": TINY_SD3_SCHEDULER_CONFIG,
    "flux": TINY_FLUX_SCHEDULER_CONFIG,
    "flux-schnell": TINY_FLUX_SCHNELL_SCHEDULER_CONFIG,
}
#: The tiny MMDiT families (a ``transformer/`` instead of a ``unet/``; see :mod:`nullcov.models.family`).
TRANSFORMER_FAMILIES = ("sd3", "sd35", "flux", "flux-schnell")
FAMILIES = tuple(SCHEDULER_CONFIGS)

SEED = 0
NUM_MERGES = 256
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
TEXT_HIDDEN_SIZE = 32
MAX_LENGTH = 77

#: Fixed lowercase corpus the tokenizer's BPE merges are learned from.
_CORPUS = """
a an the of in on at with and or by for from to under over near behind beside inside
photo photograph picture image portrait painting drawing sketch illustration render
close up closeup wide shot view landscape scene still life macro aerial
cat cats kitten dog dogs puppy horse horses bird birds eagle owl parrot duck fish
shark whale dolphin lion tiger bear fox wolf deer rabbit mouse elephant giraffe zebra
monkey cow sheep goat pig chicken butterfly bee spider snake turtle frog
car cars truck bus train bicycle bike motorcycle boat ship airplane plane rocket
house building tower castle bridge church temple street road city town village
forest tree trees flower flowers garden park field meadow mountain mountains hill
river lake sea ocean beach island desert snow ice sky cloud clouds sun moon star
stars night day morning evening sunset sunrise rain storm fog
table chair bed sofa lamp window door wall floor kitchen room bedroom office
cup mug bottle glass plate bowl apple banana orange bread cake pizza coffee tea
book books clock phone computer camera guitar piano ball hat shoe shoes bag umbrella
man woman boy girl child children people person family friends face hands eyes hair
red green blue yellow orange purple pink black white gray brown golden silver
big small large tiny old young new beautiful pretty cute happy sad dark bright
colorful vintage modern ancient realistic detailed sharp blurry soft warm cold
sitting standing running walking flying swimming sleeping playing eating looking
style art artistic oil watercolor digital cartoon anime pixel studio lighting
cinematic dramatic minimal abstract surreal fantasy futuristic retro black and white
high quality highly detailed trending masterpiece professional award winning
"""


def bytes_to_unicode() -> list[str]:
    """Return GPT-2/CLIP's 256 byte-level symbols, in CLIP's vocabulary order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every occurrence of ``pair`` in ``word`` by the concatenated symbol."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_bpe_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Learn CLIP-style BPE merges (last symbol carries ``</w>``), deterministically.

    The most frequent adjacent pair wins; ties go to the lexicographically smallest pair.
    Pairs whose concatenation is already a token are skipped so that each merge adds
    exactly one new vocabulary entry.
    """
    corpus = Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in words)
    merges: list[tuple[str, str]] = []
    known: set[str] = set()
    while len(merges) < num_merges:
        pairs: Counter = Counter()
        for word, freq in corpus.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += freq
        candidates = [(-n, pair) for pair, n in pairs.items() if "".join(pair) not in known]
        if not candidates:
            break
        best = min(candidates)[1]
        merges.append(best)
        known.add("".join(best))
        corpus = Counter({_merge_pair(word, best): freq for word, freq in corpus.items()})
    return merges


def write_model_json(path: Path, obj: dict) -> None:
    """``obj`` as every JSON file of a model folder is written: UTF-8, sorted keys, indent 2, a final
    newline (atomically, :func:`nullcov.files.write_json`)."""
    write_json(path, obj, newline=True, sort_keys=True, indent=2, ensure_ascii=False)


def write_tokenizer(folder: Path, words: list[str] | None = None, num_merges: int = NUM_MERGES) -> int:
    """Write the CLIP tokenizer files by hand, BPE merges learned from ``words`` (default: the tiny
    models' fixed corpus); return the vocabulary size."""
    merges = learn_bpe_merges(_CORPUS.split() if words is None else words, num_merges)
    symbols = bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    write_model_json(folder / "vocab.json", {tok: i for i, tok in enumerate(tokens)})
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    write_text(folder / "merges.txt", "\n".join(lines) + "\n")
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    write_model_json(folder / "special_tokens_map.json", specials)
    config = {
        **specials,
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
    }
    write_model_json(folder / "tokenizer_config.json", config)
    return len(tokens)


def text_encoder_config(vocab_size: int, hidden_size: int = TEXT_HIDDEN_SIZE, hidden_act: str = "quick_gelu",
                        with_projection: bool = False, intermediate_size: int = 64,
                        projection_dim: int | None = None) -> dict:
    """A tiny CLIP text tower's ``config.json`` (2 layers, 4 heads; bos/eos are the vocabulary's last two ids).

    ``hidden_act``: ``quick_gelu`` (OpenAI CLIP, SD-1.x) or ``gelu`` (OpenCLIP, SD-2.x and SDXL).
    """
    bos_id, eos_id = vocab_size - 2, vocab_size - 1
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "hidden_act": hidden_act,
        "hidden_size": hidden_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": MAX_LENGTH,
        "model_type": "clip_text_model",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "pad_token_id": eos_id,
        "projection_dim": projection_dim or hidden_size,
        "vocab_size": vocab_size,
    }


def write_text_encoder(folder: Path, vocab_size: int, hidden_size: int = TEXT_HIDDEN_SIZE,
                        hidden_act: str = "quick_gelu", with_projection: bool = False, seed: int = SEED,
                        projection_dim: int | None = None) -> None:
    """Write a tiny CLIPTextModel (or CLIPTextModelWithProjection) with ``text_model.``-prefixed keys."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = text_encoder_config(vocab_size, hidden_size, hidden_act, with_projection, projection_dim=projection_dim)
    architecture = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    torch.manual_seed(seed)
    model = architecture(CLIPTextConfig(**config))
    state = {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v.contiguous()
             for k, v in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_model_json(folder / "config.json", config)


SD2_TEXT_HIDDEN_SIZE = 48  # SD-2.x: 1024
SDXL_TEXT_HIDDEN_SIZES = (32, 32)  # SDXL: 768 (CLIP ViT-L) + 1280 (OpenCLIP bigG), concatenated: 2048
SDXL_ADDITION_TIME_EMBED_DIM = 8  # SDXL: 256
LCM_TIME_COND_PROJ_DIM = 32  # LCM-distilled SD-1.5: 256


def tiny_unet_config(family: str) -> dict:
    """The family's UNet2DConditionModel arguments, dimensions scaled down (also its dims before
    it is built: :mod:`nullcov.workflow.plan`)."""
    base = {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": TEXT_HIDDEN_SIZE,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }
    if family == "sd2":
        return base | {
            "cross_attention_dim": SD2_TEXT_HIDDEN_SIZE,
            "attention_head_dim": (2, 4),
            "use_linear_projection": True,
            "upcast_attention": True,
        }
    if family == "sdxl":
        return base | {
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2),
            "cross_attention_dim": sum(SDXL_TEXT_HIDDEN_SIZES),
            "attention_head_dim": (2, 4),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": SDXL_ADDITION_TIME_EMBED_DIM,
            # pooled projection of text_encoder_2 + 6 time ids (original size, crop, target size)
            "projection_class_embeddings_input_dim": SDXL_TEXT_HIDDEN_SIZES[1] + 6 * SDXL_ADDITION_TIME_EMBED_DIM,
        }
    if family == "lcm":
        return base | {"time_cond_proj_dim": LCM_TIME_COND_PROJ_DIM}
    return base


def _write_diffusers_models(root: Path, family: str = "sd1") -> None:
    """Write the tiny UNet2DConditionModel and AutoencoderKL with diffusers' own serializer."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**tiny_unet_config(family))
    unet.save_pretrained(root / "unet", safe_serialization=True)
    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=8,
    )
    vae.save_pretrained(root / "vae", safe_serialization=True)


def model_index(family: str, diffusers_version: str) -> dict:
    components = {
        "scheduler": ["diffusers", SCHEDULER_CONFIGS[family]["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if family == "sdxl":
        return {
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": diffusers_version,
            "force_zeros_for_empty_prompt": True,
            **components,
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
        }
    return {
        "_class_name": "LatentConsistencyModelPipeline" if family == "lcm" else "StableDiffusionPipeline",
        "_diffusers_version": diffusers_version,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        **components,
    }


# -- MMDiT (SD3, SD3.5, FLUX.1) -------------------------------------------------------------------------------
SD3_CLIP_HIDDEN_SIZE = 16  # SD3: CLIP-L 768 + CLIP-G 1280, concatenated (2048, zero-padded to T5's 4096)
SD3_CLIP_PROJECTION_DIM = 32  # SD3: 768 + 1280 pooled -> pooled_projection_dim 2048
T5_D_MODEL = 32  # SD3 and FLUX: T5-XXL, 4096 (joint_attention_dim)
T5_MAX_LENGTH = 512
TINY_TRANSFORMER_VAE_BLOCKS = (8, 8)  # vae_scale_factor 2


def tiny_transformer_config(family: str) -> dict:
    """The family's transformer arguments: diffusers' own tiny test configs (SD3: ``num_layers=4``, here 2;
    FLUX: ``num_layers=1, num_single_layers=1``, here 2 and 2), so ``to_add_out`` exists and a
    ``context_pre_only`` last block is hooked too. SD3.5: ``dual_attention_layers`` and ``qk_norm``."""
    if family in ("flux", "flux-schnell"):
        return {"patch_size": 1, "in_channels": 4, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
                "num_attention_heads": 2, "joint_attention_dim": T5_D_MODEL, "pooled_projection_dim": TEXT_HIDDEN_SIZE,
                "guidance_embeds": family == "flux", "axes_dims_rope": (4, 4, 8)}
    config = {"sample_size": 16, "patch_size": 1, "in_channels": 4, "num_layers": 2, "attention_head_dim": 8,
              "num_attention_heads": 4, "joint_attention_dim": T5_D_MODEL, "caption_projection_dim": 32,
              "pooled_projection_dim": 2 * SD3_CLIP_PROJECTION_DIM, "out_channels": 4, "pos_embed_max_size": 32}
    if family == "sd35":
        config |= {"dual_attention_layers": (0,), "qk_norm": "rms_norm"}
    return config


def write_t5_tokenizer(folder: Path, words: list[str] | None = None) -> int:
    """Write a T5 tokenizer (a Unigram vocabulary of the corpus words and single characters, no
    sentencepiece file: transformers builds it from the vocabulary list); return its size."""
    import string

    from transformers import T5TokenizerFast

    words = sorted(set(_CORPUS.split() if words is None else words))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + word, -1.0 - 0.01 * rank) for rank, word in enumerate(words)]
    vocab += [("\u2581", -5.0)] + [(c, -6.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def _write_t5_encoder(folder: Path, vocab_size: int) -> None:
    """Write a tiny T5EncoderModel (2 layers, 4 heads, ``d_model`` :data:`T5_D_MODEL`)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=T5_D_MODEL, d_ff=37, d_kv=8, num_heads=4, num_layers=2,
                      relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False)
    torch.manual_seed(SEED + 2)
    T5EncoderModel(config).save_pretrained(folder, safe_serialization=True)


def _write_transformer(root: Path, family: str) -> None:
    """Write the tiny transformer and its VAE (SD3: 4 latent channels; FLUX: 1, packed 2x2 into 4)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel

    flux = family.startswith("flux")
    torch.manual_seed(SEED)
    cls = FluxTransformer2DModel if flux else SD3Transformer2DModel
    cls(**tiny_transformer_config(family)).save_pretrained(root / "transformer", safe_serialization=True)
    torch.manual_seed(SEED)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, latent_channels=1 if flux else 4,
                        block_out_channels=TINY_TRANSFORMER_VAE_BLOCKS, layers_per_block=1, norm_num_groups=1,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    vae.save_pretrained(root / "vae", safe_serialization=True)


def transformer_model_index(family: str, diffusers_version: str) -> dict:
    """The ``model_index.json`` of a tiny SD3 (T5 present), SD3.5 (no T5: ``text_encoder_3`` null) or FLUX."""
    clip, t5 = ["transformers", "CLIPTokenizer"], ["transformers", "T5TokenizerFast"]
    common = {"_diffusers_version": diffusers_version, "feature_extractor": [None, None],
              "image_encoder": [None, None], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
              "vae": ["diffusers", "AutoencoderKL"], "tokenizer": clip}
    if family.startswith("flux"):
        return {"_class_name": "FluxPipeline", **common, "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": t5,
                "transformer": ["diffusers", "FluxTransformer2DModel"]}
    with_t5 = family == "sd3"
    return {"_class_name": "StableDiffusion3Pipeline", **common,
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_3": ["transformers", "T5EncoderModel"] if with_t5 else [None, None],
            "tokenizer_2": clip, "tokenizer_3": t5 if with_t5 else [None, None],
            "transformer": ["diffusers", "SD3Transformer2DModel"]}


def _write_transformer_family(tmp: Path, family: str) -> None:
    """Tokenizers, text encoders, transformer and VAE of a tiny MMDiT model."""
    vocab_size = write_tokenizer(tmp / "tokenizer")
    if family.startswith("flux"):
        write_text_encoder(tmp / "text_encoder", vocab_size)  # pooled CLIP (pooled_projection_dim 32)
        _write_t5_encoder(tmp / "text_encoder_2", write_t5_tokenizer(tmp / "tokenizer_2"))
    else:
        write_tokenizer(tmp / "tokenizer_2")
        for name, seed in (("text_encoder", SEED), ("text_encoder_2", SEED + 1)):
            write_text_encoder(tmp / name, vocab_size, SD3_CLIP_HIDDEN_SIZE, "gelu", with_projection=True, seed=seed,
                                projection_dim=SD3_CLIP_PROJECTION_DIM)
        if family == "sd3":
            _write_t5_encoder(tmp / "text_encoder_3", write_t5_tokenizer(tmp / "tokenizer_3"))
    _write_transformer(tmp, family)


def _write_unet_family(tmp: Path, family: str) -> None:
    """Tokenizer(s), text encoder(s), UNet and VAE of a tiny UNet model."""
    vocab_size = write_tokenizer(tmp / "tokenizer")
    if family == "sdxl":
        write_tokenizer(tmp / "tokenizer_2")
        first, second = SDXL_TEXT_HIDDEN_SIZES
        write_text_encoder(tmp / "text_encoder", vocab_size, first)
        write_text_encoder(tmp / "text_encoder_2", vocab_size, second, "gelu", with_projection=True, seed=SEED + 1)
    elif family == "sd2":
        write_text_encoder(tmp / "text_encoder", vocab_size, SD2_TEXT_HIDDEN_SIZE, "gelu")
    else:
        write_text_encoder(tmp / "text_encoder", vocab_size)
    _write_diffusers_models(tmp, family)


def build_tiny_model(out_dir: str | Path, family: str = "sd1") -> Path:
    """Build the tiny pipeline of ``family`` (see :data:`FAMILIES`) into ``out_dir`` (replacing it
    atomically) and return its path."""
    if family not in FAMILIES:
        raise ValueError(f"tiny model family {family!r} is not one of {', '.join(FAMILIES)}")
    from nullcov.files import atomic_folder

    out_dir = Path(out_dir).resolve()
    with atomic_folder(out_dir) as tmp:
        from diffusers import __version__ as diffusers_version

        write_model_json(tmp / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIGS[family])
        if family in TRANSFORMER_FAMILIES:
            write_model_json(tmp / "model_index.json", transformer_model_index(family, diffusers_version))
            _write_transformer_family(tmp, family)
        else:
            write_model_json(tmp / "model_index.json", model_index(family, diffusers_version))
            _write_unet_family(tmp, family)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``python -m nullcov.models.tiny_model OUT_DIR [FAMILY]``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print(f"usage: python -m nullcov.models.tiny_model OUT_DIR [{'|'.join(FAMILIES)}]", file=sys.stderr)
        return 2
    print(build_tiny_model(*args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
