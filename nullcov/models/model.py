"""Locating and loading a Stable Diffusion model, and naming its cross-attention layers and their linears.

``model`` in the config is ``builtin:shapes`` (the trained toy model shipped in
``nullcov/builtin/shapes``, see :mod:`nullcov.shapes.train`), a built-in random tiny model
(``builtin:tiny``, ``builtin:tiny-sd2``, ``builtin:tiny-sdxl``, ``builtin:tiny-lcm``: built by the
workflow into ``resources/``), a local diffusers folder, or a hub id that must already be in the
local Hugging Face cache (``HF_HOME`` is honoured). Nothing here ever contacts the hub: every load
is ``local_files_only`` and weights are read from safetensors only. A folder with a ``SHA256SUMS``
manifest (the shipped model has one) is checked against it before use.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import NamedTuple

from nullcov.docs import see
from nullcov.files import read_json
from nullcov.models.family import (
    CROSS_ATTENTION,
    MMDIT_LAYERS,
    OPTIONAL_COMPONENTS,
    TEXT_PATH,
    UNET_LAYERS,
    LayerKind,
    Linears,
    kind_of,
    statistic_key,
)
from nullcov.models.mmdit_dims import CLASSES as TRANSFORMER_CLASSES

BUILTIN_TINY = "builtin:tiny"
BUILTIN_TINY_DIR = "resources/models/tiny-sd"
#: Built-in tiny models: spec -> (family of :mod:`nullcov.models.tiny_model`, folder the workflow builds).
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    BUILTIN_TINY: ("sd1", BUILTIN_TINY_DIR),
    "builtin:tiny-sd2": ("sd2", "resources/models/tiny-sd2"),
    "builtin:tiny-sdxl": ("sdxl", "resources/models/tiny-sdxl"),
    "builtin:tiny-lcm": ("lcm", "resources/models/tiny-lcm"),
    "builtin:tiny-sd3": ("sd3", "resources/models/tiny-sd3"),
    "builtin:tiny-sd35": ("sd35", "resources/models/tiny-sd35"),
    "builtin:tiny-flux": ("flux", "resources/models/tiny-flux"),
    "builtin:tiny-flux-schnell": ("flux-schnell", "resources/models/tiny-flux-schnell"),
}
#: The trained toy model, shipped with the package (loaded like any local folder).
BUILTIN_SHAPES = "builtin:shapes"
BUILTIN_SHAPES_DIR = Path(__file__).resolve().parent.parent / "builtin" / "shapes"
#: ``sha256sum -c`` manifest a model folder may carry; nullcov checks it before using the folder.
MANIFEST = "SHA256SUMS"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelError(ValueError):
    """The configured model cannot be found or is not a Stable Diffusion folder."""


def workflow_path(model_dir: Path) -> Path:
    """The model folder as the workflow's rules name it (inputs, params): the shipped model relative to
    the working directory, like the workflow's other inputs, so that a checkout copied or moved with its
    ``results/`` (rsync to a cluster's scratch) plans nothing new; any other folder as it was given."""
    if Path(model_dir).resolve() == BUILTIN_SHAPES_DIR:
        return Path(os.path.relpath(BUILTIN_SHAPES_DIR))
    return Path(model_dir)


def resolve_model_dir(spec: str) -> Path:
    """The folder holding the model (a built-in one may not be built yet)."""
    if spec in BUILTIN_MODELS:
        return Path(BUILTIN_MODELS[spec][1])
    if spec == BUILTIN_SHAPES:
        check_model_dir(BUILTIN_SHAPES_DIR)
        return BUILTIN_SHAPES_DIR
    if spec.startswith("builtin:"):
        names = ", ".join([BUILTIN_SHAPES, *BUILTIN_MODELS])
        raise ModelError(f"model {spec!r} is not a built-in model; built-in models: {names}"
                         f"{see('unknown-built-in-model')}")
    path = Path(spec).expanduser()
    if path.exists():
        check_model_dir(path)
        return path
    if _HUB_ID.fullmatch(spec):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            path = Path(snapshot_download(spec, local_files_only=True))
        except LocalEntryNotFoundError:
            raise ModelError(
                f"model {spec!r} is not a local folder and not in the local Hugging Face cache "
                "(HF_HOME); nullcov never downloads: fetch it first with "
                f"`huggingface-cli download {spec}` on a machine with internet"
                f"{see('model-not-in-the-local-hugging-face-cache')}"
            ) from None
        check_model_dir(path)
        return path
    raise ModelError(f"model {spec!r}: no such folder (and not a hub id of the form owner/name)"
                     f"{see('model-folder-does-not-exist')}")


def check_model_dir(path: Path) -> None:
    """A diffusers folder of a supported family (unknown pipelines are refused)."""
    from nullcov.models.family import UnsupportedModelError, check_supported

    if not (path / "model_index.json").is_file():
        raise ModelError(f"model folder {str(path)!r} lacks model_index.json: not a diffusers Stable Diffusion folder"
                         f"{see('model-folder-lacks-a-file')}")
    try:
        index = check_supported(path)
    except UnsupportedModelError as err:
        raise ModelError(str(err)) from None
    denoiser = "transformer" if "unet" not in index and "transformer" in index else "unet"
    for required in (f"{denoiser}/config.json", "scheduler/scheduler_config.json"):
        if not (path / required).is_file():
            raise ModelError(f"model folder {str(path)!r} lacks {required}: not a diffusers Stable Diffusion folder"
                             f"{see('model-folder-lacks-a-file')}")
    if (path / MANIFEST).is_file():
        check_manifest(path)


def check_manifest(path: Path) -> None:
    """Every file the folder's ``SHA256SUMS`` lists exists with that hash; else refuse, naming the file
    (and, for the shipped model, the command that retrains it)."""
    path = Path(path)
    fix = (
        "retrain it with `make train-shapes` (or restore it: `git checkout -- nullcov/builtin/shapes`)"
        if path.resolve() == BUILTIN_SHAPES_DIR
        else f"restore the folder's files, or delete {MANIFEST} if the change is intended"
    )
    for number, line in enumerate((path / MANIFEST).read_text().splitlines(), start=1):
        digest, _, name = line.partition("  ")
        if not name or len(digest) != 64:
            raise ModelError(f"{path / MANIFEST}: line {number} is not '<sha256>  <file>': {line!r}"
                             f"{see('model-file-does-not-match-sha256sums')}")
        member = path / name
        if not member.is_file():
            raise ModelError(f"model folder {str(path)!r}: {name} is listed in {MANIFEST} but missing; {fix}"
                             f"{see('model-file-does-not-match-sha256sums')}")
        if hashlib.sha256(member.read_bytes()).hexdigest() != digest:
            raise ModelError(
                f"model folder {str(path)!r}: {name} does not match its sha256 in {MANIFEST} (changed or "
                f"truncated); {fix}{see('model-file-does-not-match-sha256sums')}"
            )


def scheduler_config(spec: str) -> dict:
    """The model's scheduler config, read without importing torch or diffusers."""
    if spec in BUILTIN_MODELS:
        from nullcov.models.tiny_model import SCHEDULER_CONFIGS

        return dict(SCHEDULER_CONFIGS[BUILTIN_MODELS[spec][0]])
    return read_json(resolve_model_dir(spec) / "scheduler" / "scheduler_config.json")


def load_pipeline(model_dir: str | Path, dtype: str, device: str, text_only: bool = False):
    """The model's own diffusers pipeline (the class its ``model_index.json`` names), from a local
    folder, offline, safetensors only. ``text_only``: tokenizers and text encoders only (no UNet,
    VAE or scheduler is loaded; ``encode_prompt`` works, calling the pipeline does not)."""
    import torch
    from diffusers import DiffusionPipeline

    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    index = read_json(model_dir / "model_index.json")
    skipped = {}
    if "safety_checker" in index:
        skipped |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if "image_encoder" in index:
        skipped["image_encoder"] = None
    for name in OPTIONAL_COMPONENTS.get(index.get("_class_name"), ()):  # SD3 without T5: passed as None
        if not index.get(name) or index[name][0] is None:
            skipped[name] = None
    if text_only:
        skipped |= {denoiser_name(index): None, "vae": None, "scheduler": None}
    pipe = DiffusionPipeline.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), local_files_only=True, use_safetensors=True, **skipped
    )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if text_only and denoiser_name(index) == "transformer":
        pipe.transformer = TransformerConfigOnly(read_json(model_dir / "transformer" / "config.json"))
    if isinstance(getattr(pipe, "transformer", None), _module_class()):
        check_unfused(pipe.transformer)
    return pipe


