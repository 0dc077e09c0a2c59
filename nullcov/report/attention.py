"""Cross-attention maps (the legacy ``visual_attention_map``) along the real sampler trajectory.

The probabilities ``softmax(Q Kᵀ / √d_head)`` are computed inside diffusers' attention
processor and never returned, so :class:`AttentionProbe` recomputes them from what the
processor computes anyway: forward hooks keep the outputs of ``to_q`` (the queries, image
tokens) and ``to_k`` (the keys, text tokens) of the selected cross-attention layers, and at the
selected UNet calls the probabilities are ``softmax(scale · Q Kᵀ)`` per head (``attn.scale``,
``attn.norm_q``/``norm_k`` applied as diffusers does), averaged over heads, conditional half of
the CFG batch only. Nothing in the forward pass changes: the trajectory is the feature job's.

The pipeline call is the feature job's (:data:`nullcov.models.sampling.COLLECTIONS`), with the same
generators: prompt ``i`` (its index in the training prompt file) is seeded ``seed + i``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from nullcov.collection.capture import conditional_rows
from nullcov.collection.hooks import Hook, forward_hooks
from nullcov.files import atomic_path
from nullcov.models.device import use_device
from nullcov.models.gpu_lease import lease_device
from nullcov.models.model import cross_attention_modules, image_resolution, load_pipeline, select_layers
from nullcov.models.sampling import COLLECTIONS, configure_scheduler, prompt_generator

log = logging.getLogger(__name__)


class AttentionProbe:
    """Head-averaged cross-attention probabilities of ``layers`` at the UNet calls ``steps``.

    ``maps[(step, layer)]`` is a float32 CPU tensor ``[prompts, image tokens, text tokens]``
    (conditional half only), concatenated over the batches in the order they ran.
    """

    def __init__(self, unet, layers, steps):
        self.steps = set(steps)
        self.maps: dict[tuple[int, str], list[torch.Tensor]] = {}
        self._batch = None
        hooks = [Hook(unet, self._on_unet_call, before=True, with_kwargs=True)]
        for name, module in layers:
            hooks.append(Hook(module.to_q, functools.partial(self._keep_query, name)))
            hooks.append(Hook(module.to_k, functools.partial(self._attend, name, module)))
        self._opened = contextlib.ExitStack()
        self._opened.enter_context(forward_hooks(hooks))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Remove the hooks."""
        self._opened.close()

    def begin_batch(self, size: int) -> None:
        self._batch = {"size": size, "calls": 0, "step": None, "cond": None, "query": {}}

    def end_batch(self) -> int:
        """Ends the batch; returns the number of UNet calls it made."""
        batch, self._batch = self._batch, None
        return batch["calls"]

    def _on_unet_call(self, module, args, kwargs):
        batch = self._batch
        if batch is None:
            raise RuntimeError("UNet called outside begin_batch()/end_batch()")
        sample = args[0] if args else kwargs["sample"]
        batch["cond"] = conditional_rows(sample.shape[0], batch["size"])
        batch["step"] = batch["calls"]
        batch["calls"] += 1

    def _keep_query(self, name: str, module, args, output) -> None:
        """``to_q``'s forward hook: keep the queries (conditional rows) of a selected step."""
        if self._batch["step"] in self.steps:
            self._batch["query"][name] = output[self._batch["cond"]]

    def _attend(self, name: str, attn, module, args, output) -> None:
        """``to_k``'s forward hook: the probabilities of the kept queries against these keys."""
        batch = self._batch
        if batch["step"] not in self.steps:
            return
        query, key = batch["query"].pop(name), output[batch["cond"]]
        probabilities = attention_probabilities(attn, query, key)
        self.maps.setdefault((batch["step"], name), []).append(probabilities.cpu())

    def result(self) -> dict[tuple[int, str], torch.Tensor]:
        return {index: torch.cat(parts) for index, parts in self.maps.items()}


