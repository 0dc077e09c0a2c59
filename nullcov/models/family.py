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

It is also the one vocabulary of what is hooked and how it is stored: a family's :class:`Linears`
(:attr:`Family.linears`; every current family hooks the UNet cross-attention linears,
:data:`CROSS_ATTENTION`) names the linears of each hooked attention module, which of them take the
text states (collected once per prompt under :data:`TEXT_KEY`) and which get one statistic per
step (keyed :func:`statistic_key`, ``<layer>/<linear>``), and the config's ``collect_features``
names for them. Capture, the plan, the projection bank, the constraint, the exports, the figures,
the leakage check, the run summary and the proof all read them from here. Importing this module
is cheap (no numpy, no torch): the Snakefile imports it at parse time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nullcov.docs import see
from nullcov.files import read_json

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


#: The key of the text states' statistic, the one key of every text file (``text.h5``): collected
#: once per prompt, since the text states are the same at every step.
TEXT_KEY = "encoder_hidden_states"


def statistic_key(layer: str, linear: str) -> str:
    """The key of one linear's statistic inside a step file: ``<layer>/<linear>``."""
    return f"{layer}/{linear}"


def split_key(key: str) -> tuple[str, str]:
    """``(layer, linear)`` of a :func:`statistic_key` (the layer holds dots, never ``/``)."""
    layer, _, linear = key.rpartition("/")
    if not layer:
        raise ValueError(f"statistic key {key!r} is not '<layer>/<linear>'")
    return layer, linear


@dataclass(frozen=True)
class Linears:
    """The linears a family hooks in each of its attention modules, and what their inputs are.

    ``hooked``: every one, in hook order. ``text``: those whose input is the text states (the same
    at every step): their statistic is collected once per prompt under :data:`TEXT_KEY`, and they
    share one projection. The others (:attr:`per_step`) get one statistic per step, keyed
    :func:`statistic_key`. ``features``: config ``collect_features`` name -> linear, one per
    hooked linear. ``indexed``: the linears that are a module list whose entry 0 is the
    ``torch.nn.Linear`` (``to_out``: the projection, then dropout).
    """

    hooked: tuple[str, ...]
    text: tuple[str, ...]
    features: tuple[tuple[str, str], ...]
    indexed: tuple[str, ...] = ()

    def __post_init__(self):
        named = sorted(linear for _, linear in self.features)
        if named != sorted(self.hooked) or not set(self.text) | set(self.indexed) <= set(self.hooked):
            raise ValueError(f"inconsistent linears (every feature names one hooked linear): {self}")

    @property
    def per_step(self) -> tuple[str, ...]:
        """The linears whose inputs change with the step (one statistic per step), in hook order."""
        return tuple(linear for linear in self.hooked if linear not in self.text)

    @property
    def feature_linears(self) -> dict[str, str]:
        """``collect_features`` name -> linear."""
        return dict(self.features)

    @property
    def names(self) -> dict[str, str]:
        """Every name a user may give a linear (its ``collect_features`` name or its own) -> linear."""
        return {**{linear: linear for linear in self.hooked}, **self.feature_linears}

    @property
    def text_label(self) -> str:
        """The text linears as one label: ``to_k/to_v``."""
        return "/".join(self.text)

    def module_path(self, linear: str) -> str:
        """The ``torch.nn.Linear``'s path inside its attention module (``to_out.0``, ``to_q``)."""
        return f"{linear}.0" if linear in self.indexed else linear

    def collects_text(self, collect_features: dict) -> bool:
        """Whether ``collect_features`` asks for a text linear (the text states are collected)."""
        return any(collect_features[feature] for feature, linear in self.features if linear in self.text)

    def step_linears(self, collect_features: dict) -> list[str]:
        """The per-step linears ``collect_features`` asks for, in hook order."""
        feature = {linear: name for name, linear in self.features}
        return [linear for linear in self.per_step if collect_features[feature[linear]]]


#: The UNet cross-attention linears (``attn2``) every current family hooks.
CROSS_ATTENTION = Linears(
    hooked=("to_q", "to_k", "to_v", "to_out"),
    text=("to_k", "to_v"),
    features=(("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("out", "to_out")),
    indexed=("to_out",),
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
    linears: Linears  # what is hooked and how it is stored (every current family: CROSS_ATTENTION)


def _read_json(path: Path) -> dict:
    try:
        return read_json(path)
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
            f"no UNet cross-attention: nullcov has no {'/'.join(CROSS_ATTENTION.hooked)} of a UNet attn2 "
            "to hook there. "
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
        linears=CROSS_ATTENTION,
    )
