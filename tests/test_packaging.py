"""Package pins agree: envs/nullcov.yaml (conda jobs) installs requirements.txt's runtime versions."""

import re

import yaml

from conftest import REPO

# requirements.txt entries that only the workflow driver, the tests, the lint or the docs site need.
NOT_IN_JOBS = {"snakemake", "snakemake-executor-plugin-slurm", "pytest", "pytest-xdist", "ruff", "snakefmt", "mkdocs"}


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line)
            assert match, f"not an exact pin: {line!r}"
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_conda_environment_pins_the_runtime_packages_of_requirements():
    required = _pins((REPO / "requirements.txt").read_text().splitlines())
    environment = yaml.safe_load((REPO / "envs" / "nullcov.yaml").read_text())
    pip_section = next(item["pip"] for item in environment["dependencies"] if isinstance(item, dict))
    assert _pins(pip_section) == {name: version for name, version in required.items() if name not in NOT_IN_JOBS}
