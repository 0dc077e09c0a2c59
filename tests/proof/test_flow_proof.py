"""The fine-tune proof's mechanics on the tiny SD3 and FLUX transformers (nullcov.proof.flow): no evaluator,
so losses, updates and the constraint only; the constraint checked against the projection files (h5)."""

import json

import numpy as np
import pytest
import torch

from nullcov.layout import FINETUNE_TRANSFORMER_WEIGHTS, TEXT_NAME, Results
from nullcov.statistics.store import read_moments, read_projections

from brute_force import mmdit_projection_keys
from results_folder import PERCENT, build_mmdit_results

SCOPES = ("per-timestep", "all-timesteps")


def flow_plan(results, kinds=("unconstrained", "projected", "projected-lora", "random-projected")):
    """A proof plan on ``results`` (its own projections: second moment, lowest 30 %), 3 fixed steps."""
    from nullcov.proof.plan import ProjectionSetting, ProofPlan, ProofSettings, Variant

    folder = Results(results)
    names = [step["name"] for step in json.loads(folder.schedule.read_text())["steps"]] + [TEXT_NAME]
    setting = ProjectionSetting("conditional", "second_moment", f"p{PERCENT}", 0.0, float(PERCENT),
                                str(folder.schedule), tuple(str(folder.covariance(name)) for name in names),
                                tuple(str(folder.projection(name)) for name in names))
    variants = [Variant("unconstrained", "unconstrained")] if "unconstrained" in kinds else []
    variants += [Variant(f"projected-{scope}", "projected", scope, setting) for scope in SCOPES]
    variants += [Variant(kind, kind, "per-timestep", setting) for kind in ("projected-kv", "prior-preservation")
                 if kind in kinds]
    if "projected-lora" in kinds:
        variants.append(Variant("projected-lora", "projected-lora"))
    if "random-projected" in kinds:
        variants.append(Variant("random-all-timesteps", "random-projected", "all-timesteps", setting,
                                group="projected-all-timesteps"))
    settings = ProofSettings(learning_rate=1e-2, lora_learning_rate=1e-2, lora_rank=2, fixed_steps=3, seed=0,
                             guidance_scale=3.0, high_noise_fraction=0.0, evaluate=False, batch_size=2, instances=2)
    return ProofPlan(settings, SCOPES, (setting,), setting.key, tuple(variants))


def _null_space(statistic: np.ndarray) -> torch.Tensor:
    values, vectors = np.linalg.eigh((statistic + statistic.T) / 2)
    basis = vectors[:, values < np.percentile(values, PERCENT)]
    return torch.from_numpy(basis @ basis.T)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_projected_finetune_mechanics_on_a_transformer(tmp_path, family):
    """Every run trains 3 flow-matching steps from the same weights; the trained linears' weights are given
    (LoRA merged) with the base transformer carrying them; a projected run's update lies in its null
    spaces (per-timestep: the span of the steps' P; all timesteps: the null space of the steps' summed
    statistics, brute force from the h5 files) and the row says so; the unconstrained one's and the
    random control's do not; no evaluator column is filled."""
    from nullcov.models.model import load_pipeline
    from nullcov.models.sampling import configure_scheduler
    from nullcov.proof.flow import run_flow_proof

    model_dir, results = build_mmdit_results(tmp_path, family)
    schedule = json.loads(Results(results).schedule.read_text())
    pipe = load_pipeline(model_dir, "float32", "cpu")
    configure_scheduler(pipe, schedule)
    base = {name: p.detach().clone() for name, p in pipe.transformer.named_parameters()}
    plan = flow_plan(results)
    states, merged = {}, {}

    def keep(variant, row, transformer, state):
        states[variant.name] = state
        merged[variant.name] = transformer.state_dict()

    rows = run_flow_proof(pipe, model_dir, schedule, plan, on_variant=keep)
    assert [row["variant"] for row in rows] == plan.names
    assert all(torch.equal(p, base[name]) for name, p in pipe.transformer.named_parameters())  # base untouched
    expected = mmdit_projection_keys(pipe.transformer)
    steps = [step["name"] for step in schedule["steps"]]
    spaces = {name: read_projections(Results(results).projection(name))[0] for name in [*steps, TEXT_NAME]}
    moments = {name: read_moments(Results(results).covariance(name), "covariance")[0] for name in steps}
    for row in rows:
        assert row["steps"] == 3 and np.isfinite(row["final_loss"]) and row["reached_target"] == "-"
        assert np.isnan(row["concept_fidelity"]) and row["weight_update_norm"] > 0
        weights = states[row["variant"]]
        assert all(torch.equal(merged[row["variant"]][key], value) for key, value in weights.items())
        assert set(weights) == {f"{name}.weight" for name in expected}  # every linear with a projection trained
        outside, still = 0.0, []
        for name, (where, key) in expected.items():
            delta = (weights[f"{name}.weight"] - base[f"{name}.weight"]).double()
            if not delta.any():
                still.append(name)
            if where == "text":
                basis = torch.from_numpy(spaces[TEXT_NAME][key].projection).double()
            elif row["scope"] == "all-timesteps" and not row["kind"].startswith("random"):
                basis = _null_space(sum(moments[step][key].second_moment() for step in steps))
            else:  # per timestep: the span of every step's null space
                stacked = torch.cat([torch.from_numpy(spaces[step][key].projection).double() for step in steps], 1)
                left, singular, _ = torch.linalg.svd(stacked, full_matrices=False)
                span = left[:, singular > 1e-4 * float(singular[0])]
                basis = span @ span.T
            outside += float((delta - delta @ basis).square().sum())
        # SD3's last block is context_pre_only: its text query (add_q_proj) reaches no output, so no gradient
        # reaches it (LoRA: B starts at zero; full: AdamW's decay alone moves it)
        assert still in ([], ["transformer_blocks.1.attn.add_q_proj"]), (row["variant"], still)
        share = outside ** 0.5 / row["weight_update_norm"]
        if row["kind"] in ("projected", "projected-lora"):
            assert share <= 1e-5 and row["update_outside_null_space"] <= 1e-5, (row["variant"], share)
        else:  # unconstrained, and the random control's null spaces are not these
            assert share > 0.1, (row["variant"], share)


