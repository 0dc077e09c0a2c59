"""Forward pre-hooks that turn cross-attention inputs into per-step moments, on the device.

Hooks capture, accumulators sum (:mod:`nullcov.collection.accumulators`), nobody else knows about either:
a UNet pre-hook tracks which scheduled step is running (and checks its timestep), layer
pre-hooks on ``to_q``/``to_out[0]`` add their inputs' conditional half (with ``unconditional``,
the whole CFG batch) to that step's accumulator, and the text-encoder states that every
``to_k``/``to_v`` receives (the same rows) are accumulated once per prompt batch.
The hooked inputs are first centred about a shift per step and key
(:func:`nullcov.collection.accumulators.centring_shift`, the first batch's mean, recorded in the moments;
:func:`nullcov.collection.accumulators.centred` subtracts it in float32, so fp16/bf16 inputs reach the GEMM
as float32): products then carry the spread's digits, not ``|μ|²``'s.

Nothing synchronises with the host per layer: the non-finite check keeps one number per prompt
per hook (the total of its column sums, which the moments need anyway; see
:meth:`CrossAttentionCapture._add_inputs`) and looks at them once per prompt batch; timesteps
on the device are compared once per batch too.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import numpy as np
import torch

from nullcov.collection.accumulators import (
    TorchMoments,
    _HostSteps,
    _StepAccumulator,
    accumulate,
    centred,
    centring_shift,
    column_sums,
    gram,
)
from nullcov.collection.hooks import Hook, forward_hooks
from nullcov.collection.placement import device_steps
from nullcov.docs import see
from nullcov.models.device import module_device
from nullcov.models.family import CROSS_ATTENTION, TEXT_KEY, statistic_key
from nullcov.models.model import hooked_linear, layer_linears
from nullcov.statistics.moments import Moments

log = logging.getLogger(__name__)


class ScheduleMismatchError(RuntimeError):
    """The UNet was called at a timestep (or a number of times) other than the schedule says."""


class NonFiniteActivationError(RuntimeError):
    """A captured input holds NaN or inf."""

    def __init__(self, prompt_index: int, prompt: str, key: str, step_name: str, branch: str = ""):
        self.prompt_index, self.key, self.step_name = prompt_index, key, step_name
        super().__init__(
            f"non-finite activations for prompt {prompt_index} ({prompt!r}{branch}) in {key} at step {step_name}; "
            "nothing was written for this shard (fp16 overflow? try dtype: float32 or bfloat16)"
            f"{see('non-finite-activations')}"
        )


class TextInputMismatchError(RuntimeError):
    """A ``to_k``/``to_v`` input is not the UNet's ``encoder_hidden_states``."""


class HookNotFiredError(RuntimeError):
    """A selected linear did not run on a UNet call (replaced attention processor, fused projections)."""


