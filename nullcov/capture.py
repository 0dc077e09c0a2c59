"""Forward pre-hooks that turn cross-attention inputs into per-step moments, on the device.

Hooks capture, accumulators sum, nobody else knows about either: a UNet pre-hook tracks which
scheduled step is running (and checks its timestep), layer pre-hooks on ``to_q``/``to_out[0]``
add their inputs' conditional half to that step's accumulator, and the text-encoder states that
every ``to_k``/``to_v`` receives are accumulated once per prompt batch.

Products are float32 matmuls (TF32 must be off, see :func:`exact_matmul`) summed into float64.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from nullcov.statistics import Moments
from nullcov.store import TEXT_KEY


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


class TorchMoments:
    """count / sum / sum of outer products of rows, accumulated in float64 on a device."""

    def __init__(self, dim: int, device):
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.float()
        self.sum_outer += (rows.T @ rows).double()
        self.sum += rows.sum(dim=0, dtype=torch.float64)
        self.count += rows.shape[0]

    def to_moments(self) -> Moments:
        return Moments(count=self.count, sum=self.sum.cpu().numpy(), sum_outer=self.sum_outer.cpu().numpy())


class CrossAttentionCapture:
    """Collects moments of the selected layers' inputs at every scheduled UNet call.

    ``layers`` are ``(module_name, Attention)`` pairs; ``linears`` a subset of ``to_q``,
    ``to_out`` (per step) and ``to_k``/``to_v`` (both mean: the text states, stored once).
    ``timesteps`` are the schedule's, in call order. Use as a context manager (removes hooks).
    """

    def __init__(self, unet, layers, linears, timesteps: list[float], step_names: list[str], text_tokens: str):
        if text_tokens not in ("all", "prompt"):
            raise ValueError(f"text_tokens must be 'all' or 'prompt', got {text_tokens!r}")
        self.timesteps = list(timesteps)
        self.step_names = list(step_names)
        self.text_tokens = text_tokens
        self.keys = [f"{name}/{linear}" for name, _ in layers for linear in ("to_q", "to_out") if linear in linears]
        self.collect_text = bool({"to_k", "to_v"} & set(linears))
        self.step_moments: list[dict[str, TorchMoments]] = [{} for _ in self.timesteps]
        self.text_moments: TorchMoments | None = None
        self._handles = [unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True)]
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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

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
            "nonfinite": [],  # (step, key, per-prompt bool tensor)
        }

    def end_batch(self) -> None:
        """Check the batch made exactly the scheduled UNet calls and no non-finite input."""
        batch, self._batch = self._batch, None
        if batch["calls"] != len(self.timesteps):
            raise ScheduleMismatchError(
                f"the UNet was called {batch['calls']} times for this prompt batch, but the schedule has "
                f"{len(self.timesteps)} steps"
            )
        if batch["nonfinite"]:
            flags = torch.stack([flag for _, _, flag in batch["nonfinite"]]).cpu()
            if flags.any():
                row, prompt = (int(v) for v in torch.nonzero(flags)[0])
                step, key, _ = batch["nonfinite"][row]
                raise NonFiniteActivationError(
                    batch["first_index"] + prompt, batch["prompts"][prompt], key, self.step_names[step]
                )

    # -- hooks ----------------------------------------------------------------------------------
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
        found = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
        expected = self.timesteps[step]
        if abs(found - expected) > 1e-3 * max(1.0, abs(expected)):
            raise ScheduleMismatchError(
                f"UNet call {step} ran at timestep {found}, but results/schedule.json says {expected} "
                f"({self.step_names[step]}); the schedule and the sampler disagree"
            )
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
        if self.collect_text and step == 0:
            states = hidden[batch["cond"]]
            self._flag_nonfinite(step, TEXT_KEY, states)
            rows = states[batch["text_mask"]] if batch["text_mask"] is not None else states.reshape(-1, states.shape[-1])
            if self.text_moments is None:
                self.text_moments = TorchMoments(rows.shape[-1], rows.device)
            self.text_moments.add(rows)

    def _flag_nonfinite(self, step: int, key: str, inputs: torch.Tensor) -> None:
        flag = ~torch.isfinite(inputs).reshape(inputs.shape[0], -1).all(dim=1)
        self._batch["nonfinite"].append((step, key, flag))

    def _step_hook(self, key: str):
        def hook(module, args):
            batch = self._batch
            inputs = args[0][batch["cond"]]
            step = batch["step"]
            self._flag_nonfinite(step, key, inputs)
            rows = inputs.reshape(-1, inputs.shape[-1])
            moments = self.step_moments[step].get(key)
            if moments is None:
                moments = self.step_moments[step][key] = TorchMoments(rows.shape[-1], rows.device)
            moments.add(rows)

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
        steps = []
        for index, moments in enumerate(self.step_moments):
            missing = [key for key in self.keys if key not in moments]
            if missing:
                raise RuntimeError(f"step {self.step_names[index]}: no input captured for {missing}")
            steps.append({key: moments[key].to_moments() for key in self.keys})
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
