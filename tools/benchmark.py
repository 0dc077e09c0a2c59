"""``make bench`` (``python tools/benchmark.py``): the bare sampler, our collection and the legacy
tool's method, side by side. A developer tool, not part of the installed package.

One invocation on one machine runs, per model size, on the same prompts, scheduler, batch,
dtype, steps and CFG:

1. **bare**: the diffusers pipeline trajectory, no hooks (``pipe(...)`` with the feature job's
   per-prompt generators and ``output_type="latent"``): the limit;
2. **ours**: :func:`nullcov.collection.features.collect_shard` (after ``configure_scheduler``), the feature
   job's own code; its scratch is the per-step HDF5 files it would write
   (:func:`nullcov.statistics.store.write_moments`, measured in a temporary folder);
3. **legacy**: the legacy tool's method (``../shared/legacy-tool.md``) on a subset: per prompt per
   timestep a Gaussian latent noised with ``add_noise``, one UNet call at batch 1 with hooks
   keeping the raw inputs of ``to_q``/``to_k``/``to_v``/``to_out`` of every cross-attention
   layer, ``np.savez_compressed`` of them; then a second pass streaming the files back to build
   the centred covariances. Extrapolated per prompt-timestep.

It prints prompt-timesteps per second, the ratios ours/bare and ours/legacy, peak RSS, peak GPU
memory and scratch bytes per prompt-timestep, and writes everything to
``docs/measurements/bench-<device>.json`` (``cpu`` or ``gpu``; with
:func:`nullcov.measurement.header`, rendered into ``docs/performance.md``), the table as
``benchmarks/bench-<device>.txt`` and the
profile as ``benchmarks/profile-<device>.txt``. Models: the tiny demo model and
an SD-1.5-architecture pipeline with seeded random weights (:mod:`nullcov.models.sd15`); nothing is
downloaded. On a shared CPU, bare and ours alternate ``--repeats`` times and the fastest run of
each counts; CPU seconds are reported too (less sensitive to other processes).

This file holds the contenders bare and ours, one case, the studies and the command line; a case,
its config and the measuring block are in ``tools/benchmark_case.py``, the legacy method in
``tools/benchmark_legacy.py``, the text table in ``tools/benchmark_table.py``.

``--device cuda`` is the GPU study: SD-1.5 at 512x512, fp16, CFG 7.5, 50 steps, batch sizes
1/4/8/16, peak ``torch.cuda.max_memory_allocated`` (target: under 20 GB at batch 8 with every
layer and q/k/v/out), a 1000-timestep schedule on an emulated 24 GiB card (accumulators that do
not fit go to the host), the GEMM precision check on the device, and the projected wall time of
1000 prompts x 50 steps.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from benchmark_case import (
    GPU_MEMORY_TARGET,
    REPO,
    Case,
    build_pipeline,
    case_config,
    measured,
    prepare_schedule,
    read_benchmark_prompts,
)
from benchmark_legacy import run_legacy
from benchmark_table import format_table

# (benchmark_case put this checkout's nullcov first on sys.path)
from nullcov.collection.capture import CrossAttentionCapture
from nullcov.measurement import header, load_average, measurement_path, write_record
from nullcov.models.model import image_resolution

log = logging.getLogger("nullcov.benchmark")


# -- bare and ours (the legacy method: benchmark_legacy.py) -------------------------------------------
def run_bare(pipe, prompts: list[str], schedule: dict, config: dict) -> None:
    """The bare pipeline: same call, generators, batches and scheduler as the feature job; no hooks."""
    import torch

    from nullcov.models.sampling import prompt_generators

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
    """The feature job's collection (:func:`nullcov.collection.features.collect_shard`); with ``timings``, what
    :func:`recording_capture` records goes there."""
    from nullcov.collection import features

    capture_class = CrossAttentionCapture if timings is None else recording_capture(timings)
    return features.collect_shard(pipe, prompts, 0, schedule, config, capture_class=capture_class)


def write_our_scratch(step_moments, text_moments, schedule: dict, folder: Path, steps_to_write=None) -> dict:
    """Write the shard's per-step files as the feature job does; their bytes and seconds."""
    from nullcov.models.family import TEXT_KEY
    from nullcov.statistics.store import write_moments

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

    ``gram`` is nullcov's product (:func:`nullcov.collection.accumulators.gram`); ``upcast`` converts to float32
    first; ``fp16_output`` keeps the input dtype for the result (what a plain ``x.T @ x`` does);
    on CUDA also ``tf32`` (upcast with TF32 on). Also: are fp16/bf16 products exact in float32?
    """
    import torch

    from nullcov.collection.accumulators import exact_matmul, gram

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

    from nullcov.models.model import cross_attention_modules

    layers = [index for index, (_, module) in enumerate(cross_attention_modules(pipe.unet))
              if module.to_q.in_features <= 640]
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


# -- output ---------------------------------------------------------------------------------------------
def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (no home folders in a committed file)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


# -- the command line ----------------------------------------------------------------------------------
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
    parser.add_argument("--models", default=None,
                        help="comma-separated: tiny,sd15 (default: both on CPU, sd15 on CUDA)")
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


def select_cases(args: argparse.Namespace) -> list[Case]:
    """The default cases of the device, narrowed and adjusted by ``--models``, ``--repeats`` and ``--no-legacy``."""
    cases = default_cases(args.device, args.quick)
    if args.models:
        wanted = args.models.split(",")
        cases = [case for case in cases if case.model in wanted]
    for case in cases:
        if args.repeats:
            case.repeats = args.repeats
        if args.no_legacy:
            case.legacy_prompts = 0
    return cases


def _reuse_earlier(result: dict, model: str, earlier: list[dict], scratch: bool) -> None:
    """Fill ``result`` from the earlier results of the same model: the scratch (``scratch``: the same
    files whatever the batch) and the legacy measurement (measured once per model)."""
    if scratch:
        previous = next(r for r in earlier if r["case"]["model"] == model)
        result["ours"]["scratch"] = previous["ours"]["scratch"]
        result["ours"]["scratch_bytes_per_prompt_timestep"] = (previous["ours"]["scratch"]["shard_bytes"]
                                                               / result["prompt_timesteps"])
    if "legacy" not in result:
        previous = next((r for r in earlier if r["case"]["model"] == model and "legacy" in r), None)
        if previous is not None:
            result["legacy"] = previous["legacy"]
            result["ratio_ours_legacy"] = (result["ours"]["prompt_timesteps_per_s"]
                                           / result["legacy"]["prompt_timesteps_per_s"])


def run_cases(cases: list[Case], device: str, workdir: Path, report: dict, save) -> dict:
    """Every case in turn (one pipeline held at a time), each result appended to ``report["cases"]``
    and saved; returns the pipeline still held, by (model, dtype)."""
    pipes = {}
    for case in cases:
        key = (case.model, case.dtype)
        if key not in pipes:
            pipes.clear()
            start = time.perf_counter()
            pipes[key] = build_pipeline(case.model, case.dtype, device, workdir)
            log.info("built %s (%s) in %.1f s", case.model, case.dtype, time.perf_counter() - start)
        first_of_model = not any(r["case"]["model"] == case.model for r in report["cases"])
        gpu = device.startswith("cuda")
        result = run_case(case, workdir, pipes[key], write_scratch=first_of_model or not gpu)
        _reuse_earlier(result, case.model, report["cases"], scratch=not first_of_model and gpu)
        report["cases"].append(result)
        save()
        log.info("%s: %.3f prompt-timesteps/s ours, ratio ours/bare %.3f", case.label,
                 result["ours"]["prompt_timesteps_per_s"], result["ratio_ours_bare"])
    return pipes


def summarise_gpu_cases(report: dict) -> bool:
    """The best batch of the SD-1.5 cases, its projection to 1000 x 50 and the memory check at batch 8
    into ``report``; False when there is no SD-1.5 case."""
    sd15 = [r for r in report["cases"] if r["case"]["model"] == "sd15"]
    if not sd15:
        return False
    best = max(sd15, key=lambda r: r["ours"]["prompt_timesteps_per_s"])
    report["best_batch"] = best["case"]["batch_size"]
    report["projection"] = projection_1000x50(best)
    eight = next((r for r in sd15 if r["case"]["batch_size"] == 8), None)
    if eight is not None:
        peak = eight["ours"]["peak_gpu_bytes"]
        report["memory_check"] = {"batch_size": 8, "steps": eight["case"]["steps"], "peak_gpu_bytes": peak,
                                  "pass": peak < GPU_MEMORY_TARGET}
    return True


def studies(args: argparse.Namespace, cases: list[Case], pipes: dict, workdir: Path) -> list[tuple]:
    """``(name, run)`` of the studies after the cases: precision, the 1000-timestep check (cuda), the profile."""
    device = args.device
    stages = [("precision", lambda: precision_check(device))]
    if device.startswith("cuda") and not args.no_1000 and ("sd15", "float16") in pipes:
        stages.append(("timesteps_1000", lambda: timestep_1000_check(pipes[("sd15", "float16")], workdir)))
    if args.profile and cases:
        last = cases[-1]
        path = args.side_dir / f"profile-{args.name}.txt"
        stages.append(("profile", lambda: profile_feature_job(last, pipes.get((last.model, last.dtype)), workdir,
                                                              path)))
    return stages


def run_studies(stages: list[tuple], report: dict, save) -> None:
    for stage, run in stages:  # one failing study must not cost the others (device time is scarce)
        try:
            report[stage] = run()
        except Exception as err:  # recorded, reported, and the exit status says so
            log.exception("%s failed", stage)
            report.setdefault("errors", {})[stage] = f"{type(err).__name__}: {err}"
        save()


def _configure(args: argparse.Namespace):
    """Logging and torch threads; the imported torch."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("nullcov.collection.features", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    return torch


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch = _configure(args)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {device}: torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 2
    cases = select_cases(args)
    args.side_dir.mkdir(parents=True, exist_ok=True)
    table = args.side_dir / f"bench-{args.name}.txt"
    report = header("tools/benchmark.py", argv) | {"device": device, "table": _shown(table), "cases": []}

    def save():
        write_record(args.out, report)
        table.write_text(format_table(report) + "\n")

    workdir = Path(tempfile.mkdtemp(prefix="nullcov-bench-"))
    try:
        pipes = run_cases(cases, device, workdir, report, save)
        if device.startswith("cuda") and summarise_gpu_cases(report):
            save()
        run_studies(studies(args, cases, pipes, workdir), report, save)
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
            "top": [{"op": event.key, "self_us": getattr(event, sort),
                     "share": getattr(event, sort) / total if total else None, "calls": event.count}
                    for event in top]}


if __name__ == "__main__":
    sys.exit(main())
