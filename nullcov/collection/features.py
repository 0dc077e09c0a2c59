"""The feature job: run the sampler over one shard of prompts and write per-step moment files.

Every model family (:mod:`nullcov.models.family`) runs its own diffusers pipeline through the same
hooks (:class:`nullcov.collection.capture.CrossAttentionCapture`), driven by the sampler drivers of
:mod:`nullcov.models.sampling` (``trajectory``: the real pipeline call, every UNet call a scheduled step;
``noised``: the legacy tool's one UNet call per step), with prompt ``i``'s own generator
(``seed + i``), so results depend on neither shard size, batch size nor device. When only
``k``/``v`` are collected the job runs the text encoder(s) alone (:func:`collect_text_shard`):
their inputs are the text states, which depend on neither timestep nor latents, so no UNet, VAE
or sampler is loaded or run; likewise an SD3/FLUX run that selects only the transformer's
timestep-independent text path (streams ``context``, ``pooled``: :func:`collect_text_path`). With
CFG only the conditional half of each UNet call is collected,
unless ``unconditional_branch`` (then both halves, and the negative embedding's text states once
per prompt). A job whose steps do not fit its memory collects them in chunks (:func:`plan_chunks`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from nullcov.collection import memory
from nullcov.collection.accumulators import TorchMoments, exact_matmul
from nullcov.collection.capture import (
    TRANSFORMER_TEXT_TOKENS,
    CrossAttentionCapture,
    NonFiniteActivationError,
    prompt_of_row,
    text_row_mask,
    text_rows,
)
from nullcov.collection.placement import device_memory_steps
from nullcov.collection.tokens import max_sequence_length, sequence_mask, token_masks
from nullcov.docs import see
from nullcov.files import read_json
from nullcov.models.device import module_device, use_device
from nullcov.models.family import (
    CROSS_ATTENTION,
    DEFAULT_STREAMS,
    STREAMS,
    TEXT_KEY,
    TEXT_PATH,
    Family,
    guidance_input,
    model_family,
    step_streams,
    text_path_keys,
)
from nullcov.models.gpu_lease import lease_device
from nullcov.models.model import (
    ModelError,
    check_unfused,
    cross_attention_modules,
    denoiser,
    image_resolution,
    linear_dims,
    load_pipeline,
    select_layers,
    transformer_layers,
)
from nullcov.models.sampling import COLLECTIONS, ScheduleFileError, configure_scheduler, prompt_generators
from nullcov.prompts import prompt_set_sha256
from nullcov.provenance import feature_config, model_fingerprint, package_versions
from nullcov.statistics.store import write_moments

log = logging.getLogger(__name__)


class PromptTooLongError(ValueError):
    """A prompt exceeds the tokenizer's limit and ``strict_prompts`` is set."""


def check_prompt_lengths(tokenizer, prompts: list[str], first_index: int, strict: bool,
                         limit: int | None = None) -> int:
    """Count (and log) prompts the tokenizer truncates at ``limit`` (None: its ``model_max_length``); with
    ``strict`` refuse them instead."""
    limit = limit or tokenizer.model_max_length
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


def selected_streams(config: dict, family: Family) -> set[str]:
    """The streams (``streams``: ``image``, ``text``, ...) a transformer family's run collects;
    refuse the keys of the other kind of family (``collect_features``, ``true_cfg_scale`` > 1 for SD3)."""
    default_features = {feature: True for feature, _ in CROSS_ATTENTION.features}
    if family.denoiser == "unet":
        if tuple(config.get("streams", DEFAULT_STREAMS)) != DEFAULT_STREAMS or config.get("true_cfg_scale", 1) != 1:
            raise ValueError(f"streams and true_cfg_scale select the streams and the negative call of a transformer "
                             f"(SD3, FLUX); this model ({family.name}) is a UNet: select with collect_features"
                             f"{see('collection-keys-of-another-family')}")
        return set()
    if config["collect_features"] != default_features:
        raise ValueError(f"collect_features selects the linears of a UNet's attn2; this model ({family.name}) is a "
                         f"transformer: select with streams ({', '.join(STREAMS)})"
                         f"{see('collection-keys-of-another-family')}")
    if config["true_cfg_scale"] != 1 and family.name != "flux":
        raise ValueError(f"true_cfg_scale {config['true_cfg_scale']} adds FLUX's negative call; {family.name} batches "
                         f"its CFG branches (guidance_scale){see('collection-keys-of-another-family')}")
    streams = set(config["streams"])
    if not streams:
        raise ValueError(f"streams: the list is empty; nothing to collect{see('all-features-are-off')}")
    unknown = sorted(streams - set(STREAMS))
    if unknown:
        raise ValueError(f"streams: {unknown} are not streams of a transformer; known: {', '.join(STREAMS)}")
    return streams


