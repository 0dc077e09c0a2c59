"""The text table of ``make bench`` (tools/benchmark.py, ``benchmarks/bench-<cpu|gpu>.txt``): one
block per case (bare / ours / legacy, then notes), then the precision check, the GPU-only studies,
the profile and the projection. A developer tool, not part of the installed package.

Units: the peak RSS and peak GPU memory columns stay in GiB (one fixed unit per column, like the
card and host sizes, and the 1000-timestep study's emulated card, are given); file and scratch
sizes, and the memory check against its decimal 20 GB target, go through
:func:`nullcov.measurement.human_bytes` (decimal units, as in the docs).
"""

from __future__ import annotations

from benchmark_case import GPU_MEMORY_TARGET, Case
from benchmark_legacy import LEGACY_FILE_BYTES

from nullcov.measurement import gib, human_bytes

LABEL_WIDTH = 48


def _gib(value) -> str:
    return "-" if value is None else gib(value)


def _size(value) -> str:
    return "-" if value is None else human_bytes(value)


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


# -- one case -----------------------------------------------------------------------------------------
def _variant_line(label: str, name: str, record: dict, ratio: str) -> str:
    """One row: ``name`` (bare, ours or legacy) of a case; ``label`` only on the case's first row."""
    if name == "legacy":
        wall = record["seconds_per_prompt_timestep"] * record["prompt_timesteps"]
        cpu = (record["phase1"]["cpu_s"] + record["phase2_read"]["cpu_s"]) / record["prompt_timesteps"]
        scratch = record["scratch_bytes_per_prompt_timestep"]
    else:
        wall, cpu = record["wall_s"], record["cpu_s_per_prompt_timestep"]
        scratch = record.get("scratch_bytes_per_prompt_timestep", 0 if name == "bare" else None)
    return (f"{label:<{LABEL_WIDTH}} {name:<7} {wall:>8.2f} {record['prompt_timesteps_per_s']:>9.3f} "
            f"{cpu:>9.3f} {ratio:>9} {_gib(record['peak_rss_bytes']):>10} {_gib(record['peak_gpu_bytes']):>10} "
            f"{_size(scratch):>11}")


def _case_notes(result: dict) -> list[str]:
    ours = result["ours"]
    notes = []
    if result.get("ratio_ours_bare_cpu"):
        notes.append(f"ours/bare {result['ratio_ours_bare']:.3f} (wall), "
                     f"{result['ratio_ours_bare_cpu']:.3f} (CPU seconds)")
    if "legacy" in result:
        legacy = result["legacy"]
        notes.append(f"ours/legacy {result['ratio_ours_legacy']:.4g}x (legacy on {legacy['prompts']} prompts x "
                     f"{legacy['timesteps']} timesteps: phase 1 {legacy['phase1']['wall_s']:.2f} s, phase 2 "
                     f"{legacy['phase2_read']['wall_s']:.2f} s + {legacy['phase2_finalise']['wall_s']:.2f} s "
                     f"once per timestep)")
    if "scratch" in ours:
        scratch = ours["scratch"]
        notes.append(f"ours writes {_size(scratch['step_file_bytes'])} per step file (O(d^2), any prompt count) + "
                     f"{_size(scratch['text_file_bytes'])} text.h5 = {_size(scratch['shard_bytes'])} per shard, "
                     f"{scratch['write_s']:.2f} s; results() {ours.get('results_s', 0):.2f} s")
        per_pt = (_size(scratch["shard_bytes"] / (size * result["case"]["steps"])) for size in (16, 128, 1000))
        notes.append("ours per prompt-timestep with prompts_per_shard 16 / 128 / 1000: " + " / ".join(per_pt)
                     + f" (legacy: {_size(LEGACY_FILE_BYTES)} at SD-1.5 512px, measured by its users)")
    return notes


def _case_lines(result: dict) -> list[str]:
    rows = [("bare", result["bare"], f"{result['ratio_ours_bare']:.3f}x"), ("ours", result["ours"], "1")]
    if "legacy" in result:
        rows.append(("legacy", result["legacy"], f"{result['ratio_ours_legacy']:.4g}x"))
    label = Case(**result["case"]).label
    lines = [_variant_line(label if name == "bare" else "", name, record, ratio) for name, record, ratio in rows]
    lines += [f"{'':<{LABEL_WIDTH}} {note}" for note in _case_notes(result)]
    return lines + [""]


