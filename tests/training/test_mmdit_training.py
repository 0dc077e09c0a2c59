"""nullcov.training on the tiny SD3 and FLUX transformers (FLUX with its guidance embedding): the
constraint (full and LoRA) on every stream linear, every linear sharing a stream's input and the text
path; the projection lookup on a σ grid; the safetensors export.

Every check reads the expected projection from the projection files (h5) directly, for a module
mapping written out here by walking the blocks (not through nullcov's vocabulary)."""

import json
import shutil

import numpy as np
import pytest
import torch

from nullcov.layout import TEXT_NAME, Results
from nullcov.statistics.store import read_moments, read_projections

from brute_force import mmdit_projection_keys
from results_folder import PERCENT, build_mmdit_results


@pytest.fixture(scope="module")
def mmdit(tmp_path_factory):
    """``{family: (model folder, results folder)}`` of the tiny SD3 and FLUX (:func:`build_mmdit_results`)."""
    return {family: build_mmdit_results(tmp_path_factory.mktemp(f"mmdit-{family}"), family)
            for family in ("sd3", "flux")}


def load_transformer(model_dir, lora=False, frozen=()):
    """The tiny transformer with every linear of :func:`brute_force.mmdit_projection_keys` trainable (full, but those in
    ``frozen``), or with peft-LoRA adapters on them; nothing else trainable."""
    import diffusers

    config = json.loads((model_dir / "transformer" / "config.json").read_text())
    transformer = getattr(diffusers, config["_class_name"]).from_pretrained(model_dir / "transformer")
    transformer.requires_grad_(False)
    names = list(mmdit_projection_keys(transformer))
    if lora:
        from peft import LoraConfig

        transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=names))
    else:
        for name in names:
            if name not in frozen:
                transformer.get_submodule(name).requires_grad_(True)
    return transformer


def stored(results, name: str, key: str) -> torch.Tensor:
    """``P`` of ``key`` in the projection file of step ``name`` (or text), float64."""
    spaces, _ = read_projections(Results(results).projection(name), keys=[key])
    return torch.from_numpy(spaces[key].projection).double()


def grid(results) -> list[tuple[str, float]]:
    return [(step["name"], step["timestep"]) for step in json.loads(Results(results).schedule.read_text())["steps"]]


def between(results) -> tuple[float, str, str, float]:
    """A timestep 3/10 of the way from the highest scheduled one to the next (a σ between grid points), the
    two steps' names and the weight of the lower one."""
    (high_name, high), (low_name, low) = sorted(grid(results), key=lambda item: -item[1])[:2]
    t = float(np.float32(high - 0.3 * (high - low)))
    return t, high_name, low_name, (high - t) / (high - low)