def has_negative_branch(family: Family, config: dict) -> bool:
    """Whether a transformer run has a negative branch: FLUX's separate call (``true_cfg_scale`` > 1) or
    SD3's ``[uncond, cond]`` batch (``guidance_scale`` > 1)."""
    if family.name == "flux":
        return config["true_cfg_scale"] > 1
    return family.guidance == "cfg" and config["guidance_scale"] > 1


def check_unconditional_branch(family: Family, config: dict) -> None:
    """Refuse ``unconditional_branch`` for a transformer run without a negative branch."""
    if config["unconditional_branch"] and not has_negative_branch(family, config):
        raise ValueError(
            f"unconditional_branch: true, but this {family.name} run has no negative branch (FLUX: set "
            f"true_cfg_scale > 1; SD3: guidance_scale > 1){see('no-unconditional-half-for-unconditional_branch')}")


def selected_linears(collect_features: dict) -> set[str]:
    """The linears ``collect_features`` (a ``collect_features`` name -> bool) asks for."""
    linears = {CROSS_ATTENTION.feature_linears[key] for key, wanted in collect_features.items() if wanted}
    if not linears:
        raise ValueError("collect_features: every feature (q, k, v, out) is false; nothing to collect"
                         f"{see('all-features-are-off')}")
    return linears


def text_only(collect_features: dict) -> bool:
    """Only ``k``/``v`` (text linears) collected: the text encoder(s) alone give every statistic."""
    return not CROSS_ATTENTION.step_linears(collect_features)


def text_mask(tokenizer, prompts: list[str], text_tokens: str, device,
              unconditional: bool = False) -> torch.Tensor | None:
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


def shard_layers(pipe, schedule: dict, config: dict, family: Family | None = None) -> list[tuple[str, object]]:
    """The selected cross-attention ``(name, module)`` pairs (a transformer family: its blocks),
    checked against the schedule file."""
    if family is not None and family.denoiser == "transformer":
        modules = dict(transformer_layers(pipe.transformer, family.kinds))
    else:
        modules = dict(cross_attention_modules(pipe.unet))
    names = select_layers(list(modules), config["cross_attention_layers"])
    if schedule.get("layers", names) != names:
        raise ScheduleFileError(f"results/schedule.json lists layers {schedule['layers']}, this model gives {names}"
                                f"{see('schedule-and-sampler-disagree')}")
    return [(name, modules[name]) for name in names]


def plan_chunks(pipe, layers, linears: set[str], num_steps: int, mem_mb: int | None, weights: int,
                accumulate: str = "auto", vocabulary=CROSS_ATTENTION) -> list[range]:
    """The step chunks of a job with ``mem_mb`` of host memory (None: one chunk, every step).

    On a GPU the steps whose accumulators stay on the device (:func:`nullcov.collection.placement.device_steps`
    under ``accumulate``) come on top of those the host budget holds. ``vocabulary``: the run's
    (:class:`CrossAttentionCapture`).
    """
    dims = linear_dims(layers, linears, vocabulary)
    step_bytes = memory.statistics_bytes(dims)
    if mem_mb is None or not step_bytes:
        return [range(num_steps)]
    host_steps = memory.steps_per_chunk(mem_mb * memory.MIB, step_bytes, weights, num_steps)
    device = module_device(denoiser(pipe))
    on_device = device_memory_steps(device, dims, num_steps, accumulate)
    chunks = memory.step_chunks(num_steps, min(num_steps, host_steps + on_device))
    unchunked = memory.mem_mb(memory.feature_job_bytes(step_bytes, num_steps, weights))
    log.info("memory: %d steps x %.1f MiB; mem_mb=%d (unchunked host need %d MB): %d step(s) fit on the host, %d "
             "on %s: %d chunk(s) of <= %d steps", num_steps, step_bytes / memory.MIB, mem_mb, unchunked, host_steps,
             on_device, device, len(chunks), max(len(c) for c in chunks))
    return chunks


