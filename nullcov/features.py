"""The feature job: run the sampler over one shard of prompts and write per-step moment files.

Every model family (:mod:`nullcov.family`) runs its own diffusers pipeline through the same
hooks. ``trajectory`` (default) runs the real pipeline call once per prompt batch and collects at every
UNet call, so one pass yields every scheduled timestep. When only ``k``/``v`` are collected the
job runs the text encoder(s) alone (:func:`collect_text_shard`): their inputs are the text states,
which depend on neither timestep nor latents, so no UNet, VAE or sampler is loaded or run. ``noised`` reproduces the legacy tool:
per step a Gaussian latent noised to the timestep, one UNet call, conditional embedding only.
Prompt ``i`` (0-based among all prompts) draws its latents and sampler noise from a CPU
generator seeded ``seed + i``, so results do not depend on shard size, batch size or device.
With CFG only the conditional half of each UNet call is collected, unless ``unconditional_branch``
(then both halves, and the negative embedding's text states once per prompt).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from nullcov import capture as capture_module
from nullcov import plan
from nullcov.accumulators import STAGING_BUFFERS, TorchMoments, device_memory, exact_matmul, plan_device_steps
from nullcov.capture import CrossAttentionCapture, NonFiniteActivationError, prompt_of_row, text_row_mask, text_rows
from nullcov.docs import see
from nullcov.family import guidance_input, model_family
from nullcov.gpu_lease import lease_device
from nullcov.model import (
    ModelError,
    cross_attention_modules,
    image_resolution,
    load_pipeline,
    resolve_device,
    select_layers,
)
from nullcov.prompts import prompt_set_sha256
from nullcov.provenance import feature_config, model_fingerprint, package_versions
from nullcov.schedule import build_schedule, make_scheduler
from nullcov.store import TEXT_KEY, write_moments

log = logging.getLogger(__name__)

FEATURE_LINEARS = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out"}


class ScheduleFileError(RuntimeError):
    """results/schedule.json does not describe what this model's sampler does."""


class PromptTooLongError(ValueError):
    """A prompt exceeds the tokenizer's limit and ``strict_prompts`` is set."""


def check_prompt_lengths(tokenizer, prompts: list[str], first_index: int, strict: bool) -> int:
    """Count (and log) prompts the tokenizer truncates; with ``strict`` refuse them instead."""
    limit = tokenizer.model_max_length
    too_long = []
    for offset, prompt in enumerate(prompts):
        length = len(tokenizer(prompt).input_ids)
        if length > limit:
            too_long.append((first_index + offset, prompt, length))
    if too_long and strict:
        listing = "; ".join(f"prompt {index} has {length} tokens: {prompt!r}" for index, prompt, length in too_long)
        raise PromptTooLongError(
            f"strict_prompts: {len(too_long)} prompt(s) exceed the tokenizer's limit of {limit} tokens: {listing}"
            f"{see('prompt-longer-than-the-tokenizer-limit')}"
        )
    for index, prompt, length in too_long:
        log.warning("prompt %d has %d tokens, over the limit of %d: truncated: %r", index, length, limit, prompt)
    if too_long:
        log.warning("%d of %d prompts in this shard are truncated to %d tokens%s", len(too_long), len(prompts), limit,
                    see("prompt-longer-than-the-tokenizer-limit"))
    return len(too_long)


def selected_linears(collect_features: dict) -> set[str]:
    linears = {FEATURE_LINEARS[key] for key, wanted in collect_features.items() if wanted}
    if not linears:
        raise ValueError("collect_features: every feature (q, k, v, out) is false; nothing to collect"
                         f"{see('all-features-are-off')}")
    return linears


def prompt_generator(seed: int, index: int) -> torch.Generator:
    """Prompt ``index``'s own CPU generator (latents and sampler noise): seeded ``seed + index``."""
    return torch.Generator("cpu").manual_seed(seed + index)


def text_only(collect_features: dict) -> bool:
    """Only ``k``/``v`` collected: the text encoder(s) alone give every statistic."""
    return not (collect_features["q"] or collect_features["out"])


def text_mask(tokenizer, prompts: list[str], text_tokens: str, device, unconditional: bool = False) -> torch.Tensor | None:
    """The mask of the text rows ``text_tokens`` keeps (None: all of them): [B, L], or with
    ``unconditional`` [2B, L], the negative prompts' ("", as the pipelines encode them) then the prompts'."""
    if text_tokens == "all":
        return None
    texts = [""] * len(prompts) + prompts if unconditional else prompts
    tokens = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    return text_row_mask(tokens.input_ids, tokenizer.eos_token_id, text_tokens).to(device)