class TransformerConfigOnly:
    """A text-only SD3/FLUX pipeline's stand-in for its transformer: the config, no weights, no module.

    SD3's ``encode_prompt`` reads ``transformer.config.joint_attention_dim`` when the model has no T5
    (its T5 part of the text sequence is then zeros of that width); nothing else of the transformer is
    used to encode a prompt. Calling it fails, naming what it is.
    """

    def __init__(self, config: dict):
        from diffusers.configuration_utils import FrozenDict

        self.config = FrozenDict(config)

    def __call__(self, *args, **kwargs):
        raise RuntimeError("this pipeline was loaded text-only (load_pipeline(text_only=True)): it has the "
                           "transformer's config but not its weights; load it without text_only to sample")


def _module_class():
    import torch

    return torch.nn.Module


def denoiser_name(index: dict) -> str:
    """The pipeline component that denoises (the one nullcov hooks): ``unet`` or ``transformer``."""
    return "transformer" if "unet" not in index and "transformer" in index else "unet"


def denoiser(pipe):
    """The pipeline's UNet, or its transformer (SD3, FLUX)."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


FUSED = ("to_qkv", "to_added_qkv", "to_kv")


def check_unfused(transformer) -> None:
    """Refuse a transformer whose attention runs fused projections (``fuse_qkv_projections``: ``to_qkv``,
    ``to_added_qkv``): its ``to_q``/``add_q_proj`` never run, so their inputs cannot be observed."""
    linear = _linear_class()
    fused = [f"{name}.{attribute}" for name, module in transformer.named_modules() for attribute in FUSED
             if isinstance(getattr(module, attribute, None), linear)]
    fused += [f"{name} (fused_projections)" for name, module in transformer.named_modules()
              if getattr(module, "fused_projections", False) is True
              and not any(isinstance(getattr(module, attribute, None), linear) for attribute in FUSED)]
    if fused:
        raise ModelError(
            f"the transformer runs fused QKV projections ({fused[0]}"
            + (f" and {len(fused) - 1} more" if len(fused) > 1 else "")
            + "): the inputs of to_q/to_k/to_v and add_q_proj/add_k_proj/add_v_proj are not observable. "
            "Unfuse them first (pipe.transformer.unfuse_qkv_projections(), or pipe.unfuse_qkv_projections()), "
            f"or save the model without fusing{see('transformer-runs-fused-qkv-projections')}"
        )


def _linear_class():
    import torch

    return torch.nn.Linear


def image_resolution(pipe, configured: int | None) -> int:
    """Image side in pixels: ``configured`` (config key ``resolution``), or the model's native size
    (``unet.config.sample_size x vae_scale_factor``; a transformer's ``sample_size`` likewise, FLUX's
    pipeline default 128 x ``vae_scale_factor``) when it is None."""
    if configured:
        return configured
    if getattr(pipe, "unet", None) is None and type(pipe).__name__ == "FluxPipeline":
        return pipe.default_sample_size * pipe.vae_scale_factor
    return denoiser(pipe).config.sample_size * pipe.vae_scale_factor


def image_sequence_length(pipeline: str, transformer_config, vae_scale_factor: int, resolution: int) -> int:
    """The number of image tokens the transformer sees at ``resolution`` pixels square (FLUX: 2x2 latent
    patches; SD3: ``patch_size``), as the pipelines compute it for their dynamic shift."""
    latent = resolution // vae_scale_factor
    if pipeline == "FluxPipeline":
        latent = 2 * (resolution // (vae_scale_factor * 2))
        return (latent // 2) * (latent // 2)
    patch = int(transformer_config["patch_size"])
    return (latent // patch) * (latent // patch)


def cross_attention_modules(unet) -> list[tuple[str, object]]:
    """Every cross-attention module of the UNet (``is_cross_attention``), in module order."""
    return [(name, module) for name, module in unet.named_modules() if getattr(module, "is_cross_attention", False)]


def hooked_linear(layer, linear: str, vocabulary: Linears = CROSS_ATTENTION):
    """The ``torch.nn.Linear`` that ``vocabulary`` names ``linear`` in a layer (a path, dotted for a
    transformer block's ``attn.to_q``; ``to_out`` is ``to_out[0]``, the projection; ``to_out[1]`` is
    dropout), or None when the layer lacks it (a ``context_pre_only`` block's ``attn.to_add_out``)."""
    return module_at(layer, vocabulary.module_path(linear))


def module_at(root, path: str):
    """The submodule at the dotted ``path`` inside ``root`` (a digit indexes a module list), or None."""
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part, None)
        if module is None:
            return None
    return module


