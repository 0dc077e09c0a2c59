"""The fine-tune proof, short: what must hold by construction (the measured outcome is in docs/finetune-proof.md)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nullcov.models.model import BUILTIN_SHAPES_DIR, load_pipeline
from nullcov.prompts import read_prompts
from nullcov.proof import data as proof_data
from nullcov.shapes import grammar as shapes

from conftest import REPO, base_config, planned_jobs, write_config

STATISTICS_PROMPTS = read_prompts(REPO / "config/prompts/shapes-demo.txt")[:8]


def build_results(root, model_dir, prompts, num_steps=3, model_spec="builtin:shapes"):
    """A results folder of the shipped model's statistics (schedule, covariance, projections), in process."""
    from nullcov.layout import Results
    from nullcov.models.model import cross_attention_layer_names, scheduler_config
    from nullcov.models.schedule import build_schedule, write_schedule
    from nullcov.proof.statistics import collect_statistics
    from nullcov.statistics.jobs import projection_job

    results = root / "results"
    schedule = write_schedule(results / "schedule.json",
                              build_schedule(scheduler_config(str(model_dir)), "DPM++ 2M Karras", num_steps),
                              cross_attention_layer_names(model_dir), model_spec)
    collect_statistics(Results(results), model_spec=model_spec, model_dir=str(model_dir), prompts=prompts,
                       schedule=schedule, config=base_config(num_denoising_steps=num_steps, batch_size=len(prompts)))
    for covariance in sorted((results / "covariance").glob("*.h5")):
        projection_job(covariance, results / "projections" / covariance.name, "second_moment", 0.02, None)
    return results


def proof_config(num_steps, **overrides) -> dict:
    """A validated workflow config of the proof: the schema's defaults, the statistics of
    :func:`build_results` (second_moment, 0.02), ``overrides`` (config keys)."""
    import yaml

    from nullcov.schema import SCHEMA, schema_defaults

    return (schema_defaults(yaml.safe_load(SCHEMA.read_text())) | base_config(num_denoising_steps=num_steps)
            | {"statistic": "second_moment", "nullspace_threshold": 0.02, "threshold_percent": None} | overrides)


def planned_proof(results, config: dict, model_dir, prompts, **settings):
    """The proof of ``config`` on ``results`` (:func:`nullcov.proof.plan.plan_proof`, as the Snakefile plans
    it), ``settings`` over its ProofSettings; every file it declares made (as its rules make them)."""
    from dataclasses import replace

    from nullcov.layout import TEXT_NAME, Results
    from nullcov.models.schedule import read_schedule
    from nullcov.proof.plan import plan_proof
    from nullcov.proof.statistics import make_planned_files

    schedule = read_schedule(Results(results).schedule)
    plan = plan_proof(config, Results(results), [step["name"] for step in schedule["steps"]] + [TEXT_NAME])
    plan = replace(plan, settings=replace(plan.settings, **settings))
    make_planned_files(plan, model_spec=config["model"], model_dir=str(model_dir), prompts=prompts,
                       schedule=schedule, config=config)
    return plan


@pytest.fixture(scope="module")
def proof_run(tmp_path_factory):
    """One projected variant (all timesteps, the run's own projections), its LoRA twin, projected-kv;
    the projected one repeated at a second seed and a second learning rate, and its random control;
    small caps (12 steps, checkpoints at 6 and 12)."""
    from nullcov.proof.job import finetune_proof_job

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("proof")
    results = build_results(root, BUILTIN_SHAPES_DIR, STATISTICS_PROMPTS)
    schedule = json.loads((results / "schedule.json").read_text())
    out = root / "finetune"
    config = proof_config(
        3, model="builtin:shapes", finetune_max_steps=12, finetune_eval_every=6, finetune_learning_rate=1e-3,
        finetune_lora_learning_rate=2e-3, finetune_lora_rank=4, finetune_scopes=["all-timesteps"],
        finetune_statistics=["second_moment"], finetune_branches=[False], finetune_nullspace_thresholds=[],
        finetune_threshold_percents=[], finetune_prior_preservation=False, finetune_text_only=True,
        finetune_seeds=2, finetune_repeated=[PROJECTED], finetune_grid_variants=[PROJECTED],
        finetune_learning_rate_grid=[3e-3],
        finetune_random_control=True)
    plan = planned_proof(results, config, BUILTIN_SHAPES_DIR, STATISTICS_PROMPTS, concept_seeds=1, instances=4)
    outputs = proof_outputs(out)
    rows = finetune_proof_job(model_dir=str(BUILTIN_SHAPES_DIR), plan=plan.to_dict(), schedule=schedule,
                              statistics_prompts=STATISTICS_PROMPTS, device=config["device"], outputs=outputs)
    return {"rows": rows, "out": out, "schedule": schedule, "settings": plan.settings, "results": results,
            "plan": plan}


