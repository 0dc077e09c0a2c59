"""``make bench`` (``python tools/benchmark.py``): the bare sampler, our collection and the legacy
tool's method, side by side. A developer tool, not part of the installed package.

One invocation on one machine runs, per model size, on the same prompts, scheduler, batch,
dtype, steps and CFG:

1. **bare**: the diffusers pipeline trajectory, no hooks (``pipe(...)`` with the feature job's
   per-prompt generators and ``output_type="latent"``): the limit;
2. **ours**: :func:`nullcov.features.collect_shard` (after ``configure_scheduler``), the feature
   job's own code; its scratch is the per-step HDF5 files it would write
   (:func:`nullcov.store.write_moments`, measured in a temporary folder);
3. **legacy**: the legacy tool's method (``../shared/legacy-tool.md``) on a subset: per prompt per
   timestep a Gaussian latent noised with ``add_noise``, one UNet call at batch 1 with hooks
   keeping the raw inputs of ``to_q``/``to_k``/``to_v``/``to_out`` of every cross-attention
   layer, ``np.savez_compressed`` of them; then a second pass streaming the files back to build
   the centred covariances. Extrapolated per prompt-timestep.

It prints prompt-timesteps per second, the ratios ours/bare and ours/legacy, peak RSS, peak GPU
memory and scratch bytes per prompt-timestep, and writes everything to
``docs/measurements/bench-<device>.json`` (``cpu`` or ``gpu``; with :func:`nullcov.measurement.header`,
rendered into ``docs/performance.md``), the table as ``benchmarks/bench-<device>.txt`` and the
profile as ``benchmarks/profile-<device>.txt``. Models: the tiny demo model and
an SD-1.5-architecture pipeline with seeded random weights (:mod:`nullcov.sd15`); nothing is
downloaded. On a shared CPU, bare and ours alternate ``--repeats`` times and the fastest run of
each counts; CPU seconds are reported too (less sensitive to other processes).

``--device cuda`` is the GPU study: SD-1.5 at 512x512, fp16, CFG 7.5, 50 steps, batch sizes
1/4/8/16, peak ``torch.cuda.max_memory_allocated`` (target: under 20 GB at batch 8 with every
layer and q/k/v/out), a 1000-timestep schedule on an emulated 24 GiB card (accumulators that do
not fit go to the host), the GEMM precision check on the device, and the projected wall time of
1000 prompts x 50 steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's nullcov, whatever is installed

from nullcov.capture import CrossAttentionCapture  # noqa: E402
from nullcov.config import schema_defaults  # noqa: E402
from nullcov.measurement import header, load_average, measurement_path, peak_rss_bytes, write_record  # noqa: E402
from nullcov.model import image_resolution  # noqa: E402
from nullcov.run_summary import folder_bytes  # noqa: E402

log = logging.getLogger("nullcov.benchmark")
LEGACY_FILE_BYTES = 92e6  # the legacy tool's measured .npz per prompt per timestep (SD-1.5, 512x512)
LEGACY_SECONDS = (5.5, 8.0)  # its measured seconds per prompt per timestep on one GPU
GPU_MEMORY_TARGET = 20e9


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
        return f"{self.model} {self.resolution}px {self.dtype} {self.steps} steps, {self.prompts} prompts, batch {self.batch_size}"


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


# -- the models ------------------------------------------------------------------------------------
def build_pipeline(model: str, dtype: str, device: str, workdir: Path):
    """``tiny`` through the workflow's own loader, ``sd15`` in memory (random weights)."""
    from nullcov.model import load_pipeline
    from nullcov.tiny_model import build_tiny_model

    tiny_dir = workdir / "tiny-sd"
    if not tiny_dir.exists():
        build_tiny_model(tiny_dir)
    if model == "tiny":
        return load_pipeline(tiny_dir, dtype, device)
    if model == "sd15":
        from nullcov.sd15 import build_sd15_pipeline

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
    from nullcov.sampling import configure_scheduler
    from nullcov.schedule import build_schedule

    schedule = build_schedule(dict(pipe.scheduler.config), config["sampler_strategy"], config["num_denoising_steps"])
    configure_scheduler(pipe, schedule)
    return schedule


# -- the three contenders ------------------------------------------------------------------------
def run_bare(pipe, prompts: list[str], schedule: dict, config: dict) -> None:
    """The bare pipeline: same call, generators, batches and scheduler as the feature job; no hooks."""
    import torch

    from nullcov.sampling import prompt_generators

    resolution = image_resolution(pipe, config["resolution"])
    with torch.inference_mode():
        for offset in range(0, len(prompts), config["batch_size"]):
            batch = prompts[offset : offset + config["batch_size"]]
            pipe(
                prompt=batch,
                guidance_scale=config["guidance_scale"],
                generator=prompt_generators(config["seed"], offset, len(batch)),
                height=resolution,
                width=resolution,
                output_type="latent",
                **schedule["set_timesteps"],
            )


