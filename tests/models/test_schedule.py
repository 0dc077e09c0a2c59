"""Schedules equal what the real diffusers schedulers do; names follow the contract."""

import json

import diffusers
import numpy as np
import pytest

from nullcov.models import schedule as nc_schedule
from nullcov.models.tiny_model import TINY_SCHEDULER_CONFIG

# Independent restatement of diffusers' A1111 sampler mapping (docs: api/schedulers/overview).
EXPECTED = {
    "DPM++ 2M": (diffusers.DPMSolverMultistepScheduler, {}),
    "DPM++ 2M Karras": (diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "DPM++ 3M": (diffusers.DPMSolverMultistepScheduler, {"solver_order": 3}),
    "DPM++ 3M SDE Karras": (
        diffusers.DPMSolverMultistepScheduler,
        {"solver_order": 3, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "Euler": (diffusers.EulerDiscreteScheduler, {}),
    "Euler a": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "UniPC": (diffusers.UniPCMultistepScheduler, {}),
    "LCM": (diffusers.LCMScheduler, {}),
    "DDIM": (diffusers.DDIMScheduler, {}),
    "PNDM": (diffusers.PNDMScheduler, {}),
}


@pytest.mark.parametrize("strategy", sorted(EXPECTED))
@pytest.mark.parametrize("steps", [7, 25])
def test_sampler_timesteps_equal_the_diffusers_scheduler(strategy, steps):
    cls, options = EXPECTED[strategy]
    reference = cls.from_config(TINY_SCHEDULER_CONFIG, **options)
    reference.set_timesteps(num_inference_steps=steps)
    built = nc_schedule.build_schedule(TINY_SCHEDULER_CONFIG, strategy, steps)
    assert built["scheduler"]["class"] == cls.__name__
    assert [s["timestep"] for s in built["steps"]] == [float(t) for t in reference.timesteps]
    assert [s["index"] for s in built["steps"]] == list(range(len(reference.timesteps)))
    for step in built["steps"]:
        assert step["name"] == f"alpha_{step['index']:02d}_{round(step['timestep']):04d}"
        alpha = np.interp(step["timestep"], np.arange(1000), reference.alphas_cumprod.double().numpy())
        assert step["alphas_cumprod"] == pytest.approx(alpha, rel=1e-12)
        assert step["sigma"] == pytest.approx(np.sqrt((1 - alpha) / alpha), rel=1e-12)
    json.dumps(built)  # JSON-able


def test_pndm_collects_its_repeated_call():
    built = nc_schedule.build_schedule(TINY_SCHEDULER_CONFIG, "PNDM", 10)
    timesteps = [s["timestep"] for s in built["steps"]]
    assert len(timesteps) == 11 and timesteps[1] == timesteps[2]
    assert len({s["name"] for s in built["steps"]}) == 11


@pytest.mark.parametrize("steps", [1, 10, 50, 999, 1000, 1500])
def test_uniform_strategy(steps):
    built = nc_schedule.build_schedule(TINY_SCHEDULER_CONFIG, None, steps)
    timesteps = [int(s["timestep"]) for s in built["steps"]]
    expected = list(range(999, -1, -1)) if steps >= 1000 else [int(t) for t in np.linspace(999, 0, steps)]
    assert timesteps == expected
    assert [s["name"] for s in built["steps"]] == [f"timestep_{t:04d}" for t in expected]
    assert built["set_timesteps"] == {"timesteps": expected}


def test_early_timestep_strategy():
    built = nc_schedule.build_schedule(TINY_SCHEDULER_CONFIG, "early_timestep", 5)
    assert [s["timestep"] for s in built["steps"]] == [999, 998, 997, 996, 995]
    assert built["steps"][3]["name"] == "alpha_03_0996"


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(nc_schedule.ScheduleError, match="'DPM\\+\\+ 2M Karras'.*'PNDM'"):
        nc_schedule.build_schedule(TINY_SCHEDULER_CONFIG, "Heun", 10)
    with pytest.raises(nc_schedule.ScheduleError, match="positive"):
        nc_schedule.build_schedule(TINY_SCHEDULER_CONFIG, None, 0)


def test_names_never_match_text():
    import re

    pattern = re.compile(nc_schedule.NAME_PATTERN)
    assert pattern.fullmatch("alpha_03_0979") and pattern.fullmatch("timestep_0999")
    assert pattern.fullmatch("alpha_123_0005")
    assert not pattern.fullmatch("text")
    assert "{" not in nc_schedule.NAME_PATTERN  # Snakemake would read braces as a wildcard


def test_cache_returns_the_built_schedule_and_is_reused(tmp_path, monkeypatch):
    first = nc_schedule.cached_schedule(TINY_SCHEDULER_CONFIG, "Euler", 6, tmp_path)
    assert first == json.loads(json.dumps(nc_schedule.build_schedule(TINY_SCHEDULER_CONFIG, "Euler", 6)))
    (cache_file,) = tmp_path.iterdir()

    def fail(*args):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(nc_schedule, "build_schedule", fail)
    assert nc_schedule.cached_schedule(TINY_SCHEDULER_CONFIG, "Euler", 6, tmp_path) == first
    with pytest.raises(AssertionError, match="cache was not used"):
        nc_schedule.cached_schedule(TINY_SCHEDULER_CONFIG, "Euler", 7, tmp_path)


@pytest.mark.parametrize("spelling", ["uniform", "null", "None", None])
def test_every_spelling_of_the_uniform_strategy_builds_the_uniform_schedule(spelling):
    built = nc_schedule.build_schedule(TINY_SCHEDULER_CONFIG, spelling, 5)
    assert built["strategy"] is None
    assert [int(s["timestep"]) for s in built["steps"]] == [int(t) for t in np.linspace(999, 0, 5)]
    assert [s["name"] for s in built["steps"]][0] == "timestep_0999"


def test_lcm_step_limit_is_its_original_inference_steps():
    limit = diffusers.LCMScheduler.from_config(TINY_SCHEDULER_CONFIG).config.original_inference_steps
    assert len(nc_schedule.build_schedule(TINY_SCHEDULER_CONFIG, "LCM", limit)["steps"]) == limit
    with pytest.raises(nc_schedule.ScheduleError, match=rf"'LCM' allows at most {limit} num_denoising_steps"):
        nc_schedule.build_schedule(TINY_SCHEDULER_CONFIG, "LCM", limit + 1)


def test_write_schedule_and_read_schedule_round_trip(tmp_path):
    built = nc_schedule.build_schedule(TINY_SCHEDULER_CONFIG, "Euler", 3)
    path = tmp_path / "results" / "schedule.json"
    written = nc_schedule.write_schedule(path, built, ["layer.attn2"], "builtin:tiny")
    assert nc_schedule.read_schedule(path) == json.loads(json.dumps(written))
    assert path.read_text() == json.dumps(written, indent=1, sort_keys=True)  # the format tests and exports see
    assert [p.name for p in path.parent.iterdir()] == ["schedule.json"]  # written atomically, nothing left beside


@pytest.mark.parametrize(
    "content, error, message",
    [
        (None, FileNotFoundError, "does not exist"),
        ('{"steps": [', nc_schedule.ScheduleError, "is not valid JSON"),
        ('{"format": 1}', nc_schedule.ScheduleError, "is not a nullcov schedule"),
        ("[1, 2]", nc_schedule.ScheduleError, "is not a nullcov schedule"),
    ],
)
def test_read_schedule_fails_naming_the_file_and_the_rule_that_writes_it(tmp_path, content, error, message):
    path = tmp_path / "results" / "schedule.json"
    if content is not None:
        path.parent.mkdir()
        path.write_text(content)
    with pytest.raises(error, match=message) as info:
        nc_schedule.read_schedule(path)
    assert str(path) in str(info.value)
    assert f"schedule rule writes it: snakemake --cores all --force {path}" in str(info.value)