def test_variants_a_transformer_cannot_train_are_refused(tmp_path):
    from nullcov.proof.flow import check_flow_variants

    Results(tmp_path).schedule.write_text('{"steps": []}')  # the plan names files; none is read
    plan = flow_plan(tmp_path, kinds=("projected-kv", "prior-preservation"))
    with pytest.raises(ValueError, match=r"\['projected-kv', 'prior-preservation'\] need a UNet.*turn off "
                                         r"finetune_prior_preservation, finetune_text_only"):
        check_flow_variants(plan)


#: The proof keys an SD3/FLUX model's proof needs (the kinds it cannot train off), 2 steps, one seed.
FLOW_PROOF = {"finetune_proof": True, "finetune_prior_preservation": False, "finetune_text_only": False,
              "finetune_custom_diffusion": False, "finetune_repeated": ["unconstrained"],
              "finetune_grid_variants": ["unconstrained"], "finetune_steps": 2, "finetune_seeds": 1,
              "finetune_learning_rate_grid": [], "finetune_lora_rank": 2}


def test_the_rule_plans_the_flow_proof_and_refuses_what_it_cannot_train(tmp_path, demo_prompts):
    from conftest import planned_jobs, snakemake, write_config

    run = {"model": "builtin:tiny-flux", "sampler_strategy": "Euler", "resolution": 32, "num_denoising_steps": 2}
    write_config(tmp_path, demo_prompts[:2], **run, **FLOW_PROOF)
    assert "finetune_proof" in {rule for rule, _ in planned_jobs(tmp_path)}
    write_config(tmp_path, demo_prompts[:2], **run, finetune_proof=True)  # the defaults plan UNet-only kinds
    refused = snakemake(tmp_path, "--dry-run", check=False)
    text = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "finetune_proof on an SD3/FLUX model trains unconstrained, projected, " \
        "projected-lora, random-projected runs only" in text and "finetune_prior_preservation=false " \
        "finetune_text_only=false finetune_custom_diffusion=false finetune_repeated='[\"unconstrained\"]'" in text, text


def test_the_proof_job_on_tiny_flux_writes_the_table_weights_and_grid(tmp_path):
    """The rule's job on an SD3/FLUX model: the plan the Snakefile makes (finetune_proof with the keys above),
    every run trained, its trained linears saved, the grid sampled with each variant's transformer; the
    outputs that need an evaluator or a UNet hold their header only."""
    import yaml

    from nullcov.files import read_tsv
    from nullcov.models.family import DEFAULT_STREAMS
    from nullcov.proof.job import finetune_proof_job
    from nullcov.proof.plan import plan_proof
    from nullcov.schema import SCHEMA, schema_defaults

    from conftest import base_config

    model_dir, results = build_mmdit_results(tmp_path, "flux")
    config = (schema_defaults(yaml.safe_load(SCHEMA.read_text())) | base_config(num_denoising_steps=3)
              | {"model": str(model_dir), "statistic": "second_moment", "nullspace_threshold": 0.02,
                 "threshold_percent": float(PERCENT), "sampler_strategy": "Euler", "resolution": 32,
                 "guidance_scale": 3.0, "streams": [*DEFAULT_STREAMS, "context", "pooled", "single_out"]}
              | FLOW_PROOF)
    schedule = json.loads(Results(results).schedule.read_text())
    names = [step["name"] for step in schedule["steps"]] + [TEXT_NAME]
    plan = plan_proof(config, Results(results), names, model_dir)
    assert plan.names == ["unconstrained", f"projected-all-timesteps-p{PERCENT}-second_moment-conditional",
                          "projected-lora"]
    out = tmp_path / "finetune"
    outputs = {"table": out / "variants.tsv", "curves": out / "curves.tsv", "matched": out / "matched.tsv",
               "figure": out / "frontier.png", "grid": out / "grid.png", "grid_images": out / "grid.npz",
               "null_energy": out / "null_energy.tsv", "weights": out}
    rows = finetune_proof_job(model_dir=str(model_dir), plan=plan.to_dict(), schedule=schedule, statistics_prompts=[],
                              device="cpu", outputs=outputs)
    assert [row["variant"] for row in rows] == plan.names
    assert all(row["steps"] == 2 and row["update_outside_null_space"] <= 1e-5 for row in rows if row["kind"] in (
        "projected", "projected-lora"))
    assert [row["variant"] for row in read_tsv(outputs["table"])] == plan.names
    for name in plan.names:
        assert (out / name / FINETUNE_TRANSFORMER_WEIGHTS).is_file()
    grid = np.load(outputs["grid_images"])
    assert set(grid.files) == {"captions", "base", *plan.names} and outputs["figure"].is_file()  # base, each run
    for empty in ("curves", "matched", "null_energy"):
        assert len(outputs[empty].read_text().splitlines()) == 1, empty