def attention_probabilities(attn, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Head-averaged ``softmax(attn.scale · Q Kᵀ)`` [B, N, L] from ``to_q``/``to_k`` outputs, in float32."""
    batch, heads = query.shape[0], attn.heads
    head_dim = query.shape[-1] // heads
    query = query.reshape(batch, -1, heads, head_dim).transpose(1, 2)
    key = key.reshape(batch, -1, heads, head_dim).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)
    scores = (query.float() @ key.float().transpose(-1, -2)) * attn.scale
    return scores.softmax(dim=-1).mean(dim=1)


def grid_shape(tokens: int, latent_height: int, latent_width: int) -> tuple[int, int]:
    """(h, w) of a layer's token grid: the latent grid downsampled by a power of two."""
    factor = math.sqrt(latent_height * latent_width / tokens)
    height, width = round(latent_height / factor), round(latent_width / factor)
    if height * width != tokens:
        raise ValueError(f"{tokens} image tokens do not form a grid of a {latent_height}x{latent_width} latent")
    return height, width


def prompt_tokens(tokenizer, prompt: str) -> list[str]:
    """The prompt's tokens BOS..EOS as short labels (``<bos>``, word pieces, ``<eos>``)."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    end = ids.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in ids else len(ids) - 1
    labels = []
    for position, token in enumerate(tokenizer.convert_ids_to_tokens(ids[: end + 1])):
        if position == 0 and ids[0] == tokenizer.bos_token_id:
            labels.append("<bos>")
        elif position == end:
            labels.append("<eos>")
        else:
            labels.append(token.replace("</w>", "") or "·")
    return labels


class _FinalLatents:
    """Keeps the last ``scheduler.step`` output (the final latents of a trajectory)."""

    def __init__(self, scheduler):
        self.scheduler, self.step, self.latents = scheduler, scheduler.step, None

    def __enter__(self):
        self.scheduler.step = self._step
        return self

    def _step(self, *args, **kwargs):
        output = self.step(*args, **kwargs)
        self.latents = output[0] if isinstance(output, tuple) else output.prev_sample
        return output

    def __exit__(self, *exc):
        del self.scheduler.step  # the instance attribute; the class method shows again


def collect_attention_maps(pipe, prompts: list[str], prompt_indices: list[int], schedule: dict, config: dict,
                           layer_names: list[str], step_indices: list[int]) -> dict:
    """Run the feature job's pipeline call on ``prompts`` and return their attention maps.

    Returns ``{"maps": {(prompt position, step index, layer): float32 [tokens, h, w]},
    "tokens": [labels per prompt], "images": float [P, H, W, 3] in 0..1 or None}`` where the
    maps keep the text positions BOS..EOS only.
    """
    modules = dict(cross_attention_modules(pipe.unet))
    layers = [(name, modules[name]) for name in layer_names]
    resolution = image_resolution(pipe, config["resolution"])
    latent = resolution // pipe.vae_scale_factor
    run = COLLECTIONS[config["collection"]]
    batch_size = config["batch_size"]
    tokens = [prompt_tokens(pipe.tokenizer, prompt) for prompt in prompts]
    maps, images = {}, []
    with torch.inference_mode(), AttentionProbe(pipe.unet, layers, step_indices) as probe:
        for offset in range(0, len(prompts), batch_size):
            batch = prompts[offset : offset + batch_size]
            indices = prompt_indices[offset : offset + batch_size]
            generators = [prompt_generator(config["seed"], index) for index in indices]
            probe.begin_batch(len(batch))
            with _FinalLatents(pipe.scheduler) as final:
                run(pipe, batch, generators, schedule, config["guidance_scale"], resolution)
            calls = probe.end_batch()
            if calls != len(schedule["steps"]):
                expected = len(schedule["steps"])
                raise RuntimeError(f"the UNet was called {calls} times; the schedule has {expected} steps")
            if config["collection"] == "trajectory" and final.latents is not None:
                images.append(decode(pipe, final.latents))
            log.info("attention maps: prompts %d/%d", offset + len(batch), len(prompts))
        found = probe.result()
    for (step, layer), probabilities in found.items():
        height, width = grid_shape(probabilities.shape[1], latent, latent)
        for position in range(len(prompts)):
            count = len(tokens[position])
            grid = probabilities[position, :, :count].T.reshape(count, height, width)
            maps[(position, step, layer)] = grid.numpy().astype(np.float32)
    return {"maps": maps, "tokens": tokens, "images": np.concatenate(images) if images else None}


def decode(pipe, latents: torch.Tensor) -> np.ndarray:
    """Final latents -> images [B, H, W, 3] in 0..1 (the pipeline's own VAE decode and postprocess)."""
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True] * image.shape[0])


