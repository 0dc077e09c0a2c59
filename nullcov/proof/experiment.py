"""The fine-tune proof: does a projected fine-tune learn a new concept and leave the rest of the model alone?

Teaches a model a shape it never saw under a made-up token (:mod:`nullcov.proof.data`: ``a red sks
on the left`` from a few renders of a cross) by fine-tuning the weights of its cross-attention
linears (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every ``attn2``), from the same weights,
data and seeds in every variant (planned from the config: :func:`nullcov.proof.plan.plan_proof`):

- ``unconstrained``: plain AdamW;
- ``prior-preservation``: DreamBooth's remedy: class images the base model draws for class
  prompts (the concept's frame with the trained shapes), their denoising loss added at weight 1;
- ``projected``: AdamW with :class:`nullcov.training.constraint.NullSpaceConstraint` (gradients projected
  too), for each threshold, scope (``per-timestep``: each batch's own timestep's projection;
  ``all-timesteps``: the null space of every scheduled step at once), statistic and CFG branches
  of the statistics (the declared files of each, :class:`nullcov.proof.plan.ProjectionSetting`);
- ``projected-kv``: only ``to_k``/``to_v`` trained and projected, with the run's own setting: their
  inputs are the frozen text encoder's states, which no update can shift;
- ``custom-diffusion``: as ``projected-kv``, plus an offset of the one-token identifier's embedding
  trained (:func:`identifier_embedding`);
- ``projected-lora``: peft LoRA (rank ``lora_rank``) on the same linears, ``A ← A P``, with the
  best projected setting (:func:`best_projected`: preservation first);
- ``random-<kind>``: a projected kind with every projection replaced by a random one of the same
  rank (:mod:`nullcov.proof.controls`).

Each run (a variant at one fine-tune seed and learning rate) is measured at checkpoints every
``eval_every`` steps (:class:`Checkpoints`: the learning-vs-forgetting curve,
:mod:`nullcov.proof.curves` compares the variants at matched fidelity) and trains until the
evaluator (:mod:`nullcov.shapes.evaluator`) reads the new shape, in the colour and at the position
asked, in ``target_fidelity`` of the concept prompts' samples, or stops at ``max_steps``. Then
every preserved prompt is sampled again with the
same seeds and the statistics' sampler (:class:`Measurement`): evaluator accuracy, pixel change and
attn2 output movement against the base model. Without an evaluator (a model that is not
``builtin:shapes``) every variant trains ``fixed_steps`` and only losses, drift and the grid are
reported.

The pipeline keeps the base model's UNet throughout: every function that trains, samples or
measures another UNet takes it as an argument.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from nullcov.collection.capture import conditional_rows
from nullcov.proof import data as proof_data
from nullcov.proof.curves import PRESERVED_DROP_POINTS
from nullcov.proof.null_energy import protected_timesteps
from nullcov.proof.plan import ProofPlan, ProofSettings, Variant
from nullcov.shapes import evaluator
from nullcov.shapes import grammar as shapes

log = logging.getLogger(__name__)

#: Seeds: concept prompts' samples and class images start here (preserved prompts at 0).
CONCEPT_SEED_OFFSET = 500_000
CLASS_SEED_OFFSET = 600_000


@dataclass
class ConceptData:
    """Latents and text states the fine-tunes train on (instances; class images for prior
    preservation), and the instance captions' token ids (Custom Diffusion encodes them at every step)."""

    latents: torch.Tensor
    embeddings: torch.Tensor
    input_ids: torch.Tensor | None = None
    class_latents: torch.Tensor | None = None
    class_embeddings: torch.Tensor | None = None
    class_seconds: float = 0.0


@dataclass
class Outcome:
    """What one variant's training did: the merged plain UNet and its cost."""

    unet: object
    steps: int
    seconds: float
    fidelity: float
    losses: list[tuple[int, float]] = field(default_factory=list)


