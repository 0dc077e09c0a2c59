"""The fine-tune proof: does a projected fine-tune learn a concept while leaving other prompts alone?

A short DreamBooth-style fine-tune of the cross-attention linears (``to_q``, ``to_k``, ``to_v``,
``to_out.0`` weights of every ``attn2``; biases frozen) on one new concept — a prompt with a
made-up token and a few fixed "instance" latents — with the standard denoising loss (noise
added by the model's training schedule at a uniform integer ``t``), from the same weights, data
and seeds every time:

- ``unconstrained``: plain AdamW for ``steps`` steps. Its concept loss at the end is the
  **target**.
- projected, for each threshold setting (the run's own projections, then each of
  ``threshold_percents``: the same statistics, :func:`nullcov.jobs.projection_job` at that
  percentile) and each scope — ``per-timestep`` (each update projected with its batch's
  timestep's projection, ``nearest``) and ``all-timesteps`` (the null space of the sum of every
  scheduled step's statistic: protects the whole sampling trajectory) — AdamW with
  :class:`nullcov.training.NullSpaceConstraint`, trained **until its concept loss reaches the
  target** (checked every ``eval_every`` steps), at most ``max_steps`` steps. The comparison is
  made at matched concept loss, not at matched steps: a projected update is smaller and slower.
  With ``project_gradients`` the gradient is projected too before the optimiser step (same
  ``P``, :meth:`NullSpaceConstraint.project_gradients`), so Adam's moments only see the null-space
  part of the gradient and its step stays a descent direction; ``project()`` after the step
  still removes whatever Adam's per-element scaling and weight decay put outside the null space.

Reported per variant (:data:`TABLE_COLUMNS`): threshold, learning rate, steps taken, whether the
target was reached, the concept's denoising loss on a fixed evaluation set (fixed ``t`` and
noise) before and after and its drop as a fraction of the unconstrained drop, the null space's
share ``null_dim / d`` of each linear (mean over layers and the timesteps used), ``‖ΔW‖``, and
how far preserved prompts move under the sampler the statistics were collected with, same
seeds: ``‖o − o₀‖ / ‖o₀‖`` of every attn2 output over the whole trajectory, and of the final
latents, for held-out prompts (validation prompts, not in the statistics) and for trained
prompts (in the statistics, where the projection's bound holds). The same movements are also
measured along each run (:data:`CURVE_COLUMNS`): the unconstrained run at ``drift_levels`` of
its steps, the projected runs when their loss first crosses those fractions of the target drop.

Why a projected run protects or not is measured too (:data:`ENERGY_COLUMNS`, :func:`null_energy`,
on the model before training): the share of each input set's energy that lies in the null space
``Σ‖x P‖² / Σ‖x‖²`` per linear kind, for the concept's evaluation inputs, the held-out and the
trained prompts under the sampler (conditional half) and the unconditional CFG branch of both
(in the statistics only with ``unconditional_branch: true``). A projected update reaches an
input only through ``x P``: it can learn the concept without moving the other prompts only where
the concept's share exceeds theirs.
"""

from __future__ import annotations

import logging
import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

CONCEPT_PROMPT = "a photo of sks toy"
SCOPES = ("per-timestep", "all-timesteps")
PROMPT_SETS = ("held_out", "trained")  # validation prompts; prompts in the statistics
CHANGE_COLUMNS = tuple(f"{kind}_{prompts}" for prompts in PROMPT_SETS
                       for kind in ("attn2_output_change", "final_latent_change"))
TABLE_COLUMNS = ("variant", "threshold", "learning_rate", "steps", "reached_target", "concept_loss_before",
                 "concept_loss_after", "loss_drop_vs_unconstrained", "null_fraction_to_q", "null_fraction_to_kv",
                 "null_fraction_to_out", "weight_update_norm", *CHANGE_COLUMNS)
ENERGY_KINDS = ("to_q", "to_kv", "to_out")  # linear kinds as reported; to_kv: to_k and to_v share the text projection
ENERGY_INPUTS = ("concept", *PROMPT_SETS, "unconditional")  # the last: the CFG branch of both prompt sets
ENERGY_COLUMNS = tuple(f"null_energy_{inputs}_{kind}" for inputs in ENERGY_INPUTS for kind in ENERGY_KINDS)
TABLE_COLUMNS += ENERGY_COLUMNS
CURVE_COLUMNS = ("variant", "step", "concept_loss", "loss_drop_vs_unconstrained", *CHANGE_COLUMNS)