PROJECTED = "projected-all-timesteps-0.02-second_moment-conditional"
RUNS = ["unconstrained", PROJECTED, "projected-kv", "custom-diffusion", "projected-lora", f"{PROJECTED}-seed1",
        f"{PROJECTED}-lr0.003",
        "random-all-timesteps-0.02-second_moment-conditional"]


def proof_outputs(out) -> dict:
    return {"table": out / "variants.tsv", "curves": out / "curves.tsv", "matched": out / "matched.tsv",
            "figure": out / "frontier.png", "grid": out / "grid.png", "grid_images": out / "grid.npz",
            "null_energy": out / "null_energy.tsv", "weights": out}


def test_projected_updates_stay_in_their_null_space(proof_run):
    from nullcov.proof.report import WEIGHTS_FILE, load_weights

    rows = {row["variant"]: row for row in proof_run["rows"]}
    assert list(rows) == RUNS
    assert np.isnan(rows["unconstrained"]["update_outside_null_space"])
    for name in RUNS[1:]:  # the random control: in its own random null spaces
        row = rows[name]
        assert row["weight_update_norm"] > 0, name
        assert row["update_outside_null_space"] <= 1e-5, name
    kv = load_weights(proof_run["out"] / "projected-kv" / WEIGHTS_FILE)
    base = load_pipeline(BUILTIN_SHAPES_DIR, "float32", "cpu").unet.state_dict()
    for key, weight in kv.items():  # to_q and to_out as the base model has them; to_k, to_v trained
        assert torch.equal(weight, base[key]) == (".to_q." in key or ".to_out." in key), key
    from nullcov.proof.experiment import (  # the measure sees an update it did not project
        Variant,
        merged_unet,
        update_columns,
    )

    unet = load_pipeline(BUILTIN_SHAPES_DIR, "float32", "cpu").unet
    key = next(k for k in kv if ".to_q." in k)
    noise = torch.randn(base[key].shape, generator=torch.Generator().manual_seed(0))
    moved = merged_unet(unet, {key: base[key] + 1e-3 * noise})
    check = Variant("check", "projected", "all-timesteps", setting=proof_run["plan"].setting(proof_run["plan"].own))
    columns = update_columns(unet, moved, check, proof_run["schedule"], proof_run["settings"])
    assert columns["update_outside_null_space"] > 0.5, columns
    lora = rows["projected-lora"]
    assert (lora["scope"], lora["threshold"], lora["statistic"], lora["branches"]) == \
        ("all-timesteps", "0.02", "second_moment", "conditional")  # the only projected setting was the best


def test_rows_report_every_column_and_the_table_reads_back(proof_run):
    import csv

    from nullcov.proof.report import COLUMNS

    with open(proof_run["out"] / "variants.tsv", newline="") as handle:
        table = list(csv.DictReader(handle, delimiter="\t"))
    assert [row["variant"] for row in table] == [row["variant"] for row in proof_run["rows"]]
    assert list(table[0]) == list(COLUMNS)
    for row in proof_run["rows"]:
        assert 0 <= row["concept_fidelity"] <= 1 and row["reached_target"] in ("yes", "no")
        assert row["steps"] <= 12 and row["seconds"] > 0
        for group in ("all", *proof_data.GROUPS):
            assert row[f"pixel_change_{group}"] >= 0 and row[f"attn2_change_{group}"] >= 0, group
        for attribute in ("colour", "shape", "position"):
            assert 0 <= row[f"accuracy_before_{attribute}"] <= 1
    assert (proof_run["out"] / "frontier.png").stat().st_size > 10_000
    assert (proof_run["out"] / "grid.png").stat().st_size > 10_000