# -- sampling ---------------------------------------------------------------------------------------
class Attn2Drift:
    """Every attn2 output of a sampling run, per prompt (conditional CFG half): the base run's are
    kept; after :meth:`compare`, each later run's squared distance to them is summed per prompt."""

    def __init__(self):
        self.base: list[torch.Tensor] = []
        self.distance: dict[int, torch.Tensor] = {}  # first prompt of a batch -> per-prompt sums
        self.energy: dict[int, torch.Tensor] = {}
        self._recording, self._position, self._first = True, 0, 0

    def hooks(self, unet, first_prompt: int, prompts: int):
        """A context manager that hooks every attn2 module for one pipeline call on ``prompts`` prompts
        (:func:`nullcov.collection.hooks.forward_hooks`: removed when it ends, also on an error)."""
        from nullcov.collection.hooks import Hook, forward_hooks
        from nullcov.models.model import cross_attention_modules

        self._first, self._prompts = first_prompt, prompts
        return forward_hooks(Hook(module, self._on_output) for _, module in cross_attention_modules(unet))

    def _on_output(self, module, args, output) -> None:
        rows = output[conditional_rows(len(output), self._prompts)].detach().float().cpu()
        if self._recording:
            self.base.append(rows)
            return
        base = self.base[self._position]
        self._position += 1
        distance = (rows - base).square().flatten(1).sum(1).double()
        energy = base.square().flatten(1).sum(1).double()
        self.distance[self._first] = self.distance.get(self._first, 0) + distance
        self.energy[self._first] = self.energy.get(self._first, 0) + energy

    def compare(self) -> None:
        """From now on, compare each run with the recorded base run (call before every later run)."""
        self._recording, self._position, self.distance, self.energy = False, 0, {}, {}

    def change(self, indices: list[int]) -> float:
        """``sqrt(Σ‖o − o₀‖² / Σ‖o₀‖²)`` over the prompts ``indices``."""
        distance = torch.cat([self.distance[key] for key in sorted(self.distance)])[indices]
        energy = torch.cat([self.energy[key] for key in sorted(self.energy)])[indices]
        return math.sqrt(float(distance.sum() / energy.sum()))


def sample(pipe, captions: list[str], first_seed: int, schedule: dict, settings: ProofSettings,
           drift: Attn2Drift | None = None, unet=None, indices: list[int] | None = None) -> np.ndarray:
    """Images [N, H, W, 3] (float32, 0..1) of ``captions``, caption ``i`` seeded as prompt
    ``indices[i]`` (None: ``i``) of ``first_seed``, with the schedule's sampler and CFG, in batches
    of ``settings.sample_batch`` (:func:`nullcov.models.sampling.sample_images`, at a flow-matching
    schedule's resolution; ``unet`` None: the pipeline's own UNet or transformer). A Custom Diffusion
    run's UNet brings its identifier's embedding (:func:`identifier_embedding`)."""
    from nullcov.models.model import denoiser as own_denoiser
    from nullcov.models.sampling import prompt_generator, sample_images

    denoiser = own_denoiser(pipe) if unet is None else unet
    indices = list(range(len(captions))) if indices is None else list(indices)
    images = []
    with identifier_embedding(pipe, denoiser):
        for start in range(0, len(captions), settings.sample_batch):
            batch = captions[start: start + settings.sample_batch]
            generators = [prompt_generator(first_seed, index) for index in indices[start: start + len(batch)]]
            hooked = drift.hooks(denoiser, start, len(batch)) if drift is not None else contextlib.nullcontext()
            with hooked, torch.no_grad():
                images.append(sample_images(pipe, batch, generators, schedule, settings.guidance_scale,
                                            schedule.get("flow_matching", {}).get("resolution"), unet=unet))
    return np.concatenate(images)


def concept_prompts(settings: ProofSettings) -> list[tuple[shapes.Scene, str]]:
    """(scene, caption) of every concept sample: each concept scene ``concept_seeds`` times."""
    return [(scene, proof_data.concept_caption(scene)) for scene in proof_data.concept_scenes()
            for _ in range(settings.concept_seeds)]


def concept_fidelity(scenes: list[shapes.Scene], images: np.ndarray) -> float:
    """Share of samples the evaluator reads as the concept's shape, in the colour and at the position asked."""
    hits = []
    for scene, image in zip(scenes, images, strict=True):
        reading = evaluator.read_image(image)
        hits.append((reading.shape, reading.colour, reading.position) == (scene.shape, scene.colour, scene.position))
    return float(np.mean(hits))


# -- training ---------------------------------------------------------------------------------------
def encode_renders(pipe, scenes: list[shapes.Scene], seed: int, resolution: int | None = None) -> torch.Tensor:
    """VAE latents (:func:`encode_images`) of the scenes rendered at ``resolution`` pixels (None: the UNet's)."""
    resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    pixels = np.stack([shapes.render(scene, resolution, noise_seed=seed + i) for i, scene in enumerate(scenes)])
    return encode_images(pipe, pixels.astype(np.float32) / 255.0)


