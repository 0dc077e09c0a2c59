"""Model dims, memory per job and the run plan, from configs alone: before any GPU work.

The dims of every hooked linear come from the UNet's ``config.json`` through a UNet built on
the meta device (no weights read, no memory), cached as JSON under ``resources/cache/`` (the
Snakefile needs them at parse time and cluster jobs re-parse it; importing diffusers costs
seconds, the cache milliseconds). From them: the bytes of one step's statistics, what a feature
job holds in host memory for ``k`` steps at once, how many steps fit a job's ``mem_mb`` (the job
then collects its steps in chunks, see :func:`step_chunks`), every rule's ``mem_mb``, and the
run plan (:func:`run_plan`, :func:`format_plan`; rule ``plan``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from nullcov.collection.memory import (
    MIB,
    feature_job_bytes,
    mem_mb,
    statistics_bytes,
    step_chunks,
    steps_per_chunk,
)
from nullcov.docs import PLANNING, see
from nullcov.files import read_json, write_json
from nullcov.measurement import human_bytes
from nullcov.models.family import CROSS_ATTENTION, TEXT_KEY, TEXT_PATH, statistic_key, text_path_keys
from nullcov.proof.plan import check_flow_proof
from nullcov.training.export import TRANSFORMER_EXPORTS

#: Host memory of a merge: the running float64 sum, one shard being read and validated, and the
#: result (nullcov.statistics.merge, constant in the number of shards), plus the interpreter.
MERGE_STEPS = 3
#: Host memory of a projection job, which reads its step file one statistic at a time
#: (:func:`nullcov.statistics.jobs.projection_job`): every ``P`` it keeps (float32: half the
#: statistics' float64 bytes), and one statistic's working set: the statistic, its symmetrised copy,
#: the eigenvectors, ``P`` in float64 and LAPACK's workspace, counted as this many matrices of it.
PROJECTION_WORKSPACE_MATRICES = 5
#: Interpreter with numpy, h5py and torch imported (CPU jobs).
CPU_JOB_OVERHEAD_BYTES = 512 * MIB
#: Copies of the model's weights the fine-tune proof holds beyond a feature job's need: the base
#: UNet kept, the one trained and the merged one.
FINETUNE_WEIGHT_COPIES = 3
#: SLURM ``runtime`` of a feature job (rules ``features``, ``validation_inputs``), in minutes:
#: :data:`FEATURE_JOB_BASE_MINUTES` to start and load the model, plus one minute per
#: :data:`PROMPT_TIMESTEPS_PER_MINUTE` prompt-timesteps (5 per second: half the ~10 per second
#: of a GPU, so generous), times the attempt (a retry gets double).
FEATURE_JOB_BASE_MINUTES = 15
PROMPT_TIMESTEPS_PER_MINUTE = 300
#: Steps per leakage job (rule ``leakage``, CPU: one ``eigh`` per layer/linear and step); the
#: text file rides with the last chunk.
LEAKAGE_STEPS_PER_JOB = 25
DIMS_FORMAT = 1


# -- model dims -------------------------------------------------------------------------------------
def is_transformer(model_spec: str, model_dir: str | Path) -> bool:
    """Whether the model is an MMDiT transformer (SD3, FLUX), from code for a built-in tiny model (its folder
    may not be built yet), else from ``model_index.json``."""
    from nullcov.models.model import BUILTIN_MODELS, denoiser_name
    from nullcov.models.tiny_model import TRANSFORMER_FAMILIES

    if model_spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[model_spec][0] in TRANSFORMER_FAMILIES
    return denoiser_name(read_json(Path(model_dir) / "model_index.json")) == "transformer"


#: The config keys of the report, validation, exports and proof, which read UNet statistics only.
UNET_ONLY_KEYS = {"validation_prompts": None, "attention_prompts": 0}


def check_transformer_config(config: dict, flux: bool) -> None:
    """Refuse, for an SD3/FLUX model, the parts of the workflow that do not run transformers yet
    (validation, attention maps, the NullBooth export: their values must be off; the safetensors export
    runs, :data:`nullcov.training.export.TRANSFORMER_EXPORTS`, and the fine-tune proof's training mechanics,
    :func:`nullcov.proof.plan.check_flow_proof`), and the
    feature settings its feature jobs would refuse (:func:`nullcov.collection.features.selected_streams`):
    the UNet's ``collect_features``, ``collection: noised``, ``text_tokens: eos``, ``true_cfg_scale``
    for SD3, ``unconditional_branch`` without a negative branch."""
    default_features = {feature: True for feature, _ in CROSS_ATTENTION.features}
    negative = config["true_cfg_scale"] > 1 if flux else config["guidance_scale"] > 1
    refused = [
        (config["collect_features"] != default_features, "collect_features selects a UNet's attn2 linears: select "
         f"with streams{see('collection-keys-of-another-family')}"),
        (config["collection"] != "trajectory", "collection: noised calls a UNet directly: use collection: trajectory"
         f"{see('noised-collection-needs-more-than-text')}"),
        (config["text_tokens"] == "eos", "text_tokens: eos is a UNet's option: use all or prompt"
         f"{see('text_tokens-eos-with-a-transformer')}"),
        (not flux and config["true_cfg_scale"] != 1, "true_cfg_scale is FLUX's negative call: SD3 batches its CFG "
         f"branches (guidance_scale){see('collection-keys-of-another-family')}"),
        (config["unconditional_branch"] and not negative,
         "unconditional_branch: true needs a negative branch (FLUX: true_cfg_scale > 1; SD3: guidance_scale > 1)"
         f"{see('no-unconditional-half-for-unconditional_branch')}"),
        (config["finetune_proof"] and True in config["finetune_branches"] and not negative,
         "finetune_branches includes true, which needs a negative branch (FLUX: true_cfg_scale > 1; SD3: guidance_scale"
         f" > 1); or set finetune_branches: [false]{see('fine-tune-branches-need-an-unconditional-half')}"),
    ]
    for wrong, message in refused:
        if wrong:
            raise ValueError(f"model of family {'flux' if flux else 'sd3'}: {message}")
    if config["finetune_proof"]:
        check_flow_proof(config)
    on = {key: config[key] for key, off in UNET_ONLY_KEYS.items() if config[key] != off}
    exports = [name for name in config["exports"] if name not in TRANSFORMER_EXPORTS]
    if exports:
        on["exports"] = exports
    if on:
        settings = " ".join(f"{key}={'null' if off is None else off}" for key, off in UNET_ONLY_KEYS.items()
                            if key in on)
        if exports:
            settings += f" exports='{json.dumps([name for name in config['exports'] if name not in exports])}'"
        raise ValueError(
            f"{', '.join(f'{key}: {value!r}' for key, value in on.items())}: the validation, attention maps and the "
            f"NullBooth export do not run SD3/FLUX models yet (features, merges, projections, the safetensors export "
            f"and the fine-tune proof's training do); turn them off: --config {settings.strip()}"
            f"{see('report-parts-do-not-run-transformer-families-yet')}"
        )


def check_unet_config(config: dict) -> None:
    """Refuse a transformer's selection keys (``streams``, ``true_cfg_scale``) for a UNet model."""
    from nullcov.models.family import DEFAULT_STREAMS

    if list(config["streams"]) != list(DEFAULT_STREAMS) or config["true_cfg_scale"] != 1:
        raise ValueError("streams and true_cfg_scale select a transformer's (SD3, FLUX) streams and negative call; "
                         "this model is a UNet: select with collect_features"
                         f"{see('collection-keys-of-another-family')}")


