"""The report: figures, attention maps, run summary and `snakemake --report` on a finished tiny run."""

import csv
import json
import time

import numpy as np
import pytest
import yaml

from nullcov.models.family import TEXT_KEY
from nullcov.report.figures_layers import layer_order, short_layer
from nullcov.statistics.store import read_projections, read_spectra
from nullcov.workflow.config import select_prompts, select_steps

from conftest import REPO, planned_jobs, snakemake, write_config

VALIDATION_PROMPTS = [
    "a photo of a squirrel eating a nut on a fence",
    "an oil painting of a windmill in a tulip field",
    "a snowy street with lanterns at night",
    "a bowl of tomato soup with basil",
]
RUN = dict(
    prompts_per_shard=8, num_denoising_steps=3, report_steps=2, attention_prompts=[1], attention_layers=[0, 6],
    validation_thresholds=[1.0e-4, 0.01, 0.1, 1.0], validation_updates=2, validation_seed_offset=100,
)
_RUNS = {}


def report_run(tmp_path_factory, demo_prompts):
    """One finished run with report and validation, shared by test_report and test_validation.

    8 training prompts (1 shard), 4 validation prompts, DPM++ 2M Karras with 3 steps; attention
    maps of prompt 1 at 2 steps in layers 0 and 6; then `snakemake --report`.
    """
    if "run" not in _RUNS:
        workdir = tmp_path_factory.mktemp("report") / "run"
        workdir.mkdir(parents=True)
        (workdir / "validation.txt").write_text("\n".join(VALIDATION_PROMPTS) + "\n")
        write_config(workdir, demo_prompts[:8], validation_prompts=str(workdir / "validation.txt"), **RUN)
        start = time.perf_counter()
        snakemake(workdir)
        _RUNS["seconds"] = time.perf_counter() - start
        snakemake(workdir, "--report", "results/report.html")
        _RUNS["run"] = workdir
    return _RUNS["run"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, demo_prompts):
    return report_run(tmp_path_factory, demo_prompts)


def _schedule(workdir):
    return json.loads((workdir / "results" / "schedule.json").read_text())["steps"]


def _benchmark(path):
    with open(path, newline="") as handle:
        return float(next(csv.DictReader(handle, delimiter="\t"))["s"])


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


# -- selections (parse time) ---------------------------------------------------------------------
def test_step_selection_spreads_over_the_schedule():
    spread = select_steps(10, 3)
    # first and last step, and one step within half a step of the middle (4.5)
    assert len(spread) == 3 and spread[0] == 0 and spread[-1] == 9 and abs(spread[1] - 4.5) <= 0.5
    assert select_steps(10, 1) == [0]
    assert select_steps(2, 5) == [0, 1]
    assert select_steps(10, [7, 2, 7]) == [2, 7]
    with pytest.raises(ValueError, match=r"report_steps: step indices \[10\]"):
        select_steps(10, [10])
    assert select_prompts(48, 2) == [0, 1] and select_prompts(1, 2) == [0]
    assert select_prompts(48, 0) == [] and select_prompts(48, [5, 3, 5]) == [5, 3]
    with pytest.raises(ValueError, match="attention_prompts"):
        select_prompts(4, [4])


def test_layer_labels_follow_the_unet():
    names = [
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "mid_block.attentions.0.transformer_blocks.0.attn2",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "down_blocks.0.attentions.1.transformer_blocks.2.attn2",
    ]
    ordered = sorted(names, key=layer_order)
    assert [short_layer(name) for name in ordered] == ["down0.1.t2", "down1.0", "mid.0", "up1.0"]
    assert short_layer("custom.attn") == "custom.attn"


# -- the finished run ----------------------------------------------------------------------------
def test_every_figure_is_an_output_of_all_and_a_png(finished):
    results = finished / "results"
    steps = _schedule(finished)
    shown = [steps[0]["name"], steps[-1]["name"]]  # report_steps: 2 -> first and last
    expected = [
        "report/spectra/to_q.png", "report/spectra/to_out.png", "report/spectra/text.png", "report/null_dim.png",
        "report/validation/leakage_tradeoff.png", "report/validation/leakage_heatmap.png",
        *[f"report/attention/prompt_0001_{name}.png" for name in shown],
    ]
    for relative in expected:
        assert _is_png(results / relative), relative
    assert sorted(p.name for p in (results / "report" / "attention").glob("*.png")) == sorted(
        f"prompt_0001_{name}.png" for name in shown
    )
    assert planned_jobs(finished) == []  # nothing left to do: every figure is up to date under `all`


def test_snakemake_report_holds_every_category_and_figure(finished):
    page = (finished / "results" / "report.html").read_text()
    for category in ("1. Run summary", "2. Spectra", "3. Null-space dimension", "4. Attention maps",
                     "5. Validation: leakage"):
        assert json.dumps(category) in page, category
    for name in ("to_q.png", "null_dim.png", "leakage_tradeoff.png", "summary.html", "leakage.tsv",
                 f"prompt_0001_{_schedule(finished)[0]['name']}.png"):
        assert name in page, name
    assert "a photo of a golden retriever running on a beach" in page  # attention label: prompt 1


def test_spectra_read_for_the_figures_are_the_projection_files(finished):
    name = _schedule(finished)[1]["name"]
    spaces, _ = read_projections(finished / "results" / "projections" / f"{name}.h5")
    spectra = read_spectra(finished / "results" / "projections" / f"{name}.h5")
    assert sorted(spectra) == sorted(spaces)
    for key, space in spaces.items():
        np.testing.assert_array_equal(spectra[key]["eigenvalues"], space.eigenvalues)
        assert spectra[key]["null_dim"] == space.null_dim == int((space.eigenvalues < 0.02).sum())
        assert spectra[key]["d"] == space.projection.shape[0]
    text = read_spectra(finished / "results" / "projections" / "text.h5")
    assert list(text) == [TEXT_KEY]