def encode_images(pipe, images: np.ndarray) -> torch.Tensor:
    """VAE latents of images [N, H, W, 3] in 0..1: (posterior mean − ``shift_factor``, SD3's and FLUX's VAE
    have one) x ``scaling_factor``, as the pipelines decode them."""
    pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(pipe.device) * 2.0 - 1.0
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        mean = pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist.mean
    return (mean - shift) * pipe.vae.config.scaling_factor


def text_states(pipe, captions: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(captions, pipe.device, 1, do_classifier_free_guidance=False)[0]


#: The attribute a Custom Diffusion run's UNet carries its identifier with: ``(token id, offset)``,
#: the offset added to that token's row of the text encoder's token embedding.
IDENTIFIER_ATTRIBUTE = "nullcov_identifier"


def identifier_token_id(pipe) -> int:
    """The id of the concept's identifier (:data:`nullcov.proof.data.CONCEPT_TOKEN`), which must be one token."""
    ids = pipe.tokenizer(proof_data.CONCEPT_TOKEN, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"custom-diffusion trains the identifier's embedding, but the tokenizer splits "
                         f"{proof_data.CONCEPT_TOKEN!r} into {len(ids)} tokens: set finetune_custom_diffusion: false")
    return ids[0]


@contextlib.contextmanager
def identifier_embedding(pipe, unet):
    """While active, the pipeline's text encoder reads the identifier's token embedding plus the
    offset ``unet`` carries (:data:`IDENTIFIER_ATTRIBUTE`: a Custom Diffusion run); for any other
    UNet nothing changes. Every other token's embedding, so every prompt without the identifier,
    is untouched."""
    found = getattr(unet, IDENTIFIER_ATTRIBUTE, None)
    if found is None:
        yield
        return
    token_id, offset = found

    def add_offset(module, args, output):
        return output + (args[0] == token_id).unsqueeze(-1).to(output.dtype) * offset.to(output.dtype)

    handle = pipe.text_encoder.get_input_embeddings().register_forward_hook(add_offset)
    try:
        yield
    finally:
        handle.remove()


def identifier_state(pipe, unet) -> dict[str, torch.Tensor]:
    """A Custom Diffusion run's identifier as saved: its token id and its trained embedding row
    (``{}`` for any other run)."""
    found = getattr(unet, IDENTIFIER_ATTRIBUTE, None)
    if found is None:
        return {}
    token_id, offset = found
    row = pipe.text_encoder.get_input_embeddings().weight[token_id].detach().float().cpu()
    return {"token_id": torch.tensor([token_id]), "embedding": (row + offset.detach().float().cpu()).contiguous()}


def concept_data(pipe, schedule: dict, settings: ProofSettings, prior: bool) -> ConceptData:
    """The instances' latents and captions' states; with ``prior``, class images drawn by the base model."""
    scenes = proof_data.instance_scenes(settings.instances)
    captions = [proof_data.concept_caption(scene) for scene in scenes]
    data = ConceptData(encode_renders(pipe, scenes, settings.seed), text_states(pipe, captions),
                       pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                      truncation=True, return_tensors="pt").input_ids.to(pipe.device))
    if prior:
        started = time.perf_counter()
        captions = [scene.caption for scene in proof_data.class_scenes(settings.class_images, settings.seed)]
        images = sample(pipe, captions, CLASS_SEED_OFFSET, schedule, settings)
        data.class_latents, data.class_embeddings = encode_images(pipe, images), text_states(pipe, captions)
        data.class_seconds = time.perf_counter() - started
    return data


def denoising_loss(unet, noise_scheduler, latents, embeddings, timestep: int, generator) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    timesteps = torch.full((len(latents),), timestep, device=latents.device)
    prediction = unet(noise_scheduler.add_noise(latents, noise, timesteps), timesteps, embeddings).sample
    target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
        noise_scheduler.get_velocity(latents, noise, timesteps)
    return torch.nn.functional.mse_loss(prediction, target)


def batch_timestep(settings: ProofSettings, num_train_timesteps: int, generator) -> int:
    """One batch's timestep: in a ``high_noise_fraction`` share of the batches from
    ``[high_noise_start, num_train_timesteps)``, otherwise from ``[0, num_train_timesteps)``."""
    fraction = settings.high_noise_fraction
    high = fraction > 0 and float(torch.rand((), generator=generator)) < fraction
    low = settings.high_noise_start if high else 0
    return int(torch.randint(low, num_train_timesteps, (1,), generator=generator))


