"""The fine-tune proof: does a projected fine-tune learn a concept while leaving other prompts alone?

A short DreamBooth-style fine-tune of the cross-attention linears (``to_q``, ``to_k``, ``to_v``,
``to_out.0`` weights of every ``attn2``; biases frozen) on one new concept — a prompt with a
made-up token and a few fixed "instance" latents — with the standard denoising loss (noise
added by the model's training schedule at a uniform integer ``t``), run three times from the
same weights, data and seeds:

- ``unconstrained``: plain AdamW;
- ``per-timestep``: :class:`nullcov.training.NullSpaceConstraint`, each update projected with
  the projection of its batch's timestep (``nearest``);
- ``all-timesteps``: each update projected with the null space of the sum of every scheduled
  step's statistic (protects the whole sampling trajectory; see :mod:`nullcov.training`).

Reported per variant: the concept's denoising loss on a fixed evaluation set (fixed ``t`` and
noise) before and after, and how far preserved prompts move under the sampler the statistics
were collected with, same seeds: ``‖o − o₀‖ / ‖o₀‖`` of every attn2 output over the whole
trajectory, and of the final latents, for held-out prompts (validation prompts, not in the
statistics) and for trained prompts (in the statistics, where the projection's bound holds).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

CONCEPT_PROMPT = "a photo of sks toy"
VARIANTS = ("unconstrained", "per-timestep", "all-timesteps")
PROMPT_SETS = ("held_out", "trained")  # validation prompts; prompts in the statistics
TABLE_COLUMNS = ("variant", "steps", "concept_loss_before", "concept_loss_after", "weight_update_norm",
                 *(f"{kind}_{prompts}" for prompts in PROMPT_SETS for kind in ("attn2_output_change",
                                                                               "final_latent_change")))


def _attn2_weights(unet) -> list[torch.nn.Parameter]:
    from nullcov.training import find_cross_attention_linears

    return [item.module.weight for item in find_cross_attention_linears(unet)]


def _concept_batch(pipe, num_instances: int, seed: int, resolution: int):
    """The concept: its prompt's embedding and ``num_instances`` fixed instance latents."""
    size = resolution // pipe.vae_scale_factor
    generator = torch.Generator("cpu").manual_seed(seed)
    # a structured "object": a shared random pattern plus small per-instance variation
    pattern = torch.randn(1, pipe.unet.config.in_channels, size, size, generator=generator)
    instances = pattern + 0.3 * torch.randn(num_instances, *pattern.shape[1:], generator=generator)
    embedding, _ = pipe.encode_prompt([CONCEPT_PROMPT], pipe.device, 1, do_classifier_free_guidance=False)
    return embedding.detach(), instances.to(pipe.device)


def _denoising_loss(unet, noise_scheduler, latents, embedding, timesteps, noise):
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, embedding.expand(len(latents), -1, -1)).sample
    target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
        noise_scheduler.get_velocity(latents, noise, timesteps)
    return torch.nn.functional.mse_loss(prediction, target)


def _preserved_outputs(pipe, prompts, generators, schedule, guidance_scale, resolution):
    """Every attn2 output of every UNet call (in call order) and the final latents."""
    from nullcov.model import cross_attention_modules

    outputs: list[torch.Tensor] = []
    handles = [module.register_forward_hook(lambda m, a, out: outputs.append(out.detach().double().cpu()))
               for _, module in cross_attention_modules(pipe.unet)]
    try:
        with torch.no_grad():
            latents = pipe(prompt=prompts, guidance_scale=guidance_scale, generator=generators, height=resolution,
                           width=resolution, output_type="latent", **schedule["set_timesteps"]).images
    finally:
        for handle in handles:
            handle.remove()
    return outputs, latents.detach().double().cpu()


def _relative_change(new: list[torch.Tensor], old: list[torch.Tensor]) -> float:
    changes = [float((a - b).norm() / b.norm()) for a, b in zip(new, old, strict=True)]
    return float(np.mean(changes))