def is_flux(model_spec: str, model_dir: str | Path) -> bool:
    """Whether a transformer model is FLUX (else SD3)."""
    from nullcov.models.model import BUILTIN_MODELS

    if model_spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[model_spec][0].startswith("flux")
    return read_json(Path(model_dir) / "model_index.json")["_class_name"] == "FluxPipeline"


def transformer_config(model_spec: str, model_dir: str | Path) -> tuple[str, dict, int]:
    """``(pipeline class, transformer config, vae_scale_factor)`` of an SD3/FLUX model, from its JSON files
    (a built-in tiny model's from code)."""
    from nullcov.models.model import BUILTIN_MODELS

    if model_spec in BUILTIN_MODELS:
        from nullcov.models import tiny_model

        family = BUILTIN_MODELS[model_spec][0]
        config = tiny_model.tiny_transformer_config(family)
        cls = "FluxTransformer2DModel" if family.startswith("flux") else "SD3Transformer2DModel"
        pipeline = tiny_model.transformer_model_index(family, "")["_class_name"]
        return pipeline, {"_class_name": cls, **config}, 2 ** (len(tiny_model.TINY_TRANSFORMER_VAE_BLOCKS) - 1)
    folder = Path(model_dir)
    vae = read_json(folder / "vae" / "config.json")
    return (read_json(folder / "model_index.json")["_class_name"], read_json(folder / "transformer" / "config.json"),
            2 ** (len(vae["block_out_channels"]) - 1))