def training_loss(pipe, unet, noise_scheduler, data: ConceptData, variant: Variant, settings: ProofSettings,
                  generators: tuple) -> tuple[torch.Tensor, int]:
    """One batch: instances (and, for prior preservation, class images) at one timestep (:func:`batch_timestep`);
    returns (loss, timestep). ``generators``: (instances, class images), so the instance batches are
    the same in every variant."""
    instances, classes = generators
    timestep = batch_timestep(settings, noise_scheduler.config.num_train_timesteps, instances)
    chosen = torch.randint(0, len(data.latents), (settings.batch_size,), generator=instances)
    embeddings = data.embeddings[chosen]
    if variant.kind.endswith("custom-diffusion"):  # the identifier's embedding is trained: encode with it
        with identifier_embedding(pipe, unet):
            embeddings = pipe.text_encoder(data.input_ids[chosen])[0]
    loss = denoising_loss(unet, noise_scheduler, data.latents[chosen], embeddings, timestep, instances)
    if variant.kind == "prior-preservation":
        chosen = torch.randint(0, len(data.class_latents), (settings.batch_size,), generator=classes)
        loss = loss + settings.prior_weight * denoising_loss(
            unet, noise_scheduler, data.class_latents[chosen], data.class_embeddings[chosen], timestep, classes)
    return loss, timestep


def trainable_unet(base_unet, kind: str, settings: ProofSettings, seed_index: int = 0, token_id: int | None = None):
    """A copy of the base UNet trainable as a variant of ``kind`` trains it: the attn2 linears (full;
    ``projected-kv``, its control and ``custom-diffusion``: ``to_k`` and ``to_v`` only), or LoRA
    adapters on them (``projected-lora``, initialised from fine-tune seed ``seed_index``);
    ``custom-diffusion`` also carries a trainable offset of the identifier's (``token_id``) embedding
    (:func:`identifier_embedding`)."""
    from nullcov.models.family import CROSS_ATTENTION
    from nullcov.training.constraint import find_constrained_linears

    unet = copy.deepcopy(base_unet)
    unet.requires_grad_(False)
    if kind == "projected-lora":
        from peft import LoraConfig

        cuda = [unet.device.index or 0] if unet.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # the adapters' initialisation, seeded, whatever ran before
            torch.manual_seed(settings.run_seed(seed_index))
            linears = "|".join(re.escape(CROSS_ATTENTION.module_path(linear)) for linear in CROSS_ATTENTION.hooked)
            unet.add_adapter(LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_rank,
                                        target_modules=rf".*attn2\.({linears})"))  # to_q|to_k|to_v|to_out\.0
        return unet
    for item in find_constrained_linears(unet):
        if not kind.endswith(("projected-kv", "custom-diffusion")) or item.linear in CROSS_ATTENTION.text:
            item.module.weight.requires_grad_(True)
    if kind.endswith("custom-diffusion"):
        width = base_unet.config.cross_attention_dim
        setattr(unet, IDENTIFIER_ATTRIBUTE, (token_id, torch.zeros(width, device=unet.device, requires_grad=True)))
    return unet


def attn2_state(unet) -> dict[str, torch.Tensor]:
    """The attn2 linears' weights under ``UNet2DConditionModel.state_dict()`` keys (LoRA merged)."""
    from nullcov.training.constraint import find_constrained_linears

    state = {}
    for item in find_constrained_linears(unet):
        weight = item.module.weight.detach().clone()
        if item.lora_down:
            wrapper = next(m for m in unet.modules() if getattr(m, "base_layer", None) is item.module)
            for name, down in wrapper.lora_A.items():
                weight += wrapper.scaling[name] * wrapper.lora_B[name].weight.detach() @ down.weight.detach()
        state[f"{item.name}.weight"] = weight.contiguous()
    return state


def merged_unet(base_unet, state: dict[str, torch.Tensor]):
    """A plain copy of the base UNet with ``state``'s attn2 weights: what the saved file regenerates."""
    unet = copy.deepcopy(base_unet)
    missing = set(state) - set(unet.state_dict())
    if missing:
        raise KeyError(f"attn2 weights {sorted(missing)} are not keys of the UNet's state_dict")
    unet.load_state_dict(state, strict=False)
    return unet


def learning_rate(variant: Variant, settings: ProofSettings) -> float:
    """The run's learning rate: its own (a grid run), else the settings' for its kind."""
    if variant.learning_rate is not None:
        return variant.learning_rate
    return settings.lora_learning_rate if variant.kind == "projected-lora" else settings.learning_rate