def test_null_energy_table_equals_a_direct_computation_on_the_text_side(proof_run):
    """``null_energy.tsv`` has a row per setting, scope, group, CFG half and kind; its ``to_kv`` shares
    (the text encoder's states, the same at every timestep and seed) equal ``‖X P‖² / ‖X‖²``
    computed directly from each group's captions and the run's text projection."""
    import csv

    from nullcov.proof.energy import COLUMNS, GROUPS, PARTS, group_captions
    from nullcov.proof.experiment import ProofSettings, text_states
    from nullcov.proof.null_energy import ENERGY_KINDS
    from nullcov.training.bank import ProjectionBank

    with open(proof_run["out"] / "null_energy.tsv", newline="") as handle:
        table = list(csv.DictReader(handle, delimiter="\t"))
    assert list(table[0]) == list(COLUMNS)
    assert len(table) == 1 * 1 * len(GROUPS) * len(PARTS) * len(ENERGY_KINDS)  # one setting, one scope
    assert {(row["branches"], row["statistic"], row["threshold"], row["scope"]) for row in table} == {
        ("conditional", "second_moment", "0.02", "all-timesteps")}
    assert all(0 <= float(row["null_share"]) <= 1 and float(row["energy"]) > 0 for row in table)
    pipe = load_pipeline(BUILTIN_SHAPES_DIR, "float32", "cpu")
    projection = ProjectionBank(proof_run["results"]).text_factor.dense().double()
    preserved = proof_data.preserved_scenes(STATISTICS_PROMPTS)
    captions = group_captions(preserved, ProofSettings(concept_seeds=proof_run["settings"].concept_seeds))
    assert list(captions) == list(GROUPS)  # the statistics' prompts include preserved ones, and others do not
    for group, part in [(group, "conditional") for group in GROUPS] + [("concept", "unconditional")]:
        states = text_states(pipe, captions[group] if part == "conditional" else [""]).double().reshape(-1, 64)
        expected = float((states @ projection).square().sum() / states.square().sum())
        row = next(r for r in table if r["group"] == group and r["part"] == part and r["kind"] == "to_kv")
        assert float(row["null_share"]) == pytest.approx(expected, rel=1e-4), (group, part)


def test_saved_weights_regenerate_the_grid_bit_for_bit(proof_run):
    from nullcov.models.model import cross_attention_layer_names
    from nullcov.models.sampling import configure_scheduler
    from nullcov.proof.job import grid_captions, sample_grid
    from nullcov.proof.report import WEIGHTS_FILE, load_weights

    grid = np.load(proof_run["out"] / "grid.npz")
    assert list(grid["captions"]) == grid_captions()
    pipe = load_pipeline(BUILTIN_SHAPES_DIR, "float32", "cpu")
    configure_scheduler(pipe, proof_run["schedule"])
    base = sample_grid(pipe, proof_run["schedule"], proof_run["settings"])
    assert np.array_equal(base, grid["base"])
    for name in ("projected-all-timesteps-0.02-second_moment-conditional", "projected-lora"):
        weights = load_weights(proof_run["out"] / name / WEIGHTS_FILE)
        layers = len(cross_attention_layer_names(BUILTIN_SHAPES_DIR))
        assert all(".attn2.to_" in key for key in weights) and len(weights) == 4 * layers
        fresh = load_pipeline(BUILTIN_SHAPES_DIR, "float32", "cpu")
        configure_scheduler(fresh, proof_run["schedule"])
        fresh.unet.load_state_dict(weights, strict=False)
        assert np.array_equal(sample_grid(fresh, proof_run["schedule"], proof_run["settings"]), grid[name]), name
        assert not np.array_equal(grid[name], grid["base"]), name


def test_custom_diffusion_changes_only_the_identifiers_text_states_and_its_files_regenerate_its_images(proof_run):
    """Its trained identifier row, written into a fresh text encoder with its attn2 weights, draws its grid row
    bit for bit; under it, a prompt without the identifier has the base model's text states exactly."""
    from nullcov.models.sampling import configure_scheduler
    from nullcov.proof.experiment import IDENTIFIER_ATTRIBUTE, identifier_embedding, identifier_token_id
    from nullcov.proof.job import sample_grid
    from nullcov.proof.report import IDENTIFIER_FILE, WEIGHTS_FILE, load_weights

    folder = proof_run["out"] / "custom-diffusion"
    identifier, weights = load_weights(folder / IDENTIFIER_FILE), load_weights(folder / WEIGHTS_FILE)
    assert (folder / "step_0006" / IDENTIFIER_FILE).is_file()
    fresh = load_pipeline(BUILTIN_SHAPES_DIR, "float32", "cpu")
    token_id = identifier_token_id(fresh)
    assert int(identifier["token_id"][0]) == token_id
    row = fresh.text_encoder.get_input_embeddings().weight[token_id].detach().clone()
    assert not torch.equal(identifier["embedding"], row)  # trained
    plain, concept = "a red circle on the left", "a red sks on the left"
    from nullcov.proof.experiment import text_states

    before = text_states(fresh, [plain, concept])
    carrier = torch.nn.Module()
    setattr(carrier, IDENTIFIER_ATTRIBUTE, (token_id, identifier["embedding"] - row))
    with identifier_embedding(fresh, carrier):
        after = text_states(fresh, [plain, concept])
    assert torch.equal(after[0], before[0]) and not torch.equal(after[1], before[1])
    with torch.no_grad():
        fresh.text_encoder.get_input_embeddings().weight[token_id] = identifier["embedding"]
    fresh.unet.load_state_dict(weights, strict=False)
    configure_scheduler(fresh, proof_run["schedule"])
    grid = np.load(proof_run["out"] / "grid.npz")
    assert np.array_equal(sample_grid(fresh, proof_run["schedule"], proof_run["settings"]), grid["custom-diffusion"])