def check_collection(unet_config, collection: str) -> None:
    """Refuse ``collection: noised`` for a UNet that needs more than text states to be called directly."""
    needs = {"added conditioning (SDXL's text_time)": unet_config.addition_embed_type is not None,
             "a guidance embedding (time_cond_proj_dim, LCM)": guidance_input(unet_config) == "embedding"}
    if collection == "noised" and any(needs.values()):
        raise ValueError(
            "collection: noised calls the UNet with text states only; this model's UNet also needs "
            f"{' and '.join(what for what, needed in needs.items() if needed)}: use collection: trajectory"
            f"{see('noised-collection-needs-more-than-text')}"
        )


class _ShardCollection:
    """One shard's collection, chunk by chunk: its layers, linears, sampler driver and capture."""

    def __init__(self, pipe, prompts: list[str], first_index: int, schedule: dict, config: dict,
                 capture_class: type, capture_options: dict, family: Family | None = None):
        self.pipe, self.prompts, self.first_index = pipe, prompts, first_index
        self.schedule, self.config = schedule, config
        self.family = family
        self.transformer = family is not None and family.denoiser == "transformer"
        self.layers = shard_layers(pipe, schedule, config, family)
        self.resolution = image_resolution(pipe, config["resolution"])
        self.run_options, self.calls_per_step = {}, 1
        if self.transformer:
            check_unfused(pipe.transformer)
            self.linears = selected_streams(config, family)
            self._check_transformer_run()
        else:
            check_hookable(self.layers)
            self.linears = selected_linears(config["collect_features"])
            check_collection(pipe.unet.config, config["collection"])
        self.vocabulary = family if self.transformer else CROSS_ATTENTION
        self.run = COLLECTIONS[config["collection"]]
        self.device = module_device(denoiser(pipe))
        self.capture_class, self.capture_options = capture_class, capture_options
        self.text_moments = None
        self.token_counts = {"real": 0, "padding": 0}
        self.started = time.perf_counter()

    def _check_transformer_run(self) -> None:
        """A transformer run: the trajectory collection, at the schedule's resolution; FLUX's true CFG
        (``true_cfg_scale`` > 1) is two calls per step, and ``unconditional_branch`` needs a negative branch."""
        config, family = self.config, self.family
        if config["collection"] != "trajectory":
            raise ValueError(f"collection: {config['collection']} calls a UNet directly; a transformer ({family.name}) "
                             f"is collected along its pipeline's trajectory: use collection: trajectory"
                             f"{see('noised-collection-needs-more-than-text')}")
        flow = self.schedule.get("flow_matching")
        if flow is None or flow["resolution"] != self.resolution:
            raise ScheduleFileError(
                f"results/schedule.json was built for resolution {None if flow is None else flow['resolution']}, "
                f"but this run samples at {self.resolution}: a flow-matching schedule depends on the resolution; "
                f"rerun the schedule rule{see('schedule-and-sampler-disagree')}")
        if family.name == "flux" and config["true_cfg_scale"] > 1:
            self.run_options, self.calls_per_step = {"true_cfg_scale": config["true_cfg_scale"]}, 2
        check_unconditional_branch(family, config)

    def capture(self, number: int, chunk: range):
        """The capture of chunk ``number``: it collects ``chunk``'s steps, the first chunk also the text."""
        steps = self.schedule["steps"]
        call_steps = list(chunk) if self.config["collection"] == "noised" else list(range(chunk.stop))
        extra = {"vocabulary": self.family, "calls_per_step": self.calls_per_step} if self.transformer else {}
        return self.capture_class(
            denoiser(self.pipe), self.layers, self.linears, [s["timestep"] for s in steps],
            [s["name"] for s in steps], self.config["text_tokens"], collect_steps=list(chunk), call_steps=call_steps,
            text=number == 0, unconditional=self.config["unconditional_branch"], **self.capture_options, **extra,
        )

    def chunk(self, number: int, chunks: list[range]):
        """Run every prompt batch through chunk ``number``'s steps; yield ``(step index, moments)``
        per step of the chunk, one at a time (:meth:`CrossAttentionCapture.release_steps`)."""
        chunk, prompts = chunks[number], self.prompts
        with exact_matmul(), torch.inference_mode(), self.capture(number, chunk) as capture, \
                tqdm(total=len(prompts), unit="prompt", file=sys.stderr, ascii=True, mininterval=2) as progress:
            for offset in range(0, len(prompts), self.config["batch_size"]):
                size = self.batch(capture, offset, chunk)
                progress.update(size)
                self.log_progress(number, chunks, offset + size)
            if number == 0:
                self.text_moments = capture.text_results()
                self.token_counts = dict(capture.token_counts)
            yield from capture.release_steps()

    def batch(self, capture, offset: int, chunk: range) -> int:
        """Run the prompt batch starting at ``offset`` through the sampler; returns its size."""
        config = self.config
        batch = self.prompts[offset : offset + config["batch_size"]]
        if self.transformer:
            capture.begin_batch(batch, self.first_index + offset, None, token_masks(self.pipe, batch, self.device))
        else:
            mask = text_mask(self.pipe.tokenizer, batch, config["text_tokens"], self.device,
                             config["unconditional_branch"])
            capture.begin_batch(batch, self.first_index + offset, mask)
        generators = prompt_generators(config["seed"], self.first_index + offset, len(batch))
        self.run(self.pipe, batch, generators, self.schedule, config["guidance_scale"], self.resolution, chunk,
                 **self.run_options)
        capture.end_batch()
        return len(batch)

    def log_progress(self, number: int, chunks: list[range], prompts_done: int) -> None:
        chunk, count = chunks[number], len(self.prompts)
        done = number * count + prompts_done
        rate = done / (time.perf_counter() - self.started)
        log.info("chunk %d/%d (steps %d..%d): prompts %d/%d, ETA %.0f s", number + 1, len(chunks), chunk.start,
                 chunk.stop - 1, prompts_done, count, (len(chunks) * count - done) / rate)


