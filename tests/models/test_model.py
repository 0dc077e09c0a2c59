"""Locating models: local folders, hub ids from the local HF cache (offline), layer names."""

import shutil

import pytest

from nullcov.models.model import (
    ModelError,
    cross_attention_layer_names,
    cross_attention_modules,
    resolve_model_dir,
    scheduler_config,
    select_layers,
)
from nullcov.models.tiny_model import TINY_SCHEDULER_CONFIG


def _fake_hf_cache(hf_home, repo_id, model_dir, revision="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub writes: hub/models--owner--name/{refs/main, snapshots/<rev>/...}."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return repo / "snapshots" / revision


def test_hub_id_resolves_from_the_local_cache_offline(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    snapshot = _fake_hf_cache(tmp_path / "hf", "nullcov-test/tiny-sd", tiny_model_dir)
    assert resolve_model_dir("nullcov-test/tiny-sd") == snapshot
    assert scheduler_config("nullcov-test/tiny-sd") == TINY_SCHEDULER_CONFIG
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        resolve_model_dir("nullcov-test/absent")


def test_local_folder_and_builtin(tiny_model_dir):
    assert resolve_model_dir(str(tiny_model_dir)) == tiny_model_dir
    assert str(resolve_model_dir("builtin:tiny")) == "resources/models/tiny-sd"
    with pytest.raises(ModelError, match="no such folder"):
        resolve_model_dir("/definitely/not/here")


def test_layer_names_from_config_equal_the_loaded_unet(tiny_pipe, tiny_model_dir):
    names = cross_attention_layer_names(tiny_model_dir)
    assert names == [name for name, _ in cross_attention_modules(tiny_pipe.unet)]
    assert len(names) == 7 and all(name.endswith("attn2") for name in names)
    assert select_layers(names, "all") == names
    assert select_layers(names, [6, names[0]]) == [names[6], names[0]]
    with pytest.raises(ModelError, match="more than once"):
        select_layers(names, [0, names[0]])
