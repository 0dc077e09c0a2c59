"""Forward pre-hooks that turn cross-attention inputs into per-step moments, on the device.

Hooks capture, accumulators sum, nobody else knows about either: a UNet pre-hook tracks which
scheduled step is running (and checks its timestep), layer pre-hooks on ``to_q``/``to_out[0]``
add their inputs' conditional half to that step's accumulator, and the text-encoder states that
every ``to_k``/``to_v`` receives are accumulated once per prompt batch.

Products are float32 matmuls (TF32 must be off, see :func:`exact_matmul`) summed into float64;
column sums likewise (float32 within a UNet call, float64 across calls). fp16/bf16 inputs on
CUDA go straight into a GEMM with float32 accumulation and float32 output (the product of two
fp16 or bf16 numbers is exact in float32, so this equals upcasting first, without the copy and
on tensor cores); never an fp16 output, never TF32. A step's first product is copied into its
accumulator, later ones added (no zero-fill pass over Σ d² per step). The hooked inputs are
first centred about a shift per step and key (:func:`centring_shift`, the first batch's mean,
recorded in the moments; :func:`centred` subtracts it in float32, so fp16/bf16 inputs reach the
GEMM as float32): products then carry the spread's digits, not ``|μ|²``'s.

Where the accumulators live: a step's float64 accumulator (``sum_outer``, Σ d² × 8 bytes over
the hooked linears) sits on the device when it fits (:func:`plan_device_steps`, from the free
device memory with a reserve for activations); the steps that do not fit keep it on the host,
and each UNet call then ships one float32 partial product (computed on the device) through a
pinned buffer, added into float64 by a worker thread while the GPU runs on. Sums and counts
always stay on the device (O(d) per step).

Nothing synchronises with the host per layer: the non-finite check keeps one number per prompt
per hook (the total of its column sums, which the moments need anyway; see
:meth:`CrossAttentionCapture._add_inputs`) and looks at them once per prompt batch; timesteps
on the device are compared once per batch too.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from nullcov.statistics import Moments
from nullcov.store import TEXT_KEY

log = logging.getLogger(__name__)

#: Device memory kept free for the pipeline's activations when planning accumulators: the larger
#: of this fraction of the device and :data:`RESERVE_MIN_BYTES`.
RESERVE_FRACTION = 0.2
RESERVE_MIN_BYTES = 2 * 1024**3
#: Number of device/pinned staging buffers for host-side steps (double buffering).
STAGING_BUFFERS = 2
#: Default accumulator placement of :class:`CrossAttentionCapture` (``auto``, ``device``, ``host``).
ACCUMULATE = "auto"


class ScheduleMismatchError(RuntimeError):
    """The UNet was called at a timestep (or a number of times) other than the schedule says."""


class NonFiniteActivationError(RuntimeError):
    """A captured input holds NaN or inf."""

    def __init__(self, prompt_index: int, prompt: str, key: str, step_name: str):
        self.prompt_index, self.key, self.step_name = prompt_index, key, step_name
        super().__init__(
            f"non-finite activations for prompt {prompt_index} ({prompt!r}) in {key} at step {step_name}; "
            "nothing was written for this shard (fp16 overflow? try dtype: float32 or bfloat16)"
        )


class TextInputMismatchError(RuntimeError):
    """A ``to_k``/``to_v`` input is not the UNet's ``encoder_hidden_states``."""


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
        self.device_buffers = [torch.empty(flat_size, dtype=torch.float32, device=device) for _ in range(STAGING_BUFFERS)]
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
        self.outer = torch.empty(sum(d * d for d in dims.values()), dtype=torch.float64, device=device) if on_device else None
        self.counts = {key: 0 for key in dims}


def _labelled(label: str):
    """Name a hook's work in torch.profiler traces (only while a profiler runs: no cost otherwise)."""

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if torch.autograd._profiler_enabled():
                with torch.profiler.record_function(label):
                    return function(*args, **kwargs)
            return function(*args, **kwargs)

        return wrapper

    return decorate


