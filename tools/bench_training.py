"""Overhead of nullcov.training.constraint per training step on the SD-1.5 architecture (`make bench-training`).

Builds SD-1.5's UNet with seeded random weights (nullcov.models.sd15; nothing downloaded) and a
synthetic results folder of its shapes (16 attn2 layers, to_q/to_out widths 320/640/1280 and the
768-wide text states; statistics of random rank-deficient inputs, written and projected with
nullcov's own store and projection job), then times, for full fine-tuning of the attn2 weights
(AdamW) and for peft-LoRA (r=4) on them: the training step (forward, backward, optimizer step)
and ``NullSpaceConstraint.project`` with the projection cached. On the same weights, every step,
it also times the previous dense application (``ΔW P`` / ``A P`` with the stored d × d ``P``,
:func:`dense_project`, the code ``project()`` ran before the factored forms) and checks that both
give the same weights; the two run in alternating order from the same state. It also times a
cache miss of ``mode="interpolate"`` (one float64 eigh per layer/linear) and reports the cache
memory per timestep. Writes ``docs/measurements/bench-training-<resolution>.json`` (the figures and
:func:`nullcov.measurement.header`). Run it under the heavy lock on a shared machine:

    flock /tmp/nullcov-heavy.lock .venv/bin/python tools/bench_training.py --resolution 128
    flock /tmp/nullcov-heavy.lock .venv/bin/python tools/bench_training.py --resolution 512 --repeats 2 --no-interpolate
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the nullcov package of this checkout

STEPS = [("alpha_00_0999", 999.0), ("alpha_01_0001", 1.0)]  # two steps: enough to interpolate between


def rank_deficient_moments(rng: np.random.Generator, dim: int):
    """Moments of random inputs spanning ~70 % of the space: a null space of ~30 %."""
    from nullcov.statistics.moments import Moments

    rank = int(0.7 * dim)
    rows = rng.standard_normal((2 * rank, rank)) @ rng.standard_normal((rank, dim)) / np.sqrt(rank)
    return Moments.of_rows(rows)


def synthetic_results(root: Path, unet, seed: int = 0) -> Path:
    """schedule.json, covariance/ and projections/ of SD-1.5's shapes from random rank-deficient inputs."""
    from nullcov.layout import TEXT_NAME, Results
    from nullcov.models.family import CROSS_ATTENTION, TEXT_KEY, statistic_key
    from nullcov.models.model import cross_attention_modules
    from nullcov.statistics.jobs import projection_job
    from nullcov.statistics.store import write_moments

    rng = np.random.default_rng(seed)
    results = Results(root / "results")
    results.projections_folder.mkdir(parents=True)
    steps = [{"index": i, "name": name, "timestep": t} for i, (name, t) in enumerate(STEPS)]
    results.schedule.write_text(json.dumps({"steps": steps}))
    attrs = {"provenance": {"synthetic": "tools/bench_training.py"}}
    layers = cross_attention_modules(unet)
    for name, _ in STEPS:
        found = {statistic_key(layer, linear): rank_deficient_moments(rng, module.to_q.in_features)
                 for layer, module in layers for linear in CROSS_ATTENTION.per_step}
        write_moments(results.covariance(name), "covariance", found, attrs)
    write_moments(results.covariance(TEXT_NAME), "covariance",
                  {TEXT_KEY: rank_deficient_moments(rng, layers[0][1].to_k.in_features)}, attrs)
    for name in [n for n, _ in STEPS] + [TEXT_NAME]:
        projection_job(results.covariance(name), results.projection(name), "second_moment", 0.02, None)
    return results.root


