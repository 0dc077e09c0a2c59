"""Attention maps on the tiny model against diffusers' own attention probabilities."""

import numpy as np
import pytest
import torch

from nullcov.models.model import cross_attention_modules
from nullcov.models.sampling import configure_scheduler
from nullcov.models.schedule import build_schedule
from nullcov.models.tiny_model import TINY_SCHEDULER_CONFIG
from nullcov.report.attention import (
    AttentionProbe,
    collect_attention_maps,
    grid_shape,
    prompt_tokens,
    read_maps,
    write_maps,
)
from nullcov.statistics.store import StatisticsFileError

from conftest import base_config


def _schedule(pipe, config):
    schedule = build_schedule(dict(pipe.scheduler.config), config["sampler_strategy"], config["num_denoising_steps"])
    configure_scheduler(pipe, schedule)
    return schedule


class DiffusersProbabilities:
    """Reference: the classic AttnProcessor's own ``get_attention_scores`` output, recorded per call."""

    def __init__(self, pipe, names):
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())
        self.calls = {name: [] for name in names}
        self.modules = dict(cross_attention_modules(pipe.unet))
        for name in names:
            module = self.modules[name]
            original = module.get_attention_scores

            def record(query, key, attention_mask=None, original=original, name=name):
                probabilities = original(query, key, attention_mask)
                self.calls[name].append(probabilities.detach().clone())
                return probabilities

            module.get_attention_scores = record

    def close(self):
        for module in self.modules.values():
            module.__dict__.pop("get_attention_scores", None)


def test_maps_equal_diffusers_attention_probabilities(tiny_pipe, demo_prompts):
    config = base_config(num_denoising_steps=4, batch_size=2)
    schedule = _schedule(tiny_pipe, config)
    names = [name for name, _ in cross_attention_modules(tiny_pipe.unet)]
    chosen = [names[0], names[2], names[6]]  # 16x16, 8x8 (up) and 8x8 (mid)
    prompts, indices = demo_prompts[3:6], [3, 4, 5]
    reference = DiffusersProbabilities(tiny_pipe, chosen)
    try:
        found = collect_attention_maps(tiny_pipe, prompts, indices, schedule, config, chosen, [0, 3])
    finally:
        reference.close()
    tokens = found["tokens"]
    assert [len(t) for t in tokens] == [len(tiny_pipe.tokenizer(p).input_ids) for p in prompts]
    for name in chosen:
        calls, heads = reference.calls[name], reference.modules[name].heads
        assert len(calls) == 2 * 4  # two batches (2 + 1 prompts) x 4 steps
        for step in (0, 3):
            for position in range(3):
                batch, row = divmod(position, 2)
                size = 2 if batch == 0 else 1
                probabilities = calls[batch * 4 + step]  # [2 * size * heads, N, 77], CFG: [uncond, cond]
                cond = probabilities.reshape(2 * size, heads, *probabilities.shape[1:])[size + row]
                expected = cond.double().mean(0)  # heads averaged, [N, 77]
                assert torch.allclose(expected.sum(-1), torch.ones(expected.shape[0], dtype=torch.float64), atol=1e-5)
                maps = found["maps"][(position, step, name)]
                count = len(tokens[position])
                h, w = maps.shape[1:]
                assert h * w == expected.shape[0] and maps.shape[0] == count
                np.testing.assert_allclose(maps, expected[:, :count].T.reshape(count, h, w).numpy(), rtol=1e-4,
                                           atol=1e-6)
    assert {key[1] for key in found["maps"]} == {0, 3}
    assert found["images"].shape == (3, 32, 32, 3) and 0 <= found["images"].min() <= found["images"].max() <= 1


def test_maps_leave_the_trajectory_unchanged(tiny_pipe, demo_prompts):
    """The probe only reads: the final images equal a plain pipeline call with the same seeds."""
    config = base_config(num_denoising_steps=3, batch_size=2)
    schedule = _schedule(tiny_pipe, config)
    names = [name for name, _ in cross_attention_modules(tiny_pipe.unet)]
    found = collect_attention_maps(tiny_pipe, demo_prompts[:2], [0, 1], schedule, config, names, [1])
    generators = [torch.Generator("cpu").manual_seed(i) for i in (0, 1)]
    plain = tiny_pipe(prompt=demo_prompts[:2], guidance_scale=7.5, generator=generators, output_type="np",
                      **schedule["set_timesteps"]).images
    np.testing.assert_allclose(found["images"], plain, atol=1e-5)
    assert len(found["maps"]) == 2 * len(names)


