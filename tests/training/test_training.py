"""nullcov.training: constraint (constrained fine-tuning), bank (lookups), factored_projection and
export, on the tiny model.

The results folder is made by the project's own job functions (schedule, one feature shard,
merge, projection), in process; every check compares against an independent computation
(ProjectionBank's numpy path, brute-force statistics, a re-implementation of NullBooth's loader).
"""

import re
import time

import numpy as np
import pytest
import torch

from nullcov.layout import TEXT_NAME, Results
from nullcov.models.family import TEXT_KEY, split_key, statistic_key

from conftest import DEMO_PROMPTS, planned_jobs, write_config
from results_folder import THRESHOLD, build_results


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_model_dir, demo_prompts):
    return build_results(tmp_path_factory.mktemp("train"), tiny_model_dir, demo_prompts[:8])


@pytest.fixture(scope="module")
def results_both_branches(tmp_path_factory, tiny_model_dir, demo_prompts):
    """The same prompts' statistics with both CFG halves (``unconditional_branch: true``)."""
    return build_results(tmp_path_factory.mktemp("train-both"), tiny_model_dir, demo_prompts[:8],
                         unconditional_branch=True)


def trainable_unet(model_dir, lora=False):
    """The tiny UNet with only the attn2 linears trainable (full), or peft-LoRA on them."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    unet.requires_grad_(False)
    if lora:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=r".*attn2\.(to_q|to_k|to_v|to_out\.0)"))
    else:
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.requires_grad_(True)
    return unet


def train(unet, constraint, timesteps, steps, seed=0):
    """AdamW with weight decay on a random regression target; project after every step."""
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    for _ in range(steps):
        latents = torch.randn(len(timesteps), 4, size, size, generator=generator)
        text = torch.randn(len(timesteps), 77, unet.config.cross_attention_dim, generator=generator)
        loss = unet(latents, torch.tensor(timesteps), text).sample.square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        constraint.project(timesteps)


def relative_leak(delta, projection):
    delta, projection = delta.double(), projection.double()
    return float((delta - delta @ projection).norm() / delta.norm())


def test_full_finetune_with_adamw_keeps_every_update_in_the_null_space(results, tiny_model_dir):
    from nullcov.training.bank import ProjectionBank
    from nullcov.training.constraint import NullSpaceConstraint

    unet = trainable_unet(tiny_model_dir)
    before = {name: p.detach().clone() for name, p in unet.named_parameters() if p.requires_grad}
    constraint = NullSpaceConstraint(unet, results, mode="nearest")
    assert len(constraint.linears) == 4 * 7 and all(item.full for item in constraint.linears)
    train(unet, constraint, [400, 400], steps=4)
    bank = ProjectionBank(results)  # independent: numpy, the stored files
    names = {id(p): name for name, p in unet.named_parameters()}
    for item in constraint.linears:
        delta = item.module.weight.detach() - before[names[id(item.module.weight)]]
        projection = bank.get(item.layer, item.linear, timestep=400)
        assert torch.trace(projection) < projection.shape[0] - 0.5, f"{item.name}: P = I proves nothing"
        assert delta.norm() > 1e-3, item.name
        assert relative_leak(delta, projection) <= 1e-5, item.name
        if item.module.bias is not None:  # to_out.0: bias updates are undone (bias="freeze")
            assert torch.equal(item.module.bias.detach(), before[names[id(item.module.bias)]])


def test_lora_down_projection_stays_in_the_interpolated_null_space(results, tiny_model_dir):
    from nullcov.training.bank import ProjectionBank
    from nullcov.training.constraint import NullSpaceConstraint

    unet = trainable_unet(tiny_model_dir, lora=True)
    constraint = NullSpaceConstraint(unet, results, mode="interpolate")
    assert len(constraint.linears) == 28 and all(item.lora_down and not item.full for item in constraint.linears)
    train(unet, constraint, [700], steps=3)
    bank = ProjectionBank(results)
    lora_layers = {id(m.base_layer): m for m in unet.modules() if hasattr(m, "lora_A")}
    for item in constraint.linears:
        module = lora_layers[id(item.module)]
        delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
        projection = bank.get(item.layer, item.linear, timestep=700, mode="interpolate")
        assert delta.norm() > 1e-4, item.name
        assert relative_leak(delta.detach(), projection) <= 1e-5, item.name


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_project_gradients_leaves_only_the_null_space_gradient(results, tiny_model_dir, lora):
    """grad ← grad P for every trained weight (full) or LoRA A, against the bank's projections."""
    from nullcov.training.bank import ProjectionBank
    from nullcov.training.constraint import NullSpaceConstraint

    unet = trainable_unet(tiny_model_dir, lora=lora)
    constraint = NullSpaceConstraint(unet, results, mode="nearest")
    train(unet, constraint, [250], steps=1)  # LoRA's B starts at zero, and with it A's gradient
    generator = torch.Generator().manual_seed(3)
    size = unet.config.sample_size
    latents = torch.randn(2, 4, size, size, generator=generator)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    unet(latents, torch.tensor([250, 250]), text).sample.square().mean().backward()
    parameters = {item.name: [item.module.weight] if item.full else item.lora_down for item in constraint.linears}
    before = {name: [p.grad.clone() for p in found] for name, found in parameters.items()}
    constraint.project_gradients([250])
    bank = ProjectionBank(results)
    for item in constraint.linears:
        projection = bank.get(item.layer, item.linear, timestep=250).double()
        for parameter, original in zip(parameters[item.name], before[item.name], strict=True):
            grad = parameter.grad.double()
            assert original.norm() > 0 and torch.trace(projection) < projection.shape[0] - 0.5, item.name
            assert relative_leak(grad, projection) <= 1e-5, item.name  # nothing outside the null space left
            torch.testing.assert_close(grad, original.double() @ projection, atol=1e-6 * float(original.norm()),
                                       rtol=0)  # and the null-space part kept as it was