TEXT_TOKENS = ("all", "prompt", "eos")
#: ``text_tokens`` a transformer family takes: every text row (T5's padding too), or the real tokens only.
TRANSFORMER_TEXT_TOKENS = ("all", "prompt")
#: When :class:`CrossAttentionCapture` compares a UNet call's timestep with the schedule.
TIMESTEP_CHECKS = ("auto", "batch")


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

    ``layers`` are ``(module_name, Attention)`` pairs; ``linears`` a subset of the hooked linears
    (:data:`nullcov.models.family.CROSS_ATTENTION`): ``to_q``, ``to_out`` (per step) and
    ``to_k``/``to_v`` (the text linears; either means: the text states, stored once).
    ``timesteps`` are the schedule's, in call order. Use as a context manager (removes hooks).
    ``accumulate``: ``auto`` (each step's float64 accumulator on the device while it fits, see
    :func:`nullcov.collection.placement.device_steps`; the rest on the host), ``device`` or ``host`` (all steps).

    A job that cannot hold every step's accumulators at once collects its steps in chunks
    (:mod:`nullcov.workflow.plan`): ``collect_steps`` are the schedule indices this capture accumulates
    (default all), ``call_steps`` the indices the UNet is called at, in order (default every
    step: a trajectory replayed from the start; a replay may stop after its last collected
    step), and ``text`` says whether this capture accumulates the text states (one chunk does).
    ``unconditional``: collect both halves of every CFG batch (the config's ``unconditional_branch``);
    a UNet call without an unconditional half is then an error.
    ``timestep_check`` (:data:`TIMESTEP_CHECKS`): ``auto`` compares a timestep that lives on an
    accelerator once per prompt batch, in :meth:`end_batch` (reading it at the call would wait for
    the device), and any other at the call; ``batch`` compares every tensor timestep in
    :meth:`end_batch`, as on an accelerator.

    ``vocabulary``: what is hooked, a :class:`~nullcov.models.family.Linears` for every layer (default
    :data:`~nullcov.models.family.CROSS_ATTENTION`) or the run's :class:`~nullcov.models.family.Family`
    (each layer's kind's; a transformer family: ``unet`` is the transformer, ``layers`` its blocks,
    ``linears`` the ``collect_features``/stream names, and the timestep it receives is the schedule's
    divided by the family's ``timestep_divisor``). A transformer's inputs whose rows are text tokens
    keep, with ``text_tokens: prompt``, only the real tokens (the masks of :meth:`begin_batch`).
    ``calls_per_step``: 2 for FLUX's ``true_cfg_scale`` (a conditional, then a negative call per
    step; the negative one is collected with ``unconditional`` only).
    """

    def __init__(self, unet, layers, linears, timesteps: list[float], step_names: list[str], text_tokens: str,
                 accumulate: str = "auto", collect_steps=None, call_steps=None, text: bool = True,
                 unconditional: bool = False, timestep_check: str = "auto", vocabulary=CROSS_ATTENTION,
                 calls_per_step: int = 1):
        self.transformer = getattr(vocabulary, "denoiser", "unet") == "transformer"
        allowed = TRANSFORMER_TEXT_TOKENS if self.transformer else TEXT_TOKENS
        if text_tokens not in allowed:
            raise ValueError(f"text_tokens must be one of {', '.join(allowed)}, got {text_tokens!r}"
                             + (see("text_tokens-eos-with-a-transformer") if self.transformer else ""))
        if timestep_check not in TIMESTEP_CHECKS:
            raise ValueError(f"timestep_check must be one of {', '.join(TIMESTEP_CHECKS)}, got {timestep_check!r}")
        self.timesteps = list(timesteps)
        self.step_names = list(step_names)
        self.text_tokens = text_tokens
        self.unconditional = unconditional
        self.timestep_check = timestep_check
        self.timestep_divisor = float(getattr(vocabulary, "timestep_divisor", 1.0))
        self.calls_per_step = calls_per_step
        self.layout = layer_linears(layers, linears, vocabulary)
        self.dims = {statistic_key(name, linear): int(hooked_linear(module, linear, vocab).in_features)
                     for name, module, vocab, chosen in self.layout for linear in chosen}
        self.token_kinds = {statistic_key(name, linear): vocab.token_kind(linear)
                            for name, _, vocab, chosen in self.layout for linear in chosen}
        self.token_counts = {"real": 0, "padding": 0}  # text tokens of the collected prompts (transformers)
        self.keys = list(self.dims)
        self.collect_text = any(set(vocab.text) & set(vocab.chosen(linears)) for _, _, vocab, _ in self.layout)
        self.accumulate_text = self.collect_text and text
        self.collect_steps = list(range(len(self.timesteps)) if collect_steps is None else collect_steps)
        self.call_steps = list(range(len(self.timesteps)) if call_steps is None else call_steps)
        if not set(self.collect_steps) <= set(self.call_steps):
            raise ValueError(f"collect_steps {self.collect_steps} are not all among call_steps {self.call_steps}")
        self.device = module_device(unet)
        self._lay_out_keys()
        self.device_steps = self._plan(accumulate)
        # every hooked linear must run on every UNet call (checked in the UNet's post-hook), and the
        # linears that share a statistic's input (a transformer's to_k/to_v, proj_mlp) must receive it
        self.hooked = [statistic_key(name, hooked) for name, module, vocab, chosen in self.layout
                       for linear in vocab.hooked
                       if linear in chosen or (self.collect_text and linear in vocab.text
                                               and hooked_linear(module, linear, vocab) is not None)
                       for hooked in (vocab.sharing(linear) if linear in chosen else (linear,))]
        self.text_moments: TorchMoments | None = None
        self._fired: set[str] = set()
        self._inputs: dict[str, torch.Tensor] = {}  # per call: the input of each shared-input statistic
        self._batch = None
        self._call = None  # per UNet call: staging buffer and the keys written into it (host steps)
        self._host = None
        with contextlib.ExitStack() as opened:  # on a failure here, whatever was opened is closed
            if self.device_steps < len(self.collect_steps) and self._outer_size:
                self._host = _HostSteps(self._outer_size, self.device)
                opened.callback(self._host.close)
            self._steps = {  # schedule index -> accumulator, for the collected steps only
                step: _StepAccumulator(self.dims, self.device, on_device=position < self.device_steps)
                for position, step in enumerate(self.collect_steps)
            }
            opened.enter_context(forward_hooks(self._hooks(unet, layers)))
            self._opened = opened.pop_all()

    def _lay_out_keys(self) -> None:
        """Each key's place in a step's flat ``sum_outer`` and ``sum`` (keys in order, back to back)."""
        self._outer_offsets, self._sum_offsets = {}, {}
        outer_offset = sum_offset = 0
        for key, dim in self.dims.items():
            self._outer_offsets[key], self._sum_offsets[key] = outer_offset, sum_offset
            outer_offset += dim * dim
            sum_offset += dim
        self._outer_size, self._sum_size = outer_offset, sum_offset

    def _plan(self, accumulate: str) -> int:
        """How many of the collected steps (the first ones) accumulate on the device."""
        return device_steps(self.device, self.dims, len(self.collect_steps), accumulate)

    def _hooks(self, unet, layers) -> list[Hook]:
        """The UNet's pre- and post-hook, then per layer the pre-hooks of its collected linears
        (``to_q``, ``to_out``; a transformer's streams and the linears sharing their inputs) and, when
        the text states are collected, of ``to_k``/``to_v``."""
        hooks = [Hook(unet, self._on_unet_call, before=True, with_kwargs=True), Hook(unet, self._after_unet_call)]
        for name, module, vocab, _ in self.layout:
            for linear in vocab.hooked:
                key = statistic_key(name, linear)
                if key in self.dims:
                    hooks.append(Hook(hooked_linear(module, linear, vocab),
                                      functools.partial(self._on_step_input, key), before=True))
                    for shared in vocab.sharing(linear)[1:]:
                        hooks.append(Hook(hooked_linear(module, shared, vocab), functools.partial(
                            self._on_shared_input, key, statistic_key(name, shared)), before=True))
                elif self.collect_text and linear in vocab.text:
                    hooks.append(Hook(hooked_linear(module, linear, vocab),
                                      functools.partial(self._on_text_input, key), before=True))
        return hooks

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Remove the hooks, then stop the host accumulators' copy thread."""
        self._opened.close()

    # -- per batch ------------------------------------------------------------------------------
    def begin_batch(self, prompts: list[str], first_prompt_index: int, text_mask: torch.Tensor | None,
                    token_masks: dict | None = None) -> None:
        """Start a prompt batch; ``text_mask`` marks the text rows kept (``prompt``/``eos`` modes), one
        row per collected text (B; with ``unconditional`` 2B: the negative prompts', then the prompts').
        ``token_masks`` (transformers): ``{"cond": [B, L], "uncond": [B, L]}``, the real (not padding)
        tokens of the text sequence the transformer receives, for the prompts and the negative prompts:
        counted always, applied with ``text_tokens: prompt``."""
        if self.transformer:
            if token_masks is None:
                raise ValueError("a transformer's capture needs the batch's token_masks")
            for branch in ("cond", "uncond") if self.unconditional else ("cond",):
                real = int(token_masks[branch].sum())
                self.token_counts["real"] += real
                self.token_counts["padding"] += token_masks[branch].numel() - real
        self._batch = {
            "token_masks": token_masks,
            "token_mask": None,  # this call's mask of the collected rows' text tokens (None: keep all)
            "prompts": prompts,
            "first_index": first_prompt_index,
            "size": len(prompts),
            "text_mask": text_mask,
            "calls": 0,
            "rows": None,  # the rows of the UNet call that are collected
            "encoder_hidden_states": None,
            "timesteps": [],  # (step, device timestep tensor) checked in end_batch
            "nonfinite": [],  # (step, key, per-prompt float64 tensor: non-finite iff an input is)
        }

    def end_batch(self) -> None:
        """Check the batch made exactly the scheduled UNet calls and no non-finite input."""
        batch, self._batch = self._batch, None
        if self._host is not None:
            self._host.drain()
        self._check_deferred_timesteps(batch)
        if batch["calls"] != len(self.call_steps) * self.calls_per_step:
            raise ScheduleMismatchError(
                f"the UNet was called {batch['calls']} times for this prompt batch, but the schedule has "
                f"{len(self.call_steps)} steps"
                + (f" of {self.calls_per_step} calls" if self.calls_per_step > 1 else "")
                + ("" if len(self.call_steps) == len(self.timesteps) else " in this chunk")
                + see("schedule-and-sampler-disagree")
            )
        self._check_finite(batch)

    def _check_deferred_timesteps(self, batch: dict) -> None:
        """Compare the batch's deferred timesteps with the schedule (one read of the device for all)."""
        if not batch["timesteps"]:
            return
        found = torch.cat([t.reshape(-1)[:1] for _, t in batch["timesteps"]]).cpu().double().tolist()
        for (step, _), value in zip(batch["timesteps"], found, strict=True):
            self._check_timestep(step, value)

    def _check_finite(self, batch: dict) -> None:
        """Refuse the batch when a prompt's check total is non-finite, naming the first such input."""
        if not batch["nonfinite"]:
            return
        checks = torch.stack([check for _, _, check in batch["nonfinite"]]).cpu()
        flags = ~torch.isfinite(checks)
        if flags.any():
            row, prompt = (int(v) for v in torch.nonzero(flags)[0])
            step, key, _ = batch["nonfinite"][row]
            prompt, branch = prompt_of_row(prompt, batch["size"], checks.shape[1])
            raise NonFiniteActivationError(
                batch["first_index"] + prompt, batch["prompts"][prompt], key, self.step_names[step], branch
            )

    # -- hooks ----------------------------------------------------------------------------------
    def _check_timestep(self, step: int, found: float) -> None:
        """Compare a call's timestep with the schedule's (a FLUX transformer receives ``t / 1000``:
        ``timestep_divisor``)."""
        expected = self.timesteps[step]
        if abs(found * self.timestep_divisor - expected) > 1e-3 * max(1.0, abs(expected)):
            scaled = (f" (x {self.timestep_divisor:g} = {found * self.timestep_divisor})"
                      if self.timestep_divisor != 1 else "")
            raise ScheduleMismatchError(
                f"UNet call {step} ran at timestep {found}{scaled}, but results/schedule.json says {expected} "
                f"({self.step_names[step]}); the schedule and the sampler disagree"
                f"{see('schedule-and-sampler-disagree')}"
            )

    def _defers(self, timestep) -> bool:
        """Whether this call's timestep is compared in :meth:`end_batch` (``timestep_check``)."""
        if not torch.is_tensor(timestep):
            return False
        return self.timestep_check == "batch" or timestep.device.type != "cpu"

    @_labelled("nullcov:unet pre-hook")
    def _on_unet_call(self, module, args, kwargs):
        batch = self._batch
        if batch is None:
            raise RuntimeError("UNet called outside begin_batch()/end_batch()")
        sample, timestep, hidden = self._call_inputs(args, kwargs)
        call = batch["calls"]
        if call >= len(self.call_steps) * self.calls_per_step:
            raise ScheduleMismatchError(f"the UNet was called more than the {len(self.call_steps)} scheduled times"
                                        + (f" x {self.calls_per_step}" if self.calls_per_step > 1 else "")
                                        + see("schedule-and-sampler-disagree"))
        step, branch = self.call_steps[call // self.calls_per_step], call % self.calls_per_step
        if self._defers(timestep):
            batch["timesteps"].append((step, timestep.detach()))  # compared in end_batch: no sync here
        else:
            self._check_timestep(step, float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep))
        if self.calls_per_step > 1:  # FLUX true CFG: each call is one branch of B rows
            batch["rows"] = conditional_rows(sample.shape[0], batch["size"])
            collected = branch == 0 or self.unconditional
        else:
            batch["rows"] = collected_rows(sample.shape[0], batch["size"], self.unconditional, self.step_names[step])
            collected = True
        batch["calls"] = call + 1
        # None: a replayed step, or the negative call of true CFG without unconditional_branch
        batch["step"] = step if step in self._steps and collected else None
        batch["encoder_hidden_states"] = hidden
        if self.transformer:
            batch["token_mask"] = self._token_mask(sample.shape[0], batch["rows"], "uncond" if branch else "cond")
        self._fired = set()
        self._inputs = {}
        self._call = None
        if self._host is not None and batch["step"] is not None and not self._steps[step].on_device:
            self._call = {"buffer": self._host.begin_call(), "written": set()}
        if self.accumulate_text and call == 0:
            self._add_text(step, hidden[batch["rows"]])

    def _call_inputs(self, args, kwargs) -> tuple:
        """``(latents, timestep, text states)`` of a UNet call (``sample``, ``timestep``,
        ``encoder_hidden_states``) or a transformer call (``hidden_states``, ...)."""
        if self.transformer:
            return (args[0] if args else kwargs["hidden_states"], kwargs["timestep"],
                    args[1] if len(args) > 1 else kwargs["encoder_hidden_states"])
        return (args[0] if args else kwargs["sample"], args[1] if len(args) > 1 else kwargs["timestep"],
                args[2] if len(args) > 2 else kwargs["encoder_hidden_states"])

    def _token_mask(self, rows_in_call: int, rows, branch: str) -> torch.Tensor | None:
        """The real-token mask [R, L] of this call's collected rows (None: ``text_tokens: all``). A CFG
        batch ``[uncond, cond]`` (SD3) takes the negative prompts' masks, then the prompts'."""
        masks = self._batch["token_masks"]
        if self.text_tokens == "all":
            return None
        if rows_in_call == 2 * self._batch["size"] and self.calls_per_step == 1:
            return torch.cat([masks["uncond"], masks["cond"]])[rows]
        return masks[branch][rows]

    def _add_text(self, step: int, states: torch.Tensor) -> None:
        """Add the collected text states of a prompt batch (its first UNet call's) to the text moments."""
        batch = self._batch
        batch["nonfinite"].append((step, TEXT_KEY, column_sums(states.reshape(states.shape[0], -1), dim=1).double()))
        rows = text_rows(states, batch["text_mask"])
        if self.text_moments is None:
            self.text_moments = TorchMoments(rows.shape[-1], rows.device)
        self.text_moments.add(rows)

    @_labelled("nullcov:unet post-hook")
    def _after_unet_call(self, module, args, output):
        if self._batch is None:
            return
        self._check_fired()
        call, self._call = self._call, None
        if call is None:
            return
        missing = [key for key in self.keys if key not in call["written"]]
        for key in missing:  # a hook did not fire: its slot still holds another call's product
            self._outer_view(call["buffer"], key).zero_()
        self._host.flush(self._batch["step"])

    def _check_fired(self) -> None:
        """Every hooked linear ran on this UNet call, else :class:`HookNotFiredError`."""
        not_fired = [key for key in self.hooked if key not in self._fired]
        if not not_fired:
            return
        batch = self._batch
        step = self.call_steps[(batch["calls"] - 1) // self.calls_per_step]
        raise HookNotFiredError(
            f"{not_fired[0]} did not run on UNet call {step} ({self.step_names[step]}) of the "
            f"prompt batch starting at prompt {batch['first_index']}"
            + (f" (nor did {len(not_fired) - 1} other selected linear(s): {not_fired[1:]})"
               if len(not_fired) > 1 else "")
            + "; its statistics would be empty or partial. A replaced attention processor or fused projections "
            "(fuse_qkv_projections) bypass the linear: restore diffusers' default processors "
            "(unet.set_default_attn_processor()) and unfuse (unfuse_qkv_projections())"
            + see("a-selected-linear-did-not-run")
        )

    def _outer_view(self, flat: torch.Tensor, key: str) -> torch.Tensor:
        dim, offset = self.dims[key], self._outer_offsets[key]
        return flat[offset : offset + dim * dim].view(dim, dim)

    @_labelled("nullcov:layer hook")
    def _add_inputs(self, key: str, step: int, inputs: torch.Tensor, keep: torch.Tensor | None = None) -> None:
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
        if first:  # moments about this step's first batch mean (see nullcov.statistics.moments)
            shift.copy_(centring_shift(inputs.reshape(-1, dim) if keep is None else inputs[keep]))
        inputs = centred(inputs, shift).reshape(inputs.shape[0], -1, dim)
        if keep is not None:  # only the kept rows (a transformer's real text tokens) count
            inputs = inputs * keep.unsqueeze(-1)
        per_prompt = column_sums(inputs, dim=1)  # [B, d]
        self._batch["nonfinite"].append((step, key, per_prompt.sum(dim=1, dtype=torch.float64)))
        accumulator.sums[offset : offset + dim].add_(per_prompt.sum(dim=0, dtype=torch.float64))
        rows = inputs.reshape(-1, dim) if keep is None else inputs[keep]
        accumulator.counts[key] += rows.shape[0]
        if accumulator.on_device:
            accumulate(self._outer_view(accumulator.outer, key), gram(rows), first)
        else:
            self._stage(key, rows)

    def _stage(self, key: str, rows: torch.Tensor) -> None:
        """Write a host step's product into this UNet call's staging buffer (added when the layer runs twice)."""
        call = self._call
        view = self._outer_view(call["buffer"], key)
        if key in call["written"]:  # a second call of the same layer in one UNet call
            view.add_(gram(rows))
        else:
            gram(rows, out=view)
            call["written"].add(key)

    def _on_step_input(self, key: str, module, args) -> None:
        """The pre-hook of a collected ``to_q``/``to_out`` (a transformer's stream): its collected rows
        join the running step (a stream's text rows: the real tokens only, with ``text_tokens: prompt``)."""
        batch = self._batch
        self._fired.add(key)
        if self.transformer:
            self._same_input(key, key, args[0])
        if batch["step"] is None:
            return
        inputs = args[0][batch["rows"]]
        keep = self._kept_rows(key, inputs) if self.transformer else None
        self._add_inputs(key, batch["step"], inputs, keep)

    def _kept_rows(self, key: str, inputs: torch.Tensor) -> torch.Tensor | None:
        """[R, N] mask of the rows of a transformer input that are kept (None: all): its text tokens'
        real ones (``text`` rows), followed by every image row (``text+image``, FLUX's single blocks)."""
        mask, kind = self._batch["token_mask"], self.token_kinds[key]
        if mask is None or kind == "image":
            return None
        length = mask.shape[1]
        if kind == "text" and inputs.shape[1] != length or inputs.shape[1] < length:
            raise TextInputMismatchError(
                f"{key} receives {inputs.shape[1]} rows per prompt, but the prompt's text sequence has {length} "
                f"tokens{see('text-input-is-not-the-encoder-hidden-states')}")
        if kind == "text":
            return mask
        image = torch.ones(mask.shape[0], inputs.shape[1] - length, dtype=torch.bool, device=mask.device)
        return torch.cat([mask, image], dim=1)

    def _same_input(self, key: str, linear_key: str, inputs: torch.Tensor) -> None:
        """The linears that share a statistic (``to_q``/``to_k``/``to_v``, ``proj_mlp``) receive the same
        input on a call (whichever runs first sets it), else :class:`TextInputMismatchError`."""
        seen = self._inputs.setdefault(key, inputs)
        if seen is inputs or (seen.shape == inputs.shape and torch.equal(seen, inputs)):
            return
        raise TextInputMismatchError(
            f"{linear_key} receives an input other than {key}'s: nullcov stores one statistic for the linears "
            f"that share an input and cannot represent this model{see('text-input-is-not-the-encoder-hidden-states')}"
        )

    def _on_shared_input(self, key: str, linear_key: str, module, args) -> None:
        """The pre-hook of a linear that shares ``key``'s input (a transformer's ``to_k``, ``proj_mlp``)."""
        self._fired.add(linear_key)
        self._same_input(key, linear_key, args[0])

    def _on_text_input(self, key: str, module, args) -> None:
        """The pre-hook of a ``to_k``/``to_v``: its input must be the UNet's ``encoder_hidden_states``."""
        self._fired.add(key)
        inputs, states = args[0], self._batch["encoder_hidden_states"]
        if inputs is states or (inputs.shape == states.shape and torch.equal(inputs, states)):
            return
        raise TextInputMismatchError(
            f"{key} receives an input that is not the UNet's encoder_hidden_states; nullcov stores the text "
            "statistics once per prompt (text.h5) and cannot represent this model"
            f"{see('text-input-is-not-the-encoder-hidden-states')}"
        )

    # -- results --------------------------------------------------------------------------------
    def text_results(self) -> Moments | None:
        """The text moments (None when this capture does not accumulate them)."""
        return self.text_moments.to_moments() if self.text_moments is not None else None

    def release_steps(self):
        """Yield ``(schedule index, {key: Moments})`` per collected step, in schedule order, one at
        a time: a device step is copied to the host when its turn comes, and every step's
        accumulators are freed once the caller asks for the next one (so the host holds at most
        one step beyond the host-side accumulators not yet released)."""
        if self._host is not None:
            self._host.drain()
        for index in sorted(self._steps):
            moments = self._step_moments(index)
            yield index, moments
            del moments
            del self._steps[index]
            if self._host is not None:
                self._host.accumulators.pop(index, None)

    def _step_moments(self, index: int) -> dict[str, Moments]:
        """``{key: Moments}`` of collected step ``index``, on the host."""
        accumulator = self._steps[index]
        missing = [key for key in self.keys if accumulator.counts[key] == 0]
        if missing:
            raise RuntimeError(f"step {self.step_names[index]}: no input captured for {missing}")
        if not self.keys:
            return {}
        outer = accumulator.outer if accumulator.on_device else self._host.accumulator(index)
        outer, sums, shifts = outer.cpu().numpy(), accumulator.sums.cpu().numpy(), accumulator.shifts.cpu().numpy()
        moments = {}
        for key in self.keys:
            dim, o, s = self.dims[key], self._outer_offsets[key], self._sum_offsets[key]
            moments[key] = Moments.about(accumulator.counts[key], shifts[s : s + dim], sums[s : s + dim],
                                         outer[o : o + dim * dim].reshape(dim, dim))
        return moments


def conditional_rows(unet_batch: int, prompts: int) -> slice:
    """The rows of a UNet call that belong to the prompts' conditional pass.

    With classifier-free guidance the pipeline stacks ``[uncond, cond]`` (2 x prompts rows);
    without it the batch is the prompts themselves. Anything else is an error.
    """
    if unet_batch == 2 * prompts:
        return slice(prompts, 2 * prompts)
    if unet_batch == prompts:
        return slice(0, prompts)
    raise RuntimeError(f"UNet batch of {unet_batch} for {prompts} prompts: neither plain nor CFG")


def collected_rows(unet_batch: int, prompts: int, unconditional: bool, step_name: str = "?") -> slice:
    """The rows of a UNet call that are collected: the conditional half (:func:`conditional_rows`),
    or with ``unconditional`` the whole ``[uncond, cond]`` CFG batch, which it must then be."""
    rows = conditional_rows(unet_batch, prompts)
    if not unconditional:
        return rows
    if unet_batch != 2 * prompts:
        raise ScheduleMismatchError(
            f"unconditional_branch: true, but the UNet call at step {step_name} has {unet_batch} rows for {prompts} "
            "prompts: no unconditional half (guidance_scale <= 1, or a UNet that takes guidance as an embedding); "
            "set unconditional_branch: false"
            f"{see('no-unconditional-half-for-unconditional_branch')}"
        )
    return slice(None)


def prompt_of_row(row: int, prompts: int, rows: int) -> tuple[int, str]:
    """Which prompt (index in its batch) a collected row belongs to, and the branch as error
    messages name it: ``rows`` = ``prompts`` (one row each) or ``2 * prompts`` (``[uncond, cond]``)."""
    if rows == 2 * prompts:
        return row % prompts, ", unconditional branch" if row < prompts else ""
    return row, ""


def text_row_mask(input_ids: np.ndarray | torch.Tensor, eos_token_id: int, text_tokens: str = "prompt") -> torch.Tensor:
    """[B, L] mask of the text rows kept per tokenized prompt: ``prompt`` = positions BOS..EOS
    (inclusive), ``eos`` = the (first) EOS position only."""
    ids = torch.as_tensor(input_ids)
    is_eos = ids == eos_token_id
    if not bool(is_eos.any(dim=1).all()):
        raise ValueError("a tokenized prompt has no EOS token")
    eos_position = is_eos.int().argmax(dim=1)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    if text_tokens == "prompt":
        return positions <= eos_position.unsqueeze(1)
    if text_tokens == "eos":
        return positions == eos_position.unsqueeze(1)
    raise ValueError(f"text_row_mask: text_tokens must be 'prompt' or 'eos', got {text_tokens!r}")


def text_rows(states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows [N, d] of text states [B, L, d] that are collected: all, or those ``mask`` [B, L] keeps."""
    return states[mask] if mask is not None else states.reshape(-1, states.shape[-1])