def _vocabulary(vocabulary):
    """``vocabulary`` as a function of the layer name: a :class:`~nullcov.models.family.Linears` serves every
    layer; a :class:`~nullcov.models.family.Family` (or anything with ``linears_of``) names each layer's."""
    if isinstance(vocabulary, Linears):
        return lambda name: vocabulary
    return vocabulary.linears_of


def layer_linears(layers, selection, vocabulary=CROSS_ATTENTION) -> list[tuple[str, object, Linears, list[str]]]:
    """Per ``(name, layer module)`` of ``layers``: its :class:`~nullcov.models.family.Linears` and the
    per-step linears ``selection`` names (own or ``collect_features`` names) that the layer has."""
    of = _vocabulary(vocabulary)
    chosen = []
    for name, module in layers:
        linears = of(name)
        present = [linear for linear in linears.chosen(selection)
                   if linear in linears.per_step and hooked_linear(module, linear, linears) is not None]
        chosen.append((name, module, linears, present))
    return chosen


def linear_dims(layers, linears, vocabulary=CROSS_ATTENTION) -> dict[str, int]:
    """``{statistic_key(layer, linear): input width}`` of the per-step linears
    (:attr:`~nullcov.models.family.Linears.per_step`) among ``linears``, for the ``(name, layer
    module)`` pairs ``layers``, in layer order. ``vocabulary``: the layers' ``Linears`` (one for all),
    or a ``Family`` (each layer's kind's)."""
    return {statistic_key(name, linear): int(hooked_linear(module, linear, vocab).in_features)
            for name, module, vocab, chosen in layer_linears(layers, linears, vocabulary) for linear in chosen}