def flow_plan(model_spec: str, model_dir: str | Path, resolution: int | None) -> dict:
    """``build_schedule``'s ``flow`` for an SD3/FLUX model at ``resolution`` (None: its native size: SD3
    ``sample_size``, FLUX the pipeline's 128, times the VAE's scale factor), from configs alone."""
    from nullcov.models.model import image_sequence_length

    pipeline, config, scale = transformer_config(model_spec, model_dir)
    if resolution is None:
        resolution = (128 if pipeline == "FluxPipeline" else int(config.get("sample_size", 128))) * scale
    return {"pipeline": pipeline, "resolution": resolution,
            "image_seq_len": image_sequence_length(pipeline, config, scale, resolution)}


def transformer_dims(model_spec: str, model_dir: str | Path) -> dict:
    """``{"kind": "transformer", "layers": {block: {linear: d}}, "unet_parameters": n}`` of an SD3/FLUX
    model (a meta-device transformer from its config: no weights read): every hooked linear's input
    width per block (``context_pre_only`` blocks lack ``attn.to_add_out``)."""
    import diffusers
    import torch

    from nullcov.models.family import MMDIT_LAYERS
    from nullcov.models.model import hooked_linear, transformer_layers

    _, config, _ = transformer_config(model_spec, model_dir)
    cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        transformer = cls.from_config(config)
    layers = {}
    for name, block in transformer_layers(transformer, MMDIT_LAYERS):
        vocabulary = next(kind.linears for kind in MMDIT_LAYERS if kind.holds(name))
        layers[name] = {linear: int(module.in_features) for linear in vocabulary.hooked
                        if (module := hooked_linear(block, linear, vocabulary)) is not None}
    text = {key: int(transformer.get_submodule(key).in_features) for _, key in TEXT_PATH}
    return {"format": DIMS_FORMAT, "kind": "transformer", "layers": layers, "text": text,
            "unet_parameters": sum(p.numel() for p in transformer.parameters())}


def unet_config(model_spec: str, model_dir: str | Path) -> dict:
    """The UNet's config: a builtin tiny model's from code, else ``<model_dir>/unet/config.json``."""
    from nullcov.models.model import BUILTIN_MODELS

    if model_spec in BUILTIN_MODELS:
        from nullcov.models.tiny_model import tiny_unet_config

        return tiny_unet_config(BUILTIN_MODELS[model_spec][0])
    path = Path(model_dir) / "unet" / "config.json"
    try:
        return read_json(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"model {model_spec!r}: cannot read the UNet config {path}: {err}"
                         f"{see('unet-config-cannot-be-read')}") from None


def _meta_dims(config: dict) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from nullcov.models.model import cross_attention_modules, hooked_linear

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    # The text states' width is the first text linear's input width (to_k's; to_v's is the same).
    widths = {**{linear: linear for linear in CROSS_ATTENTION.per_step}, "text": CROSS_ATTENTION.text[0]}
    layers = {
        name: {entry: int(hooked_linear(module, linear).in_features) for entry, linear in widths.items()}
        for name, module in cross_attention_modules(unet)
    }
    return {"format": DIMS_FORMAT, "layers": layers, "unet_parameters": sum(p.numel() for p in unet.parameters())}


