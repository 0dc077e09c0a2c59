"""The run summary (rule ``run_summary``): one table of what a run did (model, prompts, schedule,
statistic, device), how long its stages took (Snakemake benchmark files) and how much disk its
folders use, written as TSV and HTML.

Bytes are written by :func:`nullcov.measurement.human_bytes`. Importing this module is cheap (no
torch, no matplotlib).
"""

from __future__ import annotations

import csv
import html
from pathlib import Path

import numpy as np

from nullcov.docs import OUTPUTS
from nullcov.files import atomic_path, read_tsv, write_text
from nullcov.measurement import human_bytes
from nullcov.models.family import CROSS_ATTENTION, TEXT_KEY, split_key
from nullcov.report.figures_layers import TEXT_LABEL
from nullcov.statistics.store import read_attrs

Row = tuple[str, str, str]
_STYLE = ("body{font-family:sans-serif;font-size:14px;margin:1em}table{border-collapse:collapse}"
          "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
          "tr.section th{background:#eef;font-size:15px}td:first-child{white-space:nowrap;color:#333}")


# -- reading ----------------------------------------------------------------------------------
def read_benchmark(path, column: str = "s") -> float | None:
    """The mean of ``column`` (``s``: wall seconds; ``max_rss``: MB) over a Snakemake benchmark
    file's rows; None when the file is absent or the column empty (``NA``, ``-``)."""
    path = Path(path)
    if not path.is_file():
        return None
    values = [row[column] for row in read_tsv(path)]
    numbers = [float(value) for value in values if value not in ("", "-", "NA")]
    return sum(numbers) / len(numbers) if numbers else None


