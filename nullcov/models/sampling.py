"""The sampler drivers: how one prompt batch runs through a model's own diffusers pipeline.

Every job that samples goes through here, so each sees the trajectory the feature job collects:
the feature job (:mod:`nullcov.collection.features`), the attention maps (:mod:`nullcov.report.attention`), the
fine-tune proof (:mod:`nullcov.proof.experiment`), the validation tests and the benchmarks.

- :func:`configure_scheduler` installs the sampler of ``results/schedule.json`` on a pipeline
  and checks that it reproduces the file's timesteps.
- :func:`prompt_generator`: prompt ``i`` (0-based among all prompts) draws its latents and sampler
  noise from a CPU generator seeded ``seed + i``, so results depend on neither shard size, batch
  size nor device.
- :data:`COLLECTIONS`: one driver per ``collection``. ``trajectory`` (default) is the real
  pipeline call, whose every UNet call is a scheduled step; ``noised`` reproduces the legacy
  tool: per step a Gaussian latent noised to the timestep, one UNet call, conditional embedding
  only. Both can stop after a chunk of steps (a chunked feature job replays from the start).
- :func:`sample_images`: the images the pipeline draws for one batch of prompts (the whole
  trajectory, decoded): the one image sampler of the proof, the attention maps and the shapes
  benchmark, with an optional UNet other than the pipeline's for the call.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from nullcov.docs import see
from nullcov.models.device import module_device
from nullcov.models.model import denoiser, image_resolution, image_sequence_length
from nullcov.models.schedule import build_schedule, is_flow_matching, make_scheduler, pipeline_arguments


class ScheduleFileError(RuntimeError):
    """results/schedule.json does not describe what this model's sampler does."""


def prompt_generator(seed: int, index: int) -> torch.Generator:
    """Prompt ``index``'s own CPU generator (latents and sampler noise): seeded ``seed + index``."""
    return torch.Generator("cpu").manual_seed(seed + index)


def prompt_generators(seed: int, first_index: int, count: int) -> list[torch.Generator]:
    """The generators of ``count`` consecutive prompts starting at ``first_index``."""
    return [prompt_generator(seed, first_index + offset) for offset in range(count)]


def flow_of(pipe, resolution: int | None) -> dict | None:
    """``build_schedule``'s ``flow`` for a flow-matching pipeline at ``resolution`` (None: its native
    size); None for a UNet pipeline."""
    if not is_flow_matching(pipe.scheduler.config):
        return None
    side = image_resolution(pipe, resolution)
    return {"pipeline": type(pipe).__name__, "resolution": side,
            "image_seq_len": image_sequence_length(type(pipe).__name__, denoiser(pipe).config, pipe.vae_scale_factor,
                                                   side)}


def configure_scheduler(pipe, schedule: dict) -> None:
    """Install the schedule's sampler on ``pipe`` and check it reproduces ``schedule``'s steps (a
    flow-matching schedule at its own resolution: a run at another resolution is refused by the caller)."""
    strategy, steps = schedule["strategy"], schedule["num_denoising_steps"]
    expected = [step["timestep"] for step in schedule["steps"]]
    flow = flow_of(pipe, schedule["flow_matching"]["resolution"]) if "flow_matching" in schedule else None
    rebuilt = [step["timestep"] for step in
               build_schedule(dict(pipe.scheduler.config), strategy, steps, flow)["steps"]]
    if rebuilt != expected:
        raise ScheduleFileError(
            f"results/schedule.json lists timesteps {expected}, but this model's scheduler config gives {rebuilt} "
            f"for {strategy!r} with {steps} steps; rerun the schedule rule{see('schedule-and-sampler-disagree')}"
        )
    pipe.scheduler = make_scheduler(pipe.scheduler.config, strategy)


class _StopAfter:
    """A ``callback_on_step_end`` that interrupts the pipeline once ``stop`` steps have run
    (diffusers' ``interrupt``: later steps call nothing)."""

    def __init__(self, stop: int):
        self.stop = stop

    def __call__(self, pipeline, index, timestep, tensors) -> dict:
        if index + 1 >= self.stop:
            pipeline._interrupt = True
        return {}


def run_trajectory(pipe, prompts, generators, schedule, guidance_scale, resolution, chunk: range | None = None,
                   true_cfg_scale: float | None = None) -> None:
    """The sampler from the first step through ``chunk``'s last (a replay: the same seeds give
    the same trajectory), interrupted there. ``chunk`` None: every step. ``true_cfg_scale`` (FLUX
    only): a separate negative call (empty negative prompt) after each conditional one."""
    stop = len(schedule["steps"]) if chunk is None else chunk.stop
    extra = {} if true_cfg_scale is None else {"true_cfg_scale": true_cfg_scale, "negative_prompt": [""] * len(prompts)}
    pipe(
        prompt=prompts,
        guidance_scale=guidance_scale,
        generator=generators,
        height=resolution,
        width=resolution,
        output_type="latent",
        callback_on_step_end=_StopAfter(stop) if stop < len(schedule["steps"]) else None,
        **pipeline_arguments(schedule),
        **extra,
    )


def run_noised(pipe, prompts, generators, schedule, guidance_scale, resolution, chunk: range | None = None) -> None:
    """Per step of ``chunk`` one UNet call; every earlier step's noise is drawn all the same (the
    generators' state, hence the result, does not depend on the chunking). ``chunk`` None: every step."""
    chunk = range(len(schedule["steps"])) if chunk is None else chunk
    from diffusers.utils.torch_utils import randn_tensor

    device, dtype = module_device(pipe.unet), pipe.unet.dtype
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


#: The sampler driver of each ``collection``: ``run(pipe, prompts, generators, schedule,
#: guidance_scale, resolution, chunk=None)``.
COLLECTIONS = {"trajectory": run_trajectory, "noised": run_noised}


def sample_images(pipe, prompts: list[str], generators: list[torch.Generator], schedule: dict, guidance_scale: float,
                  resolution: int | None = None, *, unet=None) -> np.ndarray:
    """Images [N, H, W, 3] (float32, 0..1) the pipeline draws for one batch of ``prompts``.

    Prompt ``j`` draws its latents and sampler noise from ``generators[j]`` (:func:`prompt_generator`),
    the installed scheduler (:func:`configure_scheduler`) runs ``schedule``'s timesteps with CFG
    ``guidance_scale``, at ``resolution`` pixels square (None: the UNet's native size), and the
    pipeline decodes the final latents. ``unet`` (None: the pipeline's own UNet, or an SD3/FLUX pipeline's
    transformer) denoises this call only: the pipeline's own is put back afterwards, also on an error.
    """
    component = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    own = getattr(pipe, component)
    if unet is not None:
        setattr(pipe, component, unet)
    try:
        side = image_resolution(pipe, resolution)
        output = pipe(
            prompt=prompts,
            guidance_scale=guidance_scale,
            height=side,
            width=side,
            generator=generators,
            output_type="np",
            **pipeline_arguments(schedule),
        )
    finally:
        if unet is not None:
            setattr(pipe, component, own)
    return output.images.astype(np.float32)
