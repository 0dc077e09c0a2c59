"""The projections of a run, looked up by timestep: ``ProjectionBank(results_dir)``.

One lookup serves both uses. ``get(layer, linear, timestep)`` gives one ``P`` (a float32 torch
tensor, computed with numpy, an LRU of ``cache_size`` matrices); ``factors(timesteps)`` gives
every per-timestep projection that protects a training batch, as
:class:`~nullcov.training.factored_projection.FactoredProjection` on ``device`` (what
:class:`nullcov.training.constraint.NullSpaceConstraint` applies; an LRU bounded by ``cache_bytes``).

A timestep resolves to a weighted set of scheduled steps. ``nearest``: the stored projection of
the closest scheduled step. ``interpolate``: the statistics of the two neighbouring steps mixed
linearly in t, and the null space recomputed with the run's own statistic and threshold, so the
result is still an orthogonal projection (averaging two ``P`` matrices would not be).
The text file's projections are timestep-independent (:attr:`ProjectionBank.text_factors`, by key):
a UNet's ``to_k``/``to_v`` resolve to its one text projection (``encoder_hidden_states``), an SD3/FLUX
transformer's ``context_embedder`` and pooled-text projection to their own (keyed by module path).
Which projection a linear takes is the family vocabulary's
(:meth:`nullcov.models.family.Linears.constraint_key`): a transformer block's ``attn.to_k`` takes
the ``attn.to_q`` stream's.

Timesteps are the scheduler's: a UNet's integers, or a flow-matching model's (SD3, FLUX) floats
``1000·σ``, which are not integers (``1000·σ`` after the shift: 964.58...). They are looked up as the
floats they are, never rounded: rounding would move a σ between grid points by up to 5e-4 (changing
the interpolation weights, and near a midpoint the nearest step), and a scheduled σ itself would no
longer resolve to its own stored step in ``interpolate``. The cache stays bounded for the trainers
diffusers ships: they draw each batch's timestep from the scheduler's ``timesteps`` (a UNet: 0..999;
SD3/FLUX: the 1000 shifted ``1000·σ`` of ``num_train_timesteps``), a finite set that
:meth:`ProjectionBank.precompute` fills ahead (pass ``scheduler.timesteps``). A trainer that draws σ
from a continuum in ``interpolate`` mode gets one ``eigh`` per new σ (quantise σ first, or use ``nearest``:
at most one factor set per scheduled step).

Several timesteps (``factors``): the projection is the null space of the **sum** of their
statistics at the run's absolute threshold τ. Each statistic ``S_t`` is positive semi-definite,
so every unit vector ``v`` of that null space has ``vᵀ S_t v ≤ vᵀ (Σ_u S_u) v < τ`` for every
``t`` of the batch: the update is in the null space of each of them (a thinner one than any
alone). With ``threshold_percent`` the threshold of the summed statistic is that percentile of
its own spectrum, and the bound holds with that value as τ. Factor sets are cached per timestep
set, keyed by the steps they resolve to, and computed on ``device``
(``torch.linalg.eigh`` in float64; on a device without float64, such as MPS, on the CPU).
:meth:`ProjectionBank.precompute` fills that cache for every timestep a trainer can draw.

``results_dir`` is a results folder, or the one-file safetensors export
(``results/export/nullcov_projections.safetensors``, :mod:`nullcov.training.export`): it holds the
projections, not the statistics, so it serves ``get``, ``factors`` and ``text_factors`` with
``nearest`` only (the same projections as the files it was made from, bit for bit). Or the files one by
one, wherever they lie, as a rule declares them: :meth:`ProjectionBank.from_files` (the schedule
file and lists of merged moments and projection files, :class:`nullcov.layout.DeclaredFiles`).
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from nullcov.docs import see
from nullcov.layout import PROJECTION_ENTRY, TEXT_NAME, DeclaredFiles, Results, step_file_name
from nullcov.models.family import TEXT_KEY, TEXT_PATH, layer_linears
from nullcov.models.schedule import read_schedule
from nullcov.statistics.projection import NullSpace, null_space
from nullcov.statistics.store import read_moments, read_projections
from nullcov.training.factored_projection import ConstraintError, FactoredProjection, null_space_factor

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"

MODES = ("nearest", "interpolate")

#: A timestep's statistic as weights on scheduled steps: ``((step name, weight), ...)``, sorted by name.
Mixture = tuple[tuple[str, float], ...]
#: How many timestep sets :meth:`ProjectionBank.factors` remembers the mixture of (small tuples; the
#: factor sets themselves are bounded by ``cache_bytes``).
MIXTURE_MEMORY = 100_000


class LeastRecentlyUsed:
    """A cache that drops its least recently used entries beyond ``max_entries`` entries, or beyond
    ``max_bytes`` bytes (the newest entry always stays)."""

    def __init__(self, max_entries: int | None = None, max_bytes: int | None = None):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict = OrderedDict()  # key -> (value, nbytes)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def __iter__(self):
        return iter(self._entries)

    def get(self, key):
        """The value of ``key`` (now the most recently used), or None."""
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key][0]

    def put(self, key, value, nbytes: int = 0) -> None:
        self._entries[key] = (value, nbytes)
        self.nbytes += nbytes
        while self._over():
            _, (_, dropped) = self._entries.popitem(last=False)
            self.nbytes -= dropped

    def _over(self) -> bool:
        if self.max_entries is not None and len(self._entries) > self.max_entries:
            return True
        return self.max_bytes is not None and self.nbytes > self.max_bytes and len(self._entries) > 1


def _eigh_device(device: torch.device) -> torch.device:
    """Where float64 ``eigh`` runs: the device itself unless it lacks float64 (MPS)."""
    return torch.device("cpu") if device.type == "mps" else device


def _read_steps(results_dir: Path | DeclaredFiles, exported: bool) -> list[dict]:
    """The schedule's steps, from ``schedule.json`` or the export's metadata."""
    if exported:
        from nullcov.training.export import read_safetensors_metadata

        return read_safetensors_metadata(results_dir)["schedule"]["steps"]
    declared = isinstance(results_dir, DeclaredFiles)
    schedule_path = results_dir.schedule if declared else Results(results_dir).schedule
    if not schedule_path.is_file():
        where = "the declared schedule file" if declared else f"is {results_dir} a nullcov results folder?"
        raise FileNotFoundError(f"{schedule_path} not found: {where}{see('not-a-nullcov-results-folder')}")
    return read_schedule(schedule_path)["steps"]


def _existing(path: Path | None) -> Path | None:
    """``path`` if it is a file, else None (also for a step whose file was not declared)."""
    return path if path is not None and path.is_file() else None


def _timestep_set(timesteps) -> tuple[float, ...]:
    """The distinct timesteps of a batch (a tensor, list or number), ascending, as the floats a tensor of
    them holds (Python floats become float32, as the scheduler's timesteps are): the cache key."""
    values = torch.as_tensor(timesteps).detach().reshape(-1).cpu().tolist()
    if not values:
        raise ValueError("no timesteps given")
    return tuple(sorted({float(t) for t in values}))


class ProjectionBank:
    """The projections of one run (a results folder, its safetensors export, or its files as
    :class:`~nullcov.layout.DeclaredFiles`: :meth:`from_files`), by timestep.

    ``mode`` (``nearest`` or ``interpolate``) is the default of :meth:`get` and the mode of
    :meth:`factors`; ``device`` is where factors are computed and kept; ``cache_size`` bounds the
    matrices of :meth:`get` (count), ``cache_bytes`` the factor sets (bytes).
    """

    def __init__(self, results_dir: str | Path | DeclaredFiles = "results", cache_size: int = 50, *,
                 mode: str = "nearest", device="cpu", cache_bytes: int = 8 * 1024**3):
        declared = isinstance(results_dir, DeclaredFiles)
        self.results_dir = results_dir if declared else Path(results_dir)
        self.exported = not declared and self.results_dir.suffix == SAFETENSORS_SUFFIX
        self.mode = self._checked_mode(mode)
        self.device = torch.device(device)
        self._layout = results_dir if declared else Results(self.results_dir)
        steps = _read_steps(self.results_dir, self.exported)
        order = sorted(range(len(steps)), key=lambda i: (steps[i]["timestep"], i))
        self._timesteps = [steps[i]["timestep"] for i in order]  # ascending
        self._names = [steps[i]["name"] for i in order]
        self._matrices = LeastRecentlyUsed(max_entries=cache_size)  # get(): (key, mixture) -> P
        self._cache = LeastRecentlyUsed(max_bytes=int(cache_bytes))  # factors(): mixture -> {key: factor}
        self._mixtures = LeastRecentlyUsed(max_entries=MIXTURE_MEMORY)  # timesteps -> their factor set's key
        self._statistics: dict[str, dict[str, np.ndarray]] = {}  # factors(): every step key's statistic
        self.computed = 0  # factor sets built (cache misses), for tests and benchmarks

    @classmethod
    def from_files(cls, schedule: str | Path, covariance=(), projections=(), cache_size: int = 50,
                   **options) -> ProjectionBank:
        """The projections of a run's files, wherever they lie (a rule's declared inputs): its
        ``schedule.json``, merged moments and projection files, each named ``<step>.h5`` or
        ``text.h5`` (:func:`nullcov.layout.step_name`). The same bank as the results folder that
        holds them; ``options``: ``mode``, ``device``, ``cache_bytes``."""
        return cls(DeclaredFiles(schedule, covariance, projections), cache_size, **options)

    @property
    def cache_size(self) -> int:
        return self._matrices.max_entries

    @cache_size.setter
    def cache_size(self, value: int) -> None:
        self._matrices.max_entries = value

    @property
    def cache_bytes(self) -> int:
        return self._cache.max_bytes

    @cache_bytes.setter
    def cache_bytes(self, value: int) -> None:
        self._cache.max_bytes = int(value)

    @property
    def timesteps(self) -> list[float]:
        """The scheduled timesteps, ascending."""
        return list(self._timesteps)

    @property
    def step_names(self) -> list[str]:
        """The step names, in the order of :attr:`timesteps`."""
        return list(self._names)

    # -- one projection (numpy) ------------------------------------------------------------------
    def get(self, layer: str, linear: str, timestep: float | None = None, mode: str | None = None):
        """The projection (a float32 torch tensor [d, d]) to apply as ``ΔW ← ΔW P``.

        ``linear``: a linear of ``layer`` by its own or its ``collect_features`` name (a UNet's ``q`` or
        ``to_q``; a transformer block's ``attn.to_k`` gets its stream's, ``attn.to_q``'s); a transformer's
        text-path linear (``context_embedder``) with ``layer=""``.
        """
        mode = self.mode if mode is None else self._checked_mode(mode)
        if not layer and linear in dict(TEXT_PATH).values():  # timestep-independent: the text file's projection
            return self._matrix(linear, ((TEXT_NAME, 1.0),))
        linears = layer_linears(layer)
        names = {**{name: name for name, _ in linears.trained}, **linears.names}
        if linear not in names:
            raise ValueError(f"linear must be one of {sorted(names)}, got {linear!r}"
                             f"{see('argument-not-among-the-allowed-values')}")
        key = linears.constraint_key(layer, names[linear])
        if key == TEXT_KEY:  # their inputs are the text states: the text projection
            return self._matrix(TEXT_KEY, ((TEXT_NAME, 1.0),))
        if timestep is None:
            raise ValueError(f"{linear} projections depend on the timestep; pass one"
                             f"{see('argument-not-among-the-allowed-values')}")
        return self._matrix(key, self._mixture((float(timestep),), mode))

    def _matrix(self, key: str, mixture: Mixture) -> torch.Tensor:
        """``P`` of one key: stored (one step) or the null space of the mixed statistic; cached."""
        found = self._matrices.get((key, mixture))
        if found is None:
            found = self._stored(mixture[0][0], key) if len(mixture) == 1 else self._mixed(key, mixture)
            self._matrices.put((key, mixture), found)
        return found

    def _stored(self, name: str, key: str) -> torch.Tensor:
        return torch.from_numpy(self._spaces(name, [key])[key].projection)

    def _spaces(self, name: str, keys: list[str] | None = None) -> dict[str, NullSpace]:
        """The stored null spaces of one step (or text), from its projection file or from the export."""
        if self.exported:
            from nullcov.training.export import read_safetensors_spaces

            return read_safetensors_spaces(self.results_dir, name, keys)
        return read_projections(self._file("projection", name), keys=keys)[0]

    def _holds(self, name: str) -> bool:
        """Whether the run has projections of step ``name`` (or text)."""
        if self.exported:
            return name in self._exported_keys
        return _existing(self._layout.projection(name)) is not None

    @cached_property
    def _exported_keys(self) -> dict[str, list[str]]:
        from nullcov.training.export import safetensors_keys

        return safetensors_keys(self.results_dir)

    def _mixed(self, key: str, mixture: Mixture) -> torch.Tensor:
        parts = [weight * self._read_statistics(name, [key])[key] for name, weight in mixture]
        settings = self.settings
        space = null_space(sum(parts[1:], parts[0]), settings["nullspace_threshold"], settings["threshold_percent"])
        return torch.from_numpy(space.projection)

    # -- from a timestep to scheduled steps ------------------------------------------------------
    def nearest_index(self, timestep: float) -> int:
        """Index (into :attr:`timesteps`) of the closest scheduled timestep (the lower one on a tie)."""
        return min(range(len(self._timesteps)), key=lambda i: (abs(self._timesteps[i] - timestep), i))

    def neighbours(self, timestep: float) -> tuple[int, int, float]:
        """Indices (into the ascending list) around ``timestep`` and the weight of the upper one."""
        high = bisect.bisect_left(self._timesteps, timestep)
        if high == 0:
            return 0, 0, 0.0
        if high == len(self._timesteps):
            return high - 1, high - 1, 0.0
        if self._timesteps[high] == timestep:
            return high, high, 0.0
        low = high - 1
        t_low, t_high = self._timesteps[low], self._timesteps[high]
        return low, high, (timestep - t_low) / (t_high - t_low)

    def _step_weights(self, timestep: float, mode: str) -> list[tuple[str, float]]:
        """The statistic of ``timestep`` as weights on scheduled steps (nearest: one step)."""
        names = self._names
        if mode == "nearest":
            return [(names[self.nearest_index(timestep)], 1.0)]
        low, high, weight = self.neighbours(timestep)
        if low == high:
            return [(names[low], 1.0)]
        return [(names[low], 1.0 - weight), (names[high], weight)]

    def _mixture(self, timesteps: tuple[float, ...], mode: str) -> Mixture:
        """The statistic protecting ``timesteps`` as (step name, weight) pairs: the cache key.

        Timesteps sharing one scheduled step (``nearest``) share one entry.
        """
        weights: dict[str, float] = {}
        for t in timesteps:
            for name, weight in self._step_weights(t, mode):
                # nearest: each step's statistic once; interpolate: the sum of every t's mixture
                weights[name] = 1.0 if mode == "nearest" else weights.get(name, 0.0) + weight
        weights = {name: weight for name, weight in weights.items() if weight > 0}
        if len(weights) == 1:  # every t has this one step's statistic S: its stored projection protects them all
            return ((next(iter(weights)), 1.0),)
        return tuple(sorted(weights.items()))

    def _checked_mode(self, mode: str) -> str:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}{see('argument-not-among-the-allowed-values')}")
        if mode == "interpolate" and self.exported:
            raise ValueError(f"{self.results_dir} holds projections, not statistics: mode='interpolate' needs the "
                             "results folder (its covariance/ files); use mode='nearest'"
                             f"{see('interpolation-needs-the-results-folder')}")
        return mode

    # -- what the files hold ---------------------------------------------------------------------
    def _file(self, kind: str, name: str) -> Path:
        """The ``projection`` or ``covariance`` file of one step (or text); an undeclared one is refused."""
        path = getattr(self._layout, kind)(name)
        if path is None:
            raise FileNotFoundError(f"{self.results_dir} include no {kind} file of {name}"
                                    f"{see('not-a-nullcov-results-folder')}")
        return path

    @cached_property
    def _first_step(self) -> tuple[list[str], dict] | None:
        """The per-timestep keys and the settings that made them (the first step's file), or None."""
        name = self._names[0]
        if not self._holds(name):
            return None
        if self.exported:
            from nullcov.training.export import read_safetensors_metadata

            provenance = read_safetensors_metadata(self.results_dir)["provenance"]
            return self._exported_keys[name], provenance[PROJECTION_ENTRY]
        spaces, attrs = read_projections(self._layout.projection(name))
        return sorted(spaces), attrs["provenance"][PROJECTION_ENTRY]

    @cached_property
    def text_factors(self) -> dict[str, FactoredProjection]:
        """Every timestep-independent projection of the text file, by key, on ``device`` in its cheapest
        form: a UNet's ``encoder_hidden_states`` (``to_k``/``to_v``), a transformer's text path
        (``context_embedder``, ``time_text_embed.text_embedder.linear_1``); empty without a text file."""
        if not self._holds(TEXT_NAME):
            return {}
        return {key: FactoredProjection.from_projection(torch.from_numpy(space.projection), space.null_dim,
                                                        _eigh_device(self.device)).to(self.device)
                for key, space in self._spaces(TEXT_NAME).items()}

    @property
    def text_factor(self) -> FactoredProjection | None:
        """A UNet's ``to_k``/``to_v`` projection (``text_factors[TEXT_KEY]``; None without it)."""
        return self.text_factors.get(TEXT_KEY)

    @property
    def step_keys(self) -> list[str]:
        """The per-timestep keys (``<layer>/to_q``, ``<layer>/to_out``; a transformer's stream keys
        ``<block>/attn.to_q``, ...); a folder without any projection is refused."""
        if self._first_step is None:
            if not self.text_factors:
                first = self._layout.projection(self._names[0])
                where = self.results_dir if first is None else first.parent
                raise FileNotFoundError(f"{where} holds neither {step_file_name(self._names[0])} nor {TEXT_NAME}.h5"
                                        f"{see('not-a-nullcov-results-folder')}")
            return []
        return self._first_step[0]

    @property
    def settings(self) -> dict | None:
        """The run's ``statistic``, ``nullspace_threshold`` and ``threshold_percent`` (None without step files)."""
        return None if self._first_step is None else self._first_step[1]

    def _read_statistics(self, name: str, keys: list[str]) -> dict[str, np.ndarray]:
        """The run's statistic (float64) of ``keys`` in one step's merged moments."""
        moments, _ = read_moments(self._file("covariance", name), "covariance", keys=keys)
        return {key: m.statistic(self.settings["statistic"]) for key, m in moments.items()}

    # -- every per-timestep projection of a batch (torch, factored) ------------------------------
    def projections(self, timesteps) -> dict[str, torch.Tensor]:
        """``{<layer>/<to_q|to_out>: P}`` (d × d float32) protecting every timestep in ``timesteps``.

        Formed from the cached :meth:`factors` on each call: for inspection and tests; training
        applies the factors.
        """
        return {key: factor.dense() for key, factor in self.factors(timesteps).items()}

    def factors(self, timesteps) -> dict[str, FactoredProjection]:
        """``{<step key>: FactoredProjection}`` protecting every timestep in ``timesteps`` (a tensor, list or
        number: the scheduler's timesteps, a flow-matching model's ``1000·σ`` as the floats they are, see
        the module docstring); cached."""
        if not self.step_keys:
            raise ConstraintError(f"{self.results_dir} holds no per-timestep projections (collect_features q/out off)"
                                  f"{see('no-projection-for-a-layer-or-linear')}")
        timesteps = _timestep_set(timesteps)
        mixture = self._mixtures.get(timesteps)
        if mixture is None:
            mixture = self._mixture(timesteps, self.mode)
            self._mixtures.put(timesteps, mixture)
        found = self._cache.get(mixture)
        if found is None:
            found = self._stored_factors(mixture[0][0]) if len(mixture) == 1 else self._mixed_factors(mixture)
            self.computed += 1
            self._cache.put(mixture, found, sum(factor.nbytes for factor in found.values()))
        return found

    def precompute(self, timesteps=range(1000)) -> None:
        """Fill the factor cache for each timestep the trainer can draw (one batch = one timestep): a UNet's
        integers (the default), a flow-matching trainer's ``scheduler.timesteps``."""
        sets = [_timestep_set([t]) for t in (timesteps if isinstance(timesteps, torch.Tensor) else list(timesteps))]
        for one in sets:
            self.factors(one)
        wanted = {self._mixtures.get(one) for one in sets}
        if not wanted <= set(self._cache):
            log.warning("precompute: cache_bytes=%d holds only %d of the %d projection sets of these timesteps",
                        self.cache_bytes, len(wanted & set(self._cache)), len(wanted))

    def _stored_factors(self, name: str) -> dict[str, FactoredProjection]:
        """The stored projections of one step, factored by the range finder."""
        where = _eigh_device(self.device)
        spaces = self._spaces(name, self.step_keys)
        return {key: FactoredProjection.from_projection(torch.from_numpy(space.projection), space.null_dim,
                                                        where).to(self.device)
                for key, space in spaces.items()}

    def _mixed_factors(self, mixture: Mixture) -> dict[str, FactoredProjection]:
        """The null space of the weighted sum of the steps' statistics, per key."""
        where = _eigh_device(self.device)
        found = {}
        for key in self.step_keys:
            total = None
            for name, weight in mixture:
                part = torch.from_numpy(self._step_statistics(name)[key]).to(where) * weight
                total = part if total is None else total + part
            found[key] = null_space_factor(total, self.settings["nullspace_threshold"],
                                           self.settings["threshold_percent"]).to(self.device)
        return found

    def _step_statistics(self, name: str) -> dict[str, np.ndarray]:
        """Every per-timestep key's statistic of one step (float64, host; read once)."""
        if name not in self._statistics:
            self._statistics[name] = self._read_statistics(name, self.step_keys)
        return self._statistics[name]
