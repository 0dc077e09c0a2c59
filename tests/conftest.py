"""Shared fixtures: the tiny model (built once per session) and a configured pipeline."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_PROMPTS = REPO / "config" / "prompts" / "demo.txt"


def base_config(**overrides) -> dict:
    """The workflow's feature config with test-sized defaults."""
    config = {
        "seed": 0,
        "sampler_strategy": "DPM++ 2M Karras",
        "num_denoising_steps": 4,
        "collection": "trajectory",
        "guidance_scale": 7.5,
        "resolution": None,
        "batch_size": 2,
        "dtype": "float32",
        "device": "cpu",
        "collect_features": {"q": True, "k": True, "v": True, "out": True},
        "cross_attention_layers": "all",
        "text_tokens": "all",
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from nullcov.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-sd")


@pytest.fixture(scope="session")
def demo_prompts():
    from nullcov.prompts import read_prompts

    return read_prompts(DEMO_PROMPTS)


@pytest.fixture
def tiny_pipe(tiny_model_dir):
    from nullcov.model import load_pipeline

    return load_pipeline(tiny_model_dir, "float32", "cpu")
