"""Where a job's work lives: the torch device it runs on, and which step accumulators stay on it.

Every GPU job (features, attention maps, the fine-tune proof) turns its leased device into a
torch device with :func:`use_device`. The feature job asks :func:`device_steps` twice with the
same rule: when it plans its step chunks (steps whose accumulators sit in device memory do not
count against the host budget) and when each capture places its steps (the first ones on the
device, the rest through the host staging path of :class:`nullcov.collection.accumulators._HostSteps`).
"""

from __future__ import annotations

import logging

import torch

from nullcov.collection.accumulators import STAGING_BUFFERS, device_memory, plan_device_steps

log = logging.getLogger(__name__)

#: Where the step accumulators go: ``auto`` (the device while they fit), every step on the ``device``,
#: or every step on the ``host``.
ACCUMULATE = ("auto", "device", "host")


def device_steps(device: torch.device, dims: dict[str, int], num_steps: int, accumulate: str = "auto") -> int:
    """How many of ``num_steps`` step accumulators (keys of widths ``dims``) are summed on ``device``
    directly: the first ones; the rest go through the host staging path.

    ``accumulate`` (:data:`ACCUMULATE`): ``device`` every step, ``host`` none; ``auto`` every step
    on a CPU device (host memory either way: nothing to stage), and on a CUDA device as many as
    :func:`plan_device_steps` fits beside the sums (which stay on the device whatever the plan) and
    the staging buffers.
    """
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate must be 'auto', 'device' or 'host', got {accumulate!r}")
    outer = sum(d * d for d in dims.values())
    step_bytes = 8 * outer
    if accumulate == "device" or (accumulate == "auto" and device.type != "cuda"):
        return num_steps
    chosen = 0
    if accumulate == "auto":
        free, total = device_memory(device)
        free -= num_steps * 8 * sum(dims.values())
        chosen = plan_device_steps(step_bytes, num_steps, free, total, STAGING_BUFFERS * 4 * outer)
        log.info("accumulators: %d steps x %.1f MiB; %.1f GiB of %.1f GiB free on %s",
                 num_steps, step_bytes / 2**20, free / 2**30, total / 2**30, device)
    if chosen < num_steps:
        log.info("accumulators: %d step(s) on %s, %d step(s) on the host (%.1f GiB of host memory)",
                 chosen, device, num_steps - chosen, (num_steps - chosen) * step_bytes / 2**30)
    return chosen


def device_memory_steps(device: torch.device, dims: dict[str, int], num_steps: int, accumulate: str = "auto") -> int:
    """The steps of :func:`device_steps` whose accumulators take device memory, not host memory
    (none on a CPU device: its "device" accumulators are host memory)."""
    return device_steps(device, dims, num_steps, accumulate) if device.type == "cuda" else 0