def collect_shard(pipe, prompts: list[str], first_index: int, schedule: dict, config: dict, *, on_step=None,
                  mem_mb: int | None = None, weights: int = 0, capture_class: type = CrossAttentionCapture,
                  accumulate: str = "auto", timestep_check: str = "auto", family: Family | None = None,
                  summary: dict | None = None):
    """Moments of the selected layers for a shard: (per-step dicts, text moments, layer names, resolution).

    ``on_step(index, {key: Moments})``, when given, receives each step as soon as its chunk is
    done, one at a time, and the returned per-step list is empty (the feature job writes and frees
    each step). ``mem_mb`` (with the model's ``weights`` bytes) is the job's host-memory budget:
    when every step's accumulators do not fit it, the steps are collected in chunks
    (:func:`plan_chunks`), each a replay of the prompt batches with the same seeds, so the
    results equal an unchunked run. ``capture_class`` is the hook class (a subclass of
    :class:`CrossAttentionCapture`; the benchmark passes one that also times what the capture does).
    ``accumulate`` and ``timestep_check`` go to the capture: where its step accumulators live, and
    when it compares timesteps (see :class:`CrossAttentionCapture`). ``family``: the model's
    (:func:`nullcov.models.family.model_family`), needed for a transformer (SD3, FLUX: its blocks are the
    layers, ``streams`` the selection); None: a UNet. ``summary``, when given, receives
    ``text_token_counts`` (a transformer's real and padding text tokens of the collected prompts).
    The text moments are a UNet's ``to_k``/``to_v`` inputs (one ``Moments``, or None when not selected)
    or a transformer's text path (``{module path: Moments}`` of :func:`collect_text_path` when
    ``streams`` names ``context``/``pooled``, else None; with no other stream no sampler runs).
    """
    run = _ShardCollection(pipe, prompts, first_index, schedule, config, capture_class,
                           {"accumulate": accumulate, "timestep_check": timestep_check}, family)
    steps = schedule["steps"]
    if run.transformer and not step_streams(run.linears):
        chunks = []  # the text path alone: no sampler runs
    else:
        chunks = plan_chunks(pipe, run.layers, run.linears, len(steps), mem_mb, weights, accumulate, run.vocabulary)
    log.info(
        "collecting %d prompts x %d steps, %d layers, %s, %s, batch %d, %dx%d, %d chunk(s)",
        len(prompts), len(steps), len(run.layers), sorted(run.linears), config["collection"], config["batch_size"],
        run.resolution, run.resolution, len(chunks),
    )
    collected = []
    for number in range(len(chunks)):
        with contextlib.closing(run.chunk(number, chunks)) as released:
            for index, moments in released:
                if on_step is None:
                    collected.append(moments)
                else:
                    on_step(index, moments)
                del moments
    if summary is not None:
        summary["text_token_counts"] = run.token_counts
    text = run.text_moments
    if run.transformer and text_path_keys(run.linears):
        text = collect_text_path(pipe, prompts, first_index, config, family)
    return collected, text, [name for name, _ in run.layers], run.resolution


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
            mask = text_mask(pipe.tokenizer, batch, config["text_tokens"], states.device, unconditional)
            rows = text_rows(states, mask)
            if moments is None:
                moments = TorchMoments(rows.shape[-1], rows.device)
            moments.add(rows)
            done = offset + len(batch)
            if done == len(prompts) or (offset // batch_size) % 50 == 0:
                rate = done / (time.perf_counter() - start)
                log.info("prompts %d/%d, %.1f prompts/s", done, len(prompts), rate)
    return moments.to_moments()


def encode_transformer_text(pipe, prompts: list[str], unconditional: bool = False):
    """``(texts, states, pooled)`` an SD3/FLUX pipeline passes its transformer for ``prompts``: the
    text sequence [B, L, d] (``context_embedder``'s input) and the pooled projections [B, d'] (the
    input of ``time_text_embed.text_embedder.linear_1``), from its own ``encode_prompt`` at its
    ``max_sequence_length`` (no transformer run). With ``unconditional`` [2B, ...]: the negative
    prompts' (``""``) first, encoded as the pipeline encodes them (SD3: ``encode_prompt``'s CFG
    branch; FLUX: a second ``encode_prompt`` of the negative prompts, as with ``true_cfg_scale``).
    ``texts``: the text of every row block, negatives included."""
    device, length = pipe._execution_device, max_sequence_length(pipe)
    negatives = [""] * len(prompts)
    if type(pipe).__name__ == "FluxPipeline":
        states, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1,
                                               max_sequence_length=length)
        if unconditional:
            negative, negative_pooled, _ = pipe.encode_prompt(prompt=negatives, prompt_2=None, device=device,
                                                              num_images_per_prompt=1, max_sequence_length=length)
    else:
        states, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=unconditional, max_sequence_length=length)
    if not unconditional:
        return list(prompts), states, pooled
    return negatives + list(prompts), torch.cat([negative, states]), torch.cat([negative_pooled, pooled])