def test_a_batch_of_several_timesteps_is_protected_at_each_of_them(results):
    """Null space of the summed statistic: vᵀ S_t v ≤ vᵀ (Σ S) v < τ for each t (brute force per t)."""
    from nullcov.statistics.store import read_moments
    from nullcov.training.bank import ProjectionBank

    bank = ProjectionBank(results)
    timesteps = [990, 600, 120]

    def statistic(key, t):  # independent interpolation of the merged moments (linear in t)
        low, high, weight = bank.neighbours(t)
        total = 0
        for index, share in ((low, 1 - weight), (high, weight)) if low != high else ((low, 1.0),):
            moments, _ = read_moments(Results(results).covariance(bank.step_names[index]), "covariance", keys=[key])
            total = total + share * moments[key].second_moment()
        return total

    lookup = ProjectionBank(results, mode="interpolate")
    combined = lookup.projections(torch.tensor(timesteps))
    unprotected = 0
    for key, projection in combined.items():
        p = projection.double().numpy()
        np.testing.assert_allclose(p @ p, p, atol=1e-5)
        assert np.trace(p) > 0.5, f"{key}: empty null space proves nothing"
        for t in timesteps:
            s = statistic(key, t)
            assert np.linalg.eigvalsh(p @ s @ p).max() < THRESHOLD, (key, t)
            # a single timestep's projection does not in general protect the others
            single = lookup.projections([timesteps[0]])[key].double().numpy()
            unprotected += np.linalg.eigvalsh(single @ s @ single).max() >= THRESHOLD
    assert unprotected > 0


