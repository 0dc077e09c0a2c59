"""Snakemake adapter: spectra and null-space dimension figures from the projection files (nullcov.report)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, f"{snakemake.scriptdir}/..")

from nullcov import report
from nullcov.jobs import logging_to
from nullcov.store import TEXT_KEY

with logging_to(snakemake.log[0]):
    report.keep_matplotlib_cache_in_workdir()
    figures = dict(snakemake.params.figures)
    steps = {step["name"]: step for step in json.loads(Path(snakemake.input.schedule).read_text())["steps"]}
    projections = {Path(path).stem: path for path in snakemake.input.projections}  # step name (or text) -> file
    names = list(snakemake.params.step_names)
    spectra = {name: report.read_spectra(projections[name]) for name in names}
    shown = [names[index] for index in snakemake.params.report_steps] if names else []
    for kind, path in figures.items():
        if kind in ("spectra_to_q", "spectra_to_out"):
            report.spectra_figure(path, kind.removeprefix("spectra_"), [steps[n] for n in shown],
                                  [spectra[n] for n in shown])
    text = report.read_spectra(projections["text"])[TEXT_KEY] if "spectra_text" in figures else None
    if text is not None:
        report.text_spectrum_figure(figures["spectra_text"], text)
    if "null_dim" in figures:
        report.null_dim_figure(figures["null_dim"], [steps[n] for n in names], [spectra[n] for n in names], text)