def recording_capture(record: dict) -> type:
    """A :class:`CrossAttentionCapture` that also writes into ``record`` its accumulator placement
    (``device_steps``, ``steps``, ``step_bytes``) and the seconds of its ``release_steps()``
    (device-to-host transfer of the accumulators, ``results_s``). Only this capture is changed."""

    class RecordingCapture(CrossAttentionCapture):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            record.update(device_steps=self.device_steps, steps=len(self.timesteps),
                          step_bytes=8 * getattr(self, "_outer_size", 0))

        def release_steps(self):
            steps = super().release_steps()
            while True:
                start = time.perf_counter()
                try:
                    item = next(steps)
                except StopIteration:
                    return
                finally:
                    record["results_s"] = record.get("results_s", 0.0) + time.perf_counter() - start
                yield item

    return RecordingCapture


def run_ours(pipe, prompts: list[str], schedule: dict, config: dict, timings: dict | None = None):
    """The feature job's collection (:func:`nullcov.features.collect_shard`); with ``timings``, what
    :func:`recording_capture` records goes there."""
    from nullcov import features

    capture_class = CrossAttentionCapture if timings is None else recording_capture(timings)
    return features.collect_shard(pipe, prompts, 0, schedule, config, capture_class=capture_class)


def write_our_scratch(step_moments, text_moments, schedule: dict, folder: Path, steps_to_write=None) -> dict:
    """Write the shard's per-step files as the feature job does; their bytes and seconds."""
    from nullcov.store import TEXT_KEY, write_moments

    folder.mkdir(parents=True, exist_ok=True)
    attrs = {"provenance": {"benchmark": True}}
    chosen = range(len(step_moments)) if steps_to_write is None else steps_to_write
    start = time.perf_counter()
    sizes = []
    for index in chosen:
        step = schedule["steps"][index]
        path = folder / f"{step['name']}.h5"
        write_moments(path, "features", step_moments[index], {**attrs, "step": {"index": index}})
        sizes.append(path.stat().st_size)
    text_bytes = 0
    if text_moments is not None:
        write_moments(folder / "text.h5", "features", {TEXT_KEY: text_moments}, {**attrs, "step": "text"})
        text_bytes = (folder / "text.h5").stat().st_size
    seconds = time.perf_counter() - start
    step_bytes = float(np.mean(sizes)) if sizes else 0.0
    total = step_bytes * len(step_moments) + text_bytes
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "step_file_bytes": step_bytes,
        "text_file_bytes": text_bytes,
        "shard_bytes": total,
        "files_written": len(sizes) + (1 if text_bytes else 0),
        "write_s": seconds * (len(step_moments) / max(1, len(sizes))),
    }


