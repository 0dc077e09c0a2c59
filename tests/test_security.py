"""Nothing we read can execute code: HDF5 + JSON only, safetensors only, no remote code."""

import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from nullcov.models.model import load_pipeline
from nullcov.statistics.store import StatisticsFileError, read_moments

REPO = Path(__file__).resolve().parent.parent
UNSAFE = re.compile(
    r"import pickle|from pickle|pickle\.load|torch\.load\(|allow_pickle\s*=\s*True|trust_remote_code\s*=\s*True"
    r"|(?<![.\w])eval\(|(?<![.\w])exec\("
)


def test_no_unsafe_loading_in_the_code():
    sources = sorted((REPO / "nullcov").rglob("*.py")) + sorted((REPO / "scripts").glob("*.py"))
    offenders = [f"{path.name}:{n}" for path in sources for n, line in enumerate(path.read_text().splitlines(), 1)
                 if UNSAFE.search(line)]
    assert offenders == []


def test_pickled_weights_are_refused_not_loaded(tmp_path, tiny_model_dir):
    """A model folder with only .bin (pickle) UNet weights must fail to load, not be unpickled."""
    import torch
    from safetensors.torch import load_file

    model = tmp_path / "pickled-model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), model / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(Exception, match="safetensors"):
        load_pipeline(model, "float32", "cpu")


def test_object_datasets_in_a_foreign_results_file_are_refused(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["nullcov_kind"] = "features"
        handle.attrs["provenance"] = "{}"
        group = handle.create_group("layer/to_q")
        group["count"] = np.int64(3)
        group.create_dataset("sum", data=np.array([b"cos\nsystem\n(S'echo hacked'\ntR."], dtype=object),
                             dtype=h5py.string_dtype())
        group["sum_outer"] = np.zeros((1, 1))
    with pytest.raises(StatisticsFileError, match="float64"):
        read_moments(path, "features")