def test_lookups_are_cached_per_integer_timestep_and_match_the_bank(results):
    from nullcov.training.bank import ProjectionBank

    bank = ProjectionBank(results)
    lookup = ProjectionBank(results, mode="interpolate")
    lookup.precompute(range(0, 1000, 37))
    computed = lookup.computed
    assert computed == len(range(0, 1000, 37))
    for t in (37, 74, 999):
        found = lookup.projections(torch.tensor([t, t]))
        for key in lookup.step_keys[:3]:
            layer, linear = split_key(key)
            np.testing.assert_allclose(found[key].numpy(), bank.get(layer, linear, t, mode="interpolate").numpy(),
                                       atol=2e-6)
    assert lookup.computed == computed  # every one came from the cache
    nearest = ProjectionBank(results, mode="nearest")
    nearest.precompute(range(1000))  # 1000 integer t, 3 scheduled steps: 3 entries
    assert nearest.computed == len(nearest._cache) == len(bank.timesteps)
    from nullcov.statistics.store import read_projections
    from nullcov.training.factored_projection import cheapest_form

    spaces, _ = read_projections(Results(results).projection(bank.step_names[0]))
    factors = nearest.factors([bank.timesteps[0]])
    for key, factor in factors.items():  # the cached form is the cheapest one and P is the stored one
        assert factor.form == cheapest_form(factor.dim, spaces[key].null_dim)
        assert factor.nbytes <= spaces[key].projection.nbytes
        np.testing.assert_allclose(factor.dense().numpy(), spaces[key].projection, atol=2e-6)
    small = ProjectionBank(results, mode="interpolate", cache_bytes=1)
    small.precompute([10, 20, 30])
    assert len(small._cache) == 1 and small.computed == 3


def test_bank_and_constraint_from_declared_files_equal_the_results_folders(results, tiny_model_dir, tmp_path):
    """ProjectionBank and NullSpaceConstraint from the files a rule declares, wherever they lie (here
    copied under other folder names), serve what the results folder that holds them serves; a
    file that was not declared is missing, not looked up beside the others."""
    import json
    import shutil

    from nullcov.training.bank import ProjectionBank
    from nullcov.training.constraint import ConstraintError, NullSpaceConstraint

    folder = Results(results)
    names = [step["name"] for step in json.loads(folder.schedule.read_text())["steps"]] + [TEXT_NAME]
    (tmp_path / "moments").mkdir()
    (tmp_path / "p").mkdir()
    schedule = shutil.copyfile(folder.schedule, tmp_path / "steps.json")
    covariance = [shutil.copyfile(folder.covariance(name), tmp_path / "moments" / f"{name}.h5") for name in names]
    projections = [shutil.copyfile(folder.projection(name), tmp_path / "p" / f"{name}.h5") for name in names]
    for mode in ("nearest", "interpolate"):
        declared = ProjectionBank.from_files(schedule, covariance, projections, mode=mode)
        bank = ProjectionBank(results, mode=mode)
        assert (declared.timesteps, declared.step_names, declared.step_keys, declared.settings) == \
            (bank.timesteps, bank.step_names, bank.step_keys, bank.settings)
        layer, linear = split_key(bank.step_keys[0])
        for t in (0, 333, 999):
            assert torch.equal(declared.get(layer, linear, t), bank.get(layer, linear, t))
        assert torch.equal(declared.get(layer, "to_k"), bank.get(layer, "to_k"))
        for timesteps in ([500], bank.timesteps):
            found, expected = declared.projections(timesteps), bank.projections(timesteps)
            assert found.keys() == expected.keys()
            assert all(torch.equal(found[key], expected[key]) for key in expected), (mode, timesteps)
        assert torch.equal(declared.text_factor.dense(), bank.text_factor.dense())
    unet, same = trainable_unet(tiny_model_dir), trainable_unet(tiny_model_dir)
    constraint = NullSpaceConstraint.from_files(unet, schedule, covariance, projections, mode="nearest")
    reference = NullSpaceConstraint(same, results, mode="nearest")
    assert [item.name for item in constraint.linears] == [item.name for item in reference.linears]
    for item, other in zip(constraint.linears, reference.linears, strict=True):
        for timesteps in ([10], bank.timesteps):
            assert torch.equal(constraint.projection_for(item, timesteps), reference.projection_for(other, timesteps))
    with pytest.raises(ConstraintError, match=r"attn2\.to_k.*freeze them"):  # text.h5 not declared
        NullSpaceConstraint.from_files(trainable_unet(tiny_model_dir), schedule, covariance, projections[:-1])
    with pytest.raises(FileNotFoundError, match="include no covariance file"):  # the statistics not declared
        ProjectionBank.from_files(schedule, [], projections).factors(bank.timesteps)