def run_legacy(pipe, prompts: list[str], schedule: dict, config: dict, folder: Path, amortise_prompts: int = 1000) -> dict:
    """The legacy tool's method on ``prompts`` x ``schedule['steps']`` (see the module docstring)."""
    import torch
    from diffusers import DDPMScheduler

    from nullcov.model import cross_attention_modules
    from nullcov.sampling import prompt_generators

    device, dtype = pipe.unet.device, pipe.unet.dtype
    resolution = image_resolution(pipe, config["resolution"])
    noiser = DDPMScheduler.from_config(pipe.scheduler.config)
    layers = cross_attention_modules(pipe.unet)
    captured: dict[str, torch.Tensor] = {}

    def keep(key):
        def hook(module, args):
            captured[key] = args[0]

        return hook

    handles = []
    for index, (_name, module) in enumerate(layers):
        for feature, target in (("q", module.to_q), ("k", module.to_k), ("v", module.to_v), ("out", module.to_out[0])):
            handles.append(target.register_forward_pre_hook(keep(f"layer{index:02d}_{feature}")))
    folder.mkdir(parents=True, exist_ok=True)
    steps = schedule["steps"]
    latent_shape = (1, pipe.unet.config.in_channels, resolution // pipe.vae_scale_factor, resolution // pipe.vae_scale_factor)
    phase1, phase2_read, phase2_final = {}, {}, {}
    try:
        with measured(str(device), phase1), torch.inference_mode():
            for step in steps:
                timestep = int(round(step["timestep"]))
                (folder / f"t{timestep:04d}").mkdir(exist_ok=True)
                for index, prompt in enumerate(prompts):
                    embedding, _ = pipe.encode_prompt([prompt], device, 1, do_classifier_free_guidance=False)
                    generator = prompt_generators(config["seed"], index, 1)[0]
                    clean = torch.randn(latent_shape, generator=generator).to(device, dtype)
                    noise = torch.randn(latent_shape, generator=generator).to(device, dtype)
                    noisy = noiser.add_noise(clean, noise, torch.tensor([timestep]))
                    captured.clear()
                    pipe.unet(noisy, torch.tensor([timestep], device=device), encoder_hidden_states=embedding,
                              return_dict=False)
                    arrays = {key: value[0].float().cpu().numpy() for key, value in captured.items()}
                    np.savez_compressed(folder / f"t{timestep:04d}" / f"prompt_{index:05d}", **arrays)
    finally:
        for handle in handles:
            handle.remove()
    scratch = folder_bytes(folder)
    keys = sorted(arrays)
    out = folder / "covariance"
    out.mkdir()
    with measured("cpu", phase2_read):
        sums = {}
        for step in steps:
            timestep = int(round(step["timestep"]))
            files = sorted((folder / f"t{timestep:04d}").glob("prompt_*.npz"))
            for key in keys:  # per timestep, per layer/feature: stream every prompt's file back
                total = count = outer = None
                for path in files:
                    with np.load(path) as data:
                        rows = data[key].astype(np.float64).reshape(-1, data[key].shape[-1])
                    outer = rows.T @ rows if outer is None else outer + rows.T @ rows
                    total = rows.sum(0) if total is None else total + rows.sum(0)
                    count = rows.shape[0] if count is None else count + rows.shape[0]
                sums[(timestep, key)] = (outer, total, count)
    with measured("cpu", phase2_final), np.errstate(divide="ignore", invalid="ignore"):
        for (timestep, key), (outer, total, count) in sums.items():
            mean = total / count
            covariance = (outer - count * np.outer(mean, mean)) / (count - 1)
            np.save(out / f"t{timestep:04d}_{key}.npy", covariance)
            (out / f"t{timestep:04d}_{key}.json").write_text(json.dumps({"timestep": timestep, "count": int(count)}))
    shutil.rmtree(folder, ignore_errors=True)
    prompt_timesteps = len(prompts) * len(steps)
    per_pt = (phase1["wall_s"] + phase2_read["wall_s"]) / prompt_timesteps
    per_pt += phase2_final["wall_s"] / len(steps) / amortise_prompts  # the covariances, once per timestep
    return {
        "prompts": len(prompts),
        "timesteps": len(steps),
        "prompt_timesteps": prompt_timesteps,
        "phase1": phase1,
        "phase2_read": phase2_read,
        "phase2_finalise": phase2_final,
        "seconds_per_prompt_timestep": per_pt,
        "prompt_timesteps_per_s": 1.0 / per_pt,
        "scratch_bytes": scratch,
        "scratch_bytes_per_prompt_timestep": scratch / prompt_timesteps,
        "arrays_per_file": len(keys),
        "peak_rss_bytes": max(phase1["peak_rss_bytes"], phase2_read["peak_rss_bytes"]),
        "peak_gpu_bytes": phase1["peak_gpu_bytes"],
    }


# -- one case ----------------------------------------------------------------------------------------
def run_case(case: Case, workdir: Path, pipe=None, *, legacy: bool = True, write_scratch: bool = True,
             warmup: bool = True) -> dict:
    """bare / ours (alternating ``case.repeats`` times) and legacy for one case."""
    import torch

    torch_threads = torch.get_num_threads()
    own_pipe = pipe is None
    if own_pipe:
        start = time.perf_counter()
        pipe = build_pipeline(case.model, case.dtype, case.device, workdir)
        log.info("built %s in %.1f s", case.model, time.perf_counter() - start)
    config = case_config(case)
    if case.resolution is None:
        case.resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
        config["resolution"] = case.resolution
    prompts = read_benchmark_prompts(case.prompts)
    if warmup:  # first calls allocate and pick kernels: a short run of each, untimed
        warm = case_config(case, num_denoising_steps=2, resolution=case.resolution)
        warm_schedule = prepare_schedule(pipe, warm)
        run_bare(pipe, prompts[: case.batch_size], warm_schedule, warm)
        run_ours(pipe, prompts[: case.batch_size], warm_schedule, warm)
    schedule = prepare_schedule(pipe, config)
    prompt_timesteps = case.prompts * len(schedule["steps"])
    runs = {"bare": [], "ours": []}
    moments = None
    for repeat in range(case.repeats):
        record = {}
        with measured(case.device, record):
            run_bare(pipe, prompts, schedule, config)
        runs["bare"].append(record)
        record, timings = {}, {}
        with measured(case.device, record):
            moments = run_ours(pipe, prompts, schedule, config, timings)
        record.update(timings)
        runs["ours"].append(record)
        log.info("%s: repeat %d: bare %.2f s, ours %.2f s", case.label, repeat + 1, runs["bare"][-1]["wall_s"],
                 record["wall_s"])
    best = {name: min(records, key=lambda r: r["wall_s"]) for name, records in runs.items()}
    result = {"case": {k: v for k, v in asdict(case).items() if k != "results"}, "torch_threads": torch_threads,
              "prompt_timesteps": prompt_timesteps, "runs": runs}
    for name, record in best.items():
        result[name] = {
            **record,
            "prompt_timesteps_per_s": prompt_timesteps / record["wall_s"],
            "cpu_s_per_prompt_timestep": record["cpu_s"] / prompt_timesteps,
        }
    ours = result["ours"]
    ours["steady_prompt_timesteps_per_s"] = prompt_timesteps / (ours["wall_s"] - ours.get("results_s", 0.0))
    result["ratio_ours_bare"] = result["bare"]["wall_s"] / ours["wall_s"]
    result["ratio_ours_bare_cpu"] = result["bare"]["cpu_s"] / ours["cpu_s"] if ours["cpu_s"] else None
    if write_scratch and moments is not None:
        step_moments, text_moments = moments[0], moments[1]
        ours["scratch"] = write_our_scratch(step_moments, text_moments, schedule, workdir / "ours-scratch")
        ours["scratch_bytes_per_prompt_timestep"] = ours["scratch"]["shard_bytes"] / prompt_timesteps
    del moments
    if legacy and case.legacy_prompts and case.legacy_steps:
        legacy_config = case_config(case, batch_size=1)
        legacy_schedule = dict(schedule, steps=schedule["steps"][: case.legacy_steps])
        result["legacy"] = run_legacy(pipe, prompts[: case.legacy_prompts], legacy_schedule, legacy_config,
                                      workdir / "legacy-scratch")
        result["ratio_ours_legacy"] = ours["prompt_timesteps_per_s"] / result["legacy"]["prompt_timesteps_per_s"]
    case.results = result
    return result


# -- precision of the product --------------------------------------------------------------------------
def precision_check(device: str, sizes=((4096, 320), (1024, 640), (256, 1280)), seed: int = 0) -> dict:
    """Max |error| / max |reference| of ``XᵀX`` variants against float64, for fp16 and bf16 inputs.

    ``gram`` is nullcov's product (:func:`nullcov.accumulators.gram`); ``upcast`` converts to float32
    first; ``fp16_output`` keeps the input dtype for the result (what a plain ``x.T @ x`` does);
    on CUDA also ``tf32`` (upcast with TF32 on). Also: are fp16/bf16 products exact in float32?
    """
    import torch

    from nullcov.accumulators import exact_matmul, gram

    generator = torch.Generator("cpu").manual_seed(seed)
    report = {"device": device, "sizes": [list(s) for s in sizes], "errors": {}, "timings_ms": {}}
    for dtype in (torch.float16, torch.bfloat16):
        a = (torch.randn(1 << 20, generator=generator) * 8).to(dtype)
        b = (torch.randn(1 << 20, generator=generator) * 8).to(dtype)
        exact = torch.equal((a.float() * b.float()).double(), a.double() * b.double())
        report[f"{str(dtype).split('.')[-1]}_products_exact_in_float32"] = bool(exact)
    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        for n, d in sizes:
            # activations-like: non-zero mean, heavy-ish tails
            x = (torch.randn(n, d, generator=generator) * 2 + torch.randn(d, generator=generator)).to(dtype).to(device)
            reference = x.double().T @ x.double()
            scale = reference.abs().max().item()
            variants = {"gram": lambda x=x: gram(x), "upcast": lambda x=x: gram(x, mode="upcast")}
            variants["fp16_output" if dtype == torch.float16 else "bf16_output"] = lambda x=x: x.T @ x
            if device.startswith("cuda"):
                def tf32(x=x):
                    saved = torch.backends.cuda.matmul.allow_tf32
                    torch.backends.cuda.matmul.allow_tf32 = True
                    try:
                        y = x.float()
                        return y.T @ y
                    finally:
                        torch.backends.cuda.matmul.allow_tf32 = saved

                variants["tf32"] = tf32
            for label, fn in variants.items():
                with exact_matmul() if label != "tf32" else contextlib.nullcontext():
                    with contextlib.suppress(RuntimeError):
                        value = fn()
                        error = (value.double() - reference).abs().max().item() / scale
                        report["errors"].setdefault(f"{name}/{label}", []).append(error)
                        if device.startswith("cuda"):
                            report["timings_ms"].setdefault(f"{name}/{label}", []).append(_time_ms(fn))
    return report


def _time_ms(fn, repeats: int = 20) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


# -- the GPU-only studies -------------------------------------------------------------------------------
def timestep_1000_check(pipe, workdir: Path, card_gib: float = 24.0, prompts: int = 1) -> dict:
    """A 1000-timestep schedule (every training timestep) on an emulated ``card_gib`` card.

    Layers of width 320 and 640 (10 of the 16), q/k/v/out: 41 MB of float64 accumulators per
    step, 41 GB in all: more than the card, less than the host. The capture must place the steps
    that do not fit on the host by itself (``accumulate="auto"``), and nothing may run out of
    memory. (All 16 layers would need 198 GB, more than a 128 GB host; see the report.)
    """
    import torch

    from nullcov.model import cross_attention_modules

    layers = [index for index, (_, module) in enumerate(cross_attention_modules(pipe.unet)) if module.to_q.in_features <= 640]
    case = Case(model="sd15", device="cuda", dtype=str(pipe.unet.dtype).split(".")[-1], resolution=512, steps=1000,
                prompts=prompts, batch_size=prompts, sampler=None)
    config = case_config(case, cross_attention_layers=layers)
    schedule = prepare_schedule(pipe, config)
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(1.0, card_gib * 2**30 / total)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(fraction)
    record = {"layers": len(layers), "emulated_card_gib": card_gib, "fraction": fraction}
    try:
        with measured("cuda", record):
            # the recording capture adds device_steps, steps and step_bytes (its placement) to record
            steps, text = run_ours(pipe, read_benchmark_prompts(prompts), schedule, config, record)[:2]
        record["ok"] = True
        record["finite"] = bool(all(np.isfinite(m.sum_outer).all() for step in steps[:: 100] for m in step.values()))
        del steps, text
    except torch.cuda.OutOfMemoryError as err:
        record.update(ok=False, error=f"out of GPU memory: {err}")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    record["prompt_timesteps_per_s"] = prompts * 1000 / record["wall_s"]
    return record


def projection_1000x50(best: dict, steps: int = 50, prompts: int = 1000) -> dict:
    """Wall time of ``prompts`` x ``steps`` on one GPU from the best batch's measurements."""
    ours = best["ours"]
    steady = ours["steady_prompt_timesteps_per_s"]
    compute = prompts * steps / steady
    scratch = ours.get("scratch", {})
    fixed_per_shard = ours.get("results_s", 0.0) + scratch.get("write_s", 0.0)
    projections = {}
    for shard in (16, 128, prompts):
        shards = math.ceil(prompts / shard)
        projections[f"prompts_per_shard_{shard}"] = {
            "seconds": compute + shards * fixed_per_shard,
            "scratch_bytes": shards * scratch.get("shard_bytes", 0.0),
        }
    return {"prompts": prompts, "steps": steps, "compute_s": compute, "fixed_per_shard_s": fixed_per_shard,
            "note": "model loading per job not included", **projections}


# -- output ------------------------------------------------------------------------------------------
def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (no home folders in a committed file)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def _mb(value) -> str:
    return "-" if value is None else f"{value / 1e6:.3g} MB"


def format_table(report: dict) -> str:
    lines = [f"nullcov benchmark, {report['date']}",
             f"machine: {describe_machine(report['machine'], report['versions'])}",
             f"command: {report['command']}", ""]
    header = f"{'case':<48} {'variant':<7} {'wall s':>8} {'pt/s':>9} {'cpu-s/pt':>9} {'ours/this':>9} " \
             f"{'peak RSS':>10} {'peak GPU':>10} {'scratch/pt':>11}"
    lines += [header, "-" * len(header)]
    for result in report["cases"]:
        label = Case(**result["case"]).label
        ours = result["ours"]
        rows = [("bare", result["bare"], f"{result['ratio_ours_bare']:.3f}x"),
                ("ours", ours, "1")]
        if "legacy" in result:
            rows.append(("legacy", result["legacy"], f"{result['ratio_ours_legacy']:.4g}x"))
        for name, record, ratio in rows:
            if name == "legacy":
                wall = record["seconds_per_prompt_timestep"] * record["prompt_timesteps"]
                cpu = (record["phase1"]["cpu_s"] + record["phase2_read"]["cpu_s"]) / record["prompt_timesteps"]
                scratch = record["scratch_bytes_per_prompt_timestep"]
                ratio_text = f"{ratio}"
            else:
                wall, cpu = record["wall_s"], record["cpu_s_per_prompt_timestep"]
                scratch = record.get("scratch_bytes_per_prompt_timestep", 0 if name == "bare" else None)
                ratio_text = ratio if name == "ours" else f"{ratio}"
            lines.append(
                f"{label if name == 'bare' else '':<48} {name:<7} {wall:>8.2f} {record['prompt_timesteps_per_s']:>9.3f} "
                f"{cpu:>9.3f} {ratio_text:>9} {_gib(record['peak_rss_bytes']):>10} {_gib(record['peak_gpu_bytes']):>10} "
                f"{_mb(scratch):>11}"
            )
        notes = [f"ours/bare {result['ratio_ours_bare']:.3f} (wall), "
                 f"{result['ratio_ours_bare_cpu']:.3f} (CPU seconds)" if result.get("ratio_ours_bare_cpu") else ""]
        if "legacy" in result:
            legacy = result["legacy"]
            notes.append(f"ours/legacy {result['ratio_ours_legacy']:.4g}x (legacy on {legacy['prompts']} prompts x "
                         f"{legacy['timesteps']} timesteps: phase 1 {legacy['phase1']['wall_s']:.2f} s, phase 2 "
                         f"{legacy['phase2_read']['wall_s']:.2f} s + {legacy['phase2_finalise']['wall_s']:.2f} s "
                         f"once per timestep)")
        if "scratch" in ours:
            scratch = ours["scratch"]
            notes.append(f"ours writes {_mb(scratch['step_file_bytes'])} per step file (O(d^2), any prompt count) + "
                         f"{_mb(scratch['text_file_bytes'])} text.h5 = {_mb(scratch['shard_bytes'])} per shard, "
                         f"{scratch['write_s']:.2f} s; results() {ours.get('results_s', 0):.2f} s")
            notes.append("ours per prompt-timestep with prompts_per_shard 16 / 128 / 1000: " + " / ".join(
                _mb(scratch["shard_bytes"] / (size * result["case"]["steps"])) for size in (16, 128, 1000))
                + f" (legacy: {_mb(LEGACY_FILE_BYTES)} at SD-1.5 512px, measured by its users)")
        lines += [f"{'':<48} {note}" for note in notes if note]
        lines.append("")
    if report.get("precision"):
        precision = report["precision"]
        lines.append(f"precision of X^T X vs float64 ({precision['device']}), max|err|/max|ref| per size "
                     f"{precision['sizes']}:")
        for label, errors in precision["errors"].items():
            timing = precision["timings_ms"].get(label)
            extra = f"   ms: {', '.join(f'{t:.3f}' for t in timing)}" if timing else ""
            lines.append(f"  {label:<22} {', '.join(f'{e:.2e}' for e in errors)}{extra}")
        lines.append(f"  fp16 products exact in float32: {precision['float16_products_exact_in_float32']}, "
                     f"bf16: {precision['bfloat16_products_exact_in_float32']}")
        lines.append("")
    if report.get("memory_check"):
        check = report["memory_check"]
        lines.append(f"GPU memory, SD-1.5 512px batch {check['batch_size']} {check['steps']} steps, all layers q/k/v/out: "
                     f"peak {_gib(check['peak_gpu_bytes'])} -> {'PASS' if check['pass'] else 'FAIL'} (< {GPU_MEMORY_TARGET / 1e9:.0f} GB)")
    if report.get("timesteps_1000"):
        check = report["timesteps_1000"]
        lines.append(f"1000-timestep schedule on an emulated {check['emulated_card_gib']:.0f} GiB card ({check['layers']} layers): "
                     f"{'ok' if check.get('ok') else 'FAILED'}, {check.get('device_steps')} steps on the GPU, "
                     f"{check.get('steps', 0) - check.get('device_steps', 0)} on the host, peak {_gib(check.get('peak_gpu_bytes'))}, "
                     f"{check.get('wall_s', 0):.1f} s")
    if report.get("profile"):
        profile = report["profile"]
        lines.append(f"profile of one feature run ({profile['case']}, {profile['steps']} steps; {profile['sort']}):")
        for entry in profile["top"]:
            lines.append(f"  {entry['op']:<52} {entry['self_us'] / 1e3:>10.1f} ms {100 * entry['share']:>6.1f}%  {entry['calls']:>6} calls")
        for label, entry in profile["nullcov_labels"].items():
            lines.append(f"  {label:<52} {entry['cpu_time_total_us'] / 1e3:>10.1f} ms CPU total (with children)"
                         + (f", {entry['device_time_total_us'] / 1e3:.1f} ms device" if entry.get("device_time_total_us") else ""))
    if report.get("projection"):
        projection = report["projection"]
        lines.append(f"projected 1000 prompts x 50 steps on this GPU (best batch): compute {projection['compute_s'] / 60:.1f} min; "
                     + "; ".join(f"{key.replace('prompts_per_shard_', 'shards of ')}: "
                                 f"{value['seconds'] / 60:.1f} min, scratch {value['scratch_bytes'] / 1e9:.1f} GB"
                                 for key, value in projection.items() if key.startswith("prompts_per_shard")))
    return "\n".join(lines)


def describe_machine(machine: dict, versions: dict | None = None) -> str:
    """One line of a measurement header's ``machine`` (and ``versions``), for the table."""
    text = f"{machine['processor']}, {machine['cpu_count']} CPUs ({machine['torch_threads']} torch threads)"
    if machine.get("memory_gib") is not None:
        text += f", {machine['memory_gib']:.0f} GiB RAM"
    if machine.get("gpu"):
        text += f", {machine['gpu']['name']} ({machine['gpu']['memory_gib']:.0f} GiB)"
    if machine.get("load_average") is not None:
        text += f", load average {machine['load_average']:.1f} at start"
    if machine.get("load_average_end") is not None:
        text += f", {machine['load_average_end']:.1f} at the end"
    if versions:
        text += f"; torch {versions['torch']}, diffusers {versions['diffusers']}"
    return text + f", python {machine['python']}"


def default_cases(device: str, quick: bool) -> list[Case]:
    if device.startswith("cuda"):
        sizes = (1, 8) if quick else (1, 4, 8, 16)
        return [Case(model="sd15", device=device, dtype="float16", resolution=512, steps=50, prompts=2 * size,
                     batch_size=size, legacy_prompts=2 if size == sizes[0] else 0, legacy_steps=2)
                for size in sizes]
    if quick:
        return [Case(model="tiny", device="cpu", dtype="float32", resolution=None, steps=3, prompts=4, batch_size=2,
                     legacy_prompts=1, legacy_steps=1),
                Case(model="sd15", device="cpu", dtype="float32", resolution=64, steps=2, prompts=1, batch_size=1,
                     legacy_prompts=1, legacy_steps=1)]
    return [Case(model="tiny", device="cpu", dtype="float32", resolution=None, steps=10, prompts=32, batch_size=8,
                 legacy_prompts=4, legacy_steps=3, repeats=3),
            Case(model="sd15", device="cpu", dtype="float32", resolution=128, steps=5, prompts=2, batch_size=2,
                 legacy_prompts=2, legacy_steps=2, repeats=3)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python tools/benchmark.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--models", default=None, help="comma-separated: tiny,sd15 (default: both on CPU, sd15 on CUDA)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, seconds)")
    parser.add_argument("--repeats", type=int, default=None, help="bare/ours alternations per case (best counts)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 with --device cpu, so that ratios stay stable on a shared "
                             "machine; torch's default with cuda)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the measurement file (default: docs/measurements/bench-<cpu|gpu>.json; with --quick "
                             "benchmarks/bench-<cpu|gpu>-quick.json)")
    parser.add_argument("--side-dir", type=Path, default=REPO / "benchmarks",
                        help="folder for the table (bench-<cpu|gpu>.txt) and the profile (default: benchmarks/)")
    parser.add_argument("--profile", action="store_true", help="also profile one feature run (torch.profiler)")
    parser.add_argument("--no-legacy", action="store_true")
    parser.add_argument("--no-1000", action="store_true", help="(cuda) skip the 1000-timestep check")
    args = parser.parse_args(argv)
    args.name = "gpu" if args.device.startswith("cuda") else "cpu"
    if args.out is None:  # a --quick smoke test is no measurement: it stays out of docs/
        args.out = (args.side_dir / f"bench-{args.name}-quick.json" if args.quick
                    else measurement_path(f"bench-{args.name}.json"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("nullcov.features", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    device = args.device
    threads = args.threads or (1 if device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {device}: torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 2
    cases = default_cases(device, args.quick)
    if args.models:
        wanted = args.models.split(",")
        cases = [case for case in cases if case.model in wanted]
    if args.repeats:
        for case in cases:
            case.repeats = args.repeats
    if args.no_legacy:
        for case in cases:
            case.legacy_prompts = 0
    name, side = args.name, args.side_dir
    side.mkdir(parents=True, exist_ok=True)
    table = side / f"bench-{name}.txt"
    report = header("tools/benchmark.py", argv) | {"device": device, "table": _shown(table), "cases": []}

    def save():
        write_record(args.out, report)
        table.write_text(format_table(report) + "\n")

    workdir = Path(tempfile.mkdtemp(prefix="nullcov-bench-"))
    try:
        pipes = {}
        for case in cases:
            key = (case.model, case.dtype)
            if key not in pipes:
                pipes.clear()
                start = time.perf_counter()
                pipes[key] = build_pipeline(case.model, case.dtype, device, workdir)
                log.info("built %s (%s) in %.1f s", case.model, case.dtype, time.perf_counter() - start)
            first_of_model = not any(r["case"]["model"] == case.model for r in report["cases"])
            result = run_case(case, workdir, pipes[key], write_scratch=first_of_model or not device.startswith("cuda"))
            if not first_of_model and device.startswith("cuda"):  # same files whatever the batch
                previous = next(r for r in report["cases"] if r["case"]["model"] == case.model)
                result["ours"]["scratch"] = previous["ours"]["scratch"]
                result["ours"]["scratch_bytes_per_prompt_timestep"] = previous["ours"]["scratch"]["shard_bytes"] / result["prompt_timesteps"]
            if "legacy" not in result:  # legacy measured once per model: reuse it
                previous = next((r for r in report["cases"] if r["case"]["model"] == case.model and "legacy" in r), None)
                if previous is not None:
                    result["legacy"] = previous["legacy"]
                    result["ratio_ours_legacy"] = result["ours"]["prompt_timesteps_per_s"] / result["legacy"]["prompt_timesteps_per_s"]
            report["cases"].append(result)
            save()
            log.info("%s: %.3f prompt-timesteps/s ours, ratio ours/bare %.3f", case.label,
                     result["ours"]["prompt_timesteps_per_s"], result["ratio_ours_bare"])
        if device.startswith("cuda"):
            sd15 = [r for r in report["cases"] if r["case"]["model"] == "sd15"]
            if sd15:
                best = max(sd15, key=lambda r: r["ours"]["prompt_timesteps_per_s"])
                report["best_batch"] = best["case"]["batch_size"]
                report["projection"] = projection_1000x50(best)
                eight = next((r for r in sd15 if r["case"]["batch_size"] == 8), None)
                if eight is not None:
                    peak = eight["ours"]["peak_gpu_bytes"]
                    report["memory_check"] = {"batch_size": 8, "steps": eight["case"]["steps"], "peak_gpu_bytes": peak,
                                              "pass": peak < GPU_MEMORY_TARGET}
                save()
        stages = [("precision", lambda: precision_check(device))]
        if device.startswith("cuda") and not args.no_1000 and ("sd15", "float16") in pipes:
            stages.append(("timesteps_1000", lambda: timestep_1000_check(pipes[("sd15", "float16")], workdir)))
        if args.profile and cases:
            stages.append(("profile", lambda: profile_feature_job(
                cases[-1], pipes.get((cases[-1].model, cases[-1].dtype)), workdir, side / f"profile-{name}.txt")))
        for stage, run in stages:  # one failing study must not cost the others (device time is scarce)
            try:
                report[stage] = run()
            except Exception as err:  # recorded, reported, and the exit status says so
                log.exception("%s failed", stage)
                report.setdefault("errors", {})[stage] = f"{type(err).__name__}: {err}"
            save()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["machine"]["load_average_end"] = load_average()
    save()
    print(format_table(report))
    print(f"\nwritten: {args.out}, {table}")
    for stage, error in report.get("errors", {}).items():
        print(f"FAILED {stage}: {error}", file=sys.stderr)
    return 1 if report.get("errors") else 0


def profile_feature_job(case: Case, pipe, workdir: Path, path: Path, steps: int = 3) -> dict:
    """torch.profiler over one feature collection of ``case`` (``steps`` steps); top ops to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    if pipe is None:
        pipe = build_pipeline(case.model, case.dtype, case.device, workdir)
    config = case_config(case, num_denoising_steps=min(steps, case.steps))
    schedule = prepare_schedule(pipe, config)
    prompts = read_benchmark_prompts(case.batch_size)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if case.device.startswith("cuda") else [])
    run_ours(pipe, prompts, schedule, config)
    with profile(activities=activities) as profiler:
        run_ours(pipe, prompts, schedule, config)
    sort = "self_device_time_total" if case.device.startswith("cuda") else "self_cpu_time_total"
    averages = profiler.key_averages()
    path.write_text(averages.table(sort_by=sort, row_limit=25) + "\n")
    labelled = {event.key: {"cpu_time_total_us": event.cpu_time_total,
                            "device_time_total_us": getattr(event, "device_time_total", None), "calls": event.count}
                for event in averages if event.key.startswith("nullcov:")}
    total = sum(getattr(event, sort) for event in averages)
    top = sorted(averages, key=lambda event: getattr(event, sort), reverse=True)[:12]
    return {"table": _shown(path), "sort": sort, "case": case.label, "steps": config["num_denoising_steps"],
            "self_total_us": total, "nullcov_labels": labelled,
            "top": [{"op": event.key, "self_us": getattr(event, sort), "share": getattr(event, sort) / total if total else None,
                     "calls": event.count} for event in top]}


if __name__ == "__main__":
    sys.exit(main())
