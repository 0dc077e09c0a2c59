"""Loading projections in a trainer: ``ProjectionBank(results_dir).get(layer, linear, timestep)``.

``nearest`` returns the stored projection of the closest scheduled timestep. ``interpolate``
mixes the statistics of the two neighbouring timesteps linearly in t and recomputes the null
space with the run's own statistic and threshold, so the result is still an orthogonal
projection (averaging two ``P`` matrices would not be). ``to_k``/``to_v`` resolve to the
timestep-independent text projection.

``results_dir`` is a results folder, or the one-file safetensors export
(``results/export/nullcov_projections.safetensors``, :mod:`nullcov.export`): it holds the
projections, not the statistics, so it serves ``nearest`` only.
"""

from __future__ import annotations

import bisect
import json
from collections import OrderedDict
from pathlib import Path

from nullcov.docs import see
from nullcov.projection import null_space
from nullcov.store import TEXT_KEY, read_moments, read_projections

SAFETENSORS_SUFFIX = ".safetensors"

_LINEARS = {"q": "to_q", "to_q": "to_q", "out": "to_out", "to_out": "to_out",
            "k": "to_k", "to_k": "to_k", "v": "to_v", "to_v": "to_v"}
MODES = ("nearest", "interpolate")


class ProjectionBank:
    def __init__(self, results_dir: str | Path = "results", cache_size: int = 50):
        self.results_dir = Path(results_dir)
        self.exported = self.results_dir.suffix == SAFETENSORS_SUFFIX
        if self.exported:
            from nullcov.export import read_safetensors_metadata

            steps = read_safetensors_metadata(self.results_dir)["schedule"]["steps"]
        else:
            schedule_path = self.results_dir / "schedule.json"
            if not schedule_path.is_file():
                raise FileNotFoundError(f"{schedule_path} not found: is {self.results_dir} a nullcov results folder?"
                                        f"{see('not-a-nullcov-results-folder')}")
            steps = json.loads(schedule_path.read_text())["steps"]
        order = sorted(range(len(steps)), key=lambda i: (steps[i]["timestep"], i))
        self._timesteps = [steps[i]["timestep"] for i in order]  # ascending
        self._names = [steps[i]["name"] for i in order]
        self._cache: OrderedDict = OrderedDict()
        self.cache_size = cache_size

    @property
    def timesteps(self) -> list[float]:
        """The scheduled timesteps, ascending."""
        return list(self._timesteps)

    @property
    def step_names(self) -> list[str]:
        """The step names, in the order of :attr:`timesteps`."""
        return list(self._names)

    def get(self, layer: str, linear: str, timestep: float | None = None, mode: str = "nearest"):
        """The projection (a float32 torch tensor [d, d]) to apply as ``ΔW ← ΔW P``."""
        if linear not in _LINEARS:
            raise ValueError(f"linear must be one of {sorted(_LINEARS)}, got {linear!r}"
                             f"{see('argument-not-among-the-allowed-values')}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}{see('argument-not-among-the-allowed-values')}")
        if mode == "interpolate" and self.exported:
            raise ValueError(f"{self.results_dir} holds projections, not statistics: mode='interpolate' needs the "
                             "results folder (its covariance/ files); use mode='nearest'"
                             f"{see('interpolation-needs-the-results-folder')}")
        linear = _LINEARS[linear]
        if linear in ("to_k", "to_v"):
            return self._cached(("text",), lambda: self._stored("text", TEXT_KEY))
        if timestep is None:
            raise ValueError(f"{linear} projections depend on the timestep; pass one"
                             f"{see('argument-not-among-the-allowed-values')}")
        key = f"{layer}/{linear}"
        if mode == "nearest":
            name = self._names[self.nearest_index(float(timestep))]
            return self._cached((key, name), lambda: self._stored(name, key))
        low, high, weight = self.neighbours(float(timestep))
        if low == high:
            return self._cached((key, self._names[low]), lambda: self._stored(self._names[low], key))
        return self._cached((key, low, high, weight), lambda: self._interpolated(key, low, high, weight))

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

    def _cached(self, key, compute):
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = compute()
        self._cache[key] = value
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return value

    def _stored(self, name: str, key: str):
        import torch

        if self.exported:
            from nullcov.export import read_safetensors_projection

            return torch.from_numpy(read_safetensors_projection(self.results_dir, name, key))
        spaces, _ = read_projections(self.results_dir / "projections" / f"{name}.h5", keys=[key])
        return torch.from_numpy(spaces[key].projection)

    def _interpolated(self, key: str, low: int, high: int, weight: float):
        import torch

        _, attrs = read_projections(self.results_dir / "projections" / f"{self._names[low]}.h5", keys=[key])
        settings = attrs["provenance"]["projection"]
        statistics = []
        for index in (low, high):
            moments, _ = read_moments(self.results_dir / "covariance" / f"{self._names[index]}.h5", "covariance",
                                      keys=[key])
            statistics.append(moments[key].statistic(settings["statistic"]))
        mixed = (1.0 - weight) * statistics[0] + weight * statistics[1]
        space = null_space(mixed, settings["nullspace_threshold"], settings["threshold_percent"])
        return torch.from_numpy(space.projection)
