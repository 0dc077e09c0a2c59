"""Null-space-constrained fine-tuning of the UNet's cross-attention linears.

Usage (any optimiser, full fine-tuning or peft-LoRA)::

    constraint = NullSpaceConstraint(unet, "results", mode="nearest")
    for batch in loader:
        timesteps = torch.randint(0, 1000, (batch_size,))
        loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
        constraint.project(timesteps)          # right after every optimizer.step()

What :meth:`NullSpaceConstraint.project` does to each cross-attention linear (``to_q``, ``to_k``,
``to_v``, ``to_out.0`` of every ``attn2``):

- **full fine-tuning**: the update the optimiser *applied* since the last projection,
  ``ΔW = W - W_last`` (Adam's moments, weight decay, clipping: whatever produced it), becomes
  ``ΔW P``. The projected increments are summed in a float32 buffer ``D`` and the weight is set
  to ``W_0 + D``, so rounding does not accumulate in the weight. The linear's bias (``to_out.0``
  has one) cannot be constrained by an input-side projection: ``bias="freeze"`` (default) undoes
  its updates, ``bias="free"`` leaves it alone.
- **LoRA** (peft, ``ΔW = s B A``): every adapter's down-projection becomes ``A P``, so the
  merged update satisfies ``ΔW P = ΔW``. DoRA adapters are refused (their magnitude vector
  rescales the base weight, which no input-side projection constrains).
- ``to_q``/``to_out`` use the projection of the batch's timestep(s), ``to_k``/``to_v`` the
  text projection (their inputs are the text-encoder states, the same at every timestep).

Several timesteps in one batch: the projection is the null space of the **sum** of their
statistics at the run's absolute threshold τ. Each statistic ``S_t`` is positive semi-definite,
so every unit vector ``v`` of that null space has ``vᵀ S_t v ≤ vᵀ (Σ_u S_u) v < τ`` for every
``t`` of the batch: the update is in the null space of each of them (a thinner one than any
alone). Passing all scheduled timesteps protects the whole trajectory. With
``threshold_percent`` the threshold of the summed statistic is that percentile of its own
spectrum, and the bound holds with that value as τ.

Lookups (:class:`ProjectionLookup`) are cached per integer timestep set and computed on the
training device (``torch.linalg.eigh`` in float64; on a device without float64, such as MPS, on
the CPU): ``nearest`` uses the stored projection of the closest scheduled step; ``interpolate``
mixes the two neighbouring steps' statistics linearly in t (as :class:`nullcov.bank.ProjectionBank`
does) and recomputes the null space. :meth:`ProjectionLookup.precompute` fills the cache for
every timestep the trainer can draw.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nullcov.bank import MODES, ProjectionBank
from nullcov.model import cross_attention_modules
from nullcov.projection import spectrum_threshold
from nullcov.store import TEXT_KEY, read_moments, read_projections

log = logging.getLogger(__name__)

CONSTRAINED_LINEARS = ("to_q", "to_k", "to_v", "to_out")
TEXT_LINEARS = ("to_k", "to_v")
_PEFT_PREFIXES = ("base_model.model.",)
BIAS_POLICIES = ("freeze", "free")


class ConstraintError(ValueError):
    """The model and the results folder do not fit together, or the model cannot be constrained."""


def null_space_projection(statistic: torch.Tensor, nullspace_threshold: float | None,
                          threshold_percent: float | None = None) -> torch.Tensor:
    """``P = U0 U0ᵀ`` (float32, on the statistic's device) of a symmetric float64 statistic.

    The torch twin of :func:`nullcov.projection.null_space` (same symmetrisation and threshold
    rule, :func:`nullcov.projection.spectrum_threshold`), so it runs on the training device.
    """
    matrix = statistic.to(torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    threshold = spectrum_threshold(eigenvalues.cpu().numpy(), nullspace_threshold, threshold_percent)
    basis = eigenvectors[:, eigenvalues < threshold]
    return (basis @ basis.T).to(torch.float32)


def _eigh_device(device: torch.device) -> torch.device:
    """Where float64 ``eigh`` runs: the device itself unless it lacks float64 (MPS)."""
    return torch.device("cpu") if device.type == "mps" else device


class ProjectionLookup:
    """Projections for the timesteps of a training batch, cached on the training device.

    ``projections(timesteps)`` returns ``{key: P}`` for every per-timestep key (``<layer>/to_q``,
    ``<layer>/to_out``); ``text`` is the ``to_k``/``to_v`` projection. The cache is keyed by the
    statistic a set of integer timesteps resolves to (``nearest``: one entry per scheduled step,
    whatever ``t`` maps to it) and bounded by ``cache_bytes`` (least recently used first out);
    ``precompute(range(1000))`` fills it ahead of training.
    """

    def __init__(self, results_dir: str | Path = "results", mode: str = "nearest", device="cpu",
                 cache_bytes: int = 8 * 1024**3):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.results_dir = Path(results_dir)
        self.mode = mode
        self.device = torch.device(device)
        self.cache_bytes = int(cache_bytes)
        self.bank = ProjectionBank(self.results_dir)
        self.computed = 0  # projection sets built (cache misses), for tests and benchmarks
        self._mixtures: dict[tuple[int, ...], tuple] = {}  # integer timesteps -> cache key
        self._cache: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._cached_bytes = 0
        self._statistics: dict[str, dict[str, np.ndarray]] = {}
        text_file = self.results_dir / "projections" / "text.h5"
        self.text = None
        if text_file.is_file():
            spaces, _ = read_projections(text_file, keys=[TEXT_KEY])
            self.text = torch.from_numpy(spaces[TEXT_KEY].projection).to(self.device)
        first = self.results_dir / "projections" / f"{self.bank.step_names[0]}.h5"
        self.step_keys: list[str] = []
        self.settings = None
        if first.is_file():
            spaces, attrs = read_projections(first)
            self.step_keys = sorted(spaces)
            self.settings = attrs["provenance"]["projection"]
        elif self.text is None:
            raise FileNotFoundError(f"{self.results_dir}/projections holds neither {first.name} nor text.h5")

    @property
    def timesteps(self) -> list[float]:
        """The scheduled timesteps (ascending)."""
        return self.bank.timesteps

    def projections(self, timesteps) -> dict[str, torch.Tensor]:
        """``{<layer>/<to_q|to_out>: P}`` protecting every timestep in ``timesteps`` (a tensor, list or number)."""
        if not self.step_keys:
            raise ConstraintError(f"{self.results_dir} holds no per-timestep projections (collect_features q/out off)")
        values = torch.as_tensor(timesteps).detach().reshape(-1).cpu().tolist()
        if not values:
            raise ValueError("no timesteps given")
        timesteps = tuple(sorted({round(float(t)) for t in values}))
        mixture = self._mixtures.get(timesteps)
        if mixture is None:
            mixture = self._mixtures[timesteps] = self._mixture(timesteps)
        if mixture in self._cache:
            self._cache.move_to_end(mixture)
            return self._cache[mixture]
        found = self._compute(mixture)
        self.computed += 1
        self._cache[mixture] = found
        self._cached_bytes += sum(p.numel() * p.element_size() for p in found.values())
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._cached_bytes -= sum(p.numel() * p.element_size() for p in dropped.values())
        return found

    def precompute(self, timesteps=range(1000)) -> None:
        """Fill the cache for each integer timestep the trainer can draw (one batch = one timestep)."""
        timesteps = list(timesteps)
        for t in timesteps:
            self.projections([t])
        wanted = {self._mixtures[(round(float(t)),)] for t in timesteps}
        if not wanted <= set(self._cache):
            log.warning("precompute: cache_bytes=%d holds only %d of the %d projection sets of these timesteps",
                        self.cache_bytes, len(wanted & set(self._cache)), len(wanted))

    # -- computing one projection set ---------------------------------------------------------
    def _mixture(self, timesteps: tuple[int, ...]) -> tuple[tuple[str, float], ...]:
        """The statistic protecting ``timesteps`` as (step name, weight) pairs: the cache key.

        Integer timesteps sharing one scheduled step (``nearest``) share one entry.
        """
        weights: dict[str, float] = {}
        for t in timesteps:
            for name, weight in self._step_weights(t):
                # nearest: each step's statistic once; interpolate: the sum of every t's mixture
                weights[name] = 1.0 if self.mode == "nearest" else weights.get(name, 0.0) + weight
        weights = {name: weight for name, weight in weights.items() if weight > 0}
        if len(weights) == 1:  # every t has this one step's statistic S: its stored projection protects them all
            return ((next(iter(weights)), 1.0),)
        return tuple(sorted(weights.items()))

    def _compute(self, mixture: tuple[tuple[str, float], ...]) -> dict[str, torch.Tensor]:
        """The stored projections of one step, or the null space of the weighted sum of statistics."""
        if len(mixture) == 1:
            spaces, _ = read_projections(self.results_dir / "projections" / f"{mixture[0][0]}.h5", keys=self.step_keys)
            return {key: torch.from_numpy(space.projection).to(self.device) for key, space in spaces.items()}
        where = _eigh_device(self.device)
        found = {}
        for key in self.step_keys:
            total = None
            for name, weight in mixture:
                part = torch.from_numpy(self._statistic(name)[key]).to(where) * weight
                total = part if total is None else total + part
            projection = null_space_projection(total, self.settings["nullspace_threshold"],
                                               self.settings["threshold_percent"])
            found[key] = projection.to(self.device)
        return found

    def _step_weights(self, timestep: int) -> list[tuple[str, float]]:
        """The statistic of integer ``timestep`` as weights on scheduled steps (nearest: one step)."""
        names = self.bank.step_names
        if self.mode == "nearest":
            return [(names[self.bank.nearest_index(timestep)], 1.0)]
        low, high, weight = self.bank.neighbours(timestep)
        if low == high:
            return [(names[low], 1.0)]
        return [(names[low], 1.0 - weight), (names[high], weight)]

    def _statistic(self, name: str) -> dict[str, np.ndarray]:
        """Every per-timestep key's statistic of one step (float64, host; read once)."""
        if name not in self._statistics:
            moments, _ = read_moments(self.results_dir / "covariance" / f"{name}.h5", "covariance", keys=self.step_keys)
            self._statistics[name] = {key: m.statistic(self.settings["statistic"]) for key, m in moments.items()}
        return self._statistics[name]


@dataclass
class ConstrainedLinear:
    """One cross-attention linear: its results key and what :meth:`NullSpaceConstraint.project` touches."""

    layer: str
    linear: str  # to_q, to_k, to_v, to_out
    module: torch.nn.Module  # the nn.Linear (the base layer under a LoRA wrapper)
    lora_down: list[torch.nn.Parameter] = field(default_factory=list)  # peft lora_A weights
    full: bool = False  # the base weight itself is trained
    initial: torch.Tensor | None = None  # W_0 (full fine-tuning)
    applied: torch.Tensor | None = None  # D = W - W_0, every projected increment summed (float32)
    last: torch.Tensor | None = None  # W after the last projection
    bias: torch.Tensor | None = None  # the bias to restore (bias="freeze")

    @property
    def key(self) -> str:
        return TEXT_KEY if self.linear in TEXT_LINEARS else f"{self.layer}/{self.linear}"

    @property
    def name(self) -> str:
        return f"{self.layer}.{self.linear}" + (".0" if self.linear == "to_out" else "")


def _strip_prefix(name: str) -> str:
    for prefix in _PEFT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def find_cross_attention_linears(unet) -> list[ConstrainedLinear]:
    """``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every cross-attention module, plain or peft-LoRA."""
    found = []
    for layer, attention in cross_attention_modules(unet):
        for linear in CONSTRAINED_LINEARS:
            module = attention.to_out[0] if linear == "to_out" else getattr(attention, linear)
            item = ConstrainedLinear(layer=_strip_prefix(layer), linear=linear, module=module)
            if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
                dora = [name for name, on in getattr(module, "use_dora", {}).items() if on]
                if dora:
                    raise ConstraintError(f"{item.name}: DoRA adapter(s) {dora} cannot be null-space constrained; "
                                          "use plain LoRA (use_dora=False)")
                item.lora_down = [adapter.weight for adapter in module.lora_A.values()]
                item.module = module.base_layer
            if not isinstance(item.module, torch.nn.Linear):
                raise ConstraintError(f"{item.name} is a {type(item.module).__name__}, not a torch.nn.Linear")
            item.full = item.module.weight.requires_grad
            found.append(item)
    if not found:
        raise ConstraintError("the model has no cross-attention modules (is_cross_attention); is it a UNet?")
    return found


class NullSpaceConstraint:
    """Keeps every trained cross-attention update in the null space of the preserved inputs.

    ``unet``: a diffusers UNet (or a peft model wrapping one); ``results_dir``: a nullcov results
    folder (``schedule.json``, ``projections/``, and ``covariance/`` for ``interpolate`` or batches
    of several timesteps). Linears with nothing trainable are left alone; a trainable one without
    a projection in the results (a layer or feature that was not collected) is an error.
    """

    def __init__(self, unet, results_dir: str | Path = "results", mode: str = "nearest", device=None,
                 cache_bytes: int = 8 * 1024**3, bias: str = "freeze"):
        if bias not in BIAS_POLICIES:
            raise ValueError(f"bias must be one of {BIAS_POLICIES}, got {bias!r}")
        linears = find_cross_attention_linears(unet)
        if device is None:
            device = linears[0].module.weight.device
        self.lookup = ProjectionLookup(results_dir, mode, device, cache_bytes)
        self.linears = [item for item in linears if item.full or item.lora_down
                        or (item.module.bias is not None and item.module.bias.requires_grad)]
        if not self.linears:
            raise ConstraintError("no cross-attention linear has a trainable weight or LoRA adapter")
        missing = [item.name for item in self.linears
                   if (item.key == TEXT_KEY and self.lookup.text is None)
                   or (item.key != TEXT_KEY and item.key not in self.lookup.step_keys)]
        if missing:
            raise ConstraintError(
                f"{results_dir} has no projection for the trainable linear(s) {missing}: collect them "
                "(config keys cross_attention_layers, collect_features) or freeze them (requires_grad_(False))"
            )
        self.bias = bias
        self.snapshot()

    @torch.no_grad()
    def snapshot(self) -> None:
        """Take the current weights as the reference ``W_0`` (called by the constructor)."""
        for item in self.linears:
            weight = item.module.weight
            if item.full:
                item.initial = weight.detach().clone()
                item.applied = torch.zeros_like(weight, dtype=torch.float32)
                item.last = weight.detach().clone()
            if self.bias == "freeze" and item.module.bias is not None and item.module.bias.requires_grad:
                item.bias = item.module.bias.detach().clone()

    @torch.no_grad()
    def project(self, timesteps) -> None:
        """Project what the optimiser applied since the last call; ``timesteps`` of the batch just trained."""
        step = self.lookup.projections(timesteps) if any(i.key != TEXT_KEY for i in self.linears) else {}
        for item in self.linears:
            projection = self.lookup.text if item.key == TEXT_KEY else step[item.key]
            if item.full:
                weight = item.module.weight
                increment = weight.to(torch.float32) - item.last.to(torch.float32)
                item.applied.addmm_(increment, projection)
                weight.copy_(item.initial.to(torch.float32) + item.applied)
                item.last.copy_(weight)
            for down in item.lora_down:
                down.copy_((down.to(torch.float32) @ projection).to(down.dtype))
            if item.bias is not None:
                item.module.bias.copy_(item.bias)

    def projection_for(self, item: ConstrainedLinear, timesteps) -> torch.Tensor:
        """The projection ``project(timesteps)`` applies to ``item``."""
        return self.lookup.text if item.key == TEXT_KEY else self.lookup.projections(timesteps)[item.key]