def model_dims(config: dict, cache_dir: str | Path | None = None) -> dict:
    """``{"layers": {module: {"to_q": d, "to_out": d, "text": d}}, "unet_parameters": n}`` for a
    UNet config, in module order; memoised under ``cache_dir`` (keyed by the config and the
    diffusers version)."""
    if cache_dir is None:
        return _meta_dims(config)
    from importlib.metadata import version

    key = hashlib.sha256(
        json.dumps([DIMS_FORMAT, version("diffusers"), config], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    path = Path(cache_dir) / f"dims-{key}.json"
    if path.exists():
        return read_json(path)
    dims = _meta_dims(config)
    write_json(path, dims, indent=1)
    return dims


def step_dims(dims: dict, layers: list[str], collect_features) -> dict[str, int]:
    """``{statistic_key(layer, linear): d}`` of the per-step keys (``to_q``, ``to_out``) of ``layers``.
    A transformer's dims (:func:`transformer_dims`): ``collect_features`` is the ``streams`` list."""
    if dims.get("kind") == "transformer":
        from nullcov.models.family import MMDIT_LAYERS, kind_of

        return {statistic_key(layer, linear): d for layer in layers for linear, d in dims["layers"][layer].items()
                if linear in kind_of(MMDIT_LAYERS, layer).linears.chosen(collect_features)}
    linears = CROSS_ATTENTION.step_linears(collect_features)
    return {statistic_key(layer, linear): dims["layers"][layer][linear] for layer in layers for linear in linears}


def text_dims(dims: dict, layers: list[str], collect_features) -> dict[str, int]:
    """``{TEXT_KEY: d}`` when ``to_k``/``to_v`` are collected (the text states, once), else ``{}``. A
    transformer's (``collect_features`` is the ``streams`` list): ``{module path: d}`` of the text-path
    streams it names (``context``, ``pooled``: :data:`~nullcov.models.family.TEXT_PATH`)."""
    if dims.get("kind") == "transformer":
        return {key: dims["text"][key] for key in text_path_keys(collect_features)}
    if not CROSS_ATTENTION.collects_text(collect_features) or not layers:
        return {}
    return {TEXT_KEY: dims["layers"][layers[0]]["text"]}


def stream_bytes(widths: dict[str, dict[str, int]], layers: list[str], num_steps: int,
                 eigh_seconds_at_3072: float) -> dict[str, dict]:
    """What each stream of a transformer costs, for the blocks ``layers`` (the text path, keyed by module
    path, whatever the blocks): ``{stream: {"keys", "widths", "files", "file_bytes", "memory_bytes",
    "total_bytes", "projection_cpu_hours"}}`` in the order of ``widths``
    (:func:`nullcov.models.mmdit_dims.stream_widths`); ``projection_cpu_hours``: the projections of its
    statistics in every file (:func:`projection_cpu_seconds`).

    ``file_bytes``: its keys' share of one merged moments file (packed float64, the store's
    :func:`~nullcov.statistics.store.moments_file_bytes` less the file's own overhead); ``memory_bytes``:
    its full float64 matrices, what a feature job holds per step; ``files``: how many such files a
    run writes (the steps; the text path: one, ``text.h5``); ``total_bytes``: ``file_bytes x files``.
    A stream the blocks lack (SD3.5's ``attn2`` outside ``dual_attention_layers``) has no keys."""
    from nullcov.models.family import TEXT_PATH
    from nullcov.statistics.store import moments_file_bytes

    text_path = {stream for stream, _ in TEXT_PATH}
    chosen = set(layers)
    rows = {}
    for stream, keys in widths.items():
        dims = keys if stream in text_path else {key: d for key, d in keys.items() if key.split("/")[0] in chosen}
        files = 1 if stream in text_path else num_steps
        file_bytes = moments_file_bytes(dims) - moments_file_bytes({}) if dims else 0
        rows[stream] = {"keys": len(dims), "widths": sorted(set(dims.values())), "files": files,
                        "file_bytes": file_bytes, "memory_bytes": statistics_bytes(dims),
                        "total_bytes": file_bytes * files,
                        "projection_cpu_hours": files * projection_cpu_seconds(dims, eigh_seconds_at_3072) / 3600}
    return rows


def stream_totals(rows: dict[str, dict], selected) -> dict[str, dict[str, int]]:
    """Bytes and projection CPU-hours of three stream choices over :func:`stream_bytes`'s ``rows``: the
    ``selected`` streams, the
    default ones (:data:`~nullcov.models.family.DEFAULT_STREAMS`) and every stream the model has: per
    step (one step file's keys, and in memory) and over the run (every step file and ``text.h5``)."""
    from nullcov.models.family import DEFAULT_STREAMS, TEXT_PATH

    text_path = {stream for stream, _ in TEXT_PATH}
    choices = {"selected": set(selected), "default": set(DEFAULT_STREAMS), "every stream": set(rows)}
    totals = {}
    for choice, streams in choices.items():
        picked = [row for stream, row in rows.items() if stream in streams]
        step = [row for stream, row in rows.items() if stream in streams and stream not in text_path]
        totals[choice] = {"step_file_bytes": sum(row["file_bytes"] for row in step),
                          "step_memory_bytes": sum(row["memory_bytes"] for row in step),
                          "total_bytes": sum(row["total_bytes"] for row in picked),
                          "projection_cpu_hours": sum(row["projection_cpu_hours"] for row in picked)}
    return totals


def replayed_calls(collection: str, chunks: list[range]) -> int:
    """UNet calls per prompt batch over all chunks: ``trajectory`` replays the sampler from the
    start to each chunk's last step; ``noised`` calls only the chunk's steps."""
    if collection == "noised":
        return sum(len(chunk) for chunk in chunks)
    return sum(chunk.stop for chunk in chunks)


def feature_job_mem_mb(step_bytes: int, num_steps: int, weights: int, max_mem_mb: int) -> int:
    """A feature job's ``mem_mb``: what it needs holding every step, at most ``max_mem_mb`` (then it
    collects in chunks), and at least what one step needs."""
    unchunked = mem_mb(feature_job_bytes(step_bytes, num_steps, weights))
    single = mem_mb(feature_job_bytes(step_bytes, min(num_steps, 1), weights))
    return max(min(unchunked, max_mem_mb), single)


def merge_mem_mb(step_bytes: int) -> int:
    """A merge job's ``mem_mb`` for files of ``step_bytes`` of float64 statistics (in memory)."""
    return mem_mb(CPU_JOB_OVERHEAD_BYTES + MERGE_STEPS * step_bytes)


def largest_statistic_bytes(dims: dict[str, int]) -> int:
    """In-memory float64 bytes of the largest statistic of ``dims`` (0 for none)."""
    return max((statistics_bytes({key: d}) for key, d in dims.items()), default=0)


def projection_mem_mb(step_bytes: int, largest_bytes: int) -> int:
    """A projection job's ``mem_mb`` for one file of ``step_bytes`` of float64 statistics (in memory), the
    largest of them ``largest_bytes`` (:data:`PROJECTION_WORKSPACE_MATRICES`)."""
    return mem_mb(CPU_JOB_OVERHEAD_BYTES + step_bytes // 2 + PROJECTION_WORKSPACE_MATRICES * largest_bytes)


def finetune_mem_mb(feature_mem_mb: int, weights: int) -> int:
    """The fine-tune proof's ``mem_mb``: a feature job's (it may collect the other CFG-branch
    statistics) plus :data:`FINETUNE_WEIGHT_COPIES` more copies of the model's weights."""
    return feature_mem_mb + mem_mb(FINETUNE_WEIGHT_COPIES * weights)


def feature_job_minutes(prompt_timesteps: int, attempt: int = 1) -> int:
    """A feature job's SLURM ``runtime`` for ``prompt_timesteps`` (prompts × steps), times ``attempt``."""
    return attempt * (FEATURE_JOB_BASE_MINUTES + prompt_timesteps // PROMPT_TIMESTEPS_PER_MINUTE)


#: The width :func:`projection_cpu_seconds` scales the config's measured ``eigh`` time from.
EIGH_REFERENCE_WIDTH = 3072


def projection_cpu_seconds(dims: dict[str, int], eigh_seconds_at_reference: float) -> float:
    """CPU seconds of the projections of the statistics ``dims`` (``{key: d}``): one float64 ``eigh`` each,
    ``eigh_seconds_at_reference`` (config ``projection_cpu_seconds_at_3072``) scaled as ``d³``."""
    return sum(eigh_seconds_at_reference * (d / EIGH_REFERENCE_WIDTH) ** 3 for d in dims.values())


def projection_file_bytes(dims: dict[str, int]) -> int:
    """``P`` (float32 d×d) and the eigenvalues (float64 d) per key."""
    return sum(4 * d * d + 8 * d for d in dims.values())


# -- the run plan ------------------------------------------------------------------------------------
def run_plan(*, model: str, dims: dict, layers: list[str], collect_features: dict, num_steps: int,
             collection: str, shards: list[int], validation_prompts: int, weights: int, feature_mem_mb: int,
             throughput: float, jobs_per_rule: dict[str, int], merge_groups: int = 0,
             eigh_seconds_at_3072: float, stream_widths: dict[str, dict[str, int]] | None = None) -> dict:
    """Every number of the plan (see :func:`format_plan`). ``shards``: prompts per shard;
    ``merge_groups``: partial-sum folders (rule ``merge_group``) when shards are merged in groups;
    ``stream_widths`` (a transformer's, :func:`nullcov.models.mmdit_dims.stream_widths`): the plan also
    gives each stream's bytes and those of the selected, default and every stream
    (:func:`stream_bytes`, :func:`stream_totals`; ``collect_features`` is then the ``streams`` list).
    ``eigh_seconds_at_3072`` (config ``projection_cpu_seconds_at_3072``): the projection jobs' CPU-hours
    (:func:`projection_cpu_seconds`), per stream too."""
    per_step = step_dims(dims, layers, collect_features)
    per_text = text_dims(dims, layers, collect_features)
    from nullcov.statistics.store import moments_file_bytes

    step_file, text_file = moments_file_bytes(per_step), moments_file_bytes(per_text) if per_text else 0
    step_memory = statistics_bytes(per_step)
    steps_written = num_steps if per_step else 0
    per_chunk = steps_per_chunk(feature_mem_mb * MIB, step_memory, weights, num_steps) if per_step else num_steps
    chunks = step_chunks(num_steps, per_chunk)
    prompts = sum(shards)
    calls = replayed_calls(collection, chunks)
    prompt_timesteps = (prompts + validation_prompts) * calls
    return {
        "model": model,
        "layers": len(layers),
        "step_keys": len(per_step),
        "steps": num_steps,
        "prompts": prompts,
        "validation_prompts": validation_prompts,
        "shards": len(shards),
        "jobs": jobs_per_rule,
        "bytes": {
            "step file": step_file,
            "text file": text_file,
            "shard scratch": len(shards) * (steps_written * step_file + text_file),
            "partial sums (merge groups)": merge_groups * (steps_written * step_file + text_file),
            "merged moments": steps_written * step_file + text_file,
            "projections": steps_written * projection_file_bytes(per_step) + projection_file_bytes(per_text),
        },
        "memory_mb": {
            "features": feature_mem_mb,
            "covariance": merge_mem_mb(max(step_memory, statistics_bytes(per_text))),
            "projection": max(projection_mem_mb(statistics_bytes(dims), largest_statistic_bytes(dims))
                              for dims in (per_step, per_text)),
        },
        "feature_chunks": {"steps_per_chunk": per_chunk, "chunks": len(chunks), "unet_calls_per_batch": calls,
                           "unchunked_mem_mb": mem_mb(feature_job_bytes(step_memory, num_steps, weights))},
        "weights": weights,
        "throughput": throughput,
        "gpu_hours": prompt_timesteps / throughput / 3600,
        "eigh_seconds_at_3072": eigh_seconds_at_3072,
        "projection_cpu_hours": (steps_written * projection_cpu_seconds(per_step, eigh_seconds_at_3072)
                                 + projection_cpu_seconds(per_text, eigh_seconds_at_3072)) / 3600,
        **({} if stream_widths is None else {"streams": _streams_plan(stream_widths, layers, num_steps,
                                                                       collect_features, eigh_seconds_at_3072)}),
    }


def _streams_plan(widths: dict, layers: list[str], num_steps: int, selected, eigh_seconds_at_3072: float) -> dict:
    rows = stream_bytes(widths, layers, num_steps, eigh_seconds_at_3072)
    return {"selected": [stream for stream in rows if stream in selected], "rows": rows,
            "totals": stream_totals(rows, selected)}


def format_streams(streams: dict, num_steps: int) -> list[str]:
    """The plan's lines on a transformer's streams (:func:`run_plan`'s ``streams``): one per stream (keys,
    widths, bytes in a step file and in memory, bytes over the run), then the selected, default and
    every-stream totals."""
    lines = [f"streams (* = selected; packed float64 in the files, full float64 in memory; x {num_steps} steps, "
             "the text path once in text.h5):"]
    for stream, row in streams["rows"].items():
        mark = "*" if stream in streams["selected"] else " "
        widths = ", ".join(str(width) for width in row["widths"]) or "-"
        per = "text.h5" if stream in dict(TEXT_PATH) else "per step"
        lines.append(f"  {mark} {stream:<15} {row['keys']:>3} keys, d = {widths:<12} "
                     f"{human_bytes(row['file_bytes']):>9} {per} ({human_bytes(row['memory_bytes'])} in memory), "
                     f"{human_bytes(row['total_bytes'])} in all, "
                     f"{row['projection_cpu_hours']:.2f} projection CPU-hours")
    for choice, total in streams["totals"].items():
        lines.append(f"  {choice + ':':<15} {human_bytes(total['step_file_bytes'])} per step file "
                     f"({human_bytes(total['step_memory_bytes'])} in memory), {human_bytes(total['total_bytes'])} "
                     f"merged moments in all, {total['projection_cpu_hours']:.2f} projection CPU-hours")
    return lines


def disk_needed(plan: dict) -> int:
    """Bytes the run writes under results/ at most: every line of the plan's disk block together (shard
    scratch, partial sums, merged moments, projections), as when the shards are kept."""
    return sum(value for name, value in plan["bytes"].items() if name not in ("step file", "text file"))


def disk_warning(plan: dict, free_bytes: int, folder: str) -> str | None:
    """The warning ``snakemake plan`` prints when ``folder`` (results/) has less free space than
    :func:`disk_needed`; None when it has enough."""
    needed = disk_needed(plan)
    if free_bytes >= needed:
        return None
    return (f"WARNING: {folder} has {human_bytes(free_bytes)} free ({free_bytes} bytes) but this plan writes up to "
            f"{human_bytes(needed)} ({needed} bytes) there: jobs will fail with 'No space left on device'. Free "
            f"space or point results/ at a larger file system first{see('no-space-left-on-device')}")


def format_plan(plan: dict, free_bytes: int | None = None, folder: str = "results/") -> str:
    """The plan as text: jobs per rule, bytes on disk, memory per job type, GPU-hours; with ``free_bytes``
    (of ``folder``) a last line warns when they are fewer than the plan needs (:func:`disk_warning`)."""
    chunks = plan["feature_chunks"]
    lines = [
        (
            f"nullcov plan: {plan['model']}: {plan['prompts']} prompts in {plan['shards']} shards "
            f"(+{plan['validation_prompts']} validation) x {plan['steps']} steps, {plan['layers']} layers, "
            f"{plan['step_keys']} per-step matrices"
        ),
        "",
        "jobs per rule:",
        *(f"  {rule:<26} {count}" for rule, count in plan["jobs"].items()),
        "",
        "disk:",
        *(f"  {name:<26} {human_bytes(value)}" for name, value in plan["bytes"].items()),
        "",
        "peak host memory per job (mem_mb):",
        *(f"  {rule:<26} {value} MB" for rule, value in plan["memory_mb"].items()),
        (
            f"  feature job unchunked would need {chunks['unchunked_mem_mb']} MB; "
            f"with {plan['memory_mb']['features']} MB it collects {chunks['steps_per_chunk']} steps per pass "
            f"in {chunks['chunks']} chunk(s) "
            f"({chunks['unet_calls_per_batch']} UNet calls per prompt batch for {plan['steps']} steps)"
        ),
        f"  model weights {human_bytes(plan['weights'])}",
        "",
        *([*format_streams(plan["streams"], plan["steps"]), ""] if "streams" in plan else []),
        (
            f"GPU time: {plan['gpu_hours']:.2f} GPU-hours at {plan['throughput']:g} prompt-timesteps/s per GPU "
            "(config gpu_prompt_timesteps_per_second)"
        ),
        (
            f"projection CPU time: {plan['projection_cpu_hours']:.2f} CPU-hours (one float64 eigh per statistic, "
            f"{plan['eigh_seconds_at_3072']:g} s at d = 3072 on one core scaled as d^3: config "
            "projection_cpu_seconds_at_3072; a projection job that sees a GPU runs its eigh there)"
        ),
        "",
        f"what each line means: {PLANNING}",
    ]
    warning = None if free_bytes is None else disk_warning(plan, free_bytes, folder)
    if warning:
        lines += ["", warning]
    return "\n".join(lines) + "\n"