def transformer_layers(transformer, kinds) -> list[tuple[str, object]]:
    """Every block of a transformer that ``kinds`` (:data:`nullcov.models.family.MMDIT_LAYERS`) hooks, in
    module order: ``transformer_blocks.<i>``, then ``single_transformer_blocks.<i>``."""
    layers = []
    for kind in kinds:
        for index, block in enumerate(getattr(transformer, kind.container, None) or ()):
            layers.append((f"{kind.container}.{index}", block))
    return layers


#: Module-name prefixes a peft wrapper (``get_peft_model``) puts before the wrapped model's own names.
PEFT_PREFIXES = ("base_model.model.",)


def _strip_peft_prefix(name: str) -> str:
    for prefix in PEFT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def layer_kinds(model) -> tuple[LayerKind, ...]:
    """The :class:`~nullcov.models.family.LayerKind` s of a denoiser module (a peft model: of the model it
    wraps): :data:`~nullcov.models.family.MMDIT_LAYERS` for an SD3/FLUX transformer, else
    :data:`~nullcov.models.family.UNET_LAYERS`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return MMDIT_LAYERS if type(base).__name__ in TRANSFORMER_CLASSES else UNET_LAYERS


class LinearSite(NamedTuple):
    """One linear a null-space constraint can train, and the statistic whose projection constrains it.

    ``layer``: the hooked layer's module path (``""`` for a transformer's text path); ``linear``: the
    linear's name in its layer's :class:`~nullcov.models.family.Linears` (a text-path linear: its module
    path); ``name``: its module path in the denoiser; ``key``: the key of its projection, in the step
    files or (``text``) in the text file; ``module``: the module there (a ``torch.nn.Linear``, or the peft
    wrapper around one)."""

    layer: str
    linear: str
    name: str
    key: str
    text: bool
    module: object


def constrained_linears(model) -> list[LinearSite]:
    """Every linear of a denoiser that a null-space constraint can train, in module order.

    A UNet (:data:`~nullcov.models.family.UNET_LAYERS`): ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of
    every cross-attention module, ``to_k``/``to_v`` constrained by the text projection (``TEXT_KEY``). An
    SD3/FLUX transformer: every linear of each block's streams and every linear sharing a stream's input
    (:attr:`~nullcov.models.family.Linears.trained`: ``attn.to_k``/``to_v`` take ``attn.to_q``'s
    projection, a FLUX single block's ``proj_mlp`` too), those a block lacks skipped (SD3's last
    ``attn.to_add_out``, ``attn2`` outside SD3.5's dual-attention blocks); then the text path
    (:data:`~nullcov.models.family.TEXT_PATH`: ``context_embedder``, the pooled-text projection), each
    constrained by its own projection in the text file. ``model`` may be a peft model wrapping either.
    """
    kinds = layer_kinds(model)
    if kinds == UNET_LAYERS:
        layers = [(_strip_peft_prefix(name), module) for name, module in cross_attention_modules(model)]
    else:
        layers = transformer_layers(model, kinds)
    sites = []
    for layer, module in layers:
        linears = kind_of(kinds, layer).linears
        for linear, _ in linears.trained:
            found = hooked_linear(module, linear, linears)
            if found is not None:
                key = linears.constraint_key(layer, linear)
                sites.append(LinearSite(layer, linear, f"{layer}.{linears.module_path(linear)}", key,
                                        linear in linears.text, found))
    if kinds != UNET_LAYERS:
        for _, path in TEXT_PATH:
            found = module_at(model, path)
            if found is not None:
                sites.append(LinearSite("", path, path, path, True, found))
    return sites


def transformer_layer_names(model_dir: str | Path) -> list[str]:
    """The transformer's block names from its config alone (meta device: no weights read)."""
    import diffusers
    import torch

    from nullcov.models.family import MMDIT_LAYERS

    folder = Path(model_dir) / "transformer"
    config = read_json(folder / "config.json")
    cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        transformer = cls.from_config(cls.load_config(folder, local_files_only=True))
    return [name for name, _ in transformer_layers(transformer, MMDIT_LAYERS)]


def cross_attention_layer_names(model_dir: str | Path) -> list[str]:
    """The UNet's cross-attention module names from its config alone (meta device: no weights read)."""
    import torch
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(Path(model_dir) / "unet", local_files_only=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return [name for name, _ in cross_attention_modules(unet)]


def select_layers(available: list[str], selection) -> list[str]:
    """Resolve ``cross_attention_layers`` (``all``, indices into ``available``, or module names): a
    UNet's cross-attention modules, a transformer's blocks (:func:`transformer_layers`)."""
    if selection == "all":
        return list(available)
    listing = ", ".join(f"{i}={n}" for i, n in enumerate(available))
    chosen = []
    for item in selection:
        if isinstance(item, int) and not isinstance(item, bool):
            if not 0 <= item < len(available):
                raise ModelError(
                    f"cross_attention_layers: index {item} is out of range; the model has {len(available)} "
                    f"cross-attention layers: {listing}{see('unknown-cross-attention-layer')}"
                )
            chosen.append(available[item])
        elif item in available:
            chosen.append(item)
        else:
            raise ModelError(f"cross_attention_layers: the model has no cross-attention layer {item!r}; "
                             f"it has: {listing}{see('unknown-cross-attention-layer')}")
    duplicated = sorted({name for name in chosen if chosen.count(name) > 1})
    if duplicated:
        raise ModelError(f"cross_attention_layers names {duplicated} more than once"
                         f"{see('unknown-cross-attention-layer')}")
    return chosen