def stored_projections(results: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{step name or "text": {key: P}}``: the d × d float32 matrices of the projection files."""
    from nullcov.layout import TEXT_NAME, Results
    from nullcov.statistics.store import read_projections

    found = {}
    for name in [n for n, _ in STEPS] + [TEXT_NAME]:
        spaces, _ = read_projections(Results(results).projection(name))
        found[name] = {key: torch.from_numpy(space.projection) for key, space in spaces.items()}
    return found


@torch.no_grad()
def dense_project(constraint, projections: dict[str, torch.Tensor]) -> None:
    """The previous ``NullSpaceConstraint.project`` body: every linear multiplied by the dense ``P``."""
    from nullcov.models.family import TEXT_KEY

    for item in constraint.linears:
        projection = projections[TEXT_KEY if item.key == TEXT_KEY else item.key]
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


def _state(constraint) -> list[torch.Tensor]:
    """Every tensor ``project()`` reads or writes (weights, W_last, D, LoRA down-projections, biases)."""
    found = []
    for item in constraint.linears:
        if item.full:
            found += [item.module.weight, item.last, item.applied]
        found += list(item.lora_down)
        if item.module.bias is not None:
            found.append(item.module.bias)
    return found


@torch.no_grad()
def _save(constraint) -> list[torch.Tensor]:
    return [tensor.detach().clone() for tensor in _state(constraint)]


@torch.no_grad()
def _restore(constraint, saved) -> None:
    for tensor, value in zip(_state(constraint), saved, strict=True):
        tensor.copy_(value)


def _result(constraint) -> list[torch.Tensor]:
    """What a projection produces: the float32 sums D = ΣΔW P (full; the weight W_0 + D adds its own
    rounding) or the LoRA down-projections A P."""
    return [item.applied if item.full else down for item in constraint.linears
            for down in ([None] if item.full else item.lora_down)]


def dense_by_step(results) -> dict[str, dict[str, torch.Tensor]]:
    """``{step name: {key: P}}`` of the stored projections, the text ``P`` under ``TEXT_KEY`` in each."""
    from nullcov.layout import TEXT_NAME

    stored = stored_projections(results)
    return {name: {**stored[name], **stored[TEXT_NAME]} for name in stored if name != TEXT_NAME}


def apply_both(constraint, dense: dict[str, torch.Tensor], t: int, dense_first: bool) -> dict:
    """From the same state, ``project([t])`` and the dense product: ``{which: (results, seconds, state)}``;
    training goes on from the factored result."""
    before = _save(constraint)
    after = {}
    for which in (("dense", "factored") if dense_first else ("factored", "dense")):
        _restore(constraint, before)
        begin = time.perf_counter()
        if which == "dense":
            dense_project(constraint, dense)
        else:
            constraint.project([t])
        elapsed = time.perf_counter() - begin
        after[which] = ([w.detach().clone() for w in _result(constraint)], elapsed,
                        _save(constraint) if which == "factored" else None)
    _restore(constraint, after["factored"][2])
    return after


def form_counts(constraint) -> dict[str, int]:
    """How many constrained linears apply their projection in each form."""
    forms = {}
    for item in constraint.linears:
        form = constraint.factor_for(item, [0]).form
        forms[form] = forms.get(form, 0) + 1
    return forms


def time_training(unet, results, resolution: int, batch: int, repeats: int, lora: bool) -> dict:
    from nullcov.training.constraint import NullSpaceConstraint

    generator = torch.Generator().manual_seed(0)
    size = resolution // 8
    constraint = NullSpaceConstraint(unet, results, mode="nearest")
    constraint.lookup.precompute(range(1000))  # nearest: one cached set per scheduled step
    dense = dense_by_step(results)
    bank = constraint.lookup
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-5)
    step_times, project_times, dense_times, differences = [], [], [], []
    for index in range(repeats + 1):
        t = int(torch.randint(0, 1000, (1,), generator=generator))
        latents = torch.randn(batch, 4, size, size, generator=generator)
        text = torch.randn(batch, 77, 768, generator=generator)
        start = time.perf_counter()
        unet(latents, torch.full((batch,), t), text).sample.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        step_time = time.perf_counter() - start
        if lora:  # the scale to compare both results against: A itself
            changes = [w.detach().clone() for w in _result(constraint)]
        else:  # the increment this step projects, W - W_last
            changes = [item.module.weight.detach() - item.last for item in constraint.linears]
        after = apply_both(constraint, dense[bank.step_names[bank.nearest_index(t)]], t, dense_first=index % 2 == 1)
        # both applications from the same state: largest ‖D_factored − D_dense‖ / ‖ΔW‖ (LoRA: ‖ΔA‖ / ‖A‖)
        differences.append(max(float((a - b).norm()) / max(float(c.norm()), 1e-30) for a, b, c in
                               zip(after["factored"][0], after["dense"][0], changes, strict=True)))
        if index > 0:  # the first step warms up
            step_times.append(step_time)
            project_times.append(after["factored"][1])
            dense_times.append(after["dense"][1])
        del after, changes
    step, project, old = (statistics.median(x) for x in (step_times, project_times, dense_times))
    return {"mode": "lora r=4" if lora else "full (attn2 weights)", "step_s": step, "project_s": project,
            "overhead": project / step, "dense_project_s": old, "dense_overhead": old / step,
            "speedup": old / project, "max_relative_difference": max(differences), "forms": form_counts(constraint),
            "steps": repeats, "step_times": step_times, "project_times": project_times,
            "dense_times": dense_times, "linears": len(constraint.linears)}


def time_interpolate(results, repeats: int = 1) -> dict:
    from nullcov.training.bank import ProjectionBank

    lookup = ProjectionBank(results, mode="interpolate")
    lookup.factors([250])  # reads the two neighbours' statistics once
    times = []
    for t in range(260, 260 + repeats):
        start = time.perf_counter()
        found = lookup.factors([t])
        times.append(time.perf_counter() - start)
    size = sum(factor.nbytes for factor in found.values())
    return {"cache_miss_s": statistics.median(times), "bytes_per_timestep": size, "matrices": len(found)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-interpolate", action="store_true", help="skip the interpolate cache-miss timing")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: docs/measurements/bench-training-<resolution>.json")
    args = parser.parse_args(argv)
    if args.out is None:
        from nullcov.measurement import measurement_path

        args.out = measurement_path(f"bench-training-{args.resolution}.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from nullcov.measurement import header, peak_rss_bytes, write_record
    from nullcov.models.sd15 import SD15_UNET_CONFIG

    record = header("tools/bench_training.py", argv)
    started = record["date"]
    load_before = os.getloadavg()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        results = synthetic_results(Path(folder), unet)
        unet.requires_grad_(False)
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                for linear in (module.to_q, module.to_k, module.to_v, module.to_out[0]):
                    linear.weight.requires_grad_(True)
        rows.append(time_training(unet, results, args.resolution, args.batch, args.repeats, lora=False))
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=r".*attn2\.(to_q|to_k|to_v|to_out\.0)"))
        rows.append(time_training(unet, results, args.resolution, args.batch, args.repeats, lora=True))
        interpolate = None if args.no_interpolate else time_interpolate(results)
    report = record | {"device": "cpu", "threads": args.threads, "resolution": args.resolution, "batch": args.batch,
                       "repeats": args.repeats, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                       "peak_rss_bytes": peak_rss_bytes(),
                       "training": rows, "interpolate": interpolate}
    write_record(args.out, report)
    print(f"SD-1.5 architecture, CPU ({args.threads} threads), {args.resolution} px, batch {args.batch}, "
          f"median of {args.repeats} steps")
    print(f"started {started}, load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"{'training':22s} {'step s':>8s} {'project s':>10s} {'overhead':>9s} {'dense s':>9s} {'dense ovh':>9s} "
          f"{'speedup':>8s} {'max rel diff':>12s}  forms")
    for row in rows:
        print(f"{row['mode']:22s} {row['step_s']:8.2f} {row['project_s']:10.4f} {row['overhead']:9.1%} "
              f"{row['dense_project_s']:9.4f} {row['dense_overhead']:9.1%} {row['speedup']:7.2f}x "
              f"{row['max_relative_difference']:12.1e}  {row['forms']}")
    if interpolate:
        print(f"interpolate cache miss: {interpolate['cache_miss_s']:.2f} s for {interpolate['matrices']} matrices; "
              f"cache {interpolate['bytes_per_timestep'] / 1e6:.0f} MB per timestep")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