def variant_constraint(unet, variant: Variant, settings: ProofSettings):
    """The run's :class:`NullSpaceConstraint` (None: not projected); a ``random-*`` control's projections
    are same-rank random ones (:func:`controlled`)."""
    from nullcov.training.constraint import NullSpaceConstraint

    if not variant.projected:
        return None
    setting = variant.setting
    constraint = NullSpaceConstraint.from_files(unet, setting.schedule, setting.covariance, setting.projections,
                                                mode="nearest")
    constraint.lookup = controlled(constraint.lookup, variant, settings)
    return constraint


def controlled(lookup, variant: Variant, settings: ProofSettings):
    """The projections a run gets from ``lookup``: its own, or for a ``random-*`` control same-rank
    random ones (:class:`nullcov.proof.controls.RandomSubspaces`, seeded by the run)."""
    from nullcov.proof.controls import RandomSubspaces

    if not variant.kind.startswith("random-"):
        return lookup
    return RandomSubspaces(lookup, settings.run_seed(variant.seed_index) + 5)


def optimizer_step(loss: torch.Tensor, timestep, optimizer, constraint, variant: Variant, every_step: list) -> None:
    """One training step of a run: backward, the gradients projected (a projected run: the projections of
    ``timestep``, or of every scheduled step, :func:`nullcov.proof.null_energy.protected_timesteps`), the
    optimiser's step, and what it applied projected (``constraint`` None: plain)."""
    loss.backward()
    protected = protected_timesteps(variant.scope, timestep, every_step) if variant.projected else None
    if constraint is not None:
        constraint.project_gradients(protected)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if constraint is not None:
        constraint.project(protected)


def train_variant(pipe, base_unet, variant: Variant, data: ConceptData, schedule: dict,
                  settings: ProofSettings, checkpoints: Checkpoints | None = None) -> Outcome:
    """Train ``variant`` from ``base_unet`` until the concept fidelity reaches the target at a
    checkpoint (every ``eval_every`` steps; or for ``fixed_steps`` without an evaluator); returns the
    merged plain UNet, steps, seconds (class images included) and fidelity. ``pipe`` (its own UNet
    untouched) samples the trained UNet; ``checkpoints`` measures each checkpoint (the curve)."""
    from diffusers import DDPMScheduler

    started = time.perf_counter()
    token_id = identifier_token_id(pipe) if variant.kind.endswith("custom-diffusion") else None
    unet = trainable_unet(base_unet, variant.kind, settings, variant.seed_index, token_id)
    constraint = variant_constraint(unet, variant, settings)
    identifier = [getattr(unet, IDENTIFIER_ATTRIBUTE)[1]] if token_id is not None else []
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad] + identifier,
                                  lr=learning_rate(variant, settings), weight_decay=1e-2)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    seed = settings.run_seed(variant.seed_index)
    generators = (torch.Generator().manual_seed(seed + 2), torch.Generator().manual_seed(seed + 3))
    every_step = [step["timestep"] for step in schedule["steps"]]
    cap = settings.max_steps if settings.evaluate else settings.fixed_steps
    outcome = Outcome(unet=None, steps=0, seconds=0.0, fidelity=math.nan)
    if checkpoints is not None:
        checkpoints.start(variant, learning_rate(variant, settings))
    for step in range(1, cap + 1):
        loss, timestep = training_loss(pipe, unet, noise_scheduler, data, variant, settings, generators)
        optimizer_step(loss, timestep, optimizer, constraint, variant, every_step)
        outcome.losses.append((step, loss.item()))
        outcome.steps = step
        if step % settings.eval_every == 0 or step == cap:
            if settings.evaluate:
                outcome.fidelity = evaluate_concept(pipe, unet, schedule, settings)[0]
                log.info("%s, step %d: concept fidelity %.3f (target %.2f)", variant.name, step, outcome.fidelity,
                         settings.target_fidelity)
            if checkpoints is not None:
                recent = [value for _, value in outcome.losses[-settings.eval_every:]]
                checkpoints.measure(step, unet, outcome.fidelity, float(np.mean(recent)))
            if settings.evaluate and outcome.fidelity >= settings.target_fidelity:
                break
    outcome.unet = merged_unet(base_unet, attn2_state(unet))
    if token_id is not None:
        setattr(outcome.unet, IDENTIFIER_ATTRIBUTE, (token_id, identifier[0].detach().clone()))
    class_seconds = data.class_seconds if variant.kind == "prior-preservation" else 0.0
    outcome.seconds = time.perf_counter() - started + class_seconds
    return outcome