def relative_leak(delta: torch.Tensor, projection: torch.Tensor) -> float:
    delta = delta.double()
    return float((delta - delta @ projection).norm() / delta.norm())


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_constraint_keeps_every_transformer_update_in_its_streams_null_space(mmdit, family, lora):
    """An AdamW step on random gradients, then project(t) at a σ between grid points (nearest): every trained
    weight's update satisfies ΔW P = ΔW, LoRA's A P = A, with P the nearest step's (or the text file's) from
    the h5 file of its stream, for every linear sharing a stream's input; biases are restored; frozen
    linears and everything else are untouched."""
    from nullcov.training.constraint import NullSpaceConstraint

    model_dir, results = mmdit[family]
    frozen = () if lora else ("transformer_blocks.1.attn.to_v", "context_embedder")
    transformer = load_transformer(model_dir, lora=lora, frozen=frozen)
    expected = mmdit_projection_keys(transformer)
    before = {name: p.detach().clone() for name, p in transformer.named_parameters()}
    constraint = NullSpaceConstraint(transformer, results, mode="nearest")
    found = {item.name: ("text" if item.text else "step", item.key) for item in constraint.linears}
    assert found == {name: where for name, where in expected.items() if name not in frozen}
    assert all(item.lora_down and not item.full for item in constraint.linears) if lora else \
        all(item.full for item in constraint.linears)

    t, nearest, _, weight = between(results)
    assert weight < 0.5 and t != round(t)  # nearer the higher step, and not an integer timestep
    generator = torch.Generator().manual_seed(0)
    trained = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        for parameter in trained:
            parameter.grad = torch.randn(parameter.shape, generator=generator)
        optimizer.step()
        constraint.project(torch.tensor([t, t]))

    wrappers = {name: module for name, module in transformer.named_modules() if hasattr(module, "lora_A")}
    for name, (where, key) in expected.items():
        projection = stored(results, nearest if where == "step" else TEXT_NAME, key)
        assert 0.5 < torch.trace(projection) < projection.shape[0] - 0.5, f"{name}: P = I or 0 proves nothing"
        if lora:
            down = wrappers[name].lora_A["default"].weight.detach()
            assert down.norm() > 0 and relative_leak(down, projection) <= 1e-5, name
            continue
        module = transformer.get_submodule(name)
        delta = module.weight.detach() - before[f"{name}.weight"]
        if name in frozen:
            assert torch.equal(module.weight.detach(), before[f"{name}.weight"]), name
            continue
        assert delta.norm() > 1e-3, name
        assert relative_leak(delta, projection) <= 1e-5, name
        if module.bias is not None:  # bias="freeze": its updates are undone
            assert torch.equal(module.bias.detach(), before[f"{name}.bias"]), name
    untouched = [name for name, p in transformer.named_parameters() if not p.requires_grad]
    assert untouched and all(torch.equal(transformer.get_parameter(name).detach(), before[name])
                             for name in untouched if name in before)


def test_dora_and_linears_without_a_projection_are_refused(mmdit, tmp_path):
    from peft import LoraConfig

    from nullcov.training.constraint import ConstraintError, NullSpaceConstraint

    model_dir, results = mmdit["flux"]
    transformer = load_transformer(model_dir)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=2, use_dora=True, target_modules=["proj_mlp"]))
    with pytest.raises(ConstraintError, match=r"single_transformer_blocks\.0\.proj_mlp: DoRA"):
        NullSpaceConstraint(transformer, results)
    partial = tmp_path / "results"
    shutil.copytree(results, partial)
    Results(partial).projection(TEXT_NAME).unlink()
    with pytest.raises(ConstraintError, match=r"no projection for the trainable linear\(s\) \['context_embedder', "
                                              r"'time_text_embed\.text_embedder\.linear_1'\].*freeze them"):
        NullSpaceConstraint(load_transformer(model_dir), partial)
    only_blocks = load_transformer(model_dir, frozen=("context_embedder", "time_text_embed.text_embedder.linear_1"))
    assert len(NullSpaceConstraint(only_blocks, partial).linears) == len(mmdit_projection_keys(only_blocks)) - 2


def _brute_force_null_space(statistic: np.ndarray) -> np.ndarray:
    """P of the lowest ``PERCENT`` % of the spectrum (numpy, float64)."""
    values, vectors = np.linalg.eigh((statistic + statistic.T) / 2)
    basis = vectors[:, values < np.percentile(values, PERCENT)]
    return basis @ basis.T