def test_projection_overhead_per_training_step_on_the_tiny_model(results, tiny_model_dir):
    """Overhead of project() against the training step itself (printed; the README quotes it)."""
    from nullcov.training.constraint import NullSpaceConstraint

    unet = trainable_unet(tiny_model_dir)
    constraint = NullSpaceConstraint(unet, results, mode="interpolate")
    drawable = range(0, 1000, 20)  # the timesteps this trainer draws
    constraint.lookup.precompute(drawable)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    step_time, project_time = [], []
    for index in range(12):
        t = drawable[int(torch.randint(0, len(drawable), (1,), generator=generator))]
        latents = torch.randn(4, 4, 16, 16, generator=generator)
        text = torch.randn(4, 77, 32, generator=generator)
        start = time.perf_counter()
        unet(latents, torch.tensor([t] * 4), text).sample.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        middle = time.perf_counter()
        constraint.project([t])
        end = time.perf_counter()
        if index >= 2:
            step_time.append(middle - start)
            project_time.append(end - middle)
    overhead = np.median(project_time) / np.median(step_time)
    print(f"tiny model, CPU, batch 4: step {np.median(step_time) * 1e3:.1f} ms, "
          f"project {np.median(project_time) * 1e3:.2f} ms, overhead {overhead:.1%}")
    assert constraint.lookup.computed == len(drawable)  # every step hit the precomputed cache
    assert overhead < 0.25


def nullbooth_loader(folder, threshold):
    """NullBooth's documented loading: scan <dir>/covariance_matrices/<layer>/, parse
    <step name>_<feature>_cov.npy, SVD of each square matrix, keep singular vectors whose
    singular value is under the absolute threshold: {(layer folder, step, feature): P}."""
    pattern = re.compile(r"^(timestep_\d{4}|alpha_\d{2}_\d{4})_(q|k|v|out)_cov\.npy$")
    found = {}
    for layer_dir in sorted((folder / "covariance_matrices").iterdir()):
        layer = layer_dir.name.removeprefix("module_")
        for path in sorted(layer_dir.iterdir()):
            match = pattern.match(path.name)
            assert match, f"unexpected file {path}"
            matrix = np.load(path, allow_pickle=False)
            assert matrix.dtype == np.float32 and matrix.ndim == 2 and matrix.shape[0] == matrix.shape[1]
            u, s, _ = np.linalg.svd(matrix.astype(np.float64))
            basis = u[:, s < threshold]
            found[(layer, match.group(1), match.group(2))] = basis @ basis.T
    return found


def test_nullbooth_export_gives_nullbooths_loader_the_same_null_spaces(results, tmp_path):
    import json

    from nullcov.statistics.store import read_projections
    from nullcov.training.export import export_nullbooth

    schedule = json.loads(Results(results).schedule.read_text())
    names = [step["name"] for step in schedule["steps"]]
    written = export_nullbooth({name: Results(results).covariance(name) for name in names}, tmp_path / "nb",
                               "second_moment", schedule["layers"], Results(results).covariance(TEXT_NAME))
    loaded = nullbooth_loader(tmp_path / "nb", THRESHOLD)
    assert written == len(loaded) == len(names) * len(schedule["layers"]) * 4
    text, _ = read_projections(Results(results).projection(TEXT_NAME))
    for name in names:
        spaces, _ = read_projections(Results(results).projection(name))
        for layer in schedule["layers"]:
            folder = layer.replace(".", "_")
            for feature, space in (("q", spaces[statistic_key(layer, "to_q")]),
                                   ("out", spaces[statistic_key(layer, "to_out")]),
                                   ("k", text[TEXT_KEY]), ("v", text[TEXT_KEY])):
                theirs = loaded[(folder, name, feature)]
                assert round(np.trace(theirs)) == space.null_dim, (layer, name, feature)
                np.testing.assert_allclose(theirs, space.projection, atol=1e-4)


