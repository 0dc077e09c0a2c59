"""builtin:shapes: the caption grammar and renderer, the evaluator, the shipped model and its training."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from nullcov.models.model import (
    BUILTIN_SHAPES_DIR,
    MANIFEST,
    ModelError,
    check_manifest,
    load_pipeline,
    resolve_model_dir,
)
from nullcov.prompts import read_prompts
from nullcov.shapes import evaluation as shapes_eval
from nullcov.shapes import evaluator
from nullcov.shapes import grammar as shapes
from nullcov.shapes.rare_tokens import RARE_TOKENS

from conftest import REPO


# -- the data set -----------------------------------------------------------------------------------
def test_training_batches_are_a_pure_function_of_seed_and_index():
    captions, pixels = shapes.training_batch(0, 1000, 6)
    again_captions, again_pixels = shapes.training_batch(0, 1000, 6)
    assert captions == again_captions and np.array_equal(pixels, again_pixels)
    # a sample does not depend on the batch it is drawn in
    tail_captions, tail_pixels = shapes.training_batch(0, 1003, 3)
    assert tail_captions == captions[3:] and np.array_equal(tail_pixels, pixels[3:])
    other_captions, other_pixels = shapes.training_batch(1, 1000, 6)
    assert other_captions != captions and not np.array_equal(other_pixels, pixels)
    assert pixels.shape == (6, 3, shapes.RESOLUTION, shapes.RESOLUTION) and pixels.dtype == np.float32
    assert -1.0 <= pixels.min() and pixels.max() <= 1.0


def test_training_data_covers_the_grammar_and_never_shows_an_unseen_shape():
    scenes = [shapes.sample_scene(0, index) for index in range(2000)]
    assert {scene.shape for scene in scenes} == set(shapes.SHAPES)
    assert {scene.colour for scene in scenes} == set(shapes.COLOURS)
    assert {scene.position for scene in scenes} == set(shapes.POSITIONS)
    assert {scene.template for scene in scenes} == set(range(len(shapes.TEMPLATES)))
    for scene in scenes[:200]:
        parsed = shapes.parse_caption(scene.caption)
        assert (parsed.colour, parsed.shape, parsed.position) == (scene.colour, scene.shape, scene.position)
        assert parsed.names_size == scene.names_size and (not scene.names_size or parsed.size == scene.size)


def test_core_grammar_and_vocabulary():
    assert shapes.caption("red", "circle", "on the left") == "a red circle on the left"
    assert shapes.caption("blue", "square", "at the top", "small", 1) == "a small blue square at the top"
    words = set(shapes.vocabulary())
    assert {"red", "green", "blue", "yellow", "circle", "square", "triangle", "star", "left", "bottom"} <= words
    with pytest.raises(ValueError, match="'a purple circle on the left' is not in the shapes grammar"):
        shapes.parse_caption("a purple circle on the left")


def test_shipped_prompt_sets_are_grammar_captions_and_disjoint():
    demo = [shapes.parse_caption(p) for p in read_prompts(REPO / "config/prompts/shapes-demo.txt")]
    held_out = [shapes.parse_caption(p) for p in read_prompts(REPO / "config/prompts/shapes-validation.txt")]
    combos = {(s.colour, s.shape, s.position) for s in demo}
    assert len(combos) == len(demo) == 36
    assert not combos & {(s.colour, s.shape, s.position) for s in held_out}
    assert all(s.shape in shapes.SHAPES for s in demo + held_out)


# -- the evaluator ----------------------------------------------------------------------------------
def test_evaluator_reads_held_out_renders():
    accuracy = evaluator.render_accuracy(count=200)
    for attribute in evaluator.ATTRIBUTES:
        assert accuracy["clean"][attribute] >= 0.99, (attribute, accuracy)
        assert accuracy["noise"][attribute] >= 0.99, (attribute, accuracy)
        assert accuracy["blur"][attribute] >= 0.95, (attribute, accuracy)


@pytest.mark.parametrize("shape", shapes.ALL_SHAPES)
def test_evaluator_names_every_shape_at_every_position(shape):
    for colour in shapes.COLOURS:
        for position in shapes.POSITIONS:
            for size in shapes.SIZES:
                scene = shapes.Scene(colour, shape, position, size)
                reading = evaluator.read_image(shapes.render(scene, noise_seed=7))
                read = (reading.colour, reading.shape, reading.position, reading.size)
                assert read == (colour, shape, position, size)


def test_evaluator_finds_nothing_in_a_blank_image_and_scores_it_wrong():
    blank = np.full((32, 32, 3), shapes.BACKGROUND, dtype=np.uint8)
    reading = evaluator.read_image(blank)
    assert not reading.found and reading.shape == evaluator.NONE
    scene = shapes.parse_caption("a small red circle on the left")
    assert evaluator.score(reading, scene) == {"colour": False, "shape": False, "position": False, "size": False}
    assert evaluator.read_image(blank.astype(np.float32) / 255.0).shape == evaluator.NONE


def test_accuracy_counts_the_attributes_read_correctly_in_renders():
    """Renders scored against the caption asked: one attribute wrong in each of three, a blank image,
    one all correct; size counts only where the caption names one, a prompt not read (``{}``) nowhere."""
    scene = shapes.Scene
    drawn_and_asked = [  # (rendered, asked); template 1 names the size
        (scene("red", "circle", "on the left", "large", 1), scene("red", "circle", "on the left", "large", 1)),
        (scene("blue", "square", "at the top", "small", 1), scene("blue", "square", "at the top", "large", 1)),
        (scene("green", "triangle", "on the right", "large"), scene("yellow", "triangle", "on the right", "large")),
        (scene("red", "star", "at the bottom", "large", 2), scene("red", "circle", "at the bottom", "large", 2)),
        (None, scene("blue", "circle", "on the left", "small", 3)),
    ]
    scores = []
    for index, (drawn, asked) in enumerate(drawn_and_asked):
        image = np.full((shapes.RESOLUTION, shapes.RESOLUTION, 3), shapes.BACKGROUND, dtype=np.uint8) \
            if drawn is None else shapes.render(drawn, noise_seed=index)
        scores.append(evaluator.score(evaluator.read_image(image), asked))
    assert [sorted(name for name, ok in correct.items() if not ok) for correct in scores] == \
        [[], ["size"], ["colour"], ["shape"], ["colour", "position", "shape"]]
    expected = {"colour": 3 / 5, "shape": 3 / 5, "position": 4 / 5, "size": 1 / 2}
    assert {name: evaluator.accuracy(scores, name) for name in evaluator.ATTRIBUTES} == pytest.approx(expected)
    assert evaluator.accuracy(scores) == pytest.approx(1 / 5)  # every attribute asked: the first only
    assert evaluator.accuracy(scores + [{}, {}]) == pytest.approx(1 / 5)
    assert np.isnan(evaluator.accuracy([{}, {}])) and np.isnan(evaluator.accuracy(scores[2:], "size"))


def test_attention_on_object_against_a_brute_force_sum():
    rng = np.random.default_rng(0)
    word_map = rng.random((4, 4))
    mask = np.zeros((32, 32), dtype=bool)
    mask[0:8, 0:16] = True  # grid cells (0, 0) and (0, 1) fully, nothing else
    result = shapes_eval.attention_on_object(word_map, mask)
    inside = word_map[0, 0] + word_map[0, 1]
    assert result["share"] == pytest.approx(inside / word_map.sum())
    assert result["mask_fraction"] == pytest.approx(2 / 16)
    assert result["ratio"] == pytest.approx(inside / word_map.sum() * 8)


# -- the shipped model ------------------------------------------------------------------------------
def test_shipped_model_resolves_loads_plainly_and_stays_small():
    from diffusers import DiffusionPipeline

    assert resolve_model_dir("builtin:shapes") == BUILTIN_SHAPES_DIR
    weights = sum(path.stat().st_size for path in BUILTIN_SHAPES_DIR.rglob("*.safetensors"))
    assert weights <= 8 * 2**20
    pipe = DiffusionPipeline.from_pretrained(BUILTIN_SHAPES_DIR)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    image = pipe("a red circle on the left", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    assert image.shape == (shapes.RESOLUTION, shapes.RESOLUTION, 3)
    record = json.loads((BUILTIN_SHAPES_DIR / "training.json").read_text())
    assert record["settings"]["seed"] == 0 and record["loss"]["unet_text"]


@pytest.fixture
def shapes_copy(tmp_path, monkeypatch):
    """A copy of the shipped folder standing in for it (nullcov.models.model.BUILTIN_SHAPES_DIR)."""
    import nullcov.models.model

    copy = tmp_path / "shapes"
    shutil.copytree(BUILTIN_SHAPES_DIR, copy)
    monkeypatch.setattr(nullcov.models.model, "BUILTIN_SHAPES_DIR", copy.resolve())
    return copy


@pytest.mark.parametrize("damage", ["changed", "truncated", "missing"])
def test_a_damaged_shipped_model_is_refused_naming_the_file_and_the_fix(shapes_copy, damage):
    weights = shapes_copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    if damage == "changed":
        weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.unlink()
    with pytest.raises(ModelError, match=r"unet/diffusion_pytorch_model\.safetensors .*make train-shapes"):
        resolve_model_dir("builtin:shapes")
    with pytest.raises(ModelError, match=r"unet/diffusion_pytorch_model\.safetensors"):
        load_pipeline(shapes_copy, "float32", "cpu")


def test_manifest_lists_every_file_of_the_shipped_model():
    listed = {line.split("  ", 1)[1] for line in (BUILTIN_SHAPES_DIR / MANIFEST).read_text().splitlines()}
    present = {p.relative_to(BUILTIN_SHAPES_DIR).as_posix() for p in BUILTIN_SHAPES_DIR.rglob("*") if p.is_file()}
    assert listed == present - {MANIFEST}
    check_manifest(BUILTIN_SHAPES_DIR)


def test_shipped_model_draws_what_a_handful_of_prompts_ask(shipped_pipe):
    """The model learned its world: 8 prompts (each template twice), the default sampler, read back."""
    from nullcov.models.sampling import configure_scheduler
    from nullcov.models.schedule import build_schedule

    pipe = shipped_pipe
    schedule = build_schedule(dict(pipe.scheduler.config), "DPM++ 2M Karras", 20)
    configure_scheduler(pipe, schedule)
    scenes = [shapes.Scene("red", "circle", "on the left", "small", 0),
              shapes.Scene("blue", "square", "at the top", "large", 1),
              shapes.Scene("yellow", "triangle", "at the bottom", "small", 2),
              shapes.Scene("green", "circle", "on the right", "small", 3),
              shapes.Scene("green", "triangle", "at the top", "small", 0),
              shapes.Scene("red", "square", "at the bottom", "small", 1),
              shapes.Scene("blue", "circle", "on the right", "small", 2),
              shapes.Scene("yellow", "square", "on the left", "small", 3)]
    config = {"seed": 0, "collection": "trajectory", "guidance_scale": 7.5, "resolution": None, "batch_size": 8}
    result = shapes_eval.evaluate(pipe, scenes, schedule, config)
    rows = result["rows"]
    wrong = [row for row in rows if not all(v for k, v in row.items() if k.startswith("correct_"))]
    assert len(wrong) <= 1, wrong
    for layer, words in result["attention"].items():
        assert set(words) == {"colour", "shape"}, layer


@pytest.fixture(scope="module")
def shipped_pipe():
    torch.set_num_threads(2)
    return load_pipeline(resolve_model_dir("builtin:shapes"), "float32", "cpu")


# -- training ---------------------------------------------------------------------------------------
def _weights_digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*.safetensors")}


def test_training_timesteps_put_the_asked_share_of_each_batch_in_the_noisy_range():
    import torch

    from nullcov.shapes.train import ShapesTraining, sample_timesteps

    settings = ShapesTraining(high_noise_fraction=0.25, high_noise_start=700)
    draws = torch.stack([sample_timesteps(settings, 1000, 32, torch.Generator().manual_seed(seed))
                         for seed in range(200)])
    assert bool((draws[:, :8] >= 700).all()) and int(draws.min()) >= 0 and int(draws.max()) <= 999
    assert abs(float((draws[:, 8:] < 700).float().mean()) - 0.7) < 0.025  # the rest: uniform, 70 % below 700
    again = sample_timesteps(settings, 1000, 32, torch.Generator().manual_seed(3))
    assert torch.equal(again, draws[3])
    uniform = sample_timesteps(ShapesTraining(high_noise_fraction=0.0), 1000, 32, torch.Generator().manual_seed(3))
    assert torch.equal(uniform, torch.randint(0, 1000, (32,), generator=torch.Generator().manual_seed(3)))


def test_training_a_few_steps_writes_a_loadable_checked_reproducible_folder(tmp_path):
    from nullcov.shapes.train import ShapesTraining, train

    settings = ShapesTraining(vae_steps=3, unet_steps=3, batch_size=4, scaling_samples=8, warmup_steps=1, log_every=1)
    lines = []
    first = train(tmp_path / "first", settings, log=lines.append)
    second = train(tmp_path / "second", settings, log=lambda line: None)
    assert _weights_digest(first) == _weights_digest(second)
    assert any("unet+text step 3/3" in line and "ETA" in line for line in lines)
    check_manifest(first)
    record = json.loads((first / "training.json").read_text())
    assert [step for step, _ in record["loss"]["unet_text"]] == [1, 2, 3]
    assert record["settings"]["unet_steps"] == 3 and record["vae_scaling_factor"] > 0
    seconds = record["seconds"]
    assert 0 < seconds["vae"] and 0 < seconds["unet_text"] and seconds["vae"] + seconds["unet_text"] <= seconds["total"]
    pipe = load_pipeline(first, "float32", "cpu")
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == shapes.RESOLUTION
    assert pipe.tokenizer.tokenize("a red sks") == ["a</w>", "red</w>", "sks</w>"]  # a rare token, added on saving
    assert set(record["rare_tokens"]["tokens"]) == set(RARE_TOKENS)
    assert evaluator.reads_model(first) and evaluator.reads_model(BUILTIN_SHAPES_DIR)  # the proof evaluates them
    assert not evaluator.reads_model(tmp_path)
    assert not list(tmp_path.glob(".first*"))  # no temporary folder left behind


# -- rare identifier tokens -------------------------------------------------------------------------
def test_rare_tokens_are_one_token_each_never_in_a_training_caption_with_rows_of_their_own():
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(BUILTIN_SHAPES_DIR / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(BUILTIN_SHAPES_DIR / "text_encoder")
    record = json.loads((BUILTIN_SHAPES_DIR / "training.json").read_text())["rare_tokens"]
    captions = [shapes.sample_scene(0, index).caption for index in range(4096)]
    seen = {int(i) for i in tokenizer(captions).input_ids for i in i}
    for word in RARE_TOKENS:
        assert tokenizer.tokenize(f"a red {word} on the left")[2] == f"{word}</w>"
        assert len(tokenizer(word).input_ids) == 3  # BOS, the word, EOS
        assert record["tokens"][word] == tokenizer.convert_tokens_to_ids(f"{word}</w>") not in seen
    assert len(tokenizer) == text_encoder.config.vocab_size == text_encoder.get_input_embeddings().weight.shape[0]


def test_adding_rare_tokens_keeps_every_grammar_caption_and_embedding_and_draws_the_new_rows_seeded(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from nullcov.models.tiny_model import text_encoder_config, write_tokenizer
    from nullcov.shapes.rare_tokens import extend_embeddings, extend_tokenizer

    write_tokenizer(tmp_path, shapes.vocabulary(), num_merges=10_000)
    templates = tuple(range(len(shapes.TEMPLATES)))
    captions = [scene.caption for scene in shapes.grammar_scenes(shapes.ALL_SHAPES, templates)]
    before = CLIPTokenizer.from_pretrained(tmp_path)(captions).input_ids
    added = extend_tokenizer(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    assert tokenizer(captions).input_ids == before
    assert [tokenizer.convert_ids_to_tokens(len(tokenizer) - len(added) + i) for i in range(len(added))] == added
    assert extend_tokenizer(tmp_path) == []  # a second time adds nothing
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(**text_encoder_config(len(tokenizer) - len(added), 16, intermediate_size=32)))
    old = model.get_input_embeddings().weight.detach().clone()
    extend_embeddings(model, len(added), seed=3)
    weight = model.get_input_embeddings().weight.detach()
    assert torch.equal(weight[: len(old)], old) and model.config.vocab_size == len(tokenizer)
    again = CLIPTextModel(CLIPTextConfig(**text_encoder_config(len(old), 16, intermediate_size=32)))
    extend_embeddings(again, len(added), seed=3)
    assert torch.equal(again.get_input_embeddings().weight[len(old):], weight[len(old):])
    with pytest.raises(ValueError, match=r"\['red'\] are grammar words"):
        extend_tokenizer(tmp_path, ("red",))


# -- the workflow on it -----------------------------------------------------------------------------
def test_workflow_runs_on_the_shipped_model_with_its_training_curve(tmp_path):
    """model: builtin:shapes goes through the local-folder path: features, report and the training curve."""
    from nullcov.statistics.store import read_projections

    from conftest import snakemake, write_config

    prompts = read_prompts(REPO / "config/prompts/shapes-demo.txt")[:4]
    write_config(tmp_path, prompts, model="builtin:shapes", attention_prompts=[0], report_steps=1)
    snakemake(tmp_path)
    results = tmp_path / "results"
    assert (results / "report" / "model" / "training_curve.png").stat().st_size > 10_000
    assert list((results / "report" / "attention").glob("prompt_0000_*.png"))
    _, attrs = read_projections(results / "projections" / "text.h5")
    model = attrs["provenance"]["model"]
    assert model["spec"] == "builtin:shapes" and model["path"] == str(BUILTIN_SHAPES_DIR)
    assert not (tmp_path / "resources" / "models").exists()  # nothing built: the shipped folder is used


def test_shipped_goals_name_every_goal_missed():
    from nullcov.shapes.train import SHIPPED_GOALS

    accuracy = {"colour": 0.95, "position": 0.90, "shape": 0.85}
    assert SHIPPED_GOALS.failures(1800, 8 * 1024**2, accuracy) == []
    missed = SHIPPED_GOALS.failures(1801, 8 * 1024**2 + 1, accuracy | {"shape": 0.84})
    assert [words.split()[0] for words in missed] == ["training", "folder", "shape"]
    assert "30.0 min" in missed[0] and "84.0 %" in missed[2]


def test_folder_bytes_counts_every_file_below(tmp_path):
    from nullcov.shapes.train import folder_bytes

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "weights").write_bytes(b"x" * 1000)
    (tmp_path / "SHA256SUMS").write_bytes(b"y" * 24)
    assert folder_bytes(tmp_path) == 1024