def folder_bytes(path) -> int:
    """Bytes of a file, or of every file under a folder; 0 when the path does not exist."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file()) if path.is_dir() else 0


def read_provenance(path, kind: str = "features") -> dict:
    """The ``provenance`` of a nullcov HDF5 file of ``kind`` (default a shard's), read by the store
    (:func:`nullcov.statistics.store.read_attrs`: kind, format and attribute checksum checked)."""
    return read_attrs(path, kind)["provenance"]


def projection_statistics(spectra_by_name: dict[str, dict[str, dict]]) -> dict[str, str]:
    """Mean null-space fraction per linear over every layer and step."""
    fractions: dict[str, list[float]] = {}
    for spectra in spectra_by_name.values():
        for key, entry in spectra.items():
            linear = TEXT_LABEL if key == TEXT_KEY else split_key(key)[1]
            fractions.setdefault(linear, []).append(entry["null_dim"] / entry["d"])
    order = [*CROSS_ATTENTION.per_step, TEXT_LABEL]
    return {f"null_dim / d, {linear}": f"mean {np.mean(values):.1%}, range {min(values):.1%}–{max(values):.1%} "
            f"over {len(values)} matri{'x' if len(values) == 1 else 'ces'}"
            for linear, values in sorted(fractions.items(), key=lambda item: order.index(item[0]))}


# -- the rows -----------------------------------------------------------------------------------
def summary_rows(*, config: dict, schedule: dict, provenance: dict, num_prompts: int, prompt_sha256: str,
                 num_shards: int, num_validation: int, benchmarks: dict[str, list[str]], folders: dict[str, str],
                 projection_stats: dict | None = None, validation_file: str | None = None) -> list[Row]:
    """(section, item, value) rows of the run summary.

    ``provenance`` is a shard file's (it records the device the feature jobs resolved);
    ``benchmarks`` maps a stage to its jobs' benchmark files; ``folders`` a label to a path.
    """
    return [
        *_model_rows(config, provenance.get("model", {})),
        *_prompt_rows(config, num_prompts, prompt_sha256, num_shards, num_validation, validation_file),
        *_schedule_rows(config, schedule["steps"], schedule["scheduler"]["class"]),
        *_statistic_rows(config, projection_stats or {}),
        _run_row(config, provenance.get("run", {})),
        *_wall_time_rows(benchmarks),
        *_disk_rows(folders),
    ]


def _model_rows(config: dict, model: dict) -> list[Row]:
    return [
        ("model", "model", f"{config['model']}"),
        ("model", "path", str(model.get("path", ""))),
        ("model", "fingerprint", str(model.get("fingerprint", ""))[:16]),
    ]


def _prompt_rows(config: dict, num_prompts: int, prompt_sha256: str, num_shards: int, num_validation: int,
                 validation_file: str | None) -> list[Row]:
    validation = (f"{validation_file or config.get('validation_prompts')} ({num_validation} prompts, seeds from "
                  f"seed + {config.get('validation_seed_offset')})" if num_validation else "none")
    return [
        ("prompts", "prompt file", f"{config['prompts']} ({num_prompts} prompts, sha256 {prompt_sha256[:12]})"),
        ("prompts", "shards", f"{num_shards} of up to {config['prompts_per_shard']} prompts"),
        ("prompts", "validation prompts", validation),
    ]


def _schedule_rows(config: dict, steps: list[dict], scheduler_class: str) -> list[Row]:
    sampler = (f"{config['sampler_strategy']} ({scheduler_class}), {len(steps)} UNet calls, collection "
               f"{config['collection']}, guidance {config['guidance_scale']}"
               + (" (both CFG branches collected)" if config["unconditional_branch"] else ""))
    timesteps = ", ".join(f"{step['timestep']:.0f}" for step in steps[:30]) + (" …" if len(steps) > 30 else "")
    return [("schedule", "sampler", sampler), ("schedule", "timesteps", timesteps)]


def _statistic_rows(config: dict, projection_stats: dict[str, str]) -> list[Row]:
    threshold = (f"percentile {config['threshold_percent']} of each spectrum"
                 if config.get("threshold_percent") is not None else f"{config['nullspace_threshold']:g} (absolute)")
    features = (", ".join(key for key, wanted in config["collect_features"].items() if wanted)
                + f"; layers: {config['cross_attention_layers']}; text tokens: {config['text_tokens']}")
    return [
        ("statistic", "statistic", config["statistic"]),
        ("statistic", "threshold", threshold),
        ("statistic", "features", features),
        *(("statistic", label, value) for label, value in projection_stats.items()),
    ]


def _run_row(config: dict, run: dict) -> Row:
    return ("run", "device / dtype", f"{run.get('device', config['device'])} (device: {config['device']}) / "
                                     f"{config['dtype']}; batch {config['batch_size']}; seed {config['seed']}")


def _wall_time_rows(benchmarks: dict[str, list[str]]) -> list[Row]:
    """Per stage with jobs: the sum and the longest of its jobs' wall times."""
    rows = []
    for stage, paths in benchmarks.items():
        if not paths:
            continue
        times = [t for t in (read_benchmark(path) for path in paths) if t is not None]
        value = (f"{sum(times):.1f} s total over {len(times)} job(s), longest {max(times):.1f} s"
                 if times else "no benchmark recorded")
        if times and len(times) < len(paths):
            value += f" ({len(paths) - len(times)} job(s) without a benchmark)"
        rows.append(("wall time", stage, value))
    return rows


def _disk_rows(folders: dict[str, str]) -> list[Row]:
    rows = []
    for label, path in folders.items():
        size = folder_bytes(path)
        rows.append(("disk", label, f"{human_bytes(size)} ({size} bytes) in {path}"))
    return rows


# -- writing ------------------------------------------------------------------------------------
def write_summary(rows: list[Row], tsv_path, html_path) -> None:
    """The rows as TSV and HTML, both ending with a row naming the page that explains them."""
    rows = [*rows, ("about", "this summary", f"what each row means: {OUTPUTS}")]
    with atomic_path(tsv_path) as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(("section", "item", "value"))
            writer.writerows(rows)
    write_text(html_path, summary_html(rows))


def summary_html(rows: list[Row]) -> str:
    """The rows as one HTML page: a table with a header row per section."""
    body = []
    section = None
    for row_section, item, value in rows:
        if row_section != section:
            body.append(f'<tr class="section"><th colspan="2">{html.escape(row_section)}</th></tr>')
            section = row_section
        body.append(f"<tr><td>{html.escape(item)}</td><td>{html.escape(value)}</td></tr>")
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>nullcov run summary</title><style>"
        + _STYLE
        + "</style></head><body><h2>nullcov run summary</h2><table>\n" + "\n".join(body) + "\n</table></body></html>\n"
    )
