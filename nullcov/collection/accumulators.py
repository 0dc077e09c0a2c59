"""Where the float64 moment accumulators live and how products get into them.

The product (:func:`gram`, :func:`column_sums`, :func:`accumulate`, :class:`TorchMoments`):
float32 matmuls (TF32 must be off, see :func:`exact_matmul`) summed into float64; column sums
likewise (float32 within a UNet call, float64 across calls). fp16/bf16 inputs on CUDA go
straight into a GEMM with float32 accumulation and float32 output (the product of two fp16 or
bf16 numbers is exact in float32, so this equals upcasting first, without the copy and on
tensor cores); never an fp16 output, never TF32. A step's first product is copied into its
accumulator, later ones added (no zero-fill pass over Σ d² per step). The capture centres its
inputs about a shift first, in float32 (:func:`centred`), so its products take the float32 path.

The placement (:func:`plan_device_steps`, :func:`device_memory`, :class:`_HostSteps`): a step's
float64 accumulator (``sum_outer``, Σ d² × 8 bytes over the hooked linears) sits on the device
when it fits (from the free device memory with a reserve for activations); the steps that do
not fit keep it on the host, and each UNet call then ships one float32 partial product
(computed on the device) through a pinned buffer, added into float64 by a worker thread while
the GPU runs on. Sums and counts always stay on the device (O(d) per step).
"""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from nullcov.statistics.moments import Moments

log = logging.getLogger(__name__)

#: Device memory kept free for the pipeline's activations when planning accumulators: the larger
#: of this fraction of the device and :data:`RESERVE_MIN_BYTES`.
RESERVE_FRACTION = 0.2
RESERVE_MIN_BYTES = 2 * 1024**3
#: Number of device/pinned staging buffers for host-side steps (double buffering).
STAGING_BUFFERS = 2

@contextlib.contextmanager
def exact_matmul():
    """Disable TF32 (which would round the products) for the duration."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# -- the product ------------------------------------------------------------------------------------
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_mm_out_dtype_works: bool | None = None  # learned on first use: torch.mm(a, b, out_dtype) on CUDA


def gram(rows: torch.Tensor, out: torch.Tensor | None = None, mode: str = "auto") -> torch.Tensor:
    """``rowsᵀ rows`` as float32 with float32 accumulation (exact products), optionally into ``out``.

    ``mode``: ``auto`` (fp16/bf16 on CUDA: one GEMM with fp16/bf16 inputs and float32 output; else
    upcast), ``out_dtype`` (force that GEMM), ``upcast`` (convert to float32, then a float32 GEMM).
    A float32 GEMM on CUDA must run with TF32 off (:func:`exact_matmul`).
    """
    global _mm_out_dtype_works
    if mode not in ("auto", "out_dtype", "upcast"):
        raise ValueError(f"mode must be auto, out_dtype or upcast, got {mode!r}")
    half = rows.dtype in _HALF_DTYPES
    if mode == "out_dtype" or (mode == "auto" and half and rows.is_cuda and _mm_out_dtype_works is not False):
        try:
            if out is None:
                result = torch.mm(rows.t(), rows, torch.float32)
            else:
                result = torch.mm(rows.t(), rows, torch.float32, out=out)
            _mm_out_dtype_works = True
            return result
        except (RuntimeError, TypeError, NotImplementedError):
            if mode == "out_dtype":
                raise
            _mm_out_dtype_works = False
            log.info("torch.mm(..., out_dtype=float32) unavailable for %s on %s: upcasting", rows.dtype, rows.device)
    rows = rows.float()
    return torch.mm(rows.t(), rows, out=out)


def column_sums(inputs: torch.Tensor, dim: int) -> torch.Tensor:
    """Sums over ``dim`` with float32 accumulation (float64 for float64 inputs), like the products.

    (A float64-accumulating reduction of float32 inputs is 10-20x slower on CPU.)
    """
    return inputs.sum(dim=dim, dtype=torch.float64 if inputs.dtype == torch.float64 else torch.float32)


def centring_shift(rows: torch.Tensor) -> torch.Tensor:
    """The shift that moments are taken about: the float64 column mean of ``rows`` [n, d],
    rounded to float32 so that :func:`centred` subtracts exactly the value recorded. Any shift
    is exact algebra; a non-finite mean column becomes 0, so that a NaN or inf input stays in
    its own prompt's rows (and the non-finite check names that prompt)."""
    mean = (column_sums(rows, dim=0).double() / rows.shape[0]).float()
    return torch.where(torch.isfinite(mean), mean, torch.zeros_like(mean)).double()