def test_training_timesteps_put_the_asked_share_of_batches_at_high_noise():
    from nullcov.proof.experiment import ProofSettings, batch_timestep

    def draw(fraction, count=2000):
        generator = torch.Generator().manual_seed(0)
        return np.array([batch_timestep(ProofSettings(high_noise_fraction=fraction), 1000, generator)
                         for _ in range(count)])

    uniform, half = draw(0.0), draw(0.5)
    assert uniform.min() >= 0 and uniform.max() < 1000 and abs((uniform >= 600).mean() - 0.4) < 0.04
    assert half.max() < 1000 and abs((half >= 600).mean() - (0.5 + 0.5 * 0.4)) < 0.04
    assert np.array_equal(draw(0.5, 50), draw(0.5, 50))  # seeded: every variant gets the same timesteps


NOT_REPEATED = {"finetune_repeated": [], "finetune_grid_variants": [], "finetune_seeds": 1,
                "finetune_custom_diffusion": False, "finetune_learning_rate_grid": [],
                "finetune_random_control": False, "finetune_learning_rate": 1e-3}


def test_repeated_variants_run_at_every_seed_and_rate_with_a_random_control_and_unknown_names_are_refused():
    from nullcov.workflow.config import finetune_variant_names

    config = {"nullspace_threshold": 0.02, "threshold_percent": None, "finetune_nullspace_thresholds": [],
              "finetune_threshold_percents": [], "unconditional_branch": False, "finetune_branches": [False],
              "finetune_statistics": ["second_moment"], "finetune_scopes": ["all-timesteps"],
              "finetune_prior_preservation": True, "finetune_lora_rank": 4, "finetune_text_only": True,
              "finetune_seeds": 3, "finetune_learning_rate": 1e-3, "finetune_learning_rate_grid": [3e-4, 1e-3],
              "finetune_random_control": True, "finetune_custom_diffusion": True,
              "finetune_repeated": ["unconstrained", PROJECTED, "projected-kv", "custom-diffusion"],
              "finetune_grid_variants": ["unconstrained", PROJECTED]}
    assert finetune_variant_names(config) == [
        "unconstrained", "prior-preservation", PROJECTED, "projected-kv", "custom-diffusion", "projected-lora",
        "unconstrained-seed1", "unconstrained-seed2", f"{PROJECTED}-seed1", f"{PROJECTED}-seed2",
        "projected-kv-seed1", "projected-kv-seed2", "custom-diffusion-seed1", "custom-diffusion-seed2",
        "unconstrained-lr0.0003", f"{PROJECTED}-lr0.0003",  # 1e-3 is the run's own
        "random-all-timesteps-0.02-second_moment-conditional", "random-kv", "random-custom-diffusion"]
    from nullcov.proof.plan import compared_projection_settings, plan_variants

    runs = {run.name: run for run in plan_variants(config, compared_projection_settings(config))}
    assert (runs[f"{PROJECTED}-seed2"].seed_index, runs[f"{PROJECTED}-seed2"].variant) == (2, PROJECTED)
    assert runs["unconstrained-lr0.0003"].learning_rate == 3e-4 and runs["unconstrained"].learning_rate is None
    assert runs["random-kv"].kind == "random-projected-kv" and runs["random-kv"].setting == runs["projected-kv"].setting
    assert runs["random-custom-diffusion"].kind == "random-custom-diffusion"
    with pytest.raises(ValueError, match=r"finetune_repeated: \['projected-lora'\] are not variants"):
        finetune_variant_names(config | {"finetune_repeated": ["projected-lora"]})
    with pytest.raises(ValueError, match=r"finetune_grid_variants: \['unconstrained-seed1'\] are not variants"):
        finetune_variant_names(config | {"finetune_grid_variants": ["unconstrained-seed1"]})