def evaluate_concept(pipe, unet, schedule: dict, settings: ProofSettings) -> tuple[float, np.ndarray]:
    """(fidelity, images) of the concept prompts under ``unet`` (None: the pipeline's)."""
    prompts = concept_prompts(settings)
    images = sample(pipe, [caption for _, caption in prompts], CONCEPT_SEED_OFFSET, schedule, settings, unet=unet)
    scenes = [scene for scene, _ in prompts]
    return (concept_fidelity(scenes, images) if settings.evaluate else math.nan), images


# -- measuring --------------------------------------------------------------------------------------
@dataclass
class Measurement:
    """The preserved prompts under one UNet: images and, per prompt, which attributes read correctly."""

    images: np.ndarray
    correct: list[dict[str, bool]]


def measure_preserved(pipe, unet, preserved: list[proof_data.PreservedPrompt], schedule: dict,
                      settings: ProofSettings, drift: Attn2Drift) -> Measurement:
    """The preserved prompts sampled under ``unet`` (None: the pipeline's), their attn2 outputs into ``drift``."""
    images = sample(pipe, [prompt.caption for prompt in preserved], 0, schedule, settings, drift, unet=unet)
    correct = [evaluator.score(evaluator.read_image(image), prompt.scene) if settings.evaluate else {}
               for prompt, image in zip(preserved, images, strict=True)]
    return Measurement(images, correct)


@dataclass
class Checkpoints:
    """Each run's curve (:data:`nullcov.proof.curves.CURVE_COLUMNS`): at step 0 (the base model) and at
    every checkpoint, the concept fidelity and, on a fixed subset of the preserved prompts (every
    ``checkpoint_stride``-th, with their own seeds, so the base model's images are the reference),
    the evaluator's accuracy per attribute, the all-correct accuracy drop and the mean pixel change
    against the base model. ``save(run, step, state)`` keeps each checkpoint's attn2 weights."""

    pipe: object
    schedule: dict
    settings: ProofSettings
    baseline: Baseline
    save: object = None
    rows: list[dict] = field(default_factory=list)

    @property
    def indices(self) -> list[int]:
        return list(range(0, len(self.baseline.preserved), self.settings.checkpoint_stride))

    def start(self, variant: Variant, rate: float) -> None:
        """A new run's curve, from the base model's point (step 0)."""
        self._head = {"run": variant.name, "variant": variant.variant, "kind": variant.kind,
                      "seed": variant.seed_index, "learning_rate": rate}
        base = self.baseline.measurement
        self._record(0, self.baseline.concept_fidelity, base.images[self.indices],
                     [base.correct[i] for i in self.indices], math.nan)

    def measure(self, step: int, unet, fidelity: float, loss: float) -> None:
        """The checkpoint at ``step`` of the current run, under ``unet`` (trained, LoRA or not)."""
        indices, preserved = self.indices, self.baseline.preserved
        images = sample(self.pipe, [preserved[i].caption for i in indices], 0, self.schedule, self.settings,
                        unet=unet, indices=indices)
        correct = [evaluator.score(evaluator.read_image(image), preserved[i].scene) if self.settings.evaluate else {}
                   for i, image in zip(indices, images, strict=True)]
        self._record(step, fidelity, images, correct, loss)
        if self.save is not None:
            self.save(self._head["run"], step, attn2_state(unet), identifier_state(self.pipe, unet))

    def _record(self, step: int, fidelity: float, images: np.ndarray, correct: list[dict], loss: float) -> None:
        base = self.baseline.measurement
        before = [base.correct[i] for i in self.indices]
        row = self._head | {"step": step, "concept_fidelity": fidelity, "loss": loss}
        for attribute in evaluator.ATTRIBUTES:
            later = evaluator.accuracy(correct, attribute)
            row |= {f"accuracy_{attribute}": later,
                    f"accuracy_drop_points_{attribute}": 100 * (evaluator.accuracy(before, attribute) - later)}
        row["accuracy_drop_points"] = 100 * (evaluator.accuracy(before) - evaluator.accuracy(correct))
        row["pixel_change"] = float(np.abs(images - base.images[self.indices]).mean())
        self.rows.append(row)


def group_indices(preserved: list[proof_data.PreservedPrompt]) -> dict[str, list[int]]:
    """Prompt indices per group (``all`` and :data:`nullcov.proof.data.GROUPS`)."""
    groups = {"all": list(range(len(preserved)))} | {group: [] for group in proof_data.GROUPS}
    for index, prompt in enumerate(preserved):
        for group in prompt.groups():
            groups[group].append(index)
    return groups