class CrossAttentionCapture:
    """Collects moments of the selected layers' inputs at every scheduled UNet call.

    ``layers`` are ``(module_name, Attention)`` pairs; ``linears`` a subset of ``to_q``,
    ``to_out`` (per step) and ``to_k``/``to_v`` (both mean: the text states, stored once).
    ``timesteps`` are the schedule's, in call order. Use as a context manager (removes hooks).
    ``accumulate``: ``auto`` (each step's float64 accumulator on the device while it fits, see
    :func:`plan_device_steps`; the rest on the host), ``device`` or ``host`` (all steps); default
    :data:`ACCUMULATE`.
    """

    #: Compare CPU timesteps in end_batch too (device timesteps always are: reading one syncs).
    _defer_timestep_check = False

    def __init__(self, unet, layers, linears, timesteps: list[float], step_names: list[str], text_tokens: str,
                 accumulate: str | None = None):
        if text_tokens not in ("all", "prompt"):
            raise ValueError(f"text_tokens must be 'all' or 'prompt', got {text_tokens!r}")
        accumulate = ACCUMULATE if accumulate is None else accumulate
        if accumulate not in ("auto", "device", "host"):
            raise ValueError(f"accumulate must be 'auto', 'device' or 'host', got {accumulate!r}")
        self.timesteps = list(timesteps)
        self.step_names = list(step_names)
        self.text_tokens = text_tokens
        self.keys = [f"{name}/{linear}" for name, _ in layers for linear in ("to_q", "to_out") if linear in linears]
        self.collect_text = bool({"to_k", "to_v"} & set(linears))
        self.device = next(unet.parameters()).device
        self.dims: dict[str, int] = {}
        for name, module in layers:
            for linear, target in (("to_q", module.to_q), ("to_out", module.to_out[0])):
                if linear in linears:
                    self.dims[f"{name}/{linear}"] = int(target.in_features)
        self._outer_offsets, self._sum_offsets = {}, {}
        outer_offset = sum_offset = 0
        for key in self.keys:
            dim = self.dims[key]
            self._outer_offsets[key], self._sum_offsets[key] = outer_offset, sum_offset
            outer_offset += dim * dim
            sum_offset += dim
        self._outer_size, self._sum_size = outer_offset, sum_offset
        self.device_steps = self._plan(accumulate)
        self._host = None
        if self.device_steps < len(self.timesteps) and self._outer_size:
            self._host = _HostSteps(self._outer_size, self.device)
        self._steps = [
            _StepAccumulator(self.dims, self.device, on_device=index < self.device_steps)
            for index in range(len(self.timesteps))
        ]
        self.text_moments: TorchMoments | None = None
        self._handles = [
            unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True),
            unet.register_forward_hook(self._after_unet_call),
        ]
        for name, module in layers:
            for linear, target in (("to_q", module.to_q), ("to_out", module.to_out[0])):
                if linear in linears:
                    key = f"{name}/{linear}"
                    self._handles.append(target.register_forward_pre_hook(self._step_hook(key)))
            if self.collect_text:
                for linear in ("to_k", "to_v"):
                    target = getattr(module, linear)
                    self._handles.append(target.register_forward_pre_hook(self._text_check_hook(f"{name}/{linear}")))
        self._batch = None
        self._call = None  # per UNet call: staging buffer and the keys written into it (host steps)

    def _plan(self, accumulate: str) -> int:
        steps = len(self.timesteps)
        step_bytes = 8 * self._outer_size
        if accumulate == "device":
            return steps
        if accumulate == "host":
            chosen = 0
        elif self.device.type != "cuda":
            return steps  # host memory either way: nothing to stage
        else:
            free, total = device_memory(self.device)
            free -= steps * 8 * self._sum_size  # the sums stay on the device whatever the plan
            staging = STAGING_BUFFERS * 4 * self._outer_size
            chosen = plan_device_steps(step_bytes, steps, free, total, staging)
            log.info("accumulators: %d steps x %.1f MiB; %.1f GiB of %.1f GiB free on %s",
                     steps, step_bytes / 2**20, free / 2**30, total / 2**30, self.device)
        if chosen < steps:
            log.info("accumulators: %d step(s) on %s, %d step(s) on the host (%.1f GiB of host memory)",
                     chosen, self.device, steps - chosen, (steps - chosen) * step_bytes / 2**30)
        return chosen

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._host is not None:
            self._host.close()

    # -- per batch ------------------------------------------------------------------------------
    def begin_batch(self, prompts: list[str], first_prompt_index: int, text_mask: torch.Tensor | None) -> None:
        """Start a prompt batch; ``text_mask`` [B, L] marks the text rows kept (``prompt`` mode)."""
        self._batch = {
            "prompts": prompts,
            "first_index": first_prompt_index,
            "size": len(prompts),
            "text_mask": text_mask,
            "calls": 0,
            "cond": None,
            "encoder_hidden_states": None,
            "timesteps": [],  # (step, device timestep tensor) checked in end_batch
            "nonfinite": [],  # (step, key, per-prompt float64 tensor: non-finite iff an input is)
        }

    def end_batch(self) -> None:
        """Check the batch made exactly the scheduled UNet calls and no non-finite input."""
        batch, self._batch = self._batch, None
        if self._host is not None:
            self._host.drain()
        if batch["timesteps"]:
            found = torch.cat([t.reshape(-1)[:1] for _, t in batch["timesteps"]]).cpu().double().tolist()
            for (step, _), value in zip(batch["timesteps"], found):
                self._check_timestep(step, value)
        if batch["calls"] != len(self.timesteps):
            raise ScheduleMismatchError(
                f"the UNet was called {batch['calls']} times for this prompt batch, but the schedule has "
                f"{len(self.timesteps)} steps"
            )
        if batch["nonfinite"]:
            checks = torch.stack([check for _, _, check in batch["nonfinite"]]).cpu()
            flags = ~torch.isfinite(checks)
            if flags.any():
                row, prompt = (int(v) for v in torch.nonzero(flags)[0])
                step, key, _ = batch["nonfinite"][row]
                raise NonFiniteActivationError(
                    batch["first_index"] + prompt, batch["prompts"][prompt], key, self.step_names[step]
                )

    # -- hooks ----------------------------------------------------------------------------------
    def _check_timestep(self, step: int, found: float) -> None:
        expected = self.timesteps[step]
        if abs(found - expected) > 1e-3 * max(1.0, abs(expected)):
            raise ScheduleMismatchError(
                f"UNet call {step} ran at timestep {found}, but results/schedule.json says {expected} "
                f"({self.step_names[step]}); the schedule and the sampler disagree"
            )

    @_labelled("nullcov:unet pre-hook")
    def _on_unet_call(self, module, args, kwargs):
        batch = self._batch
        if batch is None:
            raise RuntimeError("UNet called outside begin_batch()/end_batch()")
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        hidden = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        step = batch["calls"]
        if step >= len(self.timesteps):
            raise ScheduleMismatchError(f"the UNet was called more than the {len(self.timesteps)} scheduled times")
        if torch.is_tensor(timestep) and (timestep.device.type != "cpu" or self._defer_timestep_check):
            batch["timesteps"].append((step, timestep.detach()))  # compared in end_batch: no sync here
        else:
            self._check_timestep(step, float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep))
        size = batch["size"]
        if sample.shape[0] == 2 * size:  # classifier-free guidance: the batch is [uncond, cond]
            batch["cond"] = slice(size, 2 * size)
        elif sample.shape[0] == size:
            batch["cond"] = slice(0, size)
        else:
            raise RuntimeError(f"UNet batch of {sample.shape[0]} for {size} prompts: neither plain nor CFG")
        batch["calls"] = step + 1
        batch["step"] = step
        batch["encoder_hidden_states"] = hidden
        self._call = None
        if self._host is not None and not self._steps[step].on_device:
            self._call = {"buffer": self._host.begin_call(), "written": set()}
        if self.collect_text and step == 0:
            states = hidden[batch["cond"]]
            batch["nonfinite"].append((step, TEXT_KEY, column_sums(states.reshape(states.shape[0], -1), dim=1).double()))
            rows = states[batch["text_mask"]] if batch["text_mask"] is not None else states.reshape(-1, states.shape[-1])
            if self.text_moments is None:
                self.text_moments = TorchMoments(rows.shape[-1], rows.device)
            self.text_moments.add(rows)

    @_labelled("nullcov:unet post-hook")
    def _after_unet_call(self, module, args, output):
        call, self._call = self._call, None
        if call is None or self._batch is None:
            return
        missing = [key for key in self.keys if key not in call["written"]]
        if missing:  # a hook did not fire: its slot still holds another call's product
            for key in missing:
                self._outer_view(call["buffer"], key).zero_()
        self._host.flush(self._batch["step"])

    def _outer_view(self, flat: torch.Tensor, key: str) -> torch.Tensor:
        dim, offset = self.dims[key], self._outer_offsets[key]
        return flat[offset : offset + dim * dim].view(dim, dim)

    @_labelled("nullcov:layer hook")
    def _add_inputs(self, key: str, step: int, inputs: torch.Tensor) -> None:
        """Add a hook's conditional inputs [B, ..., d] to step ``step``'s moments of ``key``.

        The per-prompt column sums double as the non-finite check (no extra pass over the inputs,
        no sync): NaN and inf propagate into a sum, so a prompt's total is non-finite when one of
        its inputs is. A float32 sum of finite inputs overflows only for |x| > 3.4e38 / (tokens),
        which fp16 inputs cannot reach and which would overflow the float32 products (|x| > 1.8e19)
        anyway: then too the statistics would not be finite, and the job must stop.
        """
        accumulator = self._steps[step]
        dim = self.dims[key]
        offset = self._sum_offsets[key]
        first = accumulator.counts[key] == 0
        shift = accumulator.shifts[offset : offset + dim]
        if first:  # moments about this step's first batch mean (see nullcov.statistics)
            shift.copy_(centring_shift(inputs.reshape(-1, dim)))
        inputs = centred(inputs, shift).reshape(inputs.shape[0], -1, dim)
        per_prompt = column_sums(inputs, dim=1)  # [B, d]
        self._batch["nonfinite"].append((step, key, per_prompt.sum(dim=1, dtype=torch.float64)))
        accumulator.sums[offset : offset + dim].add_(per_prompt.sum(dim=0, dtype=torch.float64))
        rows = inputs.reshape(-1, dim)
        accumulator.counts[key] += rows.shape[0]
        if accumulator.on_device:
            accumulate(self._outer_view(accumulator.outer, key), gram(rows), first)
        else:
            call = self._call
            view = self._outer_view(call["buffer"], key)
            if key in call["written"]:  # a second call of the same layer in one UNet call
                view.add_(gram(rows))
            else:
                gram(rows, out=view)
                call["written"].add(key)

    def _step_hook(self, key: str):
        def hook(module, args):
            batch = self._batch
            self._add_inputs(key, batch["step"], args[0][batch["cond"]])

        return hook

    def _text_check_hook(self, key: str):
        def hook(module, args):
            inputs, states = args[0], self._batch["encoder_hidden_states"]
            if inputs is states or (inputs.shape == states.shape and torch.equal(inputs, states)):
                return
            raise TextInputMismatchError(
                f"{key} receives an input that is not the UNet's encoder_hidden_states; nullcov stores the text "
                "statistics once per prompt (text.h5) and cannot represent this model"
            )

        return hook

    # -- results --------------------------------------------------------------------------------
    def results(self) -> tuple[list[dict[str, Moments]], Moments | None]:
        """Per step ``{key: Moments}`` (in schedule order) and the text moments (or None)."""
        if self._host is not None:
            self._host.drain()
        steps = []
        for index, accumulator in enumerate(self._steps):
            missing = [key for key in self.keys if accumulator.counts[key] == 0]
            if missing:
                raise RuntimeError(f"step {self.step_names[index]}: no input captured for {missing}")
            if not self.keys:
                steps.append({})
                continue
            outer = accumulator.outer if accumulator.on_device else self._host.accumulator(index)
            outer, sums = outer.cpu().numpy(), accumulator.sums.cpu().numpy()
            shifts = accumulator.shifts.cpu().numpy()
            moments = {}
            for key in self.keys:
                dim, o, s = self.dims[key], self._outer_offsets[key], self._sum_offsets[key]
                moments[key] = Moments.about(
                    accumulator.counts[key],
                    shifts[s : s + dim],
                    sums[s : s + dim],
                    outer[o : o + dim * dim].reshape(dim, dim),
                )
            steps.append(moments)
        text = self.text_moments.to_moments() if self.text_moments is not None else None
        return steps, text


def text_row_mask(input_ids: np.ndarray | torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """[B, L] mask of positions BOS..EOS (inclusive) of each tokenized prompt."""
    ids = torch.as_tensor(input_ids)
    is_eos = ids == eos_token_id
    if not bool(is_eos.any(dim=1).all()):
        raise ValueError("a tokenized prompt has no EOS token")
    eos_position = is_eos.int().argmax(dim=1)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    return positions <= eos_position.unsqueeze(1)
