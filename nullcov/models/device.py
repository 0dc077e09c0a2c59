"""The torch device a job runs on: the config's ``device`` resolved (:func:`resolve_device`), a
leased GPU made current (:func:`use_device`), and where a module's parameters live (:func:`module_device`).
"""

from __future__ import annotations

import torch

from nullcov.docs import see
from nullcov.models.model import ModelError


def resolve_device(device: str) -> str:
    """The torch device of the config's ``device``: ``auto`` is CUDA when torch sees one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but torch sees no CUDA device (torch {torch.__version__})"
                         f"{see('no-cuda-device')}")
    return device


def use_device(leased: str) -> str:
    """The torch device for a leased one; a CUDA device also becomes the current one."""
    device = resolve_device(leased)
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)  # stray "cuda" allocations follow the leased GPU
    return device


def module_device(module) -> torch.device:
    """The device a module's parameters live on (the UNet's: where its hooks see their inputs)."""
    return next(module.parameters()).device


