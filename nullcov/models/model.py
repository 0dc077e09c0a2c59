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

from nullcov.docs import see
from nullcov.files import read_json
from nullcov.models.family import CROSS_ATTENTION, statistic_key

BUILTIN_TINY = "builtin:tiny"
BUILTIN_TINY_DIR = "resources/models/tiny-sd"
#: Built-in tiny models: spec -> (family of :mod:`nullcov.models.tiny_model`, folder the workflow builds).
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    BUILTIN_TINY: ("sd1", BUILTIN_TINY_DIR),
    "builtin:tiny-sd2": ("sd2", "resources/models/tiny-sd2"),
    "builtin:tiny-sdxl": ("sdxl", "resources/models/tiny-sdxl"),
    "builtin:tiny-lcm": ("lcm", "resources/models/tiny-lcm"),
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
    """A diffusers folder of a supported family (SD3/FLUX and unknown pipelines are refused)."""
    from nullcov.models.family import UnsupportedModelError, check_supported

    if not (path / "model_index.json").is_file():
        raise ModelError(f"model folder {str(path)!r} lacks model_index.json: not a diffusers Stable Diffusion folder"
                         f"{see('model-folder-lacks-a-file')}")
    try:
        check_supported(path)
    except UnsupportedModelError as err:
        raise ModelError(str(err)) from None
    for required in ("unet/config.json", "scheduler/scheduler_config.json"):
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
    if text_only:
        skipped |= {"unet": None, "vae": None, "scheduler": None}
    pipe = DiffusionPipeline.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), local_files_only=True, use_safetensors=True, **skipped
    )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_resolution(pipe, configured: int | None) -> int:
    """Image side in pixels: ``configured`` (config key ``resolution``), or the model's native size
    (``unet.config.sample_size x vae_scale_factor``) when it is None."""
    return configured or pipe.unet.config.sample_size * pipe.vae_scale_factor


def cross_attention_modules(unet) -> list[tuple[str, object]]:
    """Every cross-attention module of the UNet (``is_cross_attention``), in module order."""
    return [(name, module) for name, module in unet.named_modules() if getattr(module, "is_cross_attention", False)]


def hooked_linear(attention, linear: str):
    """The ``torch.nn.Linear`` that :data:`nullcov.models.family.CROSS_ATTENTION` names ``linear`` in an
    attention module (``to_out`` is ``to_out[0]``, the projection; ``to_out[1]`` is dropout)."""
    module = getattr(attention, linear)
    return module[0] if linear in CROSS_ATTENTION.indexed else module


def linear_dims(layers, linears) -> dict[str, int]:
    """``{statistic_key(layer, linear): input width}`` of the per-step linears
    (:attr:`~nullcov.models.family.Linears.per_step`) among ``linears``, for the ``(name, attention
    module)`` pairs ``layers``, in layer order."""
    return {statistic_key(name, linear): int(hooked_linear(module, linear).in_features)
            for name, module in layers for linear in CROSS_ATTENTION.per_step if linear in linears}


def cross_attention_layer_names(model_dir: str | Path) -> list[str]:
    """The UNet's cross-attention module names from its config alone (meta device: no weights read)."""
    import torch
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(Path(model_dir) / "unet", local_files_only=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return [name for name, _ in cross_attention_modules(unet)]


def select_layers(available: list[str], selection) -> list[str]:
    """Resolve ``cross_attention_layers`` (``all``, indices into ``available``, or module names)."""
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