@dataclass(frozen=True)
class Variant:
    """One fine-tune: ``scope`` None = unconstrained; else projected with the projections in ``results_dir``."""

    name: str
    threshold: str  # as reported: "-", the absolute threshold, or "p<percent>"
    scope: str | None = None
    results_dir: Path | None = None


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


def threshold_results(results_dir, folder, threshold_percent: float) -> Path:
    """A results folder in ``folder`` whose projections are the run's statistics at ``threshold_percent``.

    ``schedule.json`` and ``covariance/`` are linked; ``projections/`` is written by
    :func:`nullcov.jobs.projection_job` (the projection job itself) with the run's statistic.
    """
    from nullcov.jobs import projection_job

    results_dir, folder = Path(results_dir).resolve(), Path(folder)
    statistic = _projection_settings(results_dir)["statistic"]
    (folder / "projections").mkdir(parents=True, exist_ok=True)
    for name in ("schedule.json", "covariance"):
        (folder / name).symlink_to(results_dir / name)
    for covariance in sorted((results_dir / "covariance").glob("*.h5")):
        projection_job(covariance, folder / "projections" / covariance.name, statistic, 0.0, threshold_percent)
    return folder


def _protected(scope: str, timestep: int, every_step: list[int]) -> list[int]:
    """The timesteps whose projection constrains an update at ``timestep``: its own, or every scheduled one."""
    return [timestep] if scope == "per-timestep" else every_step


def _kind(item) -> str:
    """The linear's kind as reported (:data:`ENERGY_KINDS`)."""
    return "to_kv" if item.linear in ("to_k", "to_v") else item.linear


@contextmanager
def null_energy(unet, constraint, scope: str, every_step: list[int], prompts: int | None = None):
    """While active: ``Σ ‖x P‖²`` and ``Σ ‖x‖²`` of the inputs ``x`` of every constrained linear, per
    kind (:data:`ENERGY_KINDS`), with ``P`` the projection ``constraint.project`` applies at each
    sample's timestep under ``scope``; yields ``{part: {kind: [null energy, energy]}}``.

    ``part``: ``conditional`` and ``unconditional``. With ``prompts`` (a pipeline call on that many
    prompts) the rows are split as the feature capture splits them
    (:func:`nullcov.capture.conditional_rows`): a CFG batch ``[uncond, cond]`` puts its first half
    under ``unconditional``, which the statistics hold only when collected with
    ``unconditional_branch: true`` (else nothing protects it). Without ``prompts`` every row is
    ``conditional``.

    The share ``null / energy`` is how much of an input set the projected updates can reach: an
    update ``ΔW = ΔW P`` changes ``W x`` by ``ΔW (x P)`` only. For the prompts of the statistics
    it is the share of the statistic's trace under the threshold; learning a concept without
    moving other prompts needs the concept's share to be larger than theirs.
    """
    from nullcov.capture import conditional_rows

    sums = {part: {kind: [0.0, 0.0] for kind in ENERGY_KINDS} for part in ("conditional", "unconditional")}
    call = {}

    def before_unet(module, args, kwargs):
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        call["timesteps"] = torch.as_tensor(timestep).reshape(-1).round().long().cpu().expand(len(sample))
        call["parts"] = {"conditional": slice(None)}
        if prompts is not None:
            call["parts"] = {"conditional": conditional_rows(len(sample), prompts)}
            if len(sample) == 2 * prompts:
                call["parts"]["unconditional"] = slice(0, prompts)

    def before_linear(args, item):
        x = args[0].detach()
        if x.ndim != 3 or len(x) != len(call["timesteps"]):
            raise ValueError(f"{item.name}: input of shape {tuple(x.shape)} is not (batch, tokens, dim) of this call")
        for part, rows in call["parts"].items():
            inputs, steps = x[rows], call["timesteps"][rows]
            for timestep in steps.unique().tolist():
                selected = inputs[(steps == timestep).to(x.device)].reshape(-1, x.shape[-1])
                found = sums[part][_kind(item)]
                found[0] += constraint.factor_for(item, _protected(scope, timestep, every_step)).null_energy(selected)
                found[1] += float(selected.to(torch.float64).square().sum())

    handles = [unet.register_forward_pre_hook(before_unet, with_kwargs=True)]
    handles += [item.module.register_forward_pre_hook(lambda module, args, item=item: before_linear(args, item))
                for item in constraint.linears]
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()


