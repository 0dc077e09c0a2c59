"""Cross-attention maps (the legacy ``visual_attention_map``) along the real sampler trajectory.

The probabilities ``softmax(Q Kᵀ / √d_head)`` are computed inside diffusers' attention
processor and never returned, so :class:`AttentionProbe` recomputes them from what the
processor computes anyway: forward hooks keep the outputs of ``to_q`` (the queries, image
tokens) and ``to_k`` (the keys, text tokens) of the selected cross-attention layers, and at the
selected UNet calls the probabilities are ``softmax(scale · Q Kᵀ)`` per head (``attn.scale``,
``attn.norm_q``/``norm_k`` applied as diffusers does), averaged over heads, conditional half of
the CFG batch only. Nothing in the forward pass changes: the trajectory is the feature job's.

The pipeline call is the feature job's (:data:`nullcov.models.sampling.COLLECTIONS`; ``trajectory``
through :func:`nullcov.models.sampling.sample_images`, which also decodes the images), with the same
generators: prompt ``i`` (its index in the training prompt file) is seeded ``seed + i``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math

import numpy as np
import torch

from nullcov.collection.capture import conditional_rows
from nullcov.collection.hooks import Hook, forward_hooks
from nullcov.models.device import use_device
from nullcov.models.gpu_lease import lease_device
from nullcov.models.model import cross_attention_modules, image_resolution, load_pipeline, select_layers
from nullcov.models.sampling import COLLECTIONS, configure_scheduler, prompt_generator, sample_images
from nullcov.prompts import prompt_set_sha256
from nullcov.provenance import feature_config, model_fingerprint, package_versions
from nullcov.statistics.store import read_arrays, write_arrays

log = logging.getLogger(__name__)

#: The store kind (``nullcov_kind``) of ``attention_maps.h5``.
ATTENTION_KIND = "attention"


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


def collect_attention_maps(pipe, prompts: list[str], prompt_indices: list[int], schedule: dict, config: dict,
                           layer_names: list[str], step_indices: list[int]) -> dict:
    """Run the feature job's pipeline call on ``prompts`` and return their attention maps.

    The ``trajectory`` collection draws the images with :func:`nullcov.models.sampling.sample_images`
    (the same trajectory, decoded); ``noised`` runs its driver and draws none.

    Returns ``{"maps": {(prompt position, step index, layer): float32 [tokens, h, w]},
    "tokens": [labels per prompt], "images": float [P, H, W, 3] in 0..1 or None}`` where the
    maps keep the text positions BOS..EOS only.
    """
    modules = dict(cross_attention_modules(pipe.unet))
    layers = [(name, modules[name]) for name in layer_names]
    resolution = image_resolution(pipe, config["resolution"])
    latent = resolution // pipe.vae_scale_factor
    run = sample_images if config["collection"] == "trajectory" else COLLECTIONS[config["collection"]]
    batch_size = config["batch_size"]
    tokens = [prompt_tokens(pipe.tokenizer, prompt) for prompt in prompts]
    maps, images = {}, []
    with torch.inference_mode(), AttentionProbe(pipe.unet, layers, step_indices) as probe:
        for offset in range(0, len(prompts), batch_size):
            batch = prompts[offset : offset + batch_size]
            indices = prompt_indices[offset : offset + batch_size]
            generators = [prompt_generator(config["seed"], index) for index in indices]
            probe.begin_batch(len(batch))
            drawn = run(pipe, batch, generators, schedule, config["guidance_scale"], resolution)
            calls = probe.end_batch()
            if calls != len(schedule["steps"]):
                expected = len(schedule["steps"])
                raise RuntimeError(f"the UNet was called {calls} times; the schedule has {expected} steps")
            if drawn is not None:
                images.append(drawn)
            log.info("attention maps: prompts %d/%d", offset + len(batch), len(prompts))
        found = probe.result()
    for (step, layer), probabilities in found.items():
        height, width = grid_shape(probabilities.shape[1], latent, latent)
        for position in range(len(prompts)):
            count = len(tokens[position])
            grid = probabilities[position, :, :count].T.reshape(count, height, width)
            maps[(position, step, layer)] = grid.numpy().astype(np.float32)
    return {"maps": maps, "tokens": tokens, "images": np.concatenate(images) if images else None}


def run_attention_job(*, model_dir: str, prompts: list[str], prompt_indices: list[int], schedule: dict, config: dict,
                      layer_selection, step_indices: list[int], figure_paths: dict, data_path, threads: int = 1):
    """The attention-map job: maps of every (prompt, step, layer), one PNG grid per (prompt, step).

    ``prompts[j]`` is the prompt whose index in the prompt file is ``prompt_indices[j]`` (its
    seed is ``seed + prompt_indices[j]``, as in the feature job).

    ``figure_paths[(prompt index, step name)]`` is the PNG path; ``data_path`` the HDF5 file of
    the maps (:func:`write_maps`: datasets ``prompt_{i:04d}/{step}/{layer}/maps`` [tokens, h, w],
    checksummed, with provenance).
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
        provenance = attention_provenance(model_dir, selected, prompt_indices, config, device, schedule)
        write_maps(data_path, found, prompt_indices, selected, schedule, step_indices, layer_names, provenance)
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