def test_probe_sums_to_one_over_the_text_positions(tiny_pipe, demo_prompts):
    config = base_config(num_denoising_steps=2, guidance_scale=1.0, batch_size=1)
    schedule = _schedule(tiny_pipe, config)
    layers = cross_attention_modules(tiny_pipe.unet)[:2]
    with torch.inference_mode(), AttentionProbe(tiny_pipe.unet, layers, [1]) as probe:
        probe.begin_batch(1)
        tiny_pipe(prompt=demo_prompts[:1], guidance_scale=1.0, generator=[torch.Generator().manual_seed(0)],
                  output_type="latent", **schedule["set_timesteps"])
        assert probe.end_batch() == 2
    result = probe.result()
    assert sorted(result) == sorted((1, name) for name, _ in layers)
    for probabilities in result.values():
        assert probabilities.shape[0] == 1 and probabilities.shape[-1] == 77  # guidance off: the plain batch
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(probabilities.shape[:2]))


def test_tokens_and_grids(tiny_pipe):
    tokens = prompt_tokens(tiny_pipe.tokenizer, "a photo of a cat")
    assert tokens[0] == "<bos>" and tokens[-1] == "<eos>"
    assert "".join(tokens[1:-1]).replace("·", "") == "aphotoofacat"
    assert grid_shape(256, 16, 16) == (16, 16) and grid_shape(64, 16, 16) == (8, 8)
    assert grid_shape(32, 8, 16) == (4, 8)
    with pytest.raises(ValueError, match="do not form a grid"):
        grid_shape(60, 16, 16)


def _written_maps(path, images=True):
    """A small attention_maps.h5 of prompts 3 and 7 at steps 0 and 2 of a 3-step schedule, two layers."""
    rng = np.random.default_rng(4)
    schedule = build_schedule(TINY_SCHEDULER_CONFIG, "Euler", 3)
    layers = ["down.attn2", "mid.attn2"]
    found = {"maps": {(position, step, layer): rng.random((4, 8, 8), dtype=np.float32)
                      for position in (0, 1) for step in (0, 2) for layer in layers},
             "tokens": [["<bos>", "a", "cat", "<eos>"], ["<bos>", "a", "dog", "<eos>"]],
             "images": rng.random((2, 16, 16, 3)) if images else None}
    provenance = {"model": {"path": "m", "fingerprint": "f"}, "prompts": {"indices": [3, 7]}}
    write_maps(path, found, [3, 7], ["a cat", "a dog"], schedule, [0, 2], layers, provenance)
    return found, schedule, layers


def test_maps_file_round_trips_through_the_store(tmp_path):
    path = tmp_path / "attention_maps.h5"
    found, schedule, layers = _written_maps(path)
    stored = read_maps(path)
    names = [step["name"] for step in schedule["steps"]]
    assert sorted(stored["maps"]) == sorted((index, names[step], layer) for index in (3, 7) for step in (0, 2)
                                            for layer in layers)
    for position, index in enumerate((3, 7)):
        assert stored["tokens"][index] == found["tokens"][position]
        np.testing.assert_array_equal(stored["images"][index], found["images"][position].astype(np.float32))
        for step in (0, 2):
            for layer in layers:
                np.testing.assert_array_equal(stored["maps"][(index, names[step], layer)],
                                              found["maps"][(position, step, layer)])
    assert stored["provenance"]["model"]["fingerprint"] == "f"
    assert [p.name for p in tmp_path.iterdir()] == ["attention_maps.h5"]  # atomic: nothing left beside it


def test_a_flipped_byte_in_the_maps_file_is_refused_naming_file_and_fix(tmp_path):
    import h5py

    path = tmp_path / "attention_maps.h5"
    _, schedule, layers = _written_maps(path, images=False)
    key = f"prompt_0007/{schedule['steps'][2]['name']}/{layers[1]}"
    with h5py.File(path, "r") as handle:
        info = handle[key]["maps"].id.get_chunk_info(0)
    with open(path, "r+b") as handle:
        handle.seek(info.byte_offset + info.size // 2)
        original = handle.read(4)
        handle.seek(info.byte_offset + info.size // 2)
        handle.write(bytes(b ^ 0xFF for b in original))
    with pytest.raises(StatisticsFileError, match="fails its checksum") as info:
        read_maps(path)
    assert str(path) in str(info.value) and f"snakemake --cores all --force {path}" in str(info.value)


def test_a_maps_file_of_an_older_nullcov_is_refused(tmp_path):
    """attention_maps.h5 as nullcov wrote it before the store: plain datasets, no provenance or checksums."""
    import h5py

    path = tmp_path / "attention_maps.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["nullcov_kind"] = "attention"
        group = handle.create_group("prompt_0001")
        group.attrs["tokens"] = '["<bos>", "<eos>"]'
        group.create_group("alpha_00_0999/down.attn2").create_dataset("maps", data=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(StatisticsFileError, match="attention_maps.h5"):
        read_maps(path)