def centred(inputs: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``inputs - shift`` in float32 (float64 for float64 inputs): the moments' rows. With the
    shift near the mean, the float32 products keep the digits of the spread, not of ``|μ|²``."""
    dtype = torch.float64 if inputs.dtype == torch.float64 else torch.float32
    return inputs.to(dtype) - shift.to(dtype)


def accumulate(total: torch.Tensor, part: torch.Tensor, first: bool = False) -> None:
    """``total += part`` for a float64 ``total`` and a float32 ``part`` on the same device;
    ``total = part`` when ``first`` (accumulators start uninitialised: no zero-fill pass).

    On the CPU through numpy, whose mixed-precision add is 2-3x faster than torch's (and works
    on inference tensors from any thread); on a GPU in place, without a float64 temporary.
    """
    if total.device.type == "cpu":
        target, source = total.detach().numpy(), part.detach().numpy()
        if first:
            np.copyto(target, source)
        else:
            np.add(target, source, out=target)
    elif first:
        total.copy_(part)
    else:
        total.add_(part)


class TorchMoments:
    """count / sum / sum of outer products of rows about a shift (the first rows' mean),
    accumulated in float64 on a device."""

    def __init__(self, dim: int, device):
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, rows: torch.Tensor) -> None:
        if self.shift is None:
            self.shift = centring_shift(rows)
        rows = centred(rows, self.shift)
        accumulate(self.sum_outer, gram(rows))
        self.sum.add_(column_sums(rows, dim=0).double())
        self.count += rows.shape[0]

    def to_moments(self) -> Moments:
        return Moments.about(self.count, self.shift.cpu().numpy(), self.sum.cpu().numpy(), self.sum_outer.cpu().numpy())


# -- where the accumulators live --------------------------------------------------------------------
def plan_device_steps(step_bytes: int, num_steps: int, free_bytes: int, total_bytes: int,
                      staging_bytes: int = 0, reserve_fraction: float = RESERVE_FRACTION,
                      reserve_min_bytes: int = RESERVE_MIN_BYTES) -> int:
    """How many of ``num_steps`` step accumulators (``step_bytes`` each) to keep on the device.

    ``free_bytes`` is what the device can still give (free plus the allocator's cached blocks),
    ``total_bytes`` its size. The larger of ``reserve_fraction`` × total and ``reserve_min_bytes``
    stays free for activations. When not every step fits, ``staging_bytes`` (the device buffers
    of the host path) come out of the budget too. The first steps go to the device.
    """
    if num_steps <= 0:
        return 0
    budget = free_bytes - max(reserve_fraction * total_bytes, reserve_min_bytes)
    if step_bytes <= 0 or num_steps * step_bytes <= budget:
        return num_steps
    return max(0, min(num_steps, int((budget - staging_bytes) // step_bytes)))


def device_memory(device: torch.device) -> tuple[int, int]:
    """(bytes this process can still allocate on a CUDA ``device``, what it may use in all).

    Both honour ``torch.cuda.set_per_process_memory_fraction``.
    """
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    free += cached
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction is not None:  # torch.cuda.set_per_process_memory_fraction caps the allocator
        with contextlib.suppress(RuntimeError, AttributeError, TypeError):
            total = int(fraction(device) * total)
            free = min(free, total - torch.cuda.memory_allocated(device))
    return int(free), int(total)


class _HostSteps:
    """float64 ``sum_outer`` accumulators on the host for some steps, fed one float32 flat
    partial (every key of one UNet call) at a time through ``STAGING_BUFFERS`` staging buffers.

    On CUDA: the hooks write the partial into a device buffer, :meth:`flush` queues its copy
    into a pinned buffer on a side stream, and a worker thread waits for that copy and adds it
    into float64. On a CPU device the same path runs with plain buffers and a plain copy.
    """

    def __init__(self, flat_size: int, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.flat_size = flat_size
        self.accumulators: dict[int, torch.Tensor] = {}
        self.device_buffers = [
            torch.empty(flat_size, dtype=torch.float32, device=device) for _ in range(STAGING_BUFFERS)
        ]
        self.host_buffers = [
            torch.empty(flat_size, dtype=torch.float32, pin_memory=self.cuda) for _ in range(STAGING_BUFFERS)
        ]
        self.copy_done = [torch.cuda.Event() if self.cuda else None for _ in range(STAGING_BUFFERS)]
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.pending: list[Future | None] = [None] * STAGING_BUFFERS
        self.current = 0
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nullcov-host-accumulate")

    def accumulator(self, step: int) -> torch.Tensor:
        """Step ``step``'s float64 accumulator (uninitialised until its first :meth:`flush`)."""
        if step not in self.accumulators:
            self.accumulators[step] = torch.empty(self.flat_size, dtype=torch.float64)
        return self.accumulators[step]

    def begin_call(self) -> torch.Tensor:
        """The device buffer this UNet call writes its partial products into."""
        if self.cuda and self.pending[self.current] is not None:
            # the previous copy out of this buffer must be done before the kernels overwrite it
            torch.cuda.current_stream(self.device).wait_event(self.copy_done[self.current])
        return self.device_buffers[self.current]

    def flush(self, step: int) -> None:
        """Send this call's partial products to step ``step``'s float64 accumulator."""
        slot = self.current
        first = step not in self.accumulators  # the single worker keeps the order: copy, then adds
        accumulator = self.accumulator(step)
        if self.pending[slot] is not None:
            self.pending[slot].result()  # the worker is done reading host_buffers[slot]
        source, target = self.device_buffers[slot], self.host_buffers[slot]
        if self.cuda:
            ready = torch.cuda.current_stream(self.device).record_event()
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(ready)
                target.copy_(source, non_blocking=True)
                self.copy_done[slot].record(self.copy_stream)
            done = self.copy_done[slot]
        else:
            target.copy_(source)
            done = None

        def add():
            if done is not None:
                done.synchronize()
            accumulate(accumulator, target, first)

        self.pending[slot] = self.worker.submit(add)
        self.current = (slot + 1) % STAGING_BUFFERS

    def drain(self) -> None:
        """Wait for every queued addition (re-raising the worker's errors)."""
        for slot, future in enumerate(self.pending):
            if future is not None:
                future.result()
                self.pending[slot] = None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.drain()
        self.worker.shutdown(wait=True)


class _StepAccumulator:
    """One step's moments of every key: flat float64 buffers (``sum_outer`` on the device, or
    held by :class:`_HostSteps`), keyed views into them, counts on the host. A key's part of
    ``outer`` is uninitialised while its count is 0 (its first product is copied, not added)."""

    def __init__(self, dims: dict[str, int], device: torch.device, on_device: bool):
        self.on_device = on_device
        self.sums = torch.zeros(sum(dims.values()), dtype=torch.float64, device=device)
        self.shifts = torch.zeros(sum(dims.values()), dtype=torch.float64, device=device)  # set at a key's first call
        outer_size = sum(d * d for d in dims.values())
        self.outer = torch.empty(outer_size, dtype=torch.float64, device=device) if on_device else None
        self.counts = {key: 0 for key in dims}
