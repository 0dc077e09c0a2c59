"""The fine-tune proof's training mechanics on an SD3/FLUX transformer (flow matching), without an evaluator.

The proof (:mod:`nullcov.proof.experiment`) is written around a UNet and the shapes evaluator; no
evaluator reads a random tiny MMDiT's images (nor, yet, any SD3/FLUX model's). What does apply is run
here, from the same plan (:class:`nullcov.proof.plan.ProofPlan`) and the same building blocks: the
concept's renders (:mod:`nullcov.proof.data`) encoded by the model's own VAE (``shift_factor`` too),
its captions by its own text encoders, and every run trains ``fixed_steps`` AdamW steps from the same
weights, data and seeds:

- ``unconstrained``: plain AdamW on the trained linears;
- ``projected`` (each scope and projection setting of the plan): AdamW with
  :class:`nullcov.training.constraint.NullSpaceConstraint` (gradients projected too), nearest mode;
- ``projected-lora``: peft LoRA on the same linears, ``A ← A P`` (the plan's own setting: without an
  evaluator no projected setting is better than another), and ``random-*`` controls (same-rank random
  projections, :mod:`nullcov.proof.controls`).

The trained linears are the constrained linears (:func:`nullcov.models.model.constrained_linears`)
whose projections the run holds: every stream linear and every linear sharing a stream's input, the
text path's when it was collected. The loss is flow matching's: ``x_t = (1 − σ) x_0 + σ ε``, the
transformer predicts ``ε − x_0``; SD3 gets the timestep ``1000·σ`` and the pooled projections, FLUX
``1000·σ / 1000`` (:attr:`nullcov.models.family.Family.timestep_divisor`), packed 2 × 2 latents with
their image ids, the text ids and, when its config embeds guidance, ``guidance_scale``. Each batch's
timestep is one of the scheduler's 1000 training timesteps ``1000·σ`` (drawn as the UNet proof draws
its integer ones, :func:`nullcov.proof.experiment.batch_timestep`), and the constraint gets exactly
that float.

Each run gives the trained linears' weights (LoRA merged; the job writes them as
:data:`nullcov.layout.FINETUNE_TRANSFORMER_WEIGHTS`, :func:`nullcov.proof.job.finetune_proof_job`) and one
row of the proof's table (:data:`nullcov.proof.report.COLUMNS`): losses, ``‖ΔW‖`` and the share of the
update outside the null spaces it was projected into (:func:`nullcov.proof.experiment.update_columns`);
every evaluator column is NaN and ``reached_target`` is ``-`` (no evaluator). Refused by name: the variants that need
what a transformer run lacks (prior preservation's class images are sampled and compared by the
evaluator's world; ``projected-kv`` and ``custom-diffusion`` train a UNet's ``to_k``/``to_v``).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, replace

import torch

from nullcov.proof import data as proof_data
from nullcov.proof import experiment
from nullcov.proof.plan import FLOW_KINDS, FLOW_REFUSED_KEYS, ProofPlan, ProofSettings, Variant

log = logging.getLogger(__name__)


@dataclass
class FlowData:
    """What the fine-tunes train on: the instances' VAE latents [N, C, h, w] and their captions' text
    sequence and pooled projections (what the pipeline passes its transformer)."""

    latents: torch.Tensor
    states: torch.Tensor
    pooled: torch.Tensor


def flow_concept_data(pipe, schedule: dict, settings: ProofSettings) -> FlowData:
    """The concept's instances rendered at the schedule's resolution and encoded by the model's own VAE and
    text encoders (:func:`nullcov.collection.features.encode_transformer_text`)."""
    from nullcov.collection.features import encode_transformer_text

    scenes = proof_data.instance_scenes(settings.instances)
    captions = [proof_data.concept_caption(scene) for scene in scenes]
    latents = experiment.encode_renders(pipe, scenes, settings.seed, schedule["flow_matching"]["resolution"])
    with torch.no_grad():
        _, states, pooled = encode_transformer_text(pipe, captions)
    return FlowData(latents, states, pooled)


def training_timesteps(pipe) -> torch.Tensor:
    """The scheduler's training timesteps ``1000·σ`` (its ``num_train_timesteps`` of them, static shift
    applied: SD3), ascending: what diffusers' SD3/FLUX trainers draw from."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return scheduler.timesteps.flip(0).to(torch.float32)