def test_matched_fidelity_interpolates_at_the_first_crossing_and_finds_the_best_preserving_checkpoint():
    from nullcov.proof.curves import BEST_MEASURE, matched_rows

    def curve(run, points, rate=1e-3, variant="v"):
        return [{"run": run, "variant": variant, "kind": "projected", "learning_rate": rate, "step": 10 * i,
                 "concept_fidelity": f, "accuracy_drop_points": d, "pixel_change": p}
                for i, (f, d, p) in enumerate(points)]

    first = curve("v", [(0.1, 0.0, 0.0), (0.3, 0.0, 0.01), (0.5, 2.0, 0.03), (0.3, 0.0, 0.02), (0.9, 8.0, 0.05)])
    second = curve("v-seed1", [(0.1, 0.0, 0.0), (0.45, 1.0, 0.02), (0.7, 4.0, 0.04)])
    other_rate = curve("v-lr0.01", [(0.1, 0.0, 0.0), (0.85, 30.0, 0.2)], rate=1e-2)
    rows = matched_rows(first + second + other_rate, levels=(0.4, 0.6, 0.8))
    by = {(row["learning_rate"], row["measure"], row["level"]): row for row in rows if row["measure"] != BEST_MEASURE}
    at_40 = by[(1e-3, "at_fidelity", 0.4)]
    # first: between 0.3 (drop 0) and 0.5 (drop 2) -> 1.0; second: between 0.1 (0) and 0.45 (1) -> 6/7
    assert at_40["runs"] == 2 and at_40["reached_runs"] == 2
    assert at_40["accuracy_drop_points_mean"] == pytest.approx((1.0 + 0.3 / 0.35) / 2)
    assert at_40["accuracy_drop_points_min"] == pytest.approx(0.3 / 0.35)
    assert at_40["step_max"] == pytest.approx(15.0)
    at_80 = by[(1e-3, "at_fidelity", 0.8)]  # only the first run gets there: from 0.3 (step 30) to 0.9 (step 40)
    assert at_80["reached_runs"] == 1 and at_80["accuracy_drop_points_mean"] == pytest.approx(0.0 + 5 / 6 * 8.0)
    assert by[(1e-2, "at_fidelity", 0.4)]["runs"] == 1  # another learning rate is another group
    best = {row["learning_rate"]: row for row in rows if row["measure"] == BEST_MEASURE}
    assert best[1e-3]["concept_fidelity_max"] == 0.45 and best[1e-3]["concept_fidelity_min"] == 0.3
    assert best[1e-2]["concept_fidelity_mean"] == 0.1  # only the base model's point preserved


def test_random_control_projections_have_the_real_ones_rank_and_are_seeded(proof_run):
    from nullcov.proof.controls import RandomSubspaces
    from nullcov.training.bank import ProjectionBank

    bank = ProjectionBank(proof_run["results"])
    timestep = bank.timesteps[0]
    control, again = RandomSubspaces(bank, seed=5), RandomSubspaces(bank, seed=5)
    for key, real in bank.factors([timestep]).items():
        random = control.factors([timestep])[key]
        dense = random.dense().double()
        assert random.null_dim == real.null_dim and random.dim == real.dim
        assert torch.allclose(dense @ dense, dense, atol=1e-5) and round(float(dense.trace())) == real.null_dim
        assert torch.equal(again.factors([timestep])[key].matrix, random.matrix)
        if 0 < real.null_dim < real.dim:
            assert not torch.allclose(dense, real.dense().double(), atol=1e-2), key
    assert not torch.equal(RandomSubspaces(bank, seed=6).text_factor.matrix, control.text_factor.matrix)


def test_every_run_has_a_curve_from_the_base_model_and_weights_at_every_checkpoint(proof_run):
    import csv

    from nullcov.proof.curves import CURVE_COLUMNS
    from nullcov.proof.report import WEIGHTS_FILE, load_weights

    with open(proof_run["out"] / "curves.tsv", newline="") as handle:
        curves = list(csv.DictReader(handle, delimiter="\t"))
    assert list(curves[0]) == list(CURVE_COLUMNS)
    rows = {row["variant"]: row for row in proof_run["rows"]}
    for run in RUNS:
        points = [point for point in curves if point["run"] == run]
        steps = [int(point["step"]) for point in points]
        assert steps == [0, *range(6, rows[run]["steps"] + 1, 6)], run
        assert float(points[0]["accuracy_drop_points"]) == 0 and float(points[0]["pixel_change"]) == 0
        assert float(points[-1]["concept_fidelity"]) == pytest.approx(rows[run]["concept_fidelity"])
        final = load_weights(proof_run["out"] / run / WEIGHTS_FILE)
        last = load_weights(proof_run["out"] / run / f"step_{steps[-1]:04d}" / WEIGHTS_FILE)
        assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final), run
    assert {point["seed"] for point in curves if point["variant"] == PROJECTED} == {"0", "1"}
    assert rows[f"{PROJECTED}-lr0.003"]["learning_rate"] == 3e-3 and rows[PROJECTED]["learning_rate"] == 1e-3
    seed0, seed1 = (load_weights(proof_run["out"] / run / WEIGHTS_FILE) for run in (PROJECTED, f"{PROJECTED}-seed1"))
    assert any(not torch.equal(seed0[key], seed1[key]) for key in seed0)  # another data order and noise