def collect_text_path(pipe, prompts: list[str], first_index: int, config: dict, family: Family) -> dict:
    """``{module path: Moments}`` of an SD3/FLUX transformer's timestep-independent text path
    (:data:`nullcov.models.family.TEXT_PATH`: ``context_embedder``, ``time_text_embed.text_embedder.linear_1``)
    for the text-path streams ``config["streams"]`` names, from the text encoders alone
    (:func:`encode_transformer_text`, per prompt batch).

    ``context_embedder``'s rows are the text sequence's, chosen by ``text_tokens`` (``prompt``: the real
    tokens only, T5's padding dropped; :func:`nullcov.collection.tokens.sequence_mask`); the pooled
    projection has one row per prompt. With ``unconditional_branch`` the negative prompts' rows too
    (once per prompt, what every negative call receives). Float32 products summed in float64, as
    every statistic.
    """
    streams = selected_streams(config, family)
    keys = text_path_keys(streams)
    if not keys:
        raise ValueError(f"streams {sorted(streams)} name none of the text path's streams "
                         f"({', '.join(name for name, _ in TEXT_PATH)})")
    if config["text_tokens"] not in TRANSFORMER_TEXT_TOKENS:
        raise ValueError(f"text_tokens must be one of {', '.join(TRANSFORMER_TEXT_TOKENS)}, got "
                         f"{config['text_tokens']!r}{see('text_tokens-eos-with-a-transformer')}")
    unconditional = config["unconditional_branch"]
    check_unconditional_branch(family, config)
    context, pooled = dict(TEXT_PATH)["context"], dict(TEXT_PATH)["pooled"]
    batch_size, moments, start = config["batch_size"], {}, time.perf_counter()
    log.info("text path %s: %d prompts through %s's text encoder(s), batch %d, text_tokens %s%s", keys,
             len(prompts), type(pipe).__name__, batch_size, config["text_tokens"],
             ", with the negative prompts' states (unconditional_branch)" if unconditional else "")
    with exact_matmul(), torch.inference_mode():
        for offset in range(0, len(prompts), batch_size):
            batch = prompts[offset : offset + batch_size]
            texts, states, pooled_states = encode_transformer_text(pipe, batch, unconditional)
            real = None if config["text_tokens"] == "all" else sequence_mask(pipe, texts).to(states.device)
            for key, values, mask in ((context, states, real), (pooled, pooled_states, None)):
                if key not in keys:
                    continue
                finite = torch.isfinite(values.reshape(len(values), -1)).all(dim=1).cpu()
                if not bool(finite.all()):
                    bad, branch = prompt_of_row(int((~finite).nonzero()[0]), len(batch), len(values))
                    raise NonFiniteActivationError(first_index + offset + bad, batch[bad], key, "text", branch)
                rows = text_rows(values, mask) if values.dim() == 3 else values
                if key not in moments:
                    moments[key] = TorchMoments(rows.shape[-1], rows.device)
                moments[key].add(rows)
            done = offset + len(batch)
            if done == len(prompts) or (offset // batch_size) % 50 == 0:
                log.info("prompts %d/%d, %.1f prompts/s", done, len(prompts), done / (time.perf_counter() - start))
    return {key: moments[key].to_moments() for key in keys}


def run_feature_job(*, model_spec: str, model_dir: str, prompts: list[str], first_index: int, shard: str,
                    schedule: dict, config: dict, step_paths: dict[str, str], text_path: str | None,
                    threads: int = 1, mem_mb: int | None = None) -> None:
    """Collect one shard and write ``step_paths[name]`` per step and ``text_path``.

    ``mem_mb``: the job's host memory (Snakemake's ``resources.mem_mb``); the steps are collected
    in chunks when they do not all fit (:func:`collect_shard`), each step written and freed as
    soon as its chunk is done (each file atomically; after a failure in a later chunk the earlier
    chunks' complete files remain, and Snakemake removes the failed job's output folder).

    On a machine with several GPUs the job leases one (see :mod:`nullcov.models.gpu_lease`) and holds
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


def _collect_and_write(fingerprint: Future, *, device, model_spec, model_dir, prompts, first_index, shard, schedule,
                       config, step_paths, text_path, mem_mb=None) -> None:
    family = model_family(model_dir)
    transformer = family.denoiser == "transformer"
    truncated = _check_prompts(model_dir, family, prompts, first_index, config["strict_prompts"])
    if transformer:  # streams context/pooled alone: the text encoders give every statistic
        only_text = not step_streams(selected_streams(config, family))
    else:
        only_text = text_only(config["collect_features"])
    pipe = load_pipeline(model_dir, config["dtype"], device, text_only=only_text)
    if only_text:
        if step_paths:
            raise ValueError(f"only {'the text path' if transformer else 'k/v'} is collected (text-only job), but "
                             f"per-step outputs {sorted(step_paths)} were asked")
        layer_names, resolution = schedule.get("layers"), None
    else:
        configure_scheduler(pipe, schedule)
        if step_paths and sorted(step_paths) != sorted(step["name"] for step in schedule["steps"]):
            raise ValueError(f"outputs {sorted(step_paths)} do not match the schedule's steps")
        layer_names = [name for name, _ in shard_layers(pipe, schedule, config, family)]
        resolution = image_resolution(pipe, config["resolution"])
    provenance = {
        # The folder where it lay (the workflow may name it relatively); the fingerprint is set at the first write.
        "model": {"spec": model_spec, "path": os.path.abspath(model_dir), "fingerprint": None},
        "config": feature_config(config),
        "prompts": {"first_index": first_index, "count": len(prompts), "sha256": prompt_set_sha256(prompts),
                    "truncated": truncated, "prompts": prompts},
        "shard": shard,
        "layers": layer_names,
        "run": {"device": device, "batch_size": config["batch_size"], "resolution": resolution,
                "scheduler": None if only_text else schedule["scheduler"]["class"], "family": family.name,
                "pipeline": family.pipeline, "text_only": only_text},
        # a transformer's: real and padding text tokens of the prompts and of the negative prompts
        **({"text_tokens": text_token_counts(pipe, prompts)} if transformer else {}),
        "packages": package_versions(),
    }
    writer = _ShardWriter(provenance, fingerprint, schedule["steps"], step_paths)
    if only_text and transformer:
        text_moments = collect_text_path(pipe, prompts, first_index, config, family)
    elif only_text:
        text_moments = collect_text_shard(pipe, prompts, first_index, config)
    else:
        parameters = sum(p.numel() for p in denoiser(pipe).parameters())
        weights = memory.weights_bytes(model_dir, {"unet_parameters": parameters})
        _, text_moments, _, _ = collect_shard(pipe, prompts, first_index, schedule, config, on_step=writer.write_step,
                                              mem_mb=mem_mb, weights=weights, family=family if transformer else None)
    if text_path:
        if text_moments is None:
            raise ValueError(f"a text file ({text_path}) was asked, but this run collects no text statistic "
                             f"({'streams: ' + str(config['streams']) if transformer else 'collect_features'})")
        writer.write_text(text_path, text_moments)
    log.info("wrote %d step files%s; peak RSS of this job %.0f MB", len(writer.written),
             " and text.h5" if text_path else "", peak_rss_mb())


def _check_prompts(model_dir, family, prompts: list[str], first_index: int, strict: bool) -> int:
    """:func:`check_prompt_lengths` with each of the family's tokenizers, before the model is loaded
    (``strict_prompts`` fails fast); the most prompts one of them truncates. A T5 tokenizer (SD3,
    FLUX) is checked against the pipeline's ``max_sequence_length``."""
    import diffusers
    from transformers import CLIPTokenizer, T5TokenizerFast

    truncated = 0
    index = read_json(Path(model_dir) / "model_index.json")
    for name in family.tokenizers:
        if index[name][1].startswith("T5"):
            tokenizer = T5TokenizerFast.from_pretrained(Path(model_dir) / name, local_files_only=True)
            limit = max_sequence_length(getattr(diffusers, family.pipeline))
        else:
            tokenizer = CLIPTokenizer.from_pretrained(Path(model_dir) / name, local_files_only=True)
            limit = None
        truncated = max(truncated, check_prompt_lengths(tokenizer, prompts, first_index, strict, limit))
    return truncated


def text_token_counts(pipe, prompts: list[str]) -> dict:
    """Real and padding tokens of the text sequences a transformer receives (:mod:`nullcov.collection.tokens`),
    for the prompts and for as many negative prompts (``""``)."""
    masks = token_masks(pipe, prompts, "cpu")
    return {branch: {"real": int(masks[key].sum()), "padding": int((~masks[key]).sum())}
            for branch, key in (("prompts", "cond"), ("negative", "uncond"))}


class _ShardWriter:
    """Writes a shard's files as they come, each with the shard's provenance; the model's fingerprint
    (hashed in another thread) joins the provenance at the first write."""

    def __init__(self, provenance: dict, fingerprint: Future, steps: list[dict], step_paths: dict[str, str]):
        self.provenance, self.fingerprint = provenance, fingerprint
        self.steps, self.step_paths = steps, step_paths
        self.written: list[str] = []

    def hashed(self) -> dict:
        self.provenance["model"]["fingerprint"] = self.fingerprint.result()  # waits for the hashing thread
        return self.provenance

    def write_step(self, index: int, moments: dict) -> None:
        """``on_step`` of :func:`collect_shard`: write step ``index``'s file (when step files are asked)."""
        if not self.step_paths:
            return
        step = self.steps[index]
        attrs = {"provenance": self.hashed(), "step": {k: step[k] for k in ("index", "name", "timestep")}}
        write_moments(self.step_paths[step["name"]], "features", moments, attrs)
        self.written.append(self.step_paths[step["name"]])

    def write_text(self, path: str, moments) -> None:
        """The text file: a UNet's text states (one ``Moments``, under :data:`TEXT_KEY`), or a transformer's
        text path (``{module path: Moments}``)."""
        keyed = moments if isinstance(moments, dict) else {TEXT_KEY: moments}
        write_moments(path, "features", keyed, {"provenance": self.hashed(), "step": "text"})


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (:func:`nullcov.measurement.peak_rss_bytes`: exact,
    unlike a sampled ``benchmark:`` max_rss, which Snakemake polls every 30 s after the first 15 s)."""
    from nullcov.measurement import peak_rss_bytes

    return peak_rss_bytes() / 2**20
