"""How much of an input set a projected update can reach: the null space's share of the inputs' energy.

An update ``ΔW = ΔW P`` changes ``W x`` by ``ΔW (x P)`` only, so ``Σ‖x P‖² / Σ‖x‖²`` over the inputs
``x`` a linear sees says how much a projected fine-tune can move them. For the statistics' own
prompts it is the share of the statistic's trace under the threshold; learning a concept without
moving other prompts needs the concept's share to exceed theirs. :func:`null_energy` measures it
from the linears' raw inputs while anything runs the UNet (a training batch, a pipeline call).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

from nullcov.collection.hooks import Hook, forward_hooks
from nullcov.models.family import CROSS_ATTENTION
from nullcov.proof.plan import SCOPES

ENERGY_KINDS = ("to_q", "to_kv", "to_out")  # linear kinds as reported; to_kv: to_k and to_v share the text projection


def protected_timesteps(scope: str, timestep: int, every_step: list[float]) -> list:
    """The timesteps whose projection constrains an update at ``timestep``: its own, or every scheduled one."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return [timestep] if scope == "per-timestep" else every_step


def kind_of(item) -> str:
    """The linear's kind as reported (:data:`ENERGY_KINDS`)."""
    return "to_kv" if item.linear in CROSS_ATTENTION.text else item.linear


@contextmanager
def null_energy(unet, constraint, scope: str, every_step: list[int], prompts: int | None = None):
    """While active: ``Σ ‖x P‖²`` and ``Σ ‖x‖²`` of the inputs ``x`` of every constrained linear, per
    kind (:data:`ENERGY_KINDS`), with ``P`` the projection ``constraint.project`` applies at each
    sample's timestep under ``scope``; yields ``{part: {kind: [null energy, energy]}}``.

    ``part``: ``conditional`` and ``unconditional``. With ``prompts`` (a pipeline call on that many
    prompts) the rows are split as the feature capture splits them
    (:func:`nullcov.collection.capture.conditional_rows`): a CFG batch ``[uncond, cond]`` puts its first half
    under ``unconditional``, which the statistics hold only when collected with
    ``unconditional_branch: true`` (else nothing protects it). Without ``prompts`` every row is
    ``conditional``.

    The share ``null / energy`` is how much of an input set the projected updates can reach: an
    update ``ΔW = ΔW P`` changes ``W x`` by ``ΔW (x P)`` only. For the prompts of the statistics
    it is the share of the statistic's trace under the threshold; learning a concept without
    moving other prompts needs the concept's share to be larger than theirs.
    """
    probe = _NullEnergyProbe(constraint, scope, every_step, prompts)
    hooks = [Hook(unet, probe.before_unet, before=True, with_kwargs=True)]
    hooks += [Hook(item.module, functools.partial(probe.before_linear, item), before=True)
              for item in constraint.linears]
    with forward_hooks(hooks):
        yield probe.sums


class _NullEnergyProbe:
    """The hooks of :func:`null_energy`: the UNet call's per-row timesteps and CFG parts (before the
    UNet), then each constrained linear's input energies (before the linear)."""

    def __init__(self, constraint, scope: str, every_step: list[int], prompts: int | None):
        self.constraint, self.scope, self.every_step, self.prompts = constraint, scope, every_step, prompts
        self.sums = {part: {kind: [0.0, 0.0] for kind in ENERGY_KINDS} for part in ("conditional", "unconditional")}
        self.timesteps, self.parts = None, {}

    def before_unet(self, module, args, kwargs) -> None:
        from nullcov.collection.capture import conditional_rows

        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        self.timesteps = torch.as_tensor(timestep).reshape(-1).round().long().cpu().expand(len(sample))
        self.parts = {"conditional": slice(None)}
        if self.prompts is not None:
            self.parts = {"conditional": conditional_rows(len(sample), self.prompts)}
            if len(sample) == 2 * self.prompts:
                self.parts["unconditional"] = slice(0, self.prompts)

    def before_linear(self, item, module, args) -> None:
        x = args[0].detach()
        if x.ndim != 3 or len(x) != len(self.timesteps):
            raise ValueError(f"{item.name}: input of shape {tuple(x.shape)} is not (batch, tokens, dim) of this call")
        for part, rows in self.parts.items():
            inputs, steps = x[rows], self.timesteps[rows]
            for timestep in steps.unique().tolist():
                selected = inputs[(steps == timestep).to(x.device)].reshape(-1, x.shape[-1])
                found = self.sums[part][kind_of(item)]
                factor = self.constraint.factor_for(item, protected_timesteps(self.scope, timestep, self.every_step))
                found[0] += factor.null_energy(selected)
                found[1] += float(selected.to(torch.float64).square().sum())