def encode_text(pipe, prompts: list[str], unconditional: bool = False) -> torch.Tensor:
    """The conditional text states [B, L, d] the pipeline passes to the UNet for ``prompts``: its own
    ``encode_prompt`` (SDXL: both encoders' penultimate states, concatenated). With ``unconditional``
    [2B, L, d]: its negative embedding first (SDXL: zeros, ``force_zeros_for_empty_prompt``), as in
    the ``[uncond, cond]`` CFG batch."""
    device = pipe._execution_device
    encoded = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=unconditional)
    return torch.cat([encoded[1], encoded[0]]) if unconditional else encoded[0]


def check_hookable(layers) -> None:
    """Refuse layers whose processor uses fused projections (``fuse_qkv_projections``): their
    ``to_k``/``to_v`` never run. After ``unfuse_qkv_projections()`` they are collected as usual (and
    the hook-fired check of :class:`CrossAttentionCapture` confirms every linear ran)."""
    fused = [name for name, module in layers
             if type(getattr(module, "processor", None)).__name__.startswith("Fused")]
    if fused:
        raise ModelError(
            f"cross-attention layer(s) {fused} run fused projections (to_kv/to_qkv after fuse_qkv_projections): "
            "their to_k/to_v inputs are not observable; call pipe.unfuse_qkv_projections() first"
            f"{see('a-selected-linear-did-not-run')}"
        )


def prompt_generators(seed: int, first_index: int, count: int) -> list[torch.Generator]:
    """The generators of ``count`` consecutive prompts starting at ``first_index``."""
    return [prompt_generator(seed, first_index + offset) for offset in range(count)]


def configure_scheduler(pipe, schedule: dict) -> None:
    """Install the schedule's sampler on ``pipe`` and check it reproduces ``schedule``'s steps."""
    strategy, steps = schedule["strategy"], schedule["num_denoising_steps"]
    expected = [step["timestep"] for step in schedule["steps"]]
    rebuilt = [step["timestep"] for step in build_schedule(dict(pipe.scheduler.config), strategy, steps)["steps"]]
    if rebuilt != expected:
        raise ScheduleFileError(
            f"results/schedule.json lists timesteps {expected}, but this model's scheduler config gives {rebuilt} "
            f"for {strategy!r} with {steps} steps; rerun the schedule rule{see('schedule-and-sampler-disagree')}"
        )
    pipe.scheduler = make_scheduler(pipe.scheduler.config, strategy)


def _run_trajectory(pipe, prompts, generators, schedule, guidance_scale, resolution, chunk: range | None = None) -> None:
    """The sampler from the first step through ``chunk``'s last (a replay: the same seeds give
    the same trajectory), interrupted there (diffusers' ``interrupt``: later steps call nothing).
    ``chunk`` None: every step."""
    stop = len(schedule["steps"]) if chunk is None else chunk.stop

    def stop_after_chunk(pipeline, index, timestep, tensors):
        if index + 1 >= stop:
            pipeline._interrupt = True
        return {}

    pipe(
        prompt=prompts,
        guidance_scale=guidance_scale,
        generator=generators,
        height=resolution,
        width=resolution,
        output_type="latent",
        callback_on_step_end=stop_after_chunk if stop < len(schedule["steps"]) else None,
        **schedule["set_timesteps"],
    )