# -- the studies --------------------------------------------------------------------------------------
def _precision_lines(precision: dict) -> list[str]:
    lines = [f"precision of X^T X vs float64 ({precision['device']}), max|err|/max|ref| per size "
             f"{precision['sizes']}:"]
    for label, errors in precision["errors"].items():
        timing = precision["timings_ms"].get(label)
        extra = f"   ms: {', '.join(f'{t:.3f}' for t in timing)}" if timing else ""
        lines.append(f"  {label:<22} {', '.join(f'{e:.2e}' for e in errors)}{extra}")
    lines.append(f"  fp16 products exact in float32: {precision['float16_products_exact_in_float32']}, "
                 f"bf16: {precision['bfloat16_products_exact_in_float32']}")
    return lines + [""]


def _memory_check_line(check: dict) -> str:
    verdict = "PASS" if check["pass"] else "FAIL"
    return (f"GPU memory, SD-1.5 512px batch {check['batch_size']} {check['steps']} steps, all layers q/k/v/out: "
            f"peak {_size(check['peak_gpu_bytes'])} -> {verdict} (< {GPU_MEMORY_TARGET / 1e9:.0f} GB)")


def _timesteps_1000_line(check: dict) -> str:
    host_steps = check.get("steps", 0) - check.get("device_steps", 0)
    return (f"1000-timestep schedule on an emulated {check['emulated_card_gib']:.0f} GiB card "
            f"({check['layers']} layers): {'ok' if check.get('ok') else 'FAILED'}, "
            f"{check.get('device_steps')} steps on the GPU, {host_steps} on the host, "
            f"peak {_gib(check.get('peak_gpu_bytes'))}, {check.get('wall_s', 0):.1f} s")


def _profile_lines(profile: dict) -> list[str]:
    lines = [f"profile of one feature run ({profile['case']}, {profile['steps']} steps; {profile['sort']}):"]
    for entry in profile["top"]:
        lines.append(f"  {entry['op']:<52} {entry['self_us'] / 1e3:>10.1f} ms {100 * entry['share']:>6.1f}%  "
                     f"{entry['calls']:>6} calls")
    for label, entry in profile["nullcov_labels"].items():
        device = (f", {entry['device_time_total_us'] / 1e3:.1f} ms device"
                  if entry.get("device_time_total_us") else "")
        lines.append(f"  {label:<52} {entry['cpu_time_total_us'] / 1e3:>10.1f} ms CPU total (with children)"
                     + device)
    return lines


def _projection_line(projection: dict) -> str:
    shards = (f"{key.replace('prompts_per_shard_', 'shards of ')}: {value['seconds'] / 60:.1f} min, "
              f"scratch {_size(value['scratch_bytes'])}"
              for key, value in projection.items() if key.startswith("prompts_per_shard"))
    return (f"projected 1000 prompts x 50 steps on this GPU (best batch): compute "
            f"{projection['compute_s'] / 60:.1f} min; " + "; ".join(shards))


def format_table(report: dict) -> str:
    lines = [f"nullcov benchmark, {report['date']}",
             f"machine: {describe_machine(report['machine'], report['versions'])}",
             f"command: {report['command']}", ""]
    header = f"{'case':<{LABEL_WIDTH}} {'variant':<7} {'wall s':>8} {'pt/s':>9} {'cpu-s/pt':>9} {'ours/this':>9} " \
             f"{'peak RSS':>10} {'peak GPU':>10} {'scratch/pt':>11}"
    lines += [header, "-" * len(header)]
    for result in report["cases"]:
        lines += _case_lines(result)
    if report.get("precision"):
        lines += _precision_lines(report["precision"])
    if report.get("memory_check"):
        lines.append(_memory_check_line(report["memory_check"]))
    if report.get("timesteps_1000"):
        lines.append(_timesteps_1000_line(report["timesteps_1000"]))
    if report.get("profile"):
        lines += _profile_lines(report["profile"])
    if report.get("projection"):
        lines.append(_projection_line(report["projection"]))
    return "\n".join(lines)