def _null_fractions(constraint, timesteps_sets: list[list[int]]) -> dict[str, float]:
    """Mean ``null_dim / d`` per linear kind (:data:`ENERGY_KINDS`) over layers and ``timesteps_sets``."""
    found: dict[str, list[float]] = {kind: [] for kind in ENERGY_KINDS}
    for timesteps in timesteps_sets:
        for item in constraint.linears:
            if item.linear != "to_v":  # to_v: the same text projection as to_k
                factor = constraint.factor_for(item, timesteps)
                found[_kind(item)].append(factor.null_dim / factor.dim)
    return {f"null_fraction_{kind}": float(np.mean(values)) for kind, values in found.items()}


def run_finetune_proof(*, model_dir, results_dir, schedule: dict, preserved: dict[str, tuple[list[str], int]],
                       config: dict, steps: int = 40, max_steps: int = 200, batch_size: int = 2,
                       learning_rate: float = 5e-4, projected_learning_rate: float = 5e-3,
                       threshold_percents=(50.0,), eval_every: int = 5, drift_levels=(0.25, 0.5, 0.75, 1.0),
                       project_gradients: bool = True, num_instances: int = 4) -> tuple[list[dict], list[dict]]:
    """Run every variant; returns the table rows (:data:`TABLE_COLUMNS`) and the curve points (:data:`CURVE_COLUMNS`).

    ``preserved``: ``held_out`` and ``trained`` -> (prompts, index of the first one: seeds are
    ``seed + index``, as in the feature job).
    """
    from diffusers import DDPMScheduler

    from nullcov.features import configure_scheduler, prompt_generators
    from nullcov.model import load_pipeline, resolve_device
    from nullcov.training import NullSpaceConstraint

    if steps < 1 or max_steps < 1 or eval_every < 1:
        raise ValueError(f"steps, max_steps and eval_every must be >= 1, got {steps}, {max_steps}, {eval_every}")
    if config["guidance_scale"] > 1 and not config["unconditional_branch"]:
        log.warning("the statistics hold the conditional CFG half only (unconditional_branch: false): nothing "
                    "protects the unconditional branch every guided sample runs, so the projected fine-tunes may "
                    "move preserved prompts as much as the unconstrained one; collect with unconditional_branch: "
                    "true (README, 'The unconditional branch')")
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

    def changes() -> dict[str, float]:
        after = preserved_outputs()
        found = {}
        for kind in PROMPT_SETS:
            found[f"attn2_output_change_{kind}"] = _relative_change(after[kind][0], base[kind][0])
            found[f"final_latent_change_{kind}"] = _relative_change([after[kind][1]], [base[kind][1]])
        return found

    def energy_shares(constraint, scope) -> dict[str, float]:
        """The null space's share of the inputs' energy (before training): the concept's evaluation
        set, each preserved prompt set under the sampler (conditional half), and the unconditional
        branch of both (NaN without a CFG batch)."""
        with null_energy(unet, constraint, scope, every_step) as sums:
            concept_loss()
        totals = {"concept": sums["conditional"]}
        unconditional = {kind: [0.0, 0.0] for kind in ENERGY_KINDS}  # summed over both prompt sets
        for inputs in PROMPT_SETS:
            prompts, first_index = preserved[inputs]
            with null_energy(unet, constraint, scope, every_step, len(prompts)) as sums:
                _preserved_outputs(pipe, prompts, prompt_generators(config["seed"], first_index, len(prompts)),
                                   schedule, config["guidance_scale"], resolution)
            totals[inputs] = sums["conditional"]
            for kind, (null, total) in sums["unconditional"].items():
                unconditional[kind][0] += null
                unconditional[kind][1] += total
        totals["unconditional"] = unconditional
        return {f"null_energy_{inputs}_{kind}": null / total if total else math.nan
                for inputs, kinds in totals.items() for kind, (null, total) in kinds.items()}

    base = preserved_outputs()
    base_loss = concept_loss()
    every_step = [step["timestep"] for step in schedule["steps"]]
    with tempfile.TemporaryDirectory(prefix="nullcov-finetune-") as scratch:
        variants = [Variant("unconstrained", "-")]
        settings = [(_configured_threshold(results_dir), Path(results_dir))]
        settings += [(f"p{percent:g}", threshold_results(results_dir, Path(scratch) / f"p{percent:g}", percent))
                     for percent in threshold_percents]
        variants += [Variant(f"{scope} {label}", label, scope, folder) for label, folder in settings for scope in SCOPES]
        rows, curves = [], []
        target = None  # the unconstrained run's final concept loss
        for variant in variants:
            with torch.no_grad():
                for weight, start in zip(weights, initial, strict=True):
                    weight.copy_(start)
            for weight in weights:
                weight.requires_grad_(True)
            constraint, lr, cap = None, learning_rate, steps
            shares = dict.fromkeys(ENERGY_COLUMNS, math.nan)
            if variant.scope is not None:
                constraint = NullSpaceConstraint(unet, variant.results_dir, mode="nearest")
                lr, cap = projected_learning_rate, max_steps
                shares = energy_shares(constraint, variant.scope)
            optimizer = torch.optim.AdamW(weights, lr=lr, weight_decay=1e-2)
            generator = torch.Generator("cpu").manual_seed(config["seed"] + 2)  # same data for every variant
            # drift checkpoints: unconstrained at fractions of its steps; projected at fractions of the target drop
            pending = sorted(drift_levels)
            loss, step = base_loss, 0
            for step in range(1, cap + 1):
                t = int(torch.randint(0, num_train, (1,), generator=generator))
                chosen = torch.randint(0, num_instances, (batch_size,), generator=generator)
                noise = torch.randn((batch_size, *instances.shape[1:]), generator=generator).to(device)
                timesteps = torch.full((batch_size,), t, device=device)
                batch_loss = _denoising_loss(unet, noise_scheduler, instances[chosen], embedding, timesteps, noise)
                batch_loss.backward()
                protected = _protected(variant.scope, t, every_step)
                if constraint is not None and project_gradients:
                    constraint.project_gradients(protected)
                optimizer.step()
                optimizer.zero_grad()
                if constraint is not None:
                    constraint.project(protected)
                due = []
                if variant.scope is None:
                    due = [level for level in pending if step == max(1, round(level * steps))]
                if step % eval_every == 0 or step == cap or due:
                    loss = concept_loss()
                    log.info("%s, step %d: concept loss %.5g (from %.5g; target %s)", variant.name, step, loss,
                             base_loss, "set by this run" if target is None else f"{target:.5g}")
                    if variant.scope is not None:
                        drop = (base_loss - loss) / (base_loss - target) if base_loss != target else math.nan
                        due = [level for level in pending if drop >= level - 1e-12]
                        if loss <= target:
                            due = due or pending[-1:]
                    if due or step == cap:
                        pending = [level for level in pending if level not in due]
                        curves.append({"variant": variant.name, "step": step, "concept_loss": loss, **changes()})
                    if variant.scope is not None and loss <= target:
                        break
            for weight in weights:
                weight.requires_grad_(False)
            if variant.scope is None:
                target = loss
            update = float(torch.sqrt(sum(((w - s).double() ** 2).sum() for w, s in zip(weights, initial, strict=True))))
            row = {"variant": variant.name, "threshold": variant.threshold, "learning_rate": lr, "steps": step,
                   "reached_target": "yes" if loss <= target else "no", "concept_loss_before": base_loss,
                   "concept_loss_after": loss, "weight_update_norm": update}
            if constraint is None:
                row |= {f"null_fraction_{kind}": 0.0 for kind in ("to_q", "to_kv", "to_out")}
            else:
                sets = [[t] for t in every_step] if variant.scope == "per-timestep" else [every_step]
                row |= _null_fractions(constraint, sets)
            row |= {column: value for column, value in curves[-1].items() if column in CHANGE_COLUMNS} | shares
            rows.append(row)
            log.info("%s", row)
    unconstrained_drop = base_loss - target
    for item in [*rows, *curves]:
        loss = item.get("concept_loss_after", item.get("concept_loss"))
        item["loss_drop_vs_unconstrained"] = (base_loss - loss) / unconstrained_drop if unconstrained_drop else math.nan
    return rows, curves