def run_attention_job(*, model_dir: str, prompts: list[str], prompt_indices: list[int], schedule: dict, config: dict,
                      layer_selection, step_indices: list[int], figure_paths: dict, data_path, threads: int = 1):
    """The attention-map job: maps of every (prompt, step, layer), one PNG grid per (prompt, step).

    ``prompts[j]`` is the prompt whose index in the prompt file is ``prompt_indices[j]`` (its
    seed is ``seed + prompt_indices[j]``, as in the feature job).

    ``figure_paths[(prompt index, step name)]`` is the PNG path; ``data_path`` an HDF5 file
    with the maps (group ``prompt_{i:04d}/{step}/{layer}``, dataset ``maps`` [tokens, h, w],
    attribute ``tokens``).
    """
    from nullcov.report.figures_attention import attention_figure

    if len(prompts) != len(prompt_indices):
        raise ValueError(f"{len(prompts)} prompts for {len(prompt_indices)} prompt indices")
    torch.set_num_threads(threads)
    with lease_device(config["device"], label="attention maps") as lease:
        device = use_device(lease.device)
        log.info("attention maps of prompts %s at steps %s on device %s", prompt_indices, step_indices, device)
        pipe = load_pipeline(model_dir, config["dtype"], device)
        configure_scheduler(pipe, schedule)
        available = [name for name, _ in cross_attention_modules(pipe.unet)]
        layer_names = select_layers(available, layer_selection)
        selected = list(prompts)
        found = collect_attention_maps(pipe, selected, prompt_indices, schedule, config, layer_names, step_indices)
        write_maps(data_path, found, prompt_indices, selected, schedule, step_indices, layer_names)
        steps = schedule["steps"]
        for position, index in enumerate(prompt_indices):
            for step in step_indices:
                panels = [(layer, found["maps"][(position, step, layer)]) for layer in layer_names]
                image = None if found["images"] is None else found["images"][position]
                attention_figure(
                    figure_paths[(index, steps[step]["name"])], panels, found["tokens"][position], image,
                    prompt=selected[position], prompt_index=index, seed=config["seed"] + index, step=steps[step],
                )
        log.info("wrote %d attention figures", len(figure_paths))


def write_maps(path, found, prompt_indices, prompts, schedule, step_indices, layer_names) -> None:
    import h5py

    with atomic_path(path) as temporary:
        with h5py.File(temporary, "w") as handle:
            handle.attrs["nullcov_kind"] = "attention"
            for position, index in enumerate(prompt_indices):
                group = handle.create_group(f"prompt_{index:04d}")
                group.attrs["prompt"] = prompts[position]
                group.attrs["tokens"] = json.dumps(found["tokens"][position])
                for step in step_indices:
                    step_group = group.create_group(schedule["steps"][step]["name"])
                    step_group.attrs["timestep"] = schedule["steps"][step]["timestep"]
                    for layer in layer_names:
                        maps = found["maps"][(position, step, layer)]
                        step_group.create_group(layer).create_dataset("maps", data=maps)
                if found["images"] is not None:
                    group.create_dataset("image", data=found["images"][position].astype(np.float32))


def read_maps(path) -> dict:
    """``{(prompt index, step name, layer): maps}`` and tokens per prompt index, from :func:`write_maps`."""
    import h5py

    maps, tokens = {}, {}
    with h5py.File(Path(path), "r") as handle:
        for prompt_name, group in handle.items():
            index = int(prompt_name.split("_")[1])
            tokens[index] = json.loads(group.attrs["tokens"])
            for step_name, step_group in group.items():
                if isinstance(step_group, h5py.Dataset):
                    continue
                for layer, layer_group in step_group.items():
                    maps[(index, step_name, layer)] = layer_group["maps"][()]
    return {"maps": maps, "tokens": tokens}
