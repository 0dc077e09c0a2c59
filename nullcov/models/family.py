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

The MMDiT families (``sd3``: SD3 and SD3.5, ``flux``: FLUX.1 dev and schnell) have a
``transformer/`` instead: no UNet cross-attention, but joint blocks whose image and text streams are
hooked (:data:`JOINT_ATTENTION`; FLUX's single blocks: :data:`SINGLE_BLOCK`), keyed by the module
path of each stream's first linear. Anything else (PixArt and other transformers, unknown pipeline
classes) is refused before any job runs.

It is also the one vocabulary of what is hooked and how it is stored: a family's :class:`Linears`
(per :class:`LayerKind`, :attr:`Family.kinds`; the UNet families hook the cross-attention linears,
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
    "StableDiffusion3Pipeline": (("tokenizer", "tokenizer_2", "tokenizer_3"),
                                 ("text_encoder", "text_encoder_2", "text_encoder_3")),
    "FluxPipeline": (("tokenizer", "tokenizer_2"), ("text_encoder", "text_encoder_2")),
}
#: The MMDiT pipelines (a ``transformer`` with joint attention instead of a UNet).
TRANSFORMER_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")
#: Components a pipeline may lack (SD3 without T5: ``text_encoder_3``/``tokenizer_3`` null).
OPTIONAL_COMPONENTS = {"StableDiffusion3Pipeline": ("tokenizer_3", "text_encoder_3")}
SUPPORTED = (
    "UNet cross-attention models: SD-1.x and SD-2.x (StableDiffusionPipeline), SDXL (StableDiffusionXLPipeline), "
    "LCM-distilled UNets (LatentConsistencyModelPipeline, or StableDiffusionPipeline with time_cond_proj_dim); "
    "MMDiT transformers: SD3 and SD3.5 (StableDiffusion3Pipeline), FLUX.1 (FluxPipeline)"
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


#: What the rows of a hooked linear's input are: image tokens, text tokens, or the text tokens
#: followed by the image tokens (FLUX's single blocks run over the concatenation).
TOKEN_KINDS = ("image", "text", "text+image")


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
    #: hooked linear -> the other linears that receive the same input (a transformer block's ``to_k``,
    #: ``to_v`` share ``to_q``'s: one statistic, keyed by the first linear, serves them all).
    shared: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: hooked linear -> which tokens its input rows are: ``image``, ``text`` or ``text+image`` (FLUX's
    #: single blocks: the text rows, then the image rows). Not given: ``image`` (a UNet's ``to_q``/``to_out``).
    tokens: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        named = sorted(linear for _, linear in self.features)
        if named != sorted(self.hooked) or not set(self.text) | set(self.indexed) <= set(self.hooked):
            raise ValueError(f"inconsistent linears (every feature names one hooked linear): {self}")
        if not {linear for linear, _ in self.shared + self.tokens} <= set(self.hooked) or not {
                kind for _, kind in self.tokens} <= set(TOKEN_KINDS):
            raise ValueError(f"inconsistent linears (shared inputs and token kinds name hooked linears): {self}")

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
        """The ``torch.nn.Linear``'s path inside its layer (``to_out.0``, ``to_q``, ``attn.to_add_out``)."""
        return f"{linear}.0" if linear in self.indexed else linear

    def sharing(self, linear: str) -> tuple[str, ...]:
        """``linear`` and the linears that receive its input (one statistic for all of them)."""
        return (linear, *dict(self.shared).get(linear, ()))

    @property
    def trained(self) -> tuple[tuple[str, str], ...]:
        """Every linear a null-space constraint can train, with the hooked linear whose input (and so
        whose statistic) it takes: each hooked linear, then those that share its input
        (:meth:`sharing`), in hook order. A joint block's ``attn.to_k`` takes ``attn.to_q``'s."""
        return tuple((other, linear) for linear in self.hooked for other in self.sharing(linear))

    def constraint_key(self, layer: str, linear: str) -> str:
        """The key of the statistic (and projection) that constrains ``linear`` (one of :attr:`trained`) of
        ``layer``: :data:`TEXT_KEY` for a text linear (in the text file), else the step files'
        :func:`statistic_key` of the hooked linear whose input it shares."""
        source = dict(self.trained).get(linear)
        if source is None:
            raise ValueError(f"{linear!r} is none of the linears {[name for name, _ in self.trained]}")
        return TEXT_KEY if source in self.text else statistic_key(layer, source)

    def token_kind(self, linear: str) -> str:
        """Which tokens the rows of ``linear``'s input are (:data:`TOKEN_KINDS`)."""
        return dict(self.tokens).get(linear, "image")

    def chosen(self, selection) -> list[str]:
        """The hooked linears ``selection`` names, by their own name or their ``collect_features``
        name, in hook order."""
        feature = {linear: name for name, linear in self.features}
        return [linear for linear in self.hooked if linear in selection or feature[linear] in selection]

    def collects_text(self, collect_features: dict) -> bool:
        """Whether ``collect_features`` asks for a text linear (the text states are collected)."""
        return any(collect_features[feature] for feature, linear in self.features if linear in self.text)

    def step_linears(self, collect_features: dict) -> list[str]:
        """The per-step linears ``collect_features`` asks for, in hook order."""
        feature = {linear: name for name, linear in self.features}
        return [linear for linear in self.per_step if collect_features[feature[linear]]]


#: The UNet cross-attention linears (``attn2``) the UNet families hook.
CROSS_ATTENTION = Linears(
    hooked=("to_q", "to_k", "to_v", "to_out"),
    text=("to_k", "to_v"),
    features=(("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("out", "to_out")),
    indexed=("to_out",),
)


#: The linears of an MMDiT joint block (SD3's ``JointTransformerBlock``, FLUX's
#: ``FluxTransformerBlock``), paths relative to the block. Each stream is one statistic, keyed by its
#: first linear: the image stream's input (``attn.to_q``, shared by ``to_k``/``to_v``), the text
#: stream's (``attn.add_q_proj``, shared by ``add_k_proj``/``add_v_proj``), and the image and text
#: rows of the joint attention's output (``attn.to_out.0``, ``attn.to_add_out``; a
#: ``context_pre_only`` block has no ``to_add_out``). SD3.5's ``attn2``, in the blocks its
#: ``dual_attention_layers`` lists, is an image-only self-attention (never cross-attention, whatever
#: its name): its input (``attn2.to_q``, shared by ``attn2.to_k``/``to_v``: ``norm1``'s second AdaLN
#: output of the image tokens) and its output projection's (``attn2.to_out.0``) are the streams
#: ``image_self`` and ``image_self_out``, only on request; blocks without ``attn2`` have neither. Every
#: stream changes with the step: the text stream too (AdaLN on the timestep, and the joint attention
#: updates the text tokens).
JOINT_ATTENTION = Linears(
    hooked=("attn.to_q", "attn.add_q_proj", "attn.to_out", "attn.to_add_out", "attn2.to_q", "attn2.to_out"),
    text=(),
    features=(("image", "attn.to_q"), ("text", "attn.add_q_proj"), ("image_out", "attn.to_out"),
              ("text_out", "attn.to_add_out"), ("image_self", "attn2.to_q"), ("image_self_out", "attn2.to_out")),
    indexed=("attn.to_out", "attn2.to_out"),
    shared=(("attn.to_q", ("attn.to_k", "attn.to_v")), ("attn.add_q_proj", ("attn.add_k_proj", "attn.add_v_proj")),
            ("attn2.to_q", ("attn2.to_k", "attn2.to_v"))),
    tokens=(("attn.add_q_proj", "text"), ("attn.to_add_out", "text")),
)
#: The linears of a FLUX single block (``FluxSingleTransformerBlock``): ``attn.to_q``'s input (shared
#: by ``to_k``/``to_v`` and ``proj_mlp``) over the concatenated text and image tokens, kept together
#: in one statistic (the block's weights act on both alike, so a constraint on them needs the union;
#: ``text_tokens`` still drops the text padding rows), and ``proj_out``'s (``cat(attention, mlp)``,
#: 15,360 wide at FLUX.1 size: collected only on request).
SINGLE_BLOCK = Linears(
    hooked=("attn.to_q", "proj_out"),
    text=(),
    features=(("single", "attn.to_q"), ("single_out", "proj_out")),
    shared=(("attn.to_q", ("attn.to_k", "attn.to_v", "proj_mlp")),),
    tokens=(("attn.to_q", "text+image"), ("proj_out", "text+image")),
)
#: The streams a transformer family collects when the config names none (``proj_out``, SD3.5's ``attn2``
#: and the text path only on request).
DEFAULT_STREAMS = ("image", "text", "image_out", "text_out", "single")
#: An MMDiT transformer's timestep-independent text path: stream -> the module path (inside the
#: transformer) of the linear whose input it is, which is also the key of its statistic in the text
#: file (``text.h5``, collected once per prompt, no step). ``context``: ``context_embedder``, whose
#: input is the text sequence ``encode_prompt`` gives (FLUX: the T5 states; SD3: the joint CLIP+T5
#: ``prompt_embeds``); ``pooled``: the pooled-text projection ``time_text_embed.text_embedder.linear_1``
#: (the pooled CLIP projections, one row per prompt). Both come from the text encoders alone: a run
#: that selects no other stream loads no transformer and runs no sampler. Only on request.
TEXT_PATH = (("context", "context_embedder"), ("pooled", "time_text_embed.text_embedder.linear_1"))
#: Every stream name a transformer family knows: the blocks' (one statistic per step) and the text path's.
STREAMS = tuple(name for linears in (JOINT_ATTENTION, SINGLE_BLOCK) for name, _ in linears.features) + tuple(
    name for name, _ in TEXT_PATH)


def step_streams(streams) -> list[str]:
    """The streams among ``streams`` that are one statistic per step (the blocks' inputs), in config order."""
    path = dict(TEXT_PATH)
    return [stream for stream in streams if stream not in path]


def text_path_keys(streams) -> list[str]:
    """The text-file keys (module paths, :data:`TEXT_PATH`) of the text-path streams among ``streams``,
    in :data:`TEXT_PATH` order."""
    return [key for stream, key in TEXT_PATH if stream in streams]


@dataclass(frozen=True)
class LayerKind:
    """One kind of hooked layer: where the layers are, and their :class:`Linears`.

    ``container``: the module list whose entries are the layers (``transformer_blocks``: the layer
    ``transformer_blocks.0`` is a block, its linears' paths are relative to it); ``""``: a UNet's
    cross-attention modules (``is_cross_attention``), wherever they are.
    """

    container: str
    linears: Linears

    def holds(self, layer: str) -> bool:
        """Whether ``layer`` (a module path) is one of this kind's layers."""
        return not self.container or layer.rpartition(".")[0] == self.container


#: The one layer kind of every UNet family.
UNET_LAYERS = (LayerKind("", CROSS_ATTENTION),)
#: SD3's and FLUX's layer kinds (SD3 has no single blocks: that kind then has no layers).
MMDIT_LAYERS = (LayerKind("transformer_blocks", JOINT_ATTENTION), LayerKind("single_transformer_blocks", SINGLE_BLOCK))


def layer_linears(layer: str) -> Linears:
    """The :class:`Linears` of the hooked layer at module path ``layer``, in any family: an SD3/FLUX
    transformer block's kind (:data:`MMDIT_LAYERS`), else a UNet's cross-attention
    (:data:`CROSS_ATTENTION`)."""
    for kind in MMDIT_LAYERS:
        if kind.holds(layer):
            return kind.linears
    return CROSS_ATTENTION


class UnsupportedModelError(ValueError):
    """The model is not one of the families nullcov can collect statistics for."""


@dataclass(frozen=True)
class Family:
    """What a model's pipeline does differently (see the module docstring)."""

    name: str  # sd1, sd2, sdxl, lcm, sd3 or flux
    pipeline: str
    tokenizers: tuple[str, ...]
    text_encoders: tuple[str, ...]
    text_dim: int  # width of the text states (every attn2 to_k / to_v; a transformer's context_embedder)
    guidance: str  # "cfg" ([uncond, cond] batch when guidance_scale > 1), "embedding", or "none" (FLUX schnell)
    added_conditioning: str | None  # the UNet's addition_embed_type (SDXL: "text_time"); MMDiT: "pooled_projections"
    prediction_type: str  # a UNet scheduler's, or "flow" (flow matching)
    linears: Linears  # the UNet families' one vocabulary (CROSS_ATTENTION); MMDiT: the joint blocks'
    denoiser: str = "unet"  # the pipeline component that is hooked: "unet" or "transformer"
    kinds: tuple[LayerKind, ...] = UNET_LAYERS
    #: the transformer receives the scheduler's timestep divided by this (FLUX: 1000, t = 1000 sigma)
    timestep_divisor: float = 1.0

    def linears_of(self, layer: str) -> Linears:
        """The :class:`Linears` of the layer at module path ``layer``."""
        return kind_of(self.kinds, layer).linears


def kind_of(kinds: tuple[LayerKind, ...], layer: str) -> LayerKind:
    """The kind among ``kinds`` that holds ``layer``."""
    for kind in kinds:
        if kind.holds(layer):
            return kind
    raise ValueError(f"layer {layer!r} is none of {[kind.container for kind in kinds]}")


def _read_json(path: Path) -> dict:
    try:
        return read_json(path)
    except FileNotFoundError:
        raise UnsupportedModelError(
            f"model folder {str(path.parent)!r} lacks {path.name}{see('model-folder-lacks-a-file')}"
        ) from None


def check_supported(model_dir: str | Path) -> dict:
    """Refuse a model of an unknown pipeline (a transformer of a pipeline other than SD3's and FLUX's
    among them); return its model index."""
    model_dir = Path(model_dir)
    index = _read_json(model_dir / "model_index.json")
    pipeline = index.get("_class_name")
    if pipeline not in PIPELINES and "unet" not in index and "transformer" in index:
        raise UnsupportedModelError(
            f"model {str(model_dir)!r} is a {pipeline} with a transformer and no UNet cross-attention, and not "
            f"one of the transformer pipelines nullcov knows ({', '.join(TRANSFORMER_PIPELINES)}). "
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


def _components(model_dir: Path, index: dict, pipeline: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The tokenizers and text encoders the folder has; refuse a required one that is missing."""
    tokenizers, encoders = PIPELINES[pipeline]
    optional = OPTIONAL_COMPONENTS.get(pipeline, ())
    present = [name for name in tokenizers + encoders if index.get(name) and index[name][0] is not None]
    missing = [name for name in tokenizers + encoders if name not in present and name not in optional]
    if missing:
        raise UnsupportedModelError(f"model {str(model_dir)!r}: {pipeline} without {missing} in model_index.json"
                                    f"{see('model-family-not-supported')}")
    half = [name for name in optional if name not in present]
    if half and len(half) != len(optional):
        raise UnsupportedModelError(f"model {str(model_dir)!r}: {pipeline} has {sorted(set(optional) - set(half))} "
                                    f"but not {half} in model_index.json: give both or neither"
                                    f"{see('model-family-not-supported')}")
    return (tuple(name for name in tokenizers if name in present), tuple(name for name in encoders if name in present))


def model_family(model_dir: str | Path) -> Family:
    """The :class:`Family` of a diffusers model folder, from its JSON files."""
    model_dir = Path(model_dir)
    index = check_supported(model_dir)
    pipeline = index["_class_name"]
    tokenizers, encoders = _components(model_dir, index, pipeline)
    scheduler = _read_json(model_dir / "scheduler" / "scheduler_config.json")
    if pipeline in TRANSFORMER_PIPELINES:
        return _transformer_family(model_dir, pipeline, tokenizers, encoders)
    unet = _read_json(model_dir / "unet" / "config.json")
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


def _transformer_family(model_dir: Path, pipeline: str, tokenizers, encoders) -> Family:
    """SD3 (``StableDiffusion3Pipeline``: a ``[uncond, cond]`` CFG batch) or FLUX (``FluxPipeline``: a
    guidance embedding (dev), or none (schnell); ``true_cfg_scale`` adds a separate negative call)."""
    transformer = _read_json(model_dir / "transformer" / "config.json")
    flux = pipeline == "FluxPipeline"
    guidance = ("embedding" if transformer.get("guidance_embeds") else "none") if flux else "cfg"
    return Family(
        name="flux" if flux else "sd3",
        pipeline=pipeline,
        tokenizers=tokenizers,
        text_encoders=encoders,
        text_dim=int(transformer["joint_attention_dim"]),
        guidance=guidance,
        added_conditioning="pooled_projections",
        prediction_type="flow",
        linears=JOINT_ATTENTION,
        denoiser="transformer",
        kinds=MMDIT_LAYERS,
        timestep_divisor=1000.0 if flux else 1.0,
    )