def _projection_settings(results_dir) -> dict:
    """The projection job's settings (statistic, thresholds) recorded in the run's ``text.h5``."""
    from nullcov.store import TEXT_KEY, read_projections

    _, attrs = read_projections(Path(results_dir) / "projections" / "text.h5", keys=[TEXT_KEY])
    return attrs["provenance"]["projection"]


def _configured_threshold(results_dir) -> str:
    """The run's own threshold setting, as reported: the absolute threshold or ``p<percent>``."""
    settings = _projection_settings(results_dir)
    if settings["threshold_percent"] is not None:
        return f"p{settings['threshold_percent']:g}"
    return f"{settings['nullspace_threshold']:g}"


def _format(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_table(path, rows: list[dict], columns=TABLE_COLUMNS) -> None:
    lines = ["\t".join(columns)]
    for row in rows:
        lines.append("\t".join(_format(row[c]) for c in columns))
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def write_curves(path, curves: list[dict]) -> None:
    write_table(path, curves, CURVE_COLUMNS)


def draw_figure(path, rows: list[dict], curves: list[dict]) -> None:
    """Concept loss per variant, and how far held-out prompts moved against how much of the concept was learned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (bar_axis, attn_axis, latent_axis, energy_axis) = plt.subplots(1, 4, figsize=(21, 4.6))
    names = [row["variant"] for row in rows]
    colours = {name: f"C{i}" for i, name in enumerate(names)}
    positions = np.arange(len(rows))
    bar_axis.bar(positions, [row["loss_drop_vs_unconstrained"] for row in rows],
                 color=[colours[name] for name in names])
    for position, row in zip(positions, rows, strict=True):
        bar_axis.annotate(f"{row['steps']} steps, lr {row['learning_rate']:g}",
                          (position, max(row["loss_drop_vs_unconstrained"], 0) + 0.02), ha="center", va="bottom",
                          fontsize=7, rotation=90)
    drops = [row["loss_drop_vs_unconstrained"] for row in rows]
    bar_axis.set_ylim(min(0.0, *drops) - 0.05, max(1.0, *drops) * 1.6)  # room for the labels
    bar_axis.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
    bar_axis.set_xticks(positions, names, rotation=30, ha="right", fontsize=8)
    bar_axis.set(ylabel="concept loss drop / unconstrained drop", title=f"learning {CONCEPT_PROMPT!r}")
    for axis, kind, label in ((attn_axis, "attn2_output_change", "attn2 outputs"),
                              (latent_axis, "final_latent_change", "final latents")):
        for name in names:
            points = [point for point in curves if point["variant"] == name]
            for prompts, style in (("held_out", "-o"), ("trained", ":x")):
                axis.plot([point["loss_drop_vs_unconstrained"] for point in points],
                          [point[f"{kind}_{prompts}"] for point in points], style, color=colours[name],
                          label=name if prompts == "held_out" else None, markersize=4)
        axis.set_yscale("log")
        axis.set(xlabel="concept loss drop / unconstrained drop",
                 ylabel="relative change ‖o − o₀‖/‖o₀‖",
                 title=f"{label} moved (held-out —, trained ⋯)")
    attn_axis.legend(fontsize=7)
    projected = [row for row in rows if not math.isnan(row[f"null_energy_concept_{ENERGY_KINDS[0]}"])]
    width = 0.8 / max(2 * len(projected), 1)
    for index, row in enumerate(projected):
        for offset, (prompts, hatch) in enumerate((("held_out", None), ("trained", "//"))):
            ratios = [row[f"null_energy_concept_{kind}"] / row[f"null_energy_{prompts}_{kind}"] for kind in ENERGY_KINDS]
            energy_axis.bar(np.arange(len(ENERGY_KINDS)) + (2 * index + offset) * width, ratios, width,
                            color=colours[row["variant"]], hatch=hatch, edgecolor="k", linewidth=0.3,
                            label=row["variant"] if offset == 0 else None)
    energy_axis.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
    energy_axis.set_yscale("log")
    energy_axis.set_xticks(np.arange(len(ENERGY_KINDS)) + 0.4 - width / 2, ENERGY_KINDS)
    energy_axis.set(ylabel="concept's null-space energy share / the prompts'",
                    title="energy share, concept ÷ held-out (plain), ÷ trained (//)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