def test_nullbooth_export_of_a_text_only_run_has_k_and_v_for_every_scheduled_step(results, tmp_path):
    """A text-only run has no step files, but NullBooth's trainer looks k/v up per step."""
    import json

    from nullcov.statistics.store import read_projections
    from nullcov.training.export import export_nullbooth

    schedule = json.loads(Results(results).schedule.read_text())
    names = [step["name"] for step in schedule["steps"]]
    written = export_nullbooth({}, tmp_path / "nb", "second_moment", schedule["layers"],
                               Results(results).covariance(TEXT_NAME), step_names=names)
    loaded = nullbooth_loader(tmp_path / "nb", THRESHOLD)
    assert written == len(loaded) == len(names) * len(schedule["layers"]) * 2
    text, _ = read_projections(Results(results).projection(TEXT_NAME))
    assert {feature for _, _, feature in loaded} == {"k", "v"}
    assert {name for _, name, _ in loaded} == set(names)
    for matrix in loaded.values():
        np.testing.assert_allclose(matrix, text[TEXT_KEY].projection, atol=1e-4)


def test_safetensors_export_loads_in_the_projection_bank(results, tmp_path):
    import json

    from nullcov.statistics.store import read_projections
    from nullcov.training.bank import ProjectionBank
    from nullcov.training.export import export_safetensors, read_safetensors_metadata

    names = [step["name"] for step in json.loads(Results(results).schedule.read_text())["steps"]] + [TEXT_NAME]
    path = tmp_path / "run.safetensors"
    export_safetensors(Results(results).schedule, {n: Results(results).projection(n) for n in names}, path)
    exported, stored = ProjectionBank(path), ProjectionBank(results)
    assert exported.timesteps == stored.timesteps
    _, attrs = read_projections(Results(results).projection(TEXT_NAME))
    assert read_safetensors_metadata(path)["provenance"] == attrs["provenance"]
    spaces, _ = read_projections(Results(results).projection(names[1]))
    for key in spaces:
        layer, linear = split_key(key)
        for t in (0, 300, 999):
            assert torch.equal(exported.get(layer, linear, t), stored.get(layer, linear, t))
    assert torch.equal(exported.get(layer, "to_v"), stored.get(layer, "to_v"))
    with pytest.raises(ValueError, match="interpolate"):
        exported.get(layer, "to_q", 10, mode="interpolate")


def test_exports_config_from_the_command_line(tmp_path, demo_prompts):
    from nullcov.training.export import parse_exports

    assert parse_exports('["nullbooth"]') == ["nullbooth"]
    assert parse_exports("[nullbooth, safetensors]") == ["nullbooth", "safetensors"]
    assert parse_exports("safetensors,nullbooth") == ["safetensors", "nullbooth"]
    with pytest.raises(ValueError, match="unknown export"):
        parse_exports('["nulbooth"]')
    write_config(tmp_path, demo_prompts[:4])
    validation = DEMO_PROMPTS.parent / "validation.txt"
    rules = {rule for rule, _ in planned_jobs(tmp_path, "--config", 'exports=["safetensors"]', "finetune_proof=True",
                                               f"validation_prompts={validation}")}
    assert {"export_safetensors", "finetune_proof"} <= rules and "export_nullbooth" not in rules