def preserved_columns(base: Measurement, after: Measurement, drift: Attn2Drift,
                      groups: dict[str, list[int]]) -> dict[str, float]:
    """Accuracy before/after per attribute, and per group the all-correct drop (points), the mean
    pixel change of the final images and the attn2 output movement (:func:`nullcov.shapes.evaluator.accuracy`;
    NaN without the evaluator)."""
    row = {}
    for attribute in evaluator.ATTRIBUTES:
        before, later = (evaluator.accuracy([run.correct[i] for i in groups["all"]], attribute)
                         for run in (base, after))
        row |= {f"accuracy_before_{attribute}": before, f"accuracy_after_{attribute}": later,
                f"accuracy_drop_points_{attribute}": 100 * (before - later)}
    for group, indices in groups.items():
        if not indices:
            continue
        before, later = (evaluator.accuracy([run.correct[i] for i in indices]) for run in (base, after))
        row[f"accuracy_drop_points_{group}"] = 100 * (before - later)
        row[f"pixel_change_{group}"] = float(np.abs(after.images[indices] - base.images[indices]).mean())
        row[f"attn2_change_{group}"] = drift.change(indices)
    return row


def update_columns(base_unet, unet, variant: Variant, schedule: dict, settings: ProofSettings) -> dict[str, float]:
    """``‖ΔW‖`` over the attn2 weights and, for projected variants, the share of the update outside
    the null spaces it was projected into: ``‖ΔW − ΔW Q Qᵀ‖ / ‖ΔW‖`` over every attn2 weight together
    (Frobenius norms summed over the linears; ``Q`` a basis of the union of a linear's null spaces:
    the one ``P`` of all timesteps, or every step's ``P`` per timestep). Over the whole update, not
    the worst linear: ``ΔW`` is the merged float32 weight minus the base one, whose rounding
    (about 6e-8 of ``‖W‖``) is alone more than 1e-5 of a linear whose update is a thousandth of its
    weight (the proof's LoRA variant had such a ``to_q``). A ``random-*`` control's null spaces are
    its random ones."""
    from nullcov.training.bank import ProjectionBank
    from nullcov.training.constraint import find_constrained_linears

    before, after = attn2_state(base_unet), attn2_state(unet)
    deltas = {key: (after[key] - before[key]).double() for key in after}
    row = {"weight_update_norm": math.sqrt(sum(float(d.square().sum()) for d in deltas.values())),
           "update_outside_null_space": math.nan}
    if not variant.projected:
        return row
    setting = variant.setting
    lookup = controlled(ProjectionBank.from_files(setting.schedule, setting.covariance, setting.projections),
                        variant, settings)
    every_step = [step["timestep"] for step in schedule["steps"]]
    sets = [[t] for t in every_step] if variant.scope == "per-timestep" else [every_step]
    outside = 0.0
    for item in find_constrained_linears(base_unet):
        if not deltas[f"{item.name}.weight"].any():  # not trained (a transformer's linear the run has no projection of)
            continue
        factors = [lookup.text_factors[item.key] if item.text else lookup.factors(timesteps)[item.key]
                   for timesteps in sets]
        basis = union_basis([factor.dense().double() for factor in factors])
        delta = deltas[f"{item.name}.weight"]
        outside += float((delta - delta @ basis @ basis.T).square().sum())
    if row["weight_update_norm"] > 0:
        row["update_outside_null_space"] = math.sqrt(outside) / row["weight_update_norm"]
    return row


def union_basis(projections: list[torch.Tensor], tolerance: float = 1e-4) -> torch.Tensor:
    """An orthonormal basis (columns) of the span of the projections' ranges."""
    stacked = torch.cat(projections, dim=1)
    left, singular, _ = torch.linalg.svd(stacked, full_matrices=False)
    return left[:, singular > tolerance * max(float(singular[0]), 1.0)] if len(singular) else left


# -- the experiment ---------------------------------------------------------------------------------
def best_projected(rows: list[dict]) -> dict:
    """The projected row to repeat with LoRA, the one closest to the goal: among the variants that
    preserved (accuracy drop <= :data:`PRESERVED_DROP_POINTS`; all of them if none did), the one that
    reached the target and moved the preserved prompts' pixels least, or, if none reached it, the one
    with the highest concept fidelity. Preservation comes first: a projection that learns the concept
    but moves the rest as much as an unconstrained fine-tune is no better setting to repeat."""
    projected = [row for row in rows if row["kind"] == "projected" and not row.get("group")]
    preserved = [row for row in projected if row["accuracy_drop_points_all"] <= PRESERVED_DROP_POINTS]
    pool = preserved or projected
    reached = [row for row in pool if row["reached_target"] == "yes"]
    if reached:
        return min(reached, key=lambda row: row["pixel_change_all"])
    return max(pool, key=lambda row: (np.nan_to_num(row["concept_fidelity"], nan=-1.0), -row["steps"]))


