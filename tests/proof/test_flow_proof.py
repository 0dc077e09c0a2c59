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
    """Every run trains 3 flow-matching steps from the same weights; the trained linears' weights are saved
    (LoRA merged); a projected run's update lies in its null spaces (per-timestep: the span of the steps'
    P; all timesteps: the null space of the steps' summed statistics, brute force from the h5 files) and
    the table says so; the unconstrained one's does not; no evaluator column is filled."""
    from nullcov.models.model import load_pipeline
    from nullcov.models.sampling import configure_scheduler
    from nullcov.proof.flow import run_flow_proof
    from nullcov.proof.report import load_weights

    model_dir, results = build_mmdit_results(tmp_path, family)
    schedule = json.loads(Results(results).schedule.read_text())
    pipe = load_pipeline(model_dir, "float32", "cpu")
    configure_scheduler(pipe, schedule)
    base = {name: p.detach().clone() for name, p in pipe.transformer.named_parameters()}
    plan = flow_plan(results)
    rows = run_flow_proof(pipe, model_dir, schedule, plan, tmp_path / "finetune")
    assert [row["variant"] for row in rows] == plan.names
    assert all(torch.equal(p, base[name]) for name, p in pipe.transformer.named_parameters())  # base untouched
    expected = mmdit_projection_keys(pipe.transformer)
    steps = [step["name"] for step in schedule["steps"]]
    spaces = {name: read_projections(Results(results).projection(name))[0] for name in [*steps, TEXT_NAME]}
    moments = {name: read_moments(Results(results).covariance(name), "covariance")[0] for name in steps}
    for row in rows:
        assert row["steps"] == 3 and np.isfinite(row["final_loss"]) and row["reached_target"] == "-"
        assert np.isnan(row["concept_fidelity"]) and row["weight_update_norm"] > 0
        weights = load_weights(tmp_path / "finetune" / row["variant"] / FINETUNE_TRANSFORMER_WEIGHTS)
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
    written = (tmp_path / "finetune" / "variants.tsv").read_text().splitlines()
    assert len(written) == 1 + len(rows) and written[0].startswith("variant\tgroup\tkind")


def test_variants_a_transformer_cannot_train_are_refused(tmp_path):
    from nullcov.proof.flow import check_flow_variants

    Results(tmp_path).schedule.write_text('{"steps": []}')  # the plan names files; none is read
    plan = flow_plan(tmp_path, kinds=("projected-kv", "prior-preservation"))
    with pytest.raises(ValueError, match=r"\['projected-kv', 'prior-preservation'\] need a UNet.*turn off "
                                         r"finetune_prior_preservation, finetune_text_only"):
        check_flow_variants(plan)
