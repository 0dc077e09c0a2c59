"""Shared fixtures: the tiny model (built once per session) and a configured pipeline."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_PROMPTS = REPO / "config" / "prompts" / "demo.txt"


def base_config(**overrides) -> dict:
    """The workflow's feature config with test-sized defaults."""
    config = {
        "seed": 0,
        "sampler_strategy": "DPM++ 2M Karras",
        "num_denoising_steps": 4,
        "collection": "trajectory",
        "guidance_scale": 7.5,
        "unconditional_branch": False,
        "resolution": None,
        "batch_size": 2,
        "dtype": "float32",
        "device": "cpu",
        "collect_features": {"q": True, "k": True, "v": True, "out": True},
        "cross_attention_layers": "all",
        "text_tokens": "all",
        "strict_prompts": False,
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from nullcov.models.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-sd")


@pytest.fixture(scope="session")
def demo_prompts():
    from nullcov.prompts import read_prompts

    return read_prompts(DEMO_PROMPTS)


@pytest.fixture
def tiny_pipe(tiny_model_dir):
    from nullcov.models.model import load_pipeline

    return load_pipeline(tiny_model_dir, "float32", "cpu")


SNAKEFILE = REPO / "Snakefile"


def write_config(workdir, prompt_lines, **overrides):
    """A config.yaml for a test run in ``workdir`` (tiny model, few steps) and its prompt file."""
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prompts.txt").write_text("\n".join(prompt_lines) + "\n")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(
        model="builtin:tiny",
        prompts=str(workdir / "prompts.txt"),
        prompts_per_shard=4,
        num_denoising_steps=3,
        batch_size=2,
        device="cpu",
        # The report's extra feature-style jobs stay off unless a test asks for them
        # (tests/report/test_report.py and tests/report/test_validation.py do); the figures and summary still run.
        validation_prompts=None,
        attention_prompts=0,
    )
    config.update(overrides)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return workdir / "config.yaml"


def snakemake_command(workdir, *args) -> list[str]:
    import sys

    return [
        sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
        "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args,
    ]


def snakemake(workdir, *args, check=True, timeout=600):
    """Run the workflow with ``workdir``'s config.yaml; returns the CompletedProcess."""
    import subprocess

    result = subprocess.run(snakemake_command(workdir, *args), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def planned_jobs(workdir, *args) -> list[tuple[str, str]]:
    """(rule, first output) of every job a dry-run would run (group members print indented)."""
    import re

    output = snakemake(workdir, "--dry-run", *args).stdout
    jobs = []
    for block in re.split(r"\n(?=[ \t]*(?:local)?rule \w+:)", output):
        match = re.match(r"[ \t]*(?:local)?rule (\w+):", block)
        if match:
            out = re.search(r"^\s+output: ([^,\n]+)", block, re.M)
            jobs.append((match.group(1), out.group(1) if out else ""))
    return jobs


def pytest_terminal_summary(terminalreporter):
    """Say how many fault and bad-input cases ran and whether all passed."""
    counts = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            if report.when != "call" and outcome != "error" and not (outcome == "skipped" and report.when == "setup"):
                continue
            for marker in ("fault", "bad_input"):
                if marker in getattr(report, "keywords", {}):
                    counts.setdefault(marker, {}).setdefault(outcome, set()).add(report.nodeid)
    for marker, label in (("fault", "fault cases"), ("bad_input", "bad-input cases")):
        outcomes = {outcome: len(ids) for outcome, ids in counts.get(marker, {}).items()}
        ran = sum(outcomes.values())
        if ran:
            verdict = "all passed" if outcomes.get("passed", 0) == ran else "NOT all passed"
            details = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
            terminalreporter.write_line(f"{label}: {ran} run, {details}: {verdict}")


def pytest_addoption(parser):
    parser.addoption("--bench-faults", action="store_true",
                     help="also run the expensive fault cases (marker bench_faults): `make bench-faults` does")


def pytest_collection_modifyitems(config, items):
    """Deselect the ``bench_faults`` cases unless ``--bench-faults`` (they are `make bench-faults`'s, not CI's)."""
    if config.getoption("--bench-faults"):
        return
    dropped = [item for item in items if item.get_closest_marker("bench_faults")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not item.get_closest_marker("bench_faults")]


def wait_for(predicate, timeout=120, interval=0.02, what="condition"):
    """Poll ``predicate`` until it returns something true (returned), else fail after ``timeout`` s."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def job_process(workdir, script="features.py"):
    """The running job process of ``workdir`` whose command line runs ``script`` (Snakemake runs a copy of
    scripts/<script>): by default the feature job's."""
    import psutil

    for process in psutil.process_iter(["cmdline", "cwd"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            if script in cmdline and process.info["cwd"] == str(workdir):
                return process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None