def test_run_summary_reports_the_run(finished):
    with open(finished / "results" / "report" / "summary.tsv", newline="") as handle:
        rows = {(row["section"], row["item"]): row["value"] for row in csv.DictReader(handle, delimiter="\t")}
    assert rows[("model", "model")] == "builtin:tiny"
    assert "(8 prompts, sha256" in rows[("prompts", "prompt file")]
    assert rows[("prompts", "shards")] == "1 of up to 8 prompts"
    assert "(4 prompts, seeds from seed + 100)" in rows[("prompts", "validation prompts")]
    assert rows[("schedule", "timesteps")] == ", ".join(f"{s['timestep']:.0f}" for s in _schedule(finished))
    assert "DPMSolverMultistepScheduler" in rows[("schedule", "sampler")]
    assert rows[("statistic", "statistic")] == "second_moment"
    assert rows[("statistic", "threshold")] == "0.02 (absolute)"
    assert rows[("run", "device / dtype")].startswith("cpu (device: cpu) / float32")
    seconds = [_benchmark(path) for path in sorted((finished / "benchmarks" / "features").glob("*.tsv"))]
    assert len(seconds) == 1
    assert rows[("wall time", "features")] == f"{seconds[0]:.1f} s total over 1 job(s), longest {seconds[0]:.1f} s"
    leakage = _benchmark(finished / "benchmarks" / "leakage" / "part_000.tsv")
    assert rows[("wall time", "leakage")] == f"{leakage:.1f} s total over 1 job(s), longest {leakage:.1f} s"
    scratch = sum(p.stat().st_size for p in (finished / "results" / "features").rglob("*") if p.is_file())
    assert rows[("disk", "shard scratch (results/features)")].endswith(f"({scratch} bytes) in results/features")
    html = (finished / "results" / "report" / "summary.html").read_text()
    assert "<table>" in html and "second_moment" in html and "shard scratch" in html


def test_attention_maps_come_from_the_same_trajectory_and_seeds(finished, demo_prompts):
    """The job's maps equal maps computed here for prompt 1 with seed 0 + 1 (the feature job's seed)."""
    from nullcov.models.model import cross_attention_modules, load_pipeline
    from nullcov.models.sampling import configure_scheduler
    from nullcov.report.attention import collect_attention_maps, read_maps

    schedule = json.loads((finished / "results" / "schedule.json").read_text())
    steps = schedule["steps"]
    stored = read_maps(finished / "results" / "report" / "attention" / "attention_maps.h5")
    pipe = load_pipeline(finished / "resources" / "models" / "tiny-sd", "float32", "cpu")
    configure_scheduler(pipe, schedule)
    names = [name for name, _ in cross_attention_modules(pipe.unet)]
    config = yaml.safe_load((finished / "config.yaml").read_text())
    found = collect_attention_maps(pipe, [demo_prompts[1]], [1], schedule, config, [names[0], names[6]], [0, 2])
    assert stored["tokens"][1] == found["tokens"][0] and stored["tokens"][1][0] == "<bos>"
    assert sorted(stored["maps"]) == sorted((1, steps[s]["name"], names[layer]) for s in (0, 2) for layer in (0, 6))
    for step in (0, 2):
        for layer in (names[0], names[6]):
            np.testing.assert_allclose(stored["maps"][(1, steps[step]["name"], layer)], found["maps"][(0, step, layer)],
                                       rtol=1e-5, atol=1e-7)
    other_seed = collect_attention_maps(pipe, [demo_prompts[1]], [2], schedule, config, [names[0]], [2])
    assert not np.allclose(other_seed["maps"][(0, 2, names[0])], found["maps"][(0, 2, names[0])], atol=1e-6)


def test_a_threshold_change_reruns_projections_and_the_report_only(finished, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir, symlinks=True)
    for name in ("config.yaml",):
        text = (workdir / name).read_text().replace(str(finished), str(workdir))
        (workdir / name).write_text(text.replace("nullspace_threshold: 0.02", "nullspace_threshold: 0.05"))
    rules = {rule for rule, _ in planned_jobs(workdir)}
    assert rules == {"projection", "projection_text", "leakage", "validation_report", "report_figures",
                     "run_summary", "all"}


@pytest.mark.parametrize(
    "override, message",
    [
        ({"report_steps": [0, 3]}, "report_steps: step indices [3]"),
        ({"attention_prompts": [9]}, "attention_prompts: prompt indices [9]"),
        ({"validation_seed_offset": 1}, "validation_seed_offset 1 is smaller than the number of training prompts"),
        ({"validation_thresholds": []}, "validation_thresholds"),
        ({"validation_prompts": "/nonexistent/validation.txt"}, "/nonexistent/validation.txt"),
    ],
)
def test_invalid_report_config_stops_before_any_job(finished, tmp_path, demo_prompts, override, message):
    import shutil

    shutil.copytree(finished / "resources" / "cache", tmp_path / "resources" / "cache")  # skip the schedule build
    (tmp_path / "validation.txt").write_text("\n".join(VALIDATION_PROMPTS) + "\n")
    settings = dict(RUN, validation_prompts=str(tmp_path / "validation.txt")) | override
    write_config(tmp_path, demo_prompts[:8], **settings)
    result = snakemake(tmp_path, "--dry-run", check=False)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def test_the_shipped_validation_prompts_are_disjoint_from_the_demo_prompts(demo_prompts):
    from nullcov.report.validation import read_validation_prompts

    shipped = read_validation_prompts(REPO / "config" / "prompts" / "validation.txt", demo_prompts, 1000000)
    assert len(shipped) >= 8 and not set(shipped) & set(demo_prompts)