def attention_provenance(model_dir, prompts: list[str], prompt_indices: list[int], config: dict, device: str,
                         schedule: dict) -> dict:
    """What made an attention-maps file: the model (path, fingerprint), the feature config, the prompts
    and their indices (the seeds), the run's device, batch size and sampler, the packages."""
    return {
        "model": {"path": str(model_dir), "fingerprint": model_fingerprint(model_dir)},
        "config": feature_config(config),
        "prompts": {"indices": list(prompt_indices), "count": len(prompts), "sha256": prompt_set_sha256(prompts),
                    "prompts": list(prompts)},
        "run": {"device": str(device), "batch_size": config["batch_size"], "scheduler": schedule["scheduler"]["class"]},
        "packages": package_versions(),
    }


def write_maps(path, found, prompt_indices, prompts, schedule, step_indices, layer_names, provenance: dict) -> None:
    """``attention_maps.h5`` through the store (:func:`nullcov.statistics.store.write_arrays`, kind
    ``attention``: atomic, checksummed, with ``provenance``): datasets ``prompt_{i:04d}/{step}/{layer}/maps``
    (float32 [tokens, h, w]) and ``prompt_{i:04d}/image`` (float32 [H, W, 3], trajectory collection only);
    JSON attributes ``prompts`` (``index``, ``prompt``, ``tokens`` of each), ``steps`` (``index``, ``name``,
    ``timestep``) and ``layers``."""
    names = {step: schedule["steps"][step]["name"] for step in step_indices}
    arrays = {}
    for position, index in enumerate(prompt_indices):
        for step, layer in itertools.product(step_indices, layer_names):
            arrays[f"prompt_{index:04d}/{names[step]}/{layer}/maps"] = found["maps"][(position, step, layer)]
        if found["images"] is not None:
            arrays[f"prompt_{index:04d}/image"] = found["images"][position].astype(np.float32)
    prompt_entries = [{"index": index, "prompt": prompts[position], "tokens": found["tokens"][position]}
                      for position, index in enumerate(prompt_indices)]
    steps = [{"index": step, "name": names[step], "timestep": schedule["steps"][step]["timestep"]}
             for step in step_indices]
    attrs = {"provenance": provenance, "prompts": prompt_entries, "steps": steps, "layers": list(layer_names)}
    write_arrays(path, ATTENTION_KIND, arrays, attrs)


def read_maps(path) -> dict:
    """From :func:`write_maps`, validated by the store (:func:`nullcov.statistics.store.read_arrays`: a
    damaged file raises ``StatisticsFileError`` naming it): ``maps`` ``{(prompt index, step name, layer):
    maps}``, ``tokens`` and ``images`` per prompt index, and the ``provenance``."""
    arrays, attrs = read_arrays(path, ATTENTION_KIND)
    maps, images = {}, {}
    for name, array in arrays.items():
        prompt_name, *rest = name.split("/")
        index = int(prompt_name.removeprefix("prompt_"))
        if rest == ["image"]:
            images[index] = array
        else:
            step_name, layer, _ = rest
            maps[(index, step_name, layer)] = array
    tokens = {entry["index"]: entry["tokens"] for entry in attrs["prompts"]}
    return {"maps": maps, "tokens": tokens, "images": images, "provenance": attrs["provenance"]}
