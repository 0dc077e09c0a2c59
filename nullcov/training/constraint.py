"""Null-space-constrained fine-tuning of a UNet's cross-attention linears, or an SD3/FLUX transformer's.

Usage (any optimiser, full fine-tuning or peft-LoRA)::

    constraint = NullSpaceConstraint(unet, "results", mode="nearest")   # or an SD3/FLUX transformer
    # or the same files as a rule declares them, wherever they lie:
    # NullSpaceConstraint.from_files(unet, schedule, covariance_files, projection_files, mode="nearest")
    for batch in loader:
        timesteps = torch.randint(0, 1000, (batch_size,))
        loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
        constraint.project(timesteps)          # right after every optimizer.step()

Which linears, and which projection each takes, is the model family's vocabulary
(:func:`nullcov.models.model.constrained_linears`): a UNet's ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of
every ``attn2``; an SD3/FLUX transformer's stream linears and every linear sharing a stream's input
(a joint block's ``attn.to_q``/``to_k``/``to_v`` take the image stream's projection,
``attn.add_q_proj``/``add_k_proj``/``add_v_proj`` the text stream's, ``attn.to_out.0`` and
``attn.to_add_out`` their own; a FLUX single block's ``attn.to_q``/``to_k``/``to_v`` and ``proj_mlp`` the
``single`` stream's, ``proj_out`` its own), and its text path (``context_embedder``,
``time_text_embed.text_embedder.linear_1``: their timestep-independent projections in the text file).
A flow-matching trainer passes the scheduler's timesteps ``1000·σ`` (floats, looked up as they are:
:mod:`nullcov.training.bank`), not the ``t/1000`` FLUX's transformer receives.

What :meth:`NullSpaceConstraint.project` does to each constrained linear:

- **full fine-tuning**: the update the optimiser *applied* since the last projection,
  ``ΔW = W - W_last`` (Adam's moments, weight decay, clipping: whatever produced it), becomes
  ``ΔW P``. The projected increments are summed in a float32 buffer ``D`` and the weight is set
  to ``W_0 + D``, so rounding does not accumulate in the weight. The linear's bias (``to_out.0``
  has one) cannot be constrained by an input-side projection: ``bias="freeze"`` (default) undoes
  its updates, ``bias="free"`` leaves it alone.
- **LoRA** (peft, ``ΔW = s B A``): every adapter's down-projection becomes ``A P``, so the
  merged update satisfies ``ΔW P = ΔW``. DoRA adapters are refused (their magnitude vector
  rescales the base weight, which no input-side projection constrains).
- per-step linears (a UNet's ``to_q``/``to_out``, every transformer block's) use the projection of
  the batch's timestep(s); text linears (a UNet's ``to_k``/``to_v``, a transformer's text path) their
  text projection (their inputs are the text-encoder states, the same at every timestep).
- ``P`` is applied in the form with the fewest flops
  (:class:`nullcov.training.factored_projection.FactoredProjection`): at most half the flops of the dense
  product. The bases are cached with the lookups (from the ``eigh`` for ``interpolate``; from the
  stored ``P`` by a randomized range finder for ``nearest``), so no step factorises anything.

The projections come from :class:`nullcov.training.bank.ProjectionBank` (``constraint.lookup``):
``nearest`` uses the stored projection of the closest scheduled step; ``interpolate`` mixes the
two neighbouring steps' statistics linearly in t and recomputes the null space. Several
timesteps in one batch get the null space of the **sum** of their statistics, which lies in the
null space of each of them; passing all scheduled timesteps protects the whole trajectory.
``constraint.lookup.precompute`` fills the cache for every timestep the trainer can draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from nullcov.docs import see
from nullcov.layout import DeclaredFiles
from nullcov.models.model import constrained_linears
from nullcov.training.bank import ProjectionBank
from nullcov.training.factored_projection import ConstraintError, FactoredProjection

BIAS_POLICIES = ("freeze", "free")


@dataclass
class ConstrainedLinear:
    """One constrained linear: its projection's key and what :meth:`NullSpaceConstraint.project` touches."""

    layer: str  # the hooked layer's module path ("" for a transformer's text path)
    linear: str  # to_q, to_k, to_v, to_out; a transformer block's attn.to_k, proj_mlp, ...
    name: str  # the module path in the model (attn2's to_out.0, a block's attn.to_out.0)
    key: str  # its projection's key: a step key, or a text-file key (text)
    text: bool  # the projection is the text file's (timestep-independent)
    module: torch.nn.Module  # the nn.Linear (the base layer under a LoRA wrapper)
    lora_down: list[torch.nn.Parameter] = field(default_factory=list)  # peft lora_A weights
    full: bool = False  # the base weight itself is trained
    initial: torch.Tensor | None = None  # W_0 (full fine-tuning; float32)
    applied: torch.Tensor | None = None  # D = W - W_0, every projected increment summed (float32)
    last: torch.Tensor | None = None  # W after the last projection (float32)
    bias: torch.Tensor | None = None  # the bias to restore (bias="freeze")


