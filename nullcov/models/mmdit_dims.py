"""The input width of every statistic an SD3/FLUX transformer gives, per stream, from its config alone.

Arithmetic on the transformer's ``config.json`` (no torch, no diffusers, no weights), written after
how diffusers builds ``SD3Transformer2DModel`` and ``FluxTransformer2DModel``: every joint-block
linear nullcov hooks takes ``inner_dim = num_attention_heads x attention_head_dim`` wide rows (SD3's
last block is ``context_pre_only``: no ``attn.to_add_out``; SD3.5's ``attn2`` only in the blocks of
``dual_attention_layers``), a FLUX single block's ``attn.to_q`` ``inner_dim`` and its ``proj_out``
``inner_dim x (1 + mlp_ratio)`` (the attention output concatenated with the MLP branch), the text
path's ``context_embedder`` ``joint_attention_dim`` and its pooled-text projection
``pooled_projection_dim``. Keys and stream names are the vocabulary's
(:mod:`nullcov.models.family`). The tests hold it equal to a meta-device transformer's
``in_features`` (tiny built-ins and the real models' published configs) and to the dims of
collected statistics; the plan (bytes per stream choice) and the docs' tables at real sizes use it.
"""

from __future__ import annotations

from nullcov.models.family import JOINT_ATTENTION, SINGLE_BLOCK, STREAMS, TEXT_PATH, statistic_key

#: ``FluxSingleTransformerBlock``'s ``mlp_ratio`` (its default; not a config key): ``proj_mlp`` widens
#: ``inner_dim`` by it, and ``proj_out`` reads the attention output and the MLP branch concatenated.
FLUX_MLP_RATIO = 4.0

_SD3 = {"_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16,
        "out_channels": 16, "attention_head_dim": 64, "joint_attention_dim": 4096, "pooled_projection_dim": 2048}
_FLUX = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 19,
         "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
         "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]}
#: title -> (hub ids, the transformer ``config.json``'s sizing keys as published on the Hugging Face hub, copied
#: by hand: nothing is downloaded): the docs' tables at real sizes and the SD3-medium-architecture random model.
PUBLISHED_CONFIGS: dict[str, tuple[tuple[str, ...], dict]] = {
    "SD3-medium": (("stabilityai/stable-diffusion-3-medium-diffusers",),
                   _SD3 | {"num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                           "pos_embed_max_size": 192}),
    "SD3.5-large": (("stabilityai/stable-diffusion-3.5-large",),
                    _SD3 | {"num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
                            "pos_embed_max_size": 192, "qk_norm": "rms_norm"}),
    "SD3.5-medium": (("stabilityai/stable-diffusion-3.5-medium",),
                     _SD3 | {"num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                             "pos_embed_max_size": 384, "qk_norm": "rms_norm",
                             "dual_attention_layers": list(range(13))}),
    "FLUX.1-dev / FLUX.1-schnell": (("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell"),
                                    _FLUX | {"guidance_embeds": True}),
}

#: The transformer classes this arithmetic describes -> the family whose model holds them.
CLASSES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
#: The config keys the arithmetic reads (``dual_attention_layers`` may be absent: SD3 before 3.5).
REQUIRED = {"sd3": ("num_layers", "num_attention_heads", "attention_head_dim", "joint_attention_dim",
                    "caption_projection_dim", "pooled_projection_dim"),
            "flux": ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim",
                     "joint_attention_dim", "pooled_projection_dim")}


def _family(config: dict) -> str:
    cls = config.get("_class_name")
    if cls not in CLASSES:
        raise ValueError(f"transformer config _class_name {cls!r} is not one of {', '.join(CLASSES)}")
    missing = [key for key in REQUIRED[CLASSES[cls]] if key not in config]
    if missing:
        raise ValueError(f"{cls} config lacks {missing}: cannot size its streams")
    return CLASSES[cls]


def _block_widths(config: dict, family: str) -> dict[str, dict[str, int]]:
    """``{layer: {linear: width}}`` of every hooked linear the blocks have."""
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    if family == "sd3" and int(config["caption_projection_dim"]) != inner:
        raise ValueError(f"SD3 config: caption_projection_dim {config['caption_projection_dim']} differs from "
                         f"num_attention_heads x attention_head_dim = {inner}: the text tokens do not fit the blocks")
    layers, joint = {}, int(config["num_layers"])
    dual = set(config.get("dual_attention_layers") or ()) if family == "sd3" else set()
    for index in range(joint):
        widths = {"attn.to_q": inner, "attn.add_q_proj": inner, "attn.to_out": inner}
        if not (family == "sd3" and index == joint - 1):  # SD3's last block is context_pre_only
            widths["attn.to_add_out"] = inner
        if index in dual:
            widths |= {"attn2.to_q": inner, "attn2.to_out": inner}
        layers[f"transformer_blocks.{index}"] = widths
    for index in range(int(config.get("num_single_layers", 0)) if family == "flux" else 0):
        layers[f"single_transformer_blocks.{index}"] = {
            "attn.to_q": inner, "proj_out": inner + int(inner * FLUX_MLP_RATIO)}
    return layers


def stream_widths(config: dict) -> dict[str, dict[str, int]]:
    """``{stream: {statistic key: input width}}`` of an SD3/FLUX transformer ``config`` (its
    ``config.json``, with ``_class_name``), in :data:`~nullcov.models.family.STREAMS` order, for every
    stream the model has (SD3: no single blocks; ``attn2`` only with ``dual_attention_layers``). The
    blocks' keys are ``<block>/<first linear>``, the text path's its module paths."""
    family = _family(config)
    streams_of = {"transformer_blocks": {linear: name for name, linear in JOINT_ATTENTION.features},
                  "single_transformer_blocks": {linear: name for name, linear in SINGLE_BLOCK.features}}
    found: dict[str, dict[str, int]] = {}
    for layer, widths in _block_widths(config, family).items():
        stream_of = streams_of[layer.rpartition(".")[0]]
        for linear, width in widths.items():
            found.setdefault(stream_of[linear], {})[statistic_key(layer, linear)] = width
    text = {"context": int(config["joint_attention_dim"]), "pooled": int(config["pooled_projection_dim"])}
    for stream, key in TEXT_PATH:
        found[stream] = {key: text[stream]}
    return {stream: found[stream] for stream in STREAMS if stream in found}
