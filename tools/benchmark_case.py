"""One case of ``make bench`` (tools/benchmark.py): what it measures (:class:`Case`), its workflow
config, its pipeline and prompts, and the :func:`measured` block (wall and CPU seconds, peak RSS and
peak GPU memory). Shared by the benchmark, its legacy baseline (tools/benchmark_legacy.py) and its
table (tools/benchmark_table.py). A developer tool, not part of the installed package.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's nullcov, whatever is installed

from nullcov.measurement import peak_rss_bytes  # noqa: E402
from nullcov.schema import schema_defaults  # noqa: E402

GPU_MEMORY_TARGET = 20e9  # the GPU study's target: peak GPU memory at batch 8, every layer and q/k/v/out


@dataclass
class Case:
    """One measured configuration."""

    model: str  # tiny | sd15
    device: str
    dtype: str
    resolution: int | None  # None: the model's default
    steps: int
    prompts: int
    batch_size: int
    sampler: str | None = "DPM++ 2M Karras"
    guidance_scale: float = 7.5
    legacy_prompts: int = 2
    legacy_steps: int = 2
    repeats: int = 1
    results: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return (f"{self.model} {self.resolution}px {self.dtype} {self.steps} steps, {self.prompts} prompts, "
                f"batch {self.batch_size}")


# -- measuring ----------------------------------------------------------------------------------------
def _reset_peak_rss() -> bool:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
        return True
    return False


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def measured(device: str, into: dict):
    """Wall and CPU seconds, peak RSS and peak GPU memory of the block, stored in ``into``."""
    import torch

    _synchronize(device)
    per_phase = _reset_peak_rss()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        yield into
    finally:
        _synchronize(device)
        into["wall_s"] = time.perf_counter() - wall
        into["cpu_s"] = time.process_time() - cpu
        into["peak_rss_bytes"] = peak_rss_bytes()
        into["peak_rss_scope"] = "phase" if per_phase else "process"
        into["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


# -- the models, prompts and config -------------------------------------------------------------------
def build_pipeline(model: str, dtype: str, device: str, workdir: Path):
    """``tiny`` through the workflow's own loader, ``sd15`` in memory (random weights)."""
    from nullcov.models.model import load_pipeline
    from nullcov.models.tiny_model import build_tiny_model

    tiny_dir = workdir / "tiny-sd"
    if not tiny_dir.exists():
        build_tiny_model(tiny_dir)
    if model == "tiny":
        return load_pipeline(tiny_dir, dtype, device)
    if model == "sd15":
        from nullcov.models.sd15 import build_sd15_pipeline

        return build_sd15_pipeline(tiny_dir / "tokenizer", dtype=dtype, device=device)
    raise ValueError(f"model must be tiny or sd15, got {model!r}")


def read_benchmark_prompts(count: int) -> list[str]:
    from nullcov.prompts import read_prompts

    base = read_prompts(REPO / "config" / "prompts" / "demo.txt")
    return [base[i % len(base)] for i in range(count)]


def case_config(case: Case, **overrides) -> dict:
    """The workflow config of a case: every key's default from config/schema.yaml, then the
    settings the case measures (sampler, steps, CFG, resolution, batch, dtype, device)."""
    import yaml

    config = schema_defaults(yaml.safe_load((REPO / "config" / "schema.yaml").read_text()))
    config.update(
        sampler_strategy=case.sampler,
        num_denoising_steps=case.steps,
        guidance_scale=case.guidance_scale,
        resolution=case.resolution,
        batch_size=case.batch_size,
        dtype=case.dtype,
        device=case.device,
    )
    config.update(overrides)
    return config


def prepare_schedule(pipe, config: dict) -> dict:
    from nullcov.models.sampling import configure_scheduler
    from nullcov.models.schedule import build_schedule

    schedule = build_schedule(dict(pipe.scheduler.config), config["sampler_strategy"], config["num_denoising_steps"])
    configure_scheduler(pipe, schedule)
    return schedule