def find_constrained_linears(model) -> list[ConstrainedLinear]:
    """Every linear a constraint can train (:func:`nullcov.models.model.constrained_linears`), plain or
    peft-LoRA: a UNet's ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every cross-attention module, an
    SD3/FLUX transformer's stream, shared-input and text-path linears."""
    found = []
    for site in constrained_linears(model):
        module = site.module
        item = ConstrainedLinear(layer=site.layer, linear=site.linear, name=site.name, key=site.key,
                                 text=site.text, module=module)
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            dora = [name for name, on in getattr(module, "use_dora", {}).items() if on]
            if dora:
                raise ConstraintError(f"{item.name}: DoRA adapter(s) {dora} cannot be null-space constrained; "
                                      f"use plain LoRA (use_dora=False){see('linear-cannot-be-constrained')}")
            item.lora_down = [adapter.weight for adapter in module.lora_A.values()]
            item.module = module.base_layer
        if not isinstance(item.module, torch.nn.Linear):
            raise ConstraintError(f"{item.name} is a {type(item.module).__name__}, not a torch.nn.Linear"
                                  f"{see('linear-cannot-be-constrained')}")
        item.full = item.module.weight.requires_grad
        found.append(item)
    if not found:
        raise ConstraintError("the model has no cross-attention modules (is_cross_attention) and is not an SD3/FLUX "
                              f"transformer; is it a UNet?{see('nothing-to-constrain')}")
    return found


