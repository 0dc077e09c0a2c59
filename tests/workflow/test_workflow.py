"""The Snakemake workflow end to end on the tiny model: outputs, provenance and rerun behaviour."""

import json
import shutil
import time

import diffusers
import h5py
import numpy as np
import pytest
import yaml

from nullcov import layout
from nullcov.models import family
from nullcov.models.family import TEXT_KEY
from nullcov.models.tiny_model import TINY_SCHEDULER_CONFIG
from nullcov.prompts import read_prompts
from nullcov.statistics.store import read_moments, read_projections
from nullcov.training.bank import ProjectionBank

from conftest import planned_jobs, snakemake, write_config

# Jobs that read projections (or everything) to draw the report: they follow any rerun.
REPORT_RULES = {"report_figures", "run_summary"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, demo_prompts):
    """A completed run: 10 prompts in 3 shards, DPM++ 2M Karras, 3 steps."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    write_config(workdir, demo_prompts[:10])
    snakemake(workdir)
    return workdir


@pytest.fixture
def run_copy(finished, tmp_path):
    """A private copy of the finished run (timestamps and Snakemake metadata kept)."""
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir, symlinks=True)
    # copytree rewrites paths in nothing but config.yaml's prompt file; point it at the copy.
    config = (workdir / "config.yaml").read_text().replace(str(finished), str(workdir))
    (workdir / "config.yaml").write_text(config)
    return workdir


def _step_names(workdir):
    return [s["name"] for s in json.loads((workdir / "results" / "schedule.json").read_text())["steps"]]


def test_outputs_follow_the_layout_with_provenance(finished, demo_prompts):
    names = _step_names(finished)
    # Independent of nullcov.models.schedule: diffusers' own DPM++ 2M Karras on the tiny model's scheduler.
    reference = diffusers.DPMSolverMultistepScheduler.from_config(TINY_SCHEDULER_CONFIG, use_karras_sigmas=True)
    reference.set_timesteps(num_inference_steps=3)
    assert names == [f"alpha_{i:02d}_{int(t):04d}" for i, t in enumerate(reference.timesteps)]
    results = finished / "results"
    for shard in ("0000", "0001", "0002"):
        assert sorted(p.name for p in (results / "features" / f"shard_{shard}").glob("*.h5")) == sorted(
            [f"{n}.h5" for n in names] + ["text.h5"]
        )
    for stage in ("covariance", "projections"):
        assert sorted(p.stem for p in (results / stage).glob("*.h5")) == sorted(names + ["text"])
    spaces, attrs = read_projections(results / "projections" / f"{names[1]}.h5")
    provenance = attrs["provenance"]
    assert provenance["model"]["spec"] == "builtin:tiny" and len(provenance["model"]["fingerprint"]) == 64
    assert provenance["prompts"]["count"] == 10 and provenance["shards"] == ["shard_0000", "shard_0001", "shard_0002"]
    assert provenance["config"]["sampler_strategy"] == "DPM++ 2M Karras"
    assert {"torch", "diffusers", "nullcov"} <= set(provenance["packages"])
    assert provenance["projection"] == {"statistic": "second_moment", "nullspace_threshold": 0.02,
                                        "threshold_percent": None}
    assert attrs["step"]["name"] == names[1]
    assert len(spaces) == 14  # 7 cross-attention layers x (to_q, to_out)
    with h5py.File(results / "projections" / f"{names[1]}.h5") as handle:
        layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
        assert set(handle[layer]) == {"to_q", "to_out"}
        assert set(handle[layer]["to_q"]) == {"P", "eigenvalues", "null_dim", "threshold"}
    text, _ = read_projections(results / "projections" / "text.h5")
    assert list(text) == [TEXT_KEY]
    schedule = json.loads((results / "schedule.json").read_text())
    assert schedule["scheduler"]["class"] == "DPMSolverMultistepScheduler"
    assert schedule["scheduler"]["options"] == {"use_karras_sigmas": True}
    assert schedule["set_timesteps"] == {"num_inference_steps": 3}
    assert set(schedule["steps"][0]) == {"index", "name", "timestep", "alphas_cumprod", "sigma"}


def test_projections_are_null_spaces_of_the_merged_statistic(finished):
    name = _step_names(finished)[0]
    moments, _ = read_moments(finished / "results" / "covariance" / f"{name}.h5", "covariance")
    spaces, _ = read_projections(finished / "results" / "projections" / f"{name}.h5")
    for key, space in spaces.items():
        statistic = moments[key].second_moment()
        P = space.projection.astype(np.float64)
        assert space.null_dim == int((np.linalg.eigvalsh(statistic) < 0.02).sum())
        np.testing.assert_allclose(P @ P, P, atol=1e-5)
        assert np.linalg.norm(statistic @ P, 2) <= 0.02 * 1.001


def test_merged_moments_equal_the_sum_of_the_shards(finished):
    name = _step_names(finished)[2]
    merged, _ = read_moments(finished / "results" / "covariance" / f"{name}.h5", "covariance")
    shards = [read_moments(finished / "results" / "features" / f"shard_{s}" / f"{name}.h5", "features")[0]
              for s in ("0000", "0001", "0002")]
    for key, moment in merged.items():
        assert moment.count == sum(shard[key].count for shard in shards)
        total = sum(shard[key].sum_outer for shard in shards)  # moments about shifts: float64 noise only
        np.testing.assert_allclose(moment.sum_outer, total, rtol=0, atol=1e-12 * np.abs(total).max())


def test_nothing_to_do_after_a_full_run(finished):
    assert planned_jobs(finished) == []


def test_deleting_one_covariance_reruns_exactly_it_and_its_projection(run_copy):
    name = _step_names(run_copy)[1]
    (run_copy / "results" / "covariance" / f"{name}.h5").unlink()
    planned = planned_jobs(run_copy)
    jobs = [job for job in planned if job[0] != "all" and job[0] not in REPORT_RULES]
    assert sorted(jobs) == [("covariance", f"results/covariance/{name}.h5"),
                            ("projection", f"results/projections/{name}.h5")]
    assert {rule for rule, _ in planned} - {"all", "covariance", "projection"} == REPORT_RULES


def test_forcerun_one_projection(run_copy):
    names = _step_names(run_copy)
    paths = {n: run_copy / "results" / "projections" / f"{n}.h5" for n in names}
    before = {n: p.stat().st_mtime_ns for n, p in paths.items()}
    time.sleep(0.01)
    result = snakemake(run_copy, f"results/projections/{names[0]}.h5", "--forcerun", "projection")
    assert "1 of 1 steps" in result.stderr + result.stdout
    after = {n: p.stat().st_mtime_ns for n, p in paths.items()}
    assert after[names[0]] > before[names[0]]
    assert all(after[n] == before[n] for n in names[1:])


def test_changing_the_threshold_reruns_only_projections(run_copy):
    config = run_copy / "config.yaml"
    config.write_text(config.read_text().replace("nullspace_threshold: 0.02", "nullspace_threshold: 5.0"))
    rules = {rule for rule, _ in planned_jobs(run_copy)}
    assert rules == {"projection", "projection_text", "all"} | REPORT_RULES
    shard_files = (run_copy / "results" / "features").rglob
    features_before = sorted((p, p.stat().st_mtime_ns) for p in shard_files("*.h5"))
    snakemake(run_copy)
    assert sorted((p, p.stat().st_mtime_ns) for p in shard_files("*.h5")) == features_before
    spaces, attrs = read_projections(run_copy / "results" / "projections" / f"{_step_names(run_copy)[0]}.h5")
    assert attrs["provenance"]["projection"]["nullspace_threshold"] == 5.0
    assert all(space.threshold == 5.0 for space in spaces.values())


def test_appending_prompts_reruns_only_new_and_changed_shards(run_copy, demo_prompts):
    prompts_file = run_copy / "prompts.txt"
    prompts_file.write_text(prompts_file.read_text() + "\n".join(demo_prompts[10:13]) + "\n")
    jobs = planned_jobs(run_copy)
    features = sorted(output for rule, output in jobs if rule == "features")
    # 10 prompts in shards of 4: shard 2 held 2 and now holds 4; shard 3 is new.
    assert features == ["results/features/shard_0002", "results/features/shard_0003"]
    rules = sorted({rule for rule, _ in jobs})
    assert rules == sorted({"all", "covariance", "covariance_text", "features", "projection", "projection_text"}
                           | REPORT_RULES)


def test_merged_statistics_do_not_depend_on_shard_size(tmp_path, demo_prompts):
    merged = {}
    for per_shard in (1, 5, 6):
        workdir = tmp_path / f"per_shard_{per_shard}"
        write_config(workdir, demo_prompts[20:26], prompts_per_shard=per_shard, num_denoising_steps=2,
                     batch_size=3, sampler_strategy="Euler a")
        snakemake(workdir)
        merged[per_shard] = {
            path.stem: read_moments(path, "covariance")[0]
            for path in sorted((workdir / "results" / "covariance").glob("*.h5"))
        }
    reference = merged[6]
    for per_shard in (1, 5):
        assert sorted(merged[per_shard]) == sorted(reference)
        for name, groups in reference.items():
            for key, moment in groups.items():
                other = merged[per_shard][name][key]
                assert other.count == moment.count
                scale = np.abs(moment.sum_outer).max()
                np.testing.assert_allclose(other.sum_outer, moment.sum_outer, rtol=1e-6, atol=1e-6 * scale)


def test_the_layout_names_the_paths_the_rules_write():
    """nullcov.layout is where rules and readers get their paths: the documented layout, wildcards kept."""
    results = layout.Results(layout.ROOT)
    assert str(results.schedule) == "results/schedule.json"
    assert str(results.covariance("{name}")) == "results/covariance/{name}.h5"
    assert str(results.projection(layout.TEXT_NAME)) == "results/projections/text.h5"
    assert str(results.shard(3)) == str(results.shard("0003")) == "results/features/shard_0003"
    assert str(results.group(1)) == str(results.group("0001")) == "results/partial/group_0001"
    assert str(results.validation_features) == "results/validation/features"
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert family.split_key(family.statistic_key(layer, "to_q")) == (layer, "to_q")
    assert layout.step_name(layout.step_file(results.shard(0), "alpha_00_0999")) == "alpha_00_0999"


def test_proof_statistics_link_the_run_projections_made_at_their_setting(finished, tmp_path):
    """The fine-tune proof's planned files (nullcov.proof.plan.plan_proof, the rule's declared inputs):
    the run's own projections where they are made at the setting, made by the proof's projection rule
    (its function, here into tmp_path) for any other setting."""
    from pathlib import Path

    from nullcov.proof.plan import plan_proof
    from nullcov.statistics.jobs import projection_job

    results = layout.Results(finished / "results")
    names = [*_step_names(finished), layout.TEXT_NAME]
    config = yaml.safe_load((finished / "config.yaml").read_text()) | {
        "finetune_branches": [False], "finetune_statistics": ["second_moment"], "finetune_nullspace_thresholds": [],
        "finetune_threshold_percents": [50]}
    plan = plan_proof(config, results, names)
    same, other = plan.compared
    assert (same.key, other.key) == (("conditional", "second_moment", "0.02"), ("conditional", "second_moment", "p50"))
    made = {name: tmp_path / Path(other.file("projections", name)).relative_to(results.root) for name in names}
    for name in names:  # what rule proof_projection runs
        projection_job(other.file("covariance", name), made[name], other.statistic, other.nullspace_threshold,
                       other.threshold_percent)
    for name in names:
        assert Path(same.file("projections", name)).resolve() == results.projection(name).resolve()
        assert Path(same.file("covariance", name)).resolve() == Path(other.file("covariance", name)).resolve() \
            == results.covariance(name)
        assert not made[name].is_symlink()
        spaces, attrs = read_projections(made[name])
        assert attrs["provenance"]["projection"] == {"statistic": "second_moment", "nullspace_threshold": 0.0,
                                                     "threshold_percent": 50.0}
        assert spaces.keys() == read_projections(results.projection(name))[0].keys()
    assert ProjectionBank.from_files(other.schedule, other.covariance, made.values()).step_names == \
        ProjectionBank(results.root).step_names


def test_projection_bank(finished):
    bank = ProjectionBank(finished / "results")
    names = _step_names(finished)
    schedule = json.loads((finished / "results" / "schedule.json").read_text())["steps"]
    layer = "mid_block.attentions.0.transformer_blocks.0.attn2"
    stored, _ = read_projections(finished / "results" / "projections" / f"{names[1]}.h5")
    t1 = schedule[1]["timestep"]
    nearest = bank.get(layer, "to_q", t1 + 3)
    np.testing.assert_array_equal(nearest.numpy(), stored[f"{layer}/to_q"].projection)
    assert bank.get(layer, "q", t1 + 3) is nearest  # LRU cache hit
    exact = bank.get(layer, "to_q", t1, mode="interpolate")
    np.testing.assert_array_equal(exact.numpy(), stored[f"{layer}/to_q"].projection)
    middle = bank.get(layer, "to_out", (schedule[0]["timestep"] + t1) / 2, mode="interpolate").double().numpy()
    np.testing.assert_allclose(middle, middle.T, atol=1e-6)
    np.testing.assert_allclose(middle @ middle, middle, atol=1e-5)
    text, _ = read_projections(finished / "results" / "projections" / "text.h5")
    np.testing.assert_array_equal(bank.get(layer, "to_k").numpy(), text[TEXT_KEY].projection)
    assert bank.get("any", "v") is bank.get(layer, "k")
    with pytest.raises(ValueError, match="linear must be one of"):
        bank.get(layer, "to_x", 10)


def test_projection_bank_interpolation_equals_a_brute_force_mix(finished):
    """interpolate = null space of (1 - w) S_low + w S_high, S = sum_outer / count of the merged moments."""
    bank = ProjectionBank(finished / "results")
    schedule = json.loads((finished / "results" / "schedule.json").read_text())["steps"]
    low, high = sorted(schedule[:2], key=lambda step: step["timestep"])  # neighbours of t
    weight = 0.3
    timestep = low["timestep"] + weight * (high["timestep"] - low["timestep"])
    threshold = yaml.safe_load((finished / "config.yaml").read_text())["nullspace_threshold"]
    moments = {step["name"]: read_moments(finished / "results" / "covariance" / f"{step['name']}.h5", "covariance")[0]
               for step in (low, high)}
    null_dims = []
    for key in moments[low["name"]]:
        layer, linear = key.rsplit("/", 1)
        low_moment, high_moment = moments[low["name"]][key], moments[high["name"]][key]
        mixed = ((1 - weight) * low_moment.sum_outer / low_moment.count
                 + weight * high_moment.sum_outer / high_moment.count)
        eigenvalues, eigenvectors = np.linalg.eigh((mixed + mixed.T) / 2)
        null_basis = eigenvectors[:, eigenvalues < threshold]
        null_dims.append(null_basis.shape[1])
        expected = null_basis @ null_basis.T
        actual = bank.get(layer, linear, timestep, mode="interpolate").double().numpy()
        np.testing.assert_allclose(actual, expected, atol=1e-5, err_msg=key)
    assert 0 < max(null_dims)  # at least one non-trivial null space was compared


def test_dry_run_of_a_1000_step_schedule_is_fast_once_warm(tmp_path, demo_prompts):
    write_config(tmp_path, demo_prompts, sampler_strategy=None, num_denoising_steps=1000, prompts_per_shard=16)
    snakemake(tmp_path, "--dry-run", "--quiet")  # warms the schedule cache
    start = time.perf_counter()
    jobs = planned_jobs(tmp_path)
    elapsed = time.perf_counter() - start
    assert sum(rule == "projection" for rule, _ in jobs) == 1000
    assert sum(rule == "features" for rule, _ in jobs) == 3
    # measured ~4 s with full output on 2 quiet cores; 10.1 s with `make test`'s second pytest worker busy
    assert elapsed < 20, f"dry-run took {elapsed:.1f} s"


# -- what users type: `--config key=null` means null for every nullable key -----------------------
def test_uniform_sampler_strategy_on_the_command_line(tmp_path, demo_prompts):
    write_config(tmp_path, demo_prompts[:2], sampler_strategy="Euler")  # overridden below
    # num_denoising_steps=3: uniform = linspace(999, 0, 3) as ints, named timestep_{t:04d}
    expected = {f"results/projections/{name}.h5" for name in ("timestep_0999", "timestep_0499", "timestep_0000")}
    planned = {out for rule, out in planned_jobs(tmp_path, "--config", "sampler_strategy=uniform")}
    projections = {out for out in planned if out.startswith("results/projections/")}
    assert projections - {"results/projections/text.h5"} == expected


def test_null_on_the_command_line_means_null(tmp_path, demo_prompts):
    """`--config key=null` plans exactly what `key: null` in the config file plans (not the string)."""
    nullable = {"sampler_strategy": "Euler", "resolution": 64, "threshold_percent": 50,
                "validation_prompts": "config/prompts/validation.txt"}
    write_config(tmp_path, demo_prompts[:2], **dict.fromkeys(nullable))
    from_file = planned_jobs(tmp_path)
    assert not any(rule == "leakage" for rule, _ in from_file)  # validation_prompts: null = no validation
    assert any(out == "results/projections/timestep_0499.h5" for _, out in from_file)  # sampler_strategy: null
    write_config(tmp_path, demo_prompts[:2], **nullable)
    assert sorted(planned_jobs(tmp_path, "--config", *(f"{key}=null" for key in nullable))) == sorted(from_file)


def test_a_checkout_moved_with_its_results_plans_nothing(tmp_path):
    """The shipped model is named relative to the working directory like every other input: a finished
    run's checkout, moved elsewhere (as rsync to a cluster's scratch would), has nothing to do."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    checkout = tmp_path / "first" / "nullcov"
    checkout.mkdir(parents=True)
    for part in ("Snakefile", "rules", "scripts", "config", "report", "envs", "nullcov"):
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, checkout / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, checkout / part)
    prompts = read_prompts(REPO / "config/prompts/shapes-demo.txt")[:2]
    (checkout / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (checkout / "run.yaml").write_text(yaml.safe_dump({
        "model": "builtin:shapes", "prompts": "prompts.txt", "num_denoising_steps": 2, "device": "cpu",
        "validation_prompts": None, "attention_prompts": 0, "report_steps": 1,
    }))

    def run(folder, *args):
        command = [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "run.yaml", *args]
        env = {**os.environ, "PYTHONPATH": str(folder)}  # the copy's package, as a cluster job sees it
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout + result.stderr

    run(checkout)
    moved = tmp_path / "elsewhere" / "deeper" / "nullcov"
    moved.parent.mkdir(parents=True)
    shutil.move(checkout, moved)
    output = run(moved, "--dry-run")
    assert "Nothing to be done" in output, output