def _run_noised(pipe, prompts, generators, schedule, guidance_scale, resolution, chunk: range | None = None) -> None:
    """Per step of ``chunk`` one UNet call; every earlier step's noise is drawn all the same (the
    generators' state, hence the result, does not depend on the chunking). ``chunk`` None: every step."""
    chunk = range(len(schedule["steps"])) if chunk is None else chunk
    from diffusers.utils.torch_utils import randn_tensor

    device, dtype = pipe.unet.device, pipe.unet.dtype
    embeddings, _ = pipe.encode_prompt(prompts, device, 1, do_classifier_free_guidance=False)
    factor = pipe.vae_scale_factor
    shape = (len(prompts), pipe.unet.config.in_channels, resolution // factor, resolution // factor)
    for index, step in enumerate(schedule["steps"][: chunk.stop]):
        clean = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
        noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
        if index not in chunk:
            continue
        alpha = step["alphas_cumprod"]
        noisy = math.sqrt(alpha) * clean + math.sqrt(1.0 - alpha) * noise
        timestep = torch.tensor(step["timestep"], device=device)
        pipe.unet(noisy, timestep, encoder_hidden_states=embeddings, return_dict=False)


COLLECTIONS = {"trajectory": _run_trajectory, "noised": _run_noised}


def shard_layers(pipe, schedule: dict, config: dict) -> list[tuple[str, object]]:
    """The selected cross-attention ``(name, module)`` pairs, checked against the schedule file."""
    modules = dict(cross_attention_modules(pipe.unet))
    names = select_layers(list(modules), config["cross_attention_layers"])
    if schedule.get("layers", names) != names:
        raise ScheduleFileError(f"results/schedule.json lists layers {schedule['layers']}, this model gives {names}"
                                f"{see('schedule-and-sampler-disagree')}")
    return [(name, modules[name]) for name in names]


def plan_chunks(pipe, layers, linears: set[str], num_steps: int, mem_mb: int | None, weights: int) -> list[range]:
    """The step chunks of a job with ``mem_mb`` of host memory (None: one chunk, every step).

    On a GPU the steps whose accumulators fit on the device (:func:`plan_device_steps`) come on
    top of those the host budget holds.
    """
    dims = {f"{name}/{linear}": int((module.to_q if linear == "to_q" else module.to_out[0]).in_features)
            for name, module in layers for linear in ("to_q", "to_out") if linear in linears}
    step_bytes = plan.statistics_bytes(dims)
    if mem_mb is None or not step_bytes:
        return [range(num_steps)]
    host_steps = plan.steps_per_chunk(mem_mb * plan.MIB, step_bytes, weights, num_steps)
    device = pipe.unet.device
    device_steps = 0
    if device.type == "cuda" and capture_module.ACCUMULATE != "host":
        free, total = device_memory(device)
        device_steps = plan_device_steps(step_bytes, num_steps, free, total, STAGING_BUFFERS * step_bytes // 2)
    chunks = plan.step_chunks(num_steps, min(num_steps, host_steps + device_steps))
    unchunked = plan.mem_mb(plan.feature_job_bytes(step_bytes, num_steps, weights))
    log.info("memory: %d steps x %.1f MiB; mem_mb=%d (unchunked host need %d MB): %d step(s) fit on the host, %d "
             "on %s: %d chunk(s) of <= %d steps", num_steps, step_bytes / plan.MIB, mem_mb, unchunked, host_steps,
             device_steps, device, len(chunks), max(len(c) for c in chunks))
    return chunks


def collect_shard(pipe, prompts: list[str], first_index: int, schedule: dict, config: dict, *, on_step=None,
                  mem_mb: int | None = None, weights: int = 0, capture_class: type = CrossAttentionCapture):
    """Moments of the selected layers for a shard: (per-step dicts, text moments, layer names, resolution).

    ``on_step(index, {key: Moments})``, when given, receives each step as soon as its chunk is
    done, one at a time, and the returned per-step list is empty (the feature job writes and frees
    each step). ``mem_mb`` (with the model's ``weights`` bytes) is the job's host-memory budget:
    when every step's accumulators do not fit it, the steps are collected in chunks
    (:func:`plan_chunks`), each a replay of the prompt batches with the same seeds, so the
    results equal an unchunked run. ``capture_class`` is the hook class (a subclass of
    :class:`CrossAttentionCapture`; the benchmark passes one that also times what the capture does).
    """
    layers = shard_layers(pipe, schedule, config)
    check_hookable(layers)
    linears = selected_linears(config["collect_features"])
    resolution = image_resolution(pipe, config["resolution"])
    needs = {"added conditioning (SDXL's text_time)": pipe.unet.config.addition_embed_type is not None,
             "a guidance embedding (time_cond_proj_dim, LCM)": guidance_input(pipe.unet.config) == "embedding"}
    if config["collection"] == "noised" and any(needs.values()):
        raise ValueError(
            "collection: noised calls the UNet with text states only; this model's UNet also needs "
            f"{' and '.join(what for what, needed in needs.items() if needed)}: use collection: trajectory"
            f"{see('noised-collection-needs-more-than-text')}"
        )
    run = COLLECTIONS[config["collection"]]
    tokenizer = pipe.tokenizer
    batch_size = config["batch_size"]
    steps = schedule["steps"]
    chunks = plan_chunks(pipe, layers, linears, len(steps), mem_mb, weights)
    log.info(
        "collecting %d prompts x %d steps, %d layers, %s, %s, batch %d, %dx%d, %d chunk(s)",
        len(prompts), len(steps), len(layers), sorted(linears), config["collection"], batch_size, resolution, resolution,
        len(chunks),
    )
    collected = []
    if on_step is None:
        def on_step(index, moments):
            collected.append(moments)

    text_moments = None
    start = time.perf_counter()
    for number, chunk in enumerate(chunks):
        call_steps = list(chunk) if config["collection"] == "noised" else list(range(chunk.stop))
        with exact_matmul(), torch.inference_mode(), capture_class(
            pipe.unet, layers, linears, [s["timestep"] for s in steps], [s["name"] for s in steps],
            config["text_tokens"], collect_steps=list(chunk), call_steps=call_steps, text=number == 0,
            unconditional=config["unconditional_branch"],
        ) as capture, tqdm(total=len(prompts), unit="prompt", file=sys.stderr, ascii=True, mininterval=2) as progress:
            for offset in range(0, len(prompts), batch_size):
                batch = prompts[offset : offset + batch_size]
                mask = text_mask(tokenizer, batch, config["text_tokens"], pipe.unet.device, config["unconditional_branch"])
                capture.begin_batch(batch, first_index + offset, mask)
                generators = prompt_generators(config["seed"], first_index + offset, len(batch))
                run(pipe, batch, generators, schedule, config["guidance_scale"], resolution, chunk)
                capture.end_batch()
                progress.update(len(batch))
                done = number * len(prompts) + offset + len(batch)
                rate = done / (time.perf_counter() - start)
                log.info("chunk %d/%d (steps %d..%d): prompts %d/%d, ETA %.0f s", number + 1, len(chunks), chunk.start,
                         chunk.stop - 1, offset + len(batch), len(prompts), (len(chunks) * len(prompts) - done) / rate)
            if number == 0:
                text_moments = capture.text_results()
            for index, moments in capture.release_steps():
                on_step(index, moments)
                del moments
    return collected, text_moments, [name for name, _ in layers], resolution


def collect_text_shard(pipe, prompts: list[str], first_index: int, config: dict):
    """Text moments of a shard from the text encoder(s) alone (the ``to_k``/``to_v`` inputs).

    The same states the UNet's ``to_k``/``to_v`` receive in a full run (the pipeline's own
    ``encode_prompt`` on the same prompt batch), the same row selection and the same float64
    accumulation, so ``text.h5`` equals the full run's.
    """
    batch_size, moments, unconditional = config["batch_size"], None, config["unconditional_branch"]
    start = time.perf_counter()
    log.info("text-only: %d prompts through %s's text encoder(s), batch %d, text_tokens %s%s",
             len(prompts), type(pipe).__name__, batch_size, config["text_tokens"],
             ", with the negative embedding (unconditional_branch)" if unconditional else "")
    with exact_matmul(), torch.inference_mode():
        for offset in range(0, len(prompts), batch_size):
            batch = prompts[offset : offset + batch_size]
            states = encode_text(pipe, batch, unconditional)
            finite = torch.isfinite(states.reshape(len(states), -1)).all(dim=1).cpu()
            if not bool(finite.all()):
                bad, branch = prompt_of_row(int((~finite).nonzero()[0]), len(batch), len(states))
                raise NonFiniteActivationError(first_index + offset + bad, batch[bad], "text states", "text", branch)
            rows = text_rows(states, text_mask(pipe.tokenizer, batch, config["text_tokens"], states.device, unconditional))
            if moments is None:
                moments = TorchMoments(rows.shape[-1], rows.device)
            moments.add(rows)
            done = offset + len(batch)
            if done == len(prompts) or (offset // batch_size) % 50 == 0:
                rate = done / (time.perf_counter() - start)
                log.info("prompts %d/%d, %.1f prompts/s", done, len(prompts), rate)
    return moments.to_moments()


def run_feature_job(*, model_spec: str, model_dir: str, prompts: list[str], first_index: int, shard: str,
                    schedule: dict, config: dict, step_paths: dict[str, str], text_path: str | None,
                    threads: int = 1, mem_mb: int | None = None) -> None:
    """Collect one shard and write ``step_paths[name]`` per step and ``text_path``.

    ``mem_mb``: the job's host memory (Snakemake's ``resources.mem_mb``); the steps are collected
    in chunks when they do not all fit (:func:`collect_shard`), each step written and freed as
    soon as its chunk is done (each file atomically; after a failure in a later chunk the earlier
    chunks' complete files remain, and Snakemake removes the failed job's output folder).

    On a machine with several GPUs the job leases one (see :mod:`nullcov.gpu_lease`) and holds
    it until the shard is written.
    """
    torch.set_num_threads(threads)
    # The model's content hash reads every weight byte (seconds per GB the first time on a
    # machine; then cached): a thread does it while the model loads and the prompts run.
    with lease_device(config["device"], label=f"shard {shard}") as lease, \
            ThreadPoolExecutor(1, thread_name_prefix="model-fingerprint") as hashing:
        fingerprint = hashing.submit(model_fingerprint, model_dir)
        device = use_device(lease.device)
        log.info("shard %s: prompts %d..%d on device %s (%s)", shard, first_index, first_index + len(prompts) - 1,
                 device, config["device"])
        _collect_and_write(fingerprint, device=device, model_spec=model_spec, model_dir=model_dir, prompts=prompts,
                           first_index=first_index, shard=shard, schedule=schedule, config=config,
                           step_paths=step_paths, text_path=text_path, mem_mb=mem_mb)


def use_device(leased: str) -> str:
    """The torch device for a leased one; a CUDA device also becomes the current one."""
    device = resolve_device(leased)
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)  # stray "cuda" allocations follow the leased GPU
    return device


def _collect_and_write(fingerprint: Future, *, device, model_spec, model_dir, prompts, first_index, shard, schedule,
                       config, step_paths, text_path, mem_mb=None) -> None:
    from transformers import CLIPTokenizer

    family = model_family(model_dir)
    truncated = 0
    for name in family.tokenizers:  # before the model is loaded: strict_prompts fails fast
        tokenizer = CLIPTokenizer.from_pretrained(Path(model_dir) / name, local_files_only=True)
        truncated = max(truncated, check_prompt_lengths(tokenizer, prompts, first_index, config["strict_prompts"]))
    only_text = text_only(config["collect_features"])
    pipe = load_pipeline(model_dir, config["dtype"], device, text_only=only_text)
    steps = schedule["steps"]
    if only_text:
        if step_paths:
            raise ValueError(f"only k/v are collected (text-only job), but per-step outputs {sorted(step_paths)} were asked")
        layer_names, resolution = schedule.get("layers"), None
    else:
        configure_scheduler(pipe, schedule)
        if step_paths and sorted(step_paths) != sorted(step["name"] for step in steps):
            raise ValueError(f"outputs {sorted(step_paths)} do not match the schedule's steps")
        layer_names = [name for name, _ in shard_layers(pipe, schedule, config)]
        resolution = image_resolution(pipe, config["resolution"])
    provenance = {
        "model": {"spec": model_spec, "path": str(model_dir), "fingerprint": None},  # set at the first write
        "config": feature_config(config),
        "prompts": {"first_index": first_index, "count": len(prompts), "sha256": prompt_set_sha256(prompts),
                    "truncated": truncated, "prompts": prompts},
        "shard": shard,
        "layers": layer_names,
        "run": {"device": device, "batch_size": config["batch_size"], "resolution": resolution,
                "scheduler": None if only_text else schedule["scheduler"]["class"], "family": family.name,
                "pipeline": family.pipeline, "text_only": only_text},
        "packages": package_versions(),
    }
    written = []

    def hashed():
        provenance["model"]["fingerprint"] = fingerprint.result()  # waits for the hashing thread
        return provenance

    def write_step(index, moments):
        if step_paths:
            step = steps[index]
            attrs = {"provenance": hashed(), "step": {k: step[k] for k in ("index", "name", "timestep")}}
            write_moments(step_paths[step["name"]], "features", moments, attrs)
            written.append(step_paths[step["name"]])

    if only_text:
        text_moments = collect_text_shard(pipe, prompts, first_index, config)
    else:
        weights = plan.weights_bytes(model_dir, {"unet_parameters": sum(p.numel() for p in pipe.unet.parameters())})
        _, text_moments, _, _ = collect_shard(pipe, prompts, first_index, schedule, config, on_step=write_step,
                                              mem_mb=mem_mb, weights=weights)
    if text_path:
        write_moments(text_path, "features", {TEXT_KEY: text_moments}, {"provenance": hashed(), "step": "text"})
    log.info("wrote %d step files%s; peak RSS of this job %.0f MB", len(written), " and text.h5" if text_path else "",
             peak_rss_mb())


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (:func:`nullcov.measurement.peak_rss_bytes`: exact,
    unlike a sampled ``benchmark:`` max_rss, which Snakemake polls every 30 s after the first 15 s)."""
    from nullcov.measurement import peak_rss_bytes

    return peak_rss_bytes() / 2**20