def test_a_sigma_between_grid_points_resolves_to_the_nearest_step_or_the_interpolated_statistic(mmdit):
    """The scheduler's float timesteps 1000·σ are looked up as they are: a σ between grid points gets the
    nearest step's stored P (nearest) or the null space of the two steps' statistics mixed linearly in
    1000·σ (interpolate); a scheduled σ that is not an integer gets its own step's stored P in both modes,
    which rounding it to an integer would not give."""
    from nullcov.training.bank import ProjectionBank

    _, results = mmdit["flux"]
    t, high, low, weight = between(results)
    nearest, interpolate = ProjectionBank(results, mode="nearest"), ProjectionBank(results, mode="interpolate")
    statistics = {name: read_moments(Results(results).covariance(name), "covariance")[0] for name in (high, low)}
    found_nearest, found_mixed = nearest.projections([t]), interpolate.projections([t])
    assert set(found_nearest) == set(statistics[high]) and len(found_nearest) == 12
    for key in found_nearest:
        torch.testing.assert_close(found_nearest[key].double(), stored(results, high, key), atol=2e-6, rtol=0)
        mixed = (1 - weight) * statistics[high][key].second_moment() + weight * statistics[low][key].second_moment()
        np.testing.assert_allclose(found_mixed[key].double().numpy(), _brute_force_null_space(mixed), atol=2e-5)
    off_grid = next(timestep for _, timestep in grid(results) if timestep != round(timestep))
    name = next(name for name, timestep in grid(results) if timestep == off_grid)
    key = nearest.step_keys[0]
    for bank in (nearest, interpolate):
        torch.testing.assert_close(bank.projections([off_grid])[key].double(), stored(results, name, key),
                                   atol=2e-6, rtol=0)
    assert not torch.allclose(interpolate.projections([round(off_grid)])[key].double(), stored(results, name, key),
                              atol=1e-3)
    computed = interpolate.computed
    interpolate.precompute(torch.tensor([t, off_grid]))  # the scheduler's float timesteps: already cached
    assert interpolate.computed == computed


def test_safetensors_export_of_a_transformer_run_round_trips_and_serves_the_constraint(mmdit, tmp_path):
    """Every stream key and text-path key is exported; P, eigenvalues, null_dim and threshold read back equal
    the projection files bit for bit; the bank (nearest) and the constraint read from the export give what
    they give from the results folder."""
    from nullcov.training.bank import ProjectionBank
    from nullcov.training.constraint import NullSpaceConstraint
    from nullcov.training.export import export_safetensors, read_safetensors_spaces, safetensors_keys

    model_dir, results = mmdit["flux"]
    names = [name for name, _ in grid(results)] + [TEXT_NAME]
    path = tmp_path / "flux.safetensors"
    export_safetensors(Results(results).schedule, {name: Results(results).projection(name) for name in names}, path)
    keys = safetensors_keys(path)
    assert sorted(keys) == sorted(names)
    for name in names:
        spaces, _ = read_projections(Results(results).projection(name))
        assert keys[name] == sorted(spaces)
        exported = read_safetensors_spaces(path, name)
        for key, space in spaces.items():
            assert np.array_equal(exported[key].projection, space.projection), (name, key)
            assert np.array_equal(exported[key].eigenvalues, space.eigenvalues), (name, key)
            assert (exported[key].null_dim, exported[key].threshold) == (space.null_dim, space.threshold)
    assert set(keys[TEXT_NAME]) == {"context_embedder", "time_text_embed.text_embedder.linear_1"}
    bank, folder = ProjectionBank(path), ProjectionBank(results)
    assert (bank.step_keys, bank.settings, sorted(bank.text_factors)) == \
        (folder.step_keys, folder.settings, sorted(folder.text_factors))
    t = between(results)[0]
    assert all(torch.equal(bank.factors([t])[key].matrix, folder.factors([t])[key].matrix) for key in bank.step_keys)
    assert torch.equal(bank.get("single_transformer_blocks.1", "proj_mlp", t),
                       torch.from_numpy(read_safetensors_spaces(path, between(results)[1],
                                                                ["single_transformer_blocks.1/attn.to_q"])[
                           "single_transformer_blocks.1/attn.to_q"].projection))
    assert torch.equal(bank.get("", "context_embedder"), stored(results, TEXT_NAME, "context_embedder").float())
    exported_constraint = NullSpaceConstraint(load_transformer(model_dir), path)
    reference = NullSpaceConstraint(load_transformer(model_dir), results)
    for item, other in zip(exported_constraint.linears, reference.linears, strict=True):
        assert item.name == other.name
        assert torch.equal(exported_constraint.projection_for(item, [t]), reference.projection_for(other, [t]))