def test_thresholds_compared_are_the_runs_own_then_each_other_one_once():
    from nullcov.proof.plan import threshold_settings
    from nullcov.workflow.config import finetune_variant_names

    config = {"nullspace_threshold": 0.02, "threshold_percent": None, "finetune_nullspace_thresholds": [0.1, 0.02],
              "finetune_threshold_percents": [50], "unconditional_branch": False}
    assert threshold_settings(config) == [(0.02, None), (0.1, None), (0.0, 50.0)]
    from nullcov.proof.plan import own_setting  # what projected-kv uses: the run's branches, first statistic

    assert own_setting(config | {"unconditional_branch": True}, ["covariance", "second_moment"],
                       threshold_settings(config)) == ("both", "covariance", "0.02")
    config |= {"finetune_branches": [False], "finetune_statistics": ["second_moment"], "finetune_scopes":
               ["per-timestep"], "finetune_prior_preservation": False, "finetune_lora_rank": 0,
               "finetune_text_only": True} | NOT_REPEATED
    assert finetune_variant_names(config) == [
        "unconstrained", *(f"projected-per-timestep-{t}-second_moment-conditional" for t in ("0.02", "0.1", "p50")),
        "projected-kv"]


def test_each_knob_is_compared_against_the_runs_own_setting():
    """The projected variants: the run's own setting, then each other CFG-branch setting, statistic and
    threshold with the other two knobs at the run's own (not every combination)."""
    from nullcov.proof.plan import compared_settings, threshold_settings
    from nullcov.workflow.config import finetune_variant_names

    config = {"nullspace_threshold": 0.02, "threshold_percent": None, "finetune_nullspace_thresholds": [0.1],
              "finetune_threshold_percents": [50], "unconditional_branch": False,
              "finetune_branches": [False, True], "finetune_statistics": ["second_moment", "covariance"],
              "finetune_scopes": ["per-timestep", "all-timesteps"], "finetune_prior_preservation": True,
              "finetune_lora_rank": 4, "finetune_text_only": True} | NOT_REPEATED
    own = ("conditional", "second_moment", "0.02")
    assert compared_settings(own, [False, True], ["second_moment", "covariance"], threshold_settings(config)) == [
        own, ("both", "second_moment", "0.02"), ("conditional", "covariance", "0.02"),
        ("conditional", "second_moment", "0.1"), ("conditional", "second_moment", "p50")]
    names = finetune_variant_names(config)
    assert len(names) == 2 + 5 * 2 + 2 and len(set(names)) == len(names)
    assert names[:3] == ["unconstrained", "prior-preservation",
                         "projected-per-timestep-0.02-second_moment-conditional"]
    assert "projected-all-timesteps-0.02-covariance-conditional" in names
    assert "projected-all-timesteps-0.1-second_moment-both" not in names  # two knobs off the run's own
    assert names[-2:] == ["projected-kv", "projected-lora"]


def test_lora_adapters_start_from_the_seed_whatever_ran_before():
    from nullcov.proof.experiment import ProofSettings, Variant, trainable_unet

    base = load_pipeline(BUILTIN_SHAPES_DIR, "float32", "cpu").unet
    variant = Variant("projected-lora", "projected-lora")

    def adapters(global_seed, seed=0):
        torch.manual_seed(global_seed)
        unet = trainable_unet(base, variant.kind, ProofSettings(seed=seed))
        return [p.detach().clone() for name, p in unet.named_parameters() if "lora_A" in name]

    first = adapters(1)
    assert first and all(torch.equal(a, b) for a, b in zip(first, adapters(2), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, adapters(1, seed=5), strict=True))


def test_lora_repeats_the_projected_setting_closest_to_the_goal():
    """Preservation first (accuracy drop <= 1 point), then reaching the target with the least pixel
    change, then concept fidelity; without any preserving variant, the same over all of them."""
    from nullcov.proof.experiment import best_projected

    def row(name, drop, reached, pixels, fidelity, kind="projected"):
        return {"variant": name, "kind": kind, "accuracy_drop_points_all": drop, "reached_target": reached,
                "pixel_change_all": pixels, "concept_fidelity": fidelity, "steps": 200}

    leaky = row("leaky", 25.0, "yes", 0.04, 0.84)
    rows = [row("unconstrained", 27.0, "yes", 0.05, 0.81, kind="unconstrained"), leaky,
            row("slow", -1.4, "no", 0.018, 0.50), row("slower", -2.1, "no", 0.020, 0.34)]
    assert best_projected(rows)["variant"] == "slow"
    assert best_projected(rows + [row("good", 0.5, "yes", 0.03, 0.81)])["variant"] == "good"
    assert best_projected([leaky, row("leakier", 30.0, "no", 0.05, 0.9)])["variant"] == "leaky"
    assert best_projected([row("a", float("nan"), "-", 0.01, float("nan")),
                           row("b", float("nan"), "-", 0.02, float("nan"))])["variant"] == "a"  # no evaluator


