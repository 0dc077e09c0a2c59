"""Leakage of projected updates: moments-only computation against brute force, and the math bound."""

from pathlib import Path

import numpy as np
import pytest
import torch
from test_report import RUN, VALIDATION_PROMPTS, report_run

from nullcov.models.model import cross_attention_modules, load_pipeline
from nullcov.models.sampling import COLLECTIONS, configure_scheduler
from nullcov.report.validation import (
    ValidationConfigError,
    leakage_of_key,
    random_update,
    read_table,
    read_validation_prompts,
)
from nullcov.statistics.moments import Moments
from nullcov.statistics.projection import null_space
from nullcov.statistics.store import read_moments, read_projections

from conftest import planned_jobs, snakemake, write_config


def _rows(seed, n, d=10, shift=0.0):
    """Rows with a spread spectrum (eigenvalues from ~1e-6 to ~1) and an optional mean."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(d, d)) * np.logspace(-3, 0, d)
    return rng.normal(size=(n, d)) @ mixing.T + shift


def _direct(update, P, X):
    """‖ΔW P Xᵀ‖_F / ‖ΔW Xᵀ‖_F from the raw rows."""
    return np.linalg.norm(update @ P @ X.T) / np.linalg.norm(update @ X.T)


@pytest.mark.parametrize("statistic", ["second_moment", "covariance"])
def test_leakage_from_moments_equals_the_direct_computation(statistic):
    train, valid = _rows(0, 400, shift=0.2), _rows(1, 60, shift=0.2)
    training, validation = Moments.of_rows(train), Moments.of_rows(valid)
    configured = null_space(training.statistic(statistic), 0.01)
    thresholds = [1e-9, 1e-3, 0.01, 0.1, 10.0]
    rows = leakage_of_key("layer/to_q", training, validation, statistic, thresholds, configured, updates=3,
                          seed=7)
    assert len(rows) == 3 * (len(thresholds) + 1)
    null_dims = set()
    for row in rows:
        update = random_update(7, "layer/to_q", row["draw"], 10, 10)
        exact = configured if row["configured"] else null_space(training.statistic(statistic), row["threshold"])
        P = exact.projection.astype(np.float64)
        assert row["null_dim"] == exact.null_dim and row["d"] == 10
        assert row["n_training"] == 400 and row["n_validation"] == 60
        assert row["leakage_validation"] == pytest.approx(_direct(update, P, valid), rel=1e-6, abs=1e-9)
        assert row["leakage_training"] == pytest.approx(_direct(update, P, train), rel=1e-6, abs=1e-9)
        null_dims.add(row["null_dim"])
    assert {0, 10} < null_dims  # the sweep covers an empty and a full null space (leakage 0 and 1)
    full = [row for row in rows if row["null_dim"] == 10]
    assert all(row["leakage_validation"] == pytest.approx(1.0) for row in full)
    assert all(row["leakage_validation"] == 0.0 for row in rows if row["null_dim"] == 0)


def test_training_leakage_is_bounded_by_the_threshold():
    """‖ΔW P Xᵀ‖² = n tr(ΔW P C P ΔWᵀ) ≤ n λ_max(P C P) ‖ΔW P‖² < n τ ‖ΔW P‖² (second_moment)."""
    train = _rows(2, 300)
    training = Moments.of_rows(train)
    C = training.second_moment()
    for threshold in (1e-4, 1e-3, 1e-2, 0.1):
        space = null_space(C, threshold)
        P = space.projection.astype(np.float64)
        largest = np.linalg.eigvalsh(P @ C @ P).max()
        assert largest < threshold
        for draw in range(3):
            update = random_update(0, "k", draw, 10, 10)
            leaked = np.linalg.norm(update @ P @ train.T) ** 2
            assert leaked <= 300 * largest * np.linalg.norm(update @ P) ** 2 * (1 + 1e-9)
            assert leaked < 300 * threshold * np.linalg.norm(update @ P) ** 2
    rows = leakage_of_key("k", training, Moments.of_rows(_rows(3, 50)), "second_moment", [1e-4, 1e-3, 1e-2, 0.1],
                          null_space(C, 0.02), updates=3, seed=0)
    for row in rows:
        update = random_update(0, "k", row["draw"], 10, 10)
        P = null_space(C, row["threshold"]).projection.astype(np.float64)
        bound = np.sqrt(300 * row["threshold"] * np.linalg.norm(update @ P) ** 2) / np.linalg.norm(update @ train.T)
        assert row["training_bound"] == pytest.approx(bound, rel=1e-6, abs=1e-12)
        assert row["leakage_training"] <= row["training_bound"] * (1 + 1e-9)


def test_covariance_bound_accounts_for_the_mean():
    """With a centred statistic the mean is unconstrained: the bound adds n ‖ΔW P μ‖²."""
    train = _rows(4, 300, shift=0.5)
    training = Moments.of_rows(train)
    rows = leakage_of_key("k", training, Moments.of_rows(_rows(5, 40, shift=0.5)), "covariance", [1e-3, 1e-2, 0.1],
                          null_space(training.covariance(), 0.02), updates=2, seed=1)
    mean = train.mean(axis=0)
    mean_matters = False
    for row in rows:
        update = random_update(1, "k", row["draw"], 10, 10)
        P = null_space(training.covariance(), row["threshold"]).projection.astype(np.float64)
        centred = 299 * row["threshold"] * np.linalg.norm(update @ P) ** 2
        squared = centred + 300 * np.linalg.norm(update @ P @ mean) ** 2
        total = np.linalg.norm(update @ train.T)
        assert row["training_bound"] == pytest.approx(np.sqrt(squared) / total, rel=1e-6)
        assert row["leakage_training"] <= row["training_bound"] * (1 + 1e-9)
        mean_matters |= row["leakage_training"] > np.sqrt(centred) / total
    assert mean_matters  # without the mean's term the bound would fail for some row


def test_updates_are_seeded_per_key_and_draw():
    a = random_update(0, "x/to_q", 0, 4, 6)
    assert a.shape == (4, 6)
    np.testing.assert_array_equal(a, random_update(0, "x/to_q", 0, 4, 6))
    assert not np.allclose(a, random_update(0, "x/to_q", 1, 4, 6))
    assert not np.allclose(a, random_update(0, "x/to_out", 0, 4, 6))
    assert not np.allclose(a, random_update(1, "x/to_q", 0, 4, 6))


def test_validation_prompts_must_be_unseen_with_their_own_seeds(tmp_path):
    path = tmp_path / "validation.txt"
    path.write_text("# comment\na red fox\na blue boat\n")
    assert read_validation_prompts(path, ["a cat", "a dog"], 2) == ["a red fox", "a blue boat"]
    with pytest.raises(ValidationConfigError, match="smaller than the number of training prompts"):
        read_validation_prompts(path, ["a cat", "a dog", "a cow"], 2)
    with pytest.raises(ValidationConfigError, match=r"disjoint.*validation prompt 1: 'a blue boat'"):
        read_validation_prompts(path, ["a blue boat"], 10)


def test_a_relative_validation_file_falls_back_to_the_workflow_folder(tmp_path, monkeypatch):
    from nullcov.report.validation import resolve_prompt_file

    (tmp_path / "workflow" / "config").mkdir(parents=True)
    (tmp_path / "workflow" / "config" / "v.txt").write_text("a kayak\n")
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    assert resolve_prompt_file("config/v.txt", tmp_path / "workflow") == tmp_path / "workflow" / "config" / "v.txt"
    (tmp_path / "run" / "config").mkdir()
    (tmp_path / "run" / "config" / "v.txt").write_text("a canoe\n")
    assert resolve_prompt_file("config/v.txt", tmp_path / "workflow") == Path("config/v.txt")  # the run's own first
    assert resolve_prompt_file("missing.txt", tmp_path / "workflow") == Path("missing.txt")  # reported as missing


def test_overlapping_validation_prompts_stop_the_workflow_before_any_job(finished, tmp_path, demo_prompts):
    import shutil

    shutil.copytree(finished / "resources" / "cache", tmp_path / "resources" / "cache")  # skip the schedule build
    (tmp_path / "validation.txt").write_text(demo_prompts[2] + "\n")
    write_config(tmp_path, demo_prompts[:8], **dict(RUN, validation_prompts=str(tmp_path / "validation.txt")))
    result = snakemake(tmp_path, "--dry-run", check=False)
    assert result.returncode != 0
    assert "must be disjoint from the training prompts" in result.stdout + result.stderr


# -- the workflow on the tiny model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory, demo_prompts):
    return report_run(tmp_path_factory, demo_prompts)


def _raw_inputs(pipe, schedule, prompts, first_index):
    """Brute force: every raw to_q / to_out input (conditional half) per step, from a pipeline run
    with the feature job's call and the generators seed + first_index + j."""
    captured, calls = {}, {"step": -1}
    handles = [pipe.unet.register_forward_pre_hook(lambda module, args: calls.update(step=calls["step"] + 1))]

    def keep(key):
        def hook(module, args):
            x = args[0][args[0].shape[0] // 2 :].double()  # CFG: [uncond, cond]
            captured.setdefault((calls["step"], key), []).append(x.reshape(-1, x.shape[-1]).numpy())

        return hook

    for name, module in cross_attention_modules(pipe.unet):
        handles.append(module.to_q.register_forward_pre_hook(keep(f"{name}/to_q")))
        handles.append(module.to_out[0].register_forward_pre_hook(keep(f"{name}/to_out")))
    generators = [torch.Generator("cpu").manual_seed(0 + first_index + j) for j in range(len(prompts))]
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    with torch.inference_mode():
        COLLECTIONS["trajectory"](pipe, prompts, generators, schedule, 7.5, resolution)
    for handle in handles:
        handle.remove()
    return {key: np.concatenate(parts) for key, parts in captured.items()}


def test_workflow_leakage_equals_a_direct_computation_on_the_tiny_model(finished, demo_prompts):
    """Numbers of results/validation/leakage.tsv against ΔW P Xᵀ computed from raw inputs.

    The validation inputs are recaptured with seeds seed + validation_seed_offset + j: a run
    with other seeds would give other inputs, and other numbers.
    """
    import json

    rows = read_table(finished / "results" / "validation" / "leakage.tsv")
    schedule = json.loads((finished / "results" / "schedule.json").read_text())
    steps = schedule["steps"]
    pipe = load_pipeline(finished / "resources" / "models" / "tiny-sd", "float32", "cpu")
    configure_scheduler(pipe, schedule)
    validation = _raw_inputs(pipe, schedule, VALIDATION_PROMPTS, RUN["validation_seed_offset"])
    training = _raw_inputs(pipe, schedule, demo_prompts[:8], 0)
    layer = "mid_block.attentions.0.transformer_blocks.0.attn2"
    checked = 0
    for step_index, step in enumerate(steps):
        merged, _ = read_moments(finished / "results" / "covariance" / f"{step['name']}.h5", "covariance")
        stored, _ = read_projections(finished / "results" / "projections" / f"{step['name']}.h5")
        for linear in ("to_q", "to_out"):
            key = f"{layer}/{linear}"
            X_val, X_train = validation[(step_index, key)], training[(step_index, key)]
            selected = [r for r in rows if r["step"] == step["name"] and r["layer"] == layer and r["linear"] == linear]
            assert len(selected) == RUN["validation_updates"] * (len(RUN["validation_thresholds"]) + 1)
            for row in selected:
                assert row["n_validation"] == X_val.shape[0] and row["n_training"] == X_train.shape[0]
                if row["configured"]:
                    P = stored[key].projection.astype(np.float64)
                else:
                    P = null_space(merged[key].second_moment(), row["threshold"]).projection.astype(np.float64)
                update = random_update(0, key, row["draw"], P.shape[0], P.shape[0])
                # float32 activations: compare squared ratios with a tolerance scaled to the matrix
                for column, X in (("leakage_validation", X_val), ("leakage_training", X_train)):
                    assert row[column] ** 2 == pytest.approx(_direct(update, P, X) ** 2, rel=1e-4, abs=2e-6), column
                checked += 1
    assert checked == len(steps) * 2 * RUN["validation_updates"] * (len(RUN["validation_thresholds"]) + 1)


def test_workflow_training_leakage_respects_the_bound(finished):
    rows = read_table(finished / "results" / "validation" / "leakage.tsv")
    steps = {r["step"] for r in rows}
    assert len(steps) == 4 and "text" in steps  # 3 steps and the text projection
    assert {r["linear"] for r in rows} == {"to_q", "to_out", "to_k/to_v"}
    for row in rows:
        assert row["leakage_training"] <= row["training_bound"] * (1 + 1e-6) + 1e-9, row
        assert 0.0 <= row["leakage_validation"] <= 1.0 + 1e-9
    configured = [r for r in rows if r["configured"]]
    assert {r["threshold"] for r in configured} == {0.02}
    larger = [r for r in rows if not r["configured"] and r["threshold"] == 1.0]
    smaller = [r for r in rows if not r["configured"] and r["threshold"] == 1e-4]
    assert np.mean([r["null_dim"] / r["d"] for r in larger]) > np.mean([r["null_dim"] / r["d"] for r in smaller])
    assert np.mean([r["leakage_validation"] for r in larger]) > np.mean([r["leakage_validation"] for r in smaller])


def test_validation_inputs_go_through_the_feature_job_with_offset_seeds(finished):
    moments, attrs = read_moments(finished / "results" / "validation" / "features" / "text.h5", "features")
    provenance = attrs["provenance"]
    assert provenance["prompts"]["first_index"] == RUN["validation_seed_offset"]
    assert provenance["prompts"]["prompts"] == VALIDATION_PROMPTS
    assert provenance["shard"] == "validation"
    assert next(iter(moments.values())).count == len(VALIDATION_PROMPTS) * 77


def test_a_new_validation_prompt_reruns_validation_only(finished, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir, symlinks=True)
    config = (workdir / "config.yaml").read_text().replace(str(finished), str(workdir))
    (workdir / "config.yaml").write_text(config)
    (workdir / "validation.txt").write_text("\n".join(VALIDATION_PROMPTS + ["a kayak on a river"]) + "\n")
    rules = {rule for rule, _ in planned_jobs(workdir)}
    assert rules == {"validation_inputs", "leakage", "validation_report", "run_summary", "all"}