def transformer_prediction(pipe, transformer, family, noisy: torch.Tensor, timestep: float, data: FlowData,
                           chosen: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The transformer's prediction [N, C, h, w] for ``noisy`` latents at the scheduler timestep ``1000·σ``,
    called as the family's pipeline calls it."""
    count = len(noisy)
    states, pooled = data.states[chosen], data.pooled[chosen]
    timesteps = torch.full((count,), timestep / family.timestep_divisor, device=noisy.device)
    if family.name != "flux":
        return transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=states,
                           pooled_projections=pooled).sample
    channels, height, width = noisy.shape[1:]
    packed = pipe._pack_latents(noisy, count, channels, height, width)
    image_ids = pipe._prepare_latent_image_ids(count, height // 2, width // 2, noisy.device, noisy.dtype)
    text_ids = torch.zeros(states.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
    guidance = torch.full((count,), guidance_scale, device=noisy.device) if family.guidance == "embedding" else None
    out = transformer(hidden_states=packed, timestep=timesteps, guidance=guidance, pooled_projections=pooled,
                      encoder_hidden_states=states, txt_ids=text_ids, img_ids=image_ids).sample
    scale = pipe.vae_scale_factor
    return pipe._unpack_latents(out, height * scale, width * scale, scale)


def flow_matching_loss(pipe, transformer, family, data: FlowData, settings: ProofSettings, timesteps: torch.Tensor,
                       generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """One batch of instances at one training timestep ``t = 1000·σ``: ``x_t = (1 − σ) x_0 + σ ε``, the mean
    squared error of the prediction against ``ε − x_0``; returns (loss, t)."""
    index = experiment.batch_timestep(settings, len(timesteps), generator)
    timestep = float(timesteps[index])
    sigma = timestep / len(timesteps)
    chosen = torch.randint(0, len(data.latents), (settings.batch_size,), generator=generator)
    clean = data.latents[chosen]
    noise = torch.randn(clean.shape, generator=generator).to(clean.device)
    noisy = (1.0 - sigma) * clean + sigma * noise
    prediction = transformer_prediction(pipe, transformer, family, noisy, timestep, data, chosen,
                                        settings.guidance_scale)
    return torch.nn.functional.mse_loss(prediction.float(), (noise - clean).float()), timestep


def trained_linears(transformer, plan: ProofPlan) -> list[str]:
    """The module paths of the constrained linears whose projections the plan's own setting holds."""
    from nullcov.training.bank import ProjectionBank
    from nullcov.training.constraint import find_constrained_linears

    own = plan.setting(plan.own)
    bank = ProjectionBank.from_files(own.schedule, own.covariance, own.projections)
    keys = set(bank.step_keys) | set(bank.text_factors)
    return [item.name for item in find_constrained_linears(transformer) if item.key in keys]


def trainable_transformer(base, kind: str, names: list[str], settings: ProofSettings, seed_index: int = 0):
    """A copy of the base transformer with ``names`` trainable (full), or LoRA adapters on them
    (``projected-lora``, initialised from fine-tune seed ``seed_index``)."""
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    if kind == "projected-lora":
        from peft import LoraConfig

        cuda = [model.device.index or 0] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(settings.run_seed(seed_index))
            model.add_adapter(LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_rank, target_modules=names))
        return model
    for name in names:
        model.get_submodule(name).weight.requires_grad_(True)
    return model


def trained_state(model, names: list[str]) -> dict[str, torch.Tensor]:
    """The trained linears' weights (LoRA merged) under the transformer's ``state_dict`` keys."""
    wanted = {f"{name}.weight" for name in names}
    return {key: value for key, value in experiment.attn2_state(model).items() if key in wanted}


def check_flow_variants(plan: ProofPlan) -> None:
    """Refuse a plan with variants a transformer run cannot train, naming the config key that plans them."""
    refused = [variant for variant in plan.variants if variant.kind not in FLOW_KINDS]
    if refused:
        key_of = {kind: key for key, kind in FLOW_REFUSED_KEYS.items()}
        keys = sorted({key_of.get(variant.kind.removeprefix("random-"), variant.kind) for variant in refused})
        raise ValueError(f"the fine-tune proof on an SD3/FLUX model trains {', '.join(FLOW_KINDS)} only; "
                         f"{[variant.name for variant in refused]} need a UNet (or the shapes evaluator): "
                         f"turn off {', '.join(keys)}")


def train_flow_variant(pipe, base, family, variant: Variant, names: list[str], data: FlowData, schedule: dict,
                       settings: ProofSettings) -> tuple[experiment.Outcome, object]:
    """Train one run ``fixed_steps`` steps; returns its outcome (losses, steps, seconds; no fidelity) and the
    trained transformer."""
    started = time.perf_counter()
    model = trainable_transformer(base, variant.kind, names, settings, variant.seed_index)
    constraint = experiment.variant_constraint(model, variant, settings)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=experiment.learning_rate(variant, settings), weight_decay=1e-2)
    generator = torch.Generator().manual_seed(settings.run_seed(variant.seed_index) + 2)
    timesteps = training_timesteps(pipe)
    every_step = [step["timestep"] for step in schedule["steps"]]
    outcome = experiment.Outcome(unet=None, steps=0, seconds=0.0, fidelity=math.nan)
    for step in range(1, settings.fixed_steps + 1):
        loss, timestep = flow_matching_loss(pipe, model, family, data, settings, timesteps, generator)
        experiment.optimizer_step(loss, timestep, optimizer, constraint, variant, every_step)
        outcome.losses.append((step, loss.item()))
        outcome.steps = step
    outcome.seconds = time.perf_counter() - started
    return outcome, model


def run_flow_proof(pipe, model_dir, schedule: dict, plan: ProofPlan, on_variant=None) -> list[dict]:
    """Every run of the plan on an SD3/FLUX pipeline (the module docstring says what applies); returns the
    table's rows. ``on_variant(variant, row, transformer, state)`` after each run: the base transformer
    with the run's trained linears (``state``: their weights, LoRA merged). ``projected-lora`` takes the
    plan's own setting (all timesteps when the plan compares that scope, else its first)."""
    from nullcov.models.family import model_family

    family = model_family(model_dir)
    if family.denoiser != "transformer":
        raise ValueError(f"{model_dir} is a UNet model ({family.name}): run the fine-tune proof "
                         "(nullcov.proof.experiment.run_proof)")
    check_flow_variants(plan)
    settings = replace(plan.settings, evaluate=False)
    if plan.settings.evaluate:
        log.warning("no evaluator reads an SD3/FLUX model's images: every run trains %d steps", settings.fixed_steps)
    base = pipe.transformer
    names = trained_linears(base, plan)
    data = flow_concept_data(pipe, schedule, settings)
    rows = []
    for variant in plan.variants:
        if variant.kind == "projected-lora":
            scope = "all-timesteps" if "all-timesteps" in plan.scopes else plan.scopes[0]
            variant = replace(variant, scope=scope, setting=plan.setting(plan.own))
        outcome, model = train_flow_variant(pipe, base, family, variant, names, data, schedule, settings)
        state = trained_state(model, names)
        outcome.unet = experiment.merged_unet(base, state)
        row = experiment.run_columns(variant, outcome, settings)
        row |= experiment.update_columns(base, outcome.unet, variant, schedule, settings)
        log.info("%s: %s", variant.name, row)
        rows.append(row)
        if on_variant is not None:
            on_variant(variant, row, outcome.unet, state)
    return rows