def test_constraint_refuses_linears_without_projections(results, tiny_model_dir, tmp_path):
    import shutil

    from nullcov.training.constraint import ConstraintError, NullSpaceConstraint

    partial = tmp_path / "results"
    shutil.copytree(results, partial)
    Results(partial).projection(TEXT_NAME).unlink()
    with pytest.raises(ConstraintError, match=r"attn2\.to_k.*freeze them"):
        NullSpaceConstraint(trainable_unet(tiny_model_dir), partial)



@pytest.mark.parametrize("null_dim", [0, 7, 40, 48, 56, 89, 96])
def test_factored_projection_equals_the_dense_product_and_takes_the_cheapest_form(null_dim):
    """(ΔW U0) U0ᵀ and ΔW − (ΔW U1) U1ᵀ equal ΔW P within float32 noise, from an eigh (interpolate)
    and from a stored float32 P (nearest), for full-size ΔW and LoRA's A; the form chosen has the fewest flops."""
    from nullcov.training.factored_projection import (
        FactoredProjection,
        application_flops,
        cheapest_form,
        null_space_factor,
    )

    dim = 96
    generator = torch.Generator().manual_seed(null_dim)
    vectors, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    spectrum = torch.cat([torch.rand(null_dim, generator=generator, dtype=torch.float64) * 0.01,
                          1 + torch.rand(dim - null_dim, generator=generator, dtype=torch.float64)])
    statistic = vectors @ torch.diag(spectrum) @ vectors.T
    null = vectors[:, :null_dim]
    exact = null @ null.T  # float64 reference P
    stored = exact.to(torch.float32)  # what a projection file holds

    flops = application_flops(dim, null_dim)
    expected = {0: "null", 7: "null", 40: "null", 48: "dense", 56: "complement", 89: "complement",
                96: "complement"}[null_dim]
    assert cheapest_form(dim, null_dim) == expected
    assert flops[expected] == min(flops.values()) and flops[expected] <= flops["dense"]
    if expected != "dense":
        assert flops[expected] < flops["dense"]

    for factor in (null_space_factor(statistic, 0.05), FactoredProjection.from_projection(stored, null_dim)):
        assert factor.form == expected and factor.null_dim == null_dim
        assert factor.matrix.dtype == torch.float32
        if expected != "dense":  # d × k with k = min(k0, k1): never more than half of P's numbers
            assert factor.matrix.shape == (dim, min(null_dim, dim - null_dim))
        torch.testing.assert_close(factor.dense().double(), exact, atol=2e-6, rtol=0)
        for rows in (80, 4):  # a full weight update ΔW (d_out × d) and a LoRA down-projection A (r × d)
            x = torch.randn(rows, dim, generator=generator)
            reference = x.double() @ exact
            scale = float(x.double().norm())
            dense = x @ stored  # the previous path, float32
            assert float((dense.double() - reference).norm()) <= 1e-6 * scale
            applied = factor.apply(x)
            assert float((applied.double() - reference).norm()) <= 1e-6 * scale
            assert float((applied - dense).norm()) <= 1e-6 * scale  # equal to the dense ΔW P within float32 noise
            out = torch.randn(rows, dim, generator=generator)
            before = out.clone()
            factor.accumulate_(out, x)
            assert float(((out - before).double() - reference).norm()) <= 2e-6 * scale + 1e-6 * float(before.norm())
            in_place = x.clone()
            factor.project_(in_place)
            assert float((in_place.double() - reference).norm()) <= 1e-6 * scale
            half = x.to(torch.bfloat16)
            factor.project_(half)
            assert half.dtype == torch.bfloat16
            assert float((half.double() - reference).norm()) <= 1e-2 * scale