def test_concept_and_preserved_prompts():
    instances = proof_data.instance_scenes(8)
    assert {s.colour for s in instances} == set(shapes.COLOURS)
    assert {s.position for s in instances} == set(shapes.POSITIONS)
    assert proof_data.CONCEPT_SHAPE in shapes.UNSEEN_SHAPES
    assert all(s.shape == proof_data.CONCEPT_SHAPE for s in instances)
    assert proof_data.concept_caption(instances[0]) == "a red sks on the left"
    preserved = proof_data.preserved_scenes(STATISTICS_PROMPTS)
    assert len(preserved) == 144 and all(p.scene.shape in shapes.SHAPES for p in preserved)
    assert sum(p.in_statistics for p in preserved) == sum(
        caption in {p.caption for p in preserved} for caption in STATISTICS_PROMPTS)
    assert {p.caption for p in preserved}.isdisjoint(proof_data.concept_caption(s) for s in instances)


def test_the_rule_plans_every_variant_and_refuses_what_it_cannot_constrain(tmp_path):
    from conftest import snakemake

    prompts = STATISTICS_PROMPTS[:4]
    write_config(tmp_path, prompts, model="builtin:shapes", finetune_proof=True)
    jobs = planned_jobs(tmp_path)
    assert ("finetune_proof", "results/report/finetune/variants.tsv") in jobs
    write_config(tmp_path, prompts, model="builtin:shapes", finetune_proof=True,
                 collect_features={"q": True, "k": True, "v": True, "out": False})
    refused = snakemake(tmp_path, "--dry-run", check=False)
    assert refused.returncode != 0 and "finetune_proof constrains every attn2 linear" in refused.stderr + refused.stdout
    write_config(tmp_path, prompts, model="builtin:shapes", finetune_proof=True, guidance_scale=1.0,
                 finetune_branches=[False, True])
    refused = snakemake(tmp_path, "--dry-run", check=False)
    assert "finetune_branches includes true" in refused.stderr + refused.stdout


def test_the_plan_round_trips_through_its_dict_form_and_names_its_files():
    """One plan (the Snakefile's FINETUNE_PLAN, the job's param): through plain data (JSON) and back
    unchanged; the run's own setting stated explicitly; each setting's files the run's or the proof's."""
    from nullcov.layout import Results
    from nullcov.proof.plan import ProofPlan, plan_proof
    from nullcov.workflow.config import finetune_variant_names

    config = proof_config(10, model="builtin:shapes", finetune_branches=[False, True], finetune_threshold_percents=[50])
    names = ["alpha_00_0999", "alpha_01_0500", "text"]
    plan = plan_proof(config, Results("results"), names)
    data = json.loads(json.dumps(plan.to_dict()))
    assert ProofPlan.from_dict(data) == plan and ProofPlan.from_dict(data).to_dict() == data
    assert plan.names == finetune_variant_names(config)
    assert plan.settings.max_steps == config["finetune_max_steps"] and plan.settings.evaluate
    assert plan.own == ("conditional", "second_moment", "0.02") == plan.compared[0].key
    kv = next(variant for variant in plan.variants if variant.kind == "projected-kv")
    assert kv.setting is plan.setting(plan.own) and kv.scope == "per-timestep"
    lora = next(variant for variant in plan.variants if variant.kind == "projected-lora")
    assert lora.setting is None and not lora.projected  # chosen once the projected variants have run
    own, both = plan.setting(plan.own), plan.setting(("both", "second_moment", "0.02"))
    assert own.projections == tuple(f"results/projections/{name}.h5" for name in names)
    assert own.covariance == tuple(f"results/covariance/{name}.h5" for name in names)
    assert both.covariance == tuple(f"results/proof/statistics/both/covariance/{name}.h5" for name in names)
    assert both.projections == tuple(f"results/proof/projections/both/second_moment/0.02/{name}.h5" for name in names)
    p50 = plan.setting(("conditional", "second_moment", "p50"))
    assert (p50.nullspace_threshold, p50.threshold_percent, p50.covariance) == (0.0, 50.0, own.covariance)
    assert p50.projections[0] == "results/proof/projections/conditional/second_moment/p50/alpha_00_0999.h5"
    assert plan.files("covariance") == [*own.covariance, *both.covariance]


