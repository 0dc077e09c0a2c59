"""The model families nullcov supports, each described by what differs between their pipelines.

A family is not a code path: every family runs through the same capture (hooks on the UNet's
cross-attention linears while the model's own diffusers pipeline runs). What differs is written
down here, read from the model folder's JSON files alone (no torch, no weights):

- the pipeline class (``model_index.json``) and which tokenizers / text encoders it has;
- the width of the text states every ``attn2.to_k``/``to_v`` receives (the UNet's
  ``cross_attention_dim``; SDXL concatenates its two encoders' penultimate states);
- how guidance enters: a CFG batch ``[uncond, cond]`` (only the conditional half is kept), or an
  embedding of ``guidance_scale`` (``time_cond_proj_dim``, LCM-distilled UNets: no CFG batch);
- added conditioning (SDXL's ``text_time``: pooled text embedding and time ids);
- the scheduler's ``prediction_type`` (every sampler is built ``from_config`` on the model's own
  scheduler config, so it carries over).

Anything else (SD3, FLUX, PixArt: a ``transformer/`` with joint attention, no UNet
cross-attention; unknown pipeline classes) is refused before any job runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nullcov.docs import see

#: Pipeline class -> (tokenizer components, text encoder components), in encoding order.
PIPELINES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "StableDiffusionPipeline": (("tokenizer",), ("text_encoder",)),
    "LatentConsistencyModelPipeline": (("tokenizer",), ("text_encoder",)),
    "StableDiffusionXLPipeline": (("tokenizer", "tokenizer_2"), ("text_encoder", "text_encoder_2")),
}
SUPPORTED = (
    "UNet cross-attention models: SD-1.x and SD-2.x (StableDiffusionPipeline), SDXL (StableDiffusionXLPipeline), "
    "LCM-distilled UNets (LatentConsistencyModelPipeline, or StableDiffusionPipeline with time_cond_proj_dim)"
)


class UnsupportedModelError(ValueError):
    """The model is not one of the families nullcov can collect statistics for."""


@dataclass(frozen=True)
class Family:
    """What a model's pipeline does differently (see the module docstring)."""

    name: str  # sd1, sd2, sdxl or lcm (informative: nothing branches on it)
    pipeline: str
    tokenizers: tuple[str, ...]
    text_encoders: tuple[str, ...]
    text_dim: int  # width of the states every attn2 to_k / to_v receives
    guidance: str  # "cfg" (a [uncond, cond] batch when guidance_scale > 1) or "embedding"
    added_conditioning: str | None  # the UNet's addition_embed_type (SDXL: "text_time")
    prediction_type: str


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UnsupportedModelError(
            f"model folder {str(path.parent)!r} lacks {path.name}{see('model-folder-lacks-a-file')}"
        ) from None


def check_supported(model_dir: str | Path) -> dict:
    """Refuse a model without UNet cross-attention or with an unknown pipeline; return its model index."""
    model_dir = Path(model_dir)
    index = _read_json(model_dir / "model_index.json")
    pipeline = index.get("_class_name")
    if "unet" not in index and "transformer" in index:
        raise UnsupportedModelError(
            f"model {str(model_dir)!r} is a {pipeline} with a transformer (joint attention, as in SD3 or FLUX) and "
            f"no UNet cross-attention: nullcov has no to_q/to_k/to_v/to_out of a UNet attn2 to hook there. "
            f"nullcov supports {SUPPORTED}{see('model-family-not-supported')}"
        )
    if pipeline not in PIPELINES:
        raise UnsupportedModelError(
            f"model {str(model_dir)!r}: pipeline {pipeline!r} (model_index.json _class_name) is not supported; "
            f"nullcov supports {SUPPORTED}{see('model-family-not-supported')}"
        )
    return index


def guidance_input(unet_config) -> str:
    """How guidance enters a UNet, from its config: ``embedding`` (``time_cond_proj_dim``, LCM-distilled:
    no CFG batch) or ``cfg`` (a ``[uncond, cond]`` batch when ``guidance_scale`` > 1)."""
    return "embedding" if unet_config.get("time_cond_proj_dim") is not None else "cfg"


def model_family(model_dir: str | Path) -> Family:
    """The :class:`Family` of a diffusers model folder, from its JSON files."""
    model_dir = Path(model_dir)
    index = check_supported(model_dir)
    pipeline = index["_class_name"]
    unet = _read_json(model_dir / "unet" / "config.json")
    scheduler = _read_json(model_dir / "scheduler" / "scheduler_config.json")
    tokenizers, encoders = PIPELINES[pipeline]
    missing = [name for name in tokenizers + encoders if not index.get(name) or index[name][0] is None]
    if missing:
        raise UnsupportedModelError(f"model {str(model_dir)!r}: {pipeline} without {missing} in model_index.json"
                                    f"{see('model-family-not-supported')}")
    guidance = guidance_input(unet)
    if pipeline == "StableDiffusionXLPipeline":
        name = "sdxl"
    elif guidance == "embedding":
        name = "lcm"
    elif unet.get("use_linear_projection"):
        name = "sd2"
    else:
        name = "sd1"
    return Family(
        name=name,
        pipeline=pipeline,
        tokenizers=tokenizers,
        text_encoders=encoders,
        text_dim=int(unet["cross_attention_dim"]),
        guidance=guidance,
        added_conditioning=unet.get("addition_embed_type"),
        prediction_type=scheduler.get("prediction_type", "epsilon"),
    )