def test_stored_projection_of_the_wrong_rank_is_refused():
    from nullcov.training.factored_projection import ConstraintError, FactoredProjection

    basis, _ = torch.linalg.qr(torch.randn(64, 10, dtype=torch.float64))
    stored = (basis @ basis.T).float()
    for declared in (12, 8, 56):  # too many, too few (null form), too few (complement form)
        with pytest.raises(ConstraintError, match=f"rank {declared if declared < 32 else 64 - declared}"):
            FactoredProjection.from_projection(stored, declared)
    assert FactoredProjection.from_projection(stored, 10).matrix.shape == (64, 10)


@pytest.mark.parametrize("unconditional", [False, True], ids=["conditional", "both-branches"])
def test_null_energy_of_the_statistics_own_prompts_is_their_statistics_share(request, tiny_model_dir, demo_prompts,
                                                                            unconditional):
    """The fine-tune proof's null-energy shares, summed from the linears' raw inputs while the
    sampler runs the statistics' own prompts and seeds, equal what the statistics say:
    ``Σ_t tr(P_t Σxxᵀ_t) / Σ_t tr(Σxxᵀ_t)`` per kind (per-timestep scope: each step's own ``P``).
    The statistics hold the CFG batch's conditional half, or with ``unconditional_branch`` both
    halves: the shares to compare are then those of both parts together."""
    import json

    from nullcov.models.model import load_pipeline
    from nullcov.models.sampling import configure_scheduler
    from nullcov.proof.experiment import ProofSettings, sample
    from nullcov.proof.null_energy import ENERGY_KINDS, null_energy
    from nullcov.statistics.store import read_moments
    from nullcov.training.constraint import NullSpaceConstraint

    results = request.getfixturevalue("results_both_branches" if unconditional else "results")
    schedule = json.loads(Results(results).schedule.read_text())
    pipe = load_pipeline(tiny_model_dir, "float32", torch.device("cpu"))
    configure_scheduler(pipe, schedule)
    pipe.unet.requires_grad_(False)
    for name, module in pipe.unet.named_modules():
        if name.endswith("attn2"):
            module.requires_grad_(True)
    constraint = NullSpaceConstraint(pipe.unet, results, mode="nearest")
    prompts = demo_prompts[:8]  # the fixture's statistics
    every_step = [step["timestep"] for step in schedule["steps"]]
    for scope in ("per-timestep", "all-timesteps"):
        with null_energy(pipe.unet, constraint, scope, every_step, len(prompts)) as sums:
            sample(pipe, prompts, 0, schedule, ProofSettings(guidance_scale=7.5, sample_batch=len(prompts)))
        expected = {kind: [0.0, 0.0] for kind in ENERGY_KINDS}
        for step in schedule["steps"]:
            moments, _ = read_moments(Results(results).covariance(step["name"]), "covariance")
            protected = [step["timestep"]] if scope == "per-timestep" else every_step
            for item in constraint.linears:
                if item.linear in ("to_k", "to_v"):
                    continue
                outer = torch.from_numpy(moments[item.key].sum_outer)
                projection = constraint.projection_for(item, protected).double()
                expected[item.linear][0] += float(torch.trace(projection @ outer @ projection))
                expected[item.linear][1] += float(torch.trace(outer))
        text, _ = read_moments(Results(results).covariance(TEXT_NAME), "covariance", keys=[TEXT_KEY])
        projection = constraint.lookup.text_factor.dense().double()
        outer = torch.from_numpy(text[TEXT_KEY].sum_outer)
        expected["to_kv"] = [float(torch.trace(projection @ outer @ projection)), float(torch.trace(outer))]
        for kind in ENERGY_KINDS:
            parts = ("conditional", "unconditional") if unconditional else ("conditional",)
            found = [sum(sums[part][kind][i] for part in parts) for i in (0, 1)]
            share, want = found[0] / found[1], expected[kind][0] / expected[kind][1]
            assert 0 < want < 0.5, (scope, kind, want)
            assert share == pytest.approx(want, rel=1e-5), (scope, kind)
            # the CFG batch's unconditional half is counted apart
            assert sums["unconditional"][kind][1] > 0, (scope, kind)