class NullSpaceConstraint:
    """Keeps every trained update of the constrained linears in the null space of the preserved inputs.

    ``unet``: a diffusers UNet or SD3/FLUX transformer (or a peft model wrapping one); ``results_dir``:
    a nullcov results folder (``schedule.json``, ``projections/``, and ``covariance/`` for ``interpolate`` or batches
    of several timesteps), or the same files one by one (:meth:`from_files`). Linears with nothing
    trainable are left alone; a trainable one without a projection in the results (a layer or
    feature that was not collected) is an error.
    """

    def __init__(self, unet, results_dir: str | Path | DeclaredFiles = "results", mode: str = "nearest",
                 device=None, cache_bytes: int = 8 * 1024**3, bias: str = "freeze"):
        if bias not in BIAS_POLICIES:
            raise ValueError(f"bias must be one of {BIAS_POLICIES}, got {bias!r}"
                             f"{see('argument-not-among-the-allowed-values')}")
        linears = find_constrained_linears(unet)
        if device is None:
            device = linears[0].module.weight.device
        self.lookup = ProjectionBank(results_dir, mode=mode, device=device, cache_bytes=cache_bytes)
        text, step_keys = self.lookup.text_factors, self.lookup.step_keys  # read now: a folder without any fails here
        self.linears = [item for item in linears if item.full or item.lora_down
                        or (item.module.bias is not None and item.module.bias.requires_grad)]
        if not self.linears:
            raise ConstraintError("no constrainable linear (a UNet's cross-attention, a transformer's attention "
                                  f"streams) has a trainable weight or LoRA adapter{see('nothing-to-constrain')}")
        missing = [item.name for item in self.linears if item.key not in (text if item.text else step_keys)]
        if missing:
            raise ConstraintError(
                f"{results_dir} has no projection for the trainable linear(s) {missing}: collect them (config keys "
                "cross_attention_layers, and collect_features for a UNet, streams for a transformer) or freeze them "
                f"(requires_grad_(False)){see('no-projection-for-a-layer-or-linear')}"
            )
        self.bias = bias
        self.snapshot()

    @classmethod
    def from_files(cls, unet, schedule: str | Path, covariance=(), projections=(), **options) -> NullSpaceConstraint:
        """The constraint of a run's files, wherever they lie (a rule's declared inputs): its
        ``schedule.json``, merged moments and projection files (:meth:`ProjectionBank.from_files`);
        the same constraint as the results folder that holds them. ``options``: ``mode``,
        ``device``, ``cache_bytes``, ``bias``."""
        return cls(unet, DeclaredFiles(schedule, covariance, projections), **options)

    @torch.no_grad()
    def snapshot(self) -> None:
        """Take the current weights as the reference ``W_0`` (called by the constructor)."""
        for item in self.linears:
            weight = item.module.weight
            if item.full:
                item.initial = weight.detach().to(torch.float32, copy=True)
                item.applied = torch.zeros_like(weight, dtype=torch.float32)
                item.last = item.initial.clone()
            if self.bias == "freeze" and item.module.bias is not None and item.module.bias.requires_grad:
                item.bias = item.module.bias.detach().clone()

    @torch.no_grad()
    def project(self, timesteps) -> None:
        """Project what the optimiser applied since the last call; ``timesteps`` of the batch just trained.

        Each ``P`` is applied in its cheapest form (:class:`FactoredProjection`); the only
        full-size temporary per linear is the increment ``W − W_last`` (float32 weights).
        """
        for item, factor in self._factors(timesteps):
            if item.full:
                weight = item.module.weight
                increment = torch.sub(weight, item.last) if weight.dtype == torch.float32 \
                    else weight.to(torch.float32).sub_(item.last)
                factor.accumulate_(item.applied, increment)  # D += ΔW P
                if weight.dtype == torch.float32:
                    torch.add(item.initial, item.applied, out=weight)  # W = W_0 + D
                else:
                    weight.copy_(item.initial + item.applied)
                item.last.copy_(weight)
            for down in item.lora_down:
                factor.project_(down)  # A ← A P
            if item.bias is not None:
                item.module.bias.copy_(item.bias)

    @torch.no_grad()
    def project_gradients(self, timesteps) -> None:
        """``grad ← grad P`` for every constrained weight and LoRA ``A``: call it after
        ``loss.backward()`` and before ``optimizer.step()`` (optional; ``project()`` stays the guarantee).

        ``project()`` alone keeps the applied update in the null space, but Adam's moments then
        still hold the gradient's components outside it, and the projected step need not descend:
        on the tiny model's fine-tune proof, AdamW with ``project()`` alone did not reach the
        unconstrained run's concept loss in 200 steps, with this too it did in 40
        (the earlier random-model proof). Linears without a gradient (frozen, or not reached by
        the loss) are skipped.
        """
        for item, factor in self._factors(timesteps):
            parameters = ([item.module.weight] if item.full else []) + item.lora_down
            for parameter in parameters:
                if parameter.grad is not None:
                    factor.project_(parameter.grad)

    def _factors(self, timesteps) -> list[tuple[ConstrainedLinear, FactoredProjection]]:
        """Each constrained linear with the projection of ``timesteps`` it gets (text linears: their own)."""
        step = self.lookup.factors(timesteps) if any(not item.text for item in self.linears) else {}
        text = self.lookup.text_factors
        return [(item, (text if item.text else step)[item.key]) for item in self.linears]

    def factor_for(self, item: ConstrainedLinear, timesteps) -> FactoredProjection:
        """The projection ``project(timesteps)`` applies to ``item``, in the form it applies it."""
        return self.lookup.text_factors[item.key] if item.text else self.lookup.factors(timesteps)[item.key]

    def projection_for(self, item: ConstrainedLinear, timesteps) -> torch.Tensor:
        """The projection ``project(timesteps)`` applies to ``item`` (d × d)."""
        return self.factor_for(item, timesteps).dense()