@dataclass
class Baseline:
    """The base model's measurements every variant is compared with."""

    unet: object
    preserved: list[proof_data.PreservedPrompt]
    groups: dict[str, list[int]]
    measurement: Measurement
    drift: Attn2Drift
    concept_fidelity: float


def measure_baseline(pipe, schedule: dict, statistics_prompts: list[str], settings: ProofSettings) -> Baseline:
    """The pipeline's own UNet, the base model, measured."""
    preserved = proof_data.preserved_scenes(statistics_prompts)
    drift = Attn2Drift()
    measurement = measure_preserved(pipe, None, preserved, schedule, settings, drift)
    fidelity, _ = evaluate_concept(pipe, None, schedule, settings)
    return Baseline(pipe.unet, preserved, group_indices(preserved), measurement, drift, fidelity)


def run_columns(variant: Variant, outcome: Outcome, settings: ProofSettings) -> dict:
    """The table columns (:data:`nullcov.proof.report.COLUMNS`) that describe a run and its training:
    variant, setting, steps, seconds, concept fidelity and whether it reached the target (``-``: no
    evaluator), the mean loss of its last 10 steps."""
    reached = outcome.fidelity >= settings.target_fidelity if settings.evaluate else math.nan
    return {"variant": variant.name, "group": variant.group, "kind": variant.kind, "seed": variant.seed_index,
            "learning_rate": learning_rate(variant, settings), "scope": variant.scope, "threshold": variant.threshold,
            "statistic": variant.statistic, "branches": variant.branches, "steps": outcome.steps,
            "seconds": outcome.seconds, "concept_fidelity": outcome.fidelity,
            "reached_target": "-" if not settings.evaluate else ("yes" if reached else "no"),
            "final_loss": float(np.mean([loss for _, loss in outcome.losses[-10:]]))}


def run_variant(pipe, variant: Variant, data: ConceptData, schedule: dict, baseline: Baseline,
                settings: ProofSettings, checkpoints: Checkpoints | None = None) -> tuple[dict, object]:
    """Train one run and measure it (every preserved prompt at the end; ``checkpoints``: the curve);
    returns (table row, merged UNet)."""
    outcome = train_variant(pipe, baseline.unet, variant, data, schedule, settings, checkpoints)
    baseline.drift.compare()
    after = measure_preserved(pipe, outcome.unet, baseline.preserved, schedule, settings, baseline.drift)
    row = run_columns(variant, outcome, settings)
    row |= update_columns(baseline.unet, outcome.unet, variant, schedule, settings)
    row |= preserved_columns(baseline.measurement, after, baseline.drift, baseline.groups)
    log.info("%s: %s", variant.name, {k: v for k, v in row.items() if not k.startswith("accuracy_before")})
    return row, outcome.unet


def run_proof(pipe, schedule: dict, statistics_prompts: list[str], plan: ProofPlan, on_variant=None,
              on_checkpoint=None):
    """Every run of the plan, in its order; ``on_variant(variant, row, unet)`` after each (to save
    its weights and grid images), ``on_checkpoint(run, step, attn2 state)`` at each checkpoint.
    ``projected-lora`` takes the best projected setting (:func:`best_projected`) once the projected
    variants have run. Returns the rows, the curves' rows and the base model's concept fidelity."""
    settings = plan.settings
    baseline = measure_baseline(pipe, schedule, statistics_prompts, settings)
    checkpoints = Checkpoints(pipe, schedule, settings, baseline, on_checkpoint)
    if any(variant.kind.endswith("custom-diffusion") for variant in plan.variants):
        identifier_token_id(pipe)  # refused before any run when the identifier is not one token
    prior = any(variant.kind == "prior-preservation" for variant in plan.variants)
    data = concept_data(pipe, schedule, settings, prior)
    rows = []
    for variant in plan.variants:
        if variant.kind == "projected-lora":
            best = best_projected(rows)
            variant = replace(variant, scope=best["scope"],
                              setting=plan.setting((best["branches"], best["statistic"], best["threshold"])))
        row, unet = run_variant(pipe, variant, data, schedule, baseline, settings, checkpoints)
        rows.append(row)
        if on_variant is not None:
            on_variant(variant, row, unet)
    return rows, checkpoints.rows, baseline.concept_fidelity