def test_the_rule_runs_the_plan_the_snakefile_planned(tmp_path):
    """A dry run with finetune_proof on: the finetune_proof job gets the plan as one param, declares
    its files as inputs and one weights file per planned variant; the proof's statistics rules make
    the files the run does not (the other CFG-branch setting's, the other settings' projections)."""
    import subprocess
    import sys

    import yaml

    from nullcov.proof.plan import ProofPlan
    from nullcov.workflow.config import finetune_variant_names

    config = write_config(tmp_path, STATISTICS_PROMPTS[:4], model="builtin:shapes", finetune_proof=True,
                          finetune_branches=[False, True], finetune_threshold_percents=[50])
    subprocess.run([sys.executable, str(REPO / "tools" / "dag_dump.py"), str(tmp_path / "dag.json"), "--snakefile",
                    str(REPO / "Snakefile"), "--configfile", str(config)], cwd=tmp_path, check=True,
                   capture_output=True, text=True)
    jobs = json.loads((tmp_path / "dag.json").read_text())
    proof_job = next(job for job in jobs if job["rule"] == "finetune_proof")
    plan = ProofPlan.from_dict(proof_job["params"]["plan"])
    assert not {"settings", "variants", "config"} & set(proof_job["params"])  # one plan, not several params
    assert plan.names == finetune_variant_names(yaml.safe_load(config.read_text()))
    files = {path.name for path in proof_outputs(Path("results/report/finetune")).values()}
    weights = sorted(path for path in proof_job["output"] if Path(path).name not in files)  # a directory() per run
    assert weights == sorted(f"results/report/finetune/{name}" for name in plan.names)
    declared = set(plan.files("covariance") + plan.files("projections"))
    assert declared == {path for path in proof_job["input"] if path.endswith(".h5")}
    made = {path: job["rule"] for job in jobs for path in job["output"]}
    assert {made[path] for path in declared} == {"covariance", "covariance_text", "projection", "projection_text",
                                                 "proof_covariance", "proof_covariance_text", "proof_projection",
                                                 "proof_projection_text"}
    features = [job for job in jobs if job["rule"] == "proof_features"]
    assert [job["wildcards"] for job in features] == [{"branches": "both"}]
    assert features[0]["params"]["config"]["unconditional_branch"] is True
    assert features[0]["params"]["prompts"] == STATISTICS_PROMPTS[:4] and features[0]["params"]["first_index"] == 0
    p50 = next(job for job in jobs if job["rule"] == "proof_projection" and job["wildcards"]["threshold"] == "p50")
    assert p50["input"] == [f"results/covariance/{p50['wildcards']['name']}.h5"]
    assert (p50["params"]["nullspace_threshold"], p50["params"]["threshold_percent"]) == (0.0, 50.0)


def test_on_a_model_without_an_evaluator_every_variant_trains_fixed_steps(tmp_path, tiny_model_dir, caplog):
    """Any other model (here the random tiny one): no evaluator, so fixed steps, NaN fidelity and
    accuracy, the drift and the grid still measured; prior preservation draws its class images."""
    import logging

    from nullcov.proof.job import finetune_proof_job

    results = build_results(tmp_path, tiny_model_dir, STATISTICS_PROMPTS[:4], num_steps=2, model_spec="builtin:tiny")
    schedule = json.loads((results / "schedule.json").read_text())
    out = tmp_path / "finetune"
    outputs = proof_outputs(out)
    config = proof_config(
        2, model="builtin:tiny", finetune_steps=3, finetune_learning_rate=1e-3, finetune_scopes=["per-timestep"],
        finetune_statistics=["covariance"], finetune_branches=[False], finetune_nullspace_thresholds=[],
        finetune_threshold_percents=[50], finetune_prior_preservation=True, finetune_lora_rank=0,
        finetune_text_only=False, finetune_repeated=[], finetune_grid_variants=[], finetune_custom_diffusion=False)
    plan = planned_proof(results, config, tiny_model_dir, STATISTICS_PROMPTS[:4], class_images=4, concept_seeds=1,
                         instances=2)
    with caplog.at_level(logging.WARNING, logger="nullcov.proof.job"):
        rows = finetune_proof_job(model_dir=str(tiny_model_dir), plan=plan, schedule=schedule,
                                  statistics_prompts=STATISTICS_PROMPTS[:4], device=config["device"], outputs=outputs)
    assert "no evaluator reads its images" in caplog.text
    assert [row["variant"] for row in rows] == ["unconstrained", "prior-preservation",
                                                "projected-per-timestep-0.02-covariance-conditional",
                                                "projected-per-timestep-p50-covariance-conditional"]
    for row in rows:
        assert row["steps"] == 3 and np.isnan(row["concept_fidelity"]) and row["reached_target"] == "-"
        assert np.isnan(row["accuracy_drop_points_all"]) and row["pixel_change_all"] > 0
    assert rows[1]["seconds"] > 0 and all(row["update_outside_null_space"] <= 1e-5 for row in rows[2:])
    assert (out / "prior-preservation" / "unet_attn2.safetensors").is_file()
    energy = (out / "null_energy.tsv").read_text().splitlines()  # measured without an evaluator too
    assert len(energy) == 1 + 2 * 3 * 2 * 3  # header; 2 settings x 3 groups x 2 CFG halves x 3 kinds