def run_finetune_proof(*, model_dir, results_dir, schedule: dict, preserved: dict[str, tuple[list[str], int]],
                       config: dict, steps: int = 40, batch_size: int = 2, learning_rate: float = 5e-4,
                       num_instances: int = 4) -> tuple[list[dict], dict]:
    """Run the three variants; returns the table rows and each variant's per-step training loss.

    ``preserved``: ``held_out`` and ``trained`` -> (prompts, index of the first one: seeds are
    ``seed + index``, as in the feature job).
    """
    from diffusers import DDPMScheduler

    from nullcov.features import configure_scheduler, prompt_generators
    from nullcov.model import load_pipeline, resolve_device
    from nullcov.training import NullSpaceConstraint

    device = resolve_device(config["device"])
    pipe = load_pipeline(model_dir, "float32", device)
    configure_scheduler(pipe, schedule)
    resolution = config["resolution"] or pipe.unet.config.sample_size * pipe.vae_scale_factor
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    num_train = noise_scheduler.config.num_train_timesteps
    unet = pipe.unet
    unet.requires_grad_(False)
    weights = _attn2_weights(unet)
    initial = [w.detach().clone() for w in weights]
    embedding, instances = _concept_batch(pipe, num_instances, config["seed"], resolution)
    evaluation = torch.Generator("cpu").manual_seed(config["seed"] + 1)
    eval_t = torch.linspace(0, num_train - 1, 8).round().long().to(device)
    eval_latents = instances[torch.arange(8) % num_instances]
    eval_noise = torch.randn(eval_latents.shape, generator=evaluation).to(device)

    def concept_loss() -> float:
        with torch.no_grad():
            return float(_denoising_loss(unet, noise_scheduler, eval_latents, embedding, eval_t, eval_noise))

    def preserved_outputs():
        found = {}
        for kind in PROMPT_SETS:
            prompts, first_index = preserved[kind]
            generators = prompt_generators(config["seed"], first_index, len(prompts))
            found[kind] = _preserved_outputs(pipe, prompts, generators, schedule, config["guidance_scale"], resolution)
        return found

    base = preserved_outputs()
    base_loss = concept_loss()
    every_step = [step["timestep"] for step in schedule["steps"]]
    rows, curves = [], {}
    for variant in VARIANTS:
        with torch.no_grad():
            for weight, start in zip(weights, initial):
                weight.copy_(start)
        for weight in weights:
            weight.requires_grad_(True)
        constraint = None if variant == "unconstrained" else NullSpaceConstraint(unet, results_dir, mode="nearest")
        optimizer = torch.optim.AdamW(weights, lr=learning_rate, weight_decay=1e-2)
        generator = torch.Generator("cpu").manual_seed(config["seed"] + 2)  # same data for every variant
        curves[variant] = []
        for _ in range(steps):
            t = int(torch.randint(0, num_train, (1,), generator=generator))
            chosen = torch.randint(0, num_instances, (batch_size,), generator=generator)
            noise = torch.randn((batch_size, *instances.shape[1:]), generator=generator).to(device)
            timesteps = torch.full((batch_size,), t, device=device)
            loss = _denoising_loss(unet, noise_scheduler, instances[chosen], embedding, timesteps, noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if variant == "per-timestep":
                constraint.project([t])
            elif variant == "all-timesteps":
                constraint.project(every_step)
            curves[variant].append(loss.item())
        for weight in weights:
            weight.requires_grad_(False)
        after = preserved_outputs()
        update = float(torch.sqrt(sum(((w - s).double() ** 2).sum() for w, s in zip(weights, initial))))
        row = {"variant": variant, "steps": steps, "concept_loss_before": base_loss,
               "concept_loss_after": concept_loss(), "weight_update_norm": update}
        for kind in PROMPT_SETS:
            row[f"attn2_output_change_{kind}"] = _relative_change(after[kind][0], base[kind][0])
            row[f"final_latent_change_{kind}"] = _relative_change([after[kind][1]], [base[kind][1]])
        rows.append(row)
        log.info("%s", rows[-1])
    return rows, curves


def write_table(path, rows: list[dict]) -> None:
    lines = ["\t".join(TABLE_COLUMNS)]
    for row in rows:
        lines.append("\t".join(f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c]) for c in TABLE_COLUMNS))
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def draw_figure(path, rows: list[dict], curves: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, change_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for variant, losses in curves.items():
        window = max(1, len(losses) // 8)
        smoothed = np.convolve(losses, np.ones(window) / window, mode="valid")
        loss_axis.plot(np.arange(len(smoothed)) + window, smoothed, label=variant)
    loss_axis.set(xlabel="training step", ylabel=f"concept loss (moving mean of {window})",
                  title=f"learning {CONCEPT_PROMPT!r}")
    loss_axis.legend()
    positions = np.arange(len(rows))
    bars = [(f"{kind}_{prompts}", f"{label}, {prompts.replace('_', '-')}") for prompts in PROMPT_SETS
            for kind, label in (("attn2_output_change", "attn2 outputs"), ("final_latent_change", "final latents"))]
    width = 0.8 / len(bars)
    for offset, (column, label) in enumerate(bars):
        change_axis.bar(positions + (offset - (len(bars) - 1) / 2) * width, [r[column] for r in rows], width,
                        label=label)
    change_axis.set_xticks(positions, [r["variant"] for r in rows])
    change_axis.set_yscale("log")
    change_axis.set(ylabel="relative change ‖o − o₀‖/‖o₀‖", title="how far preserved prompts moved")
    change_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
