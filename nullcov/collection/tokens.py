"""The real-token masks of the text sequences a transformer (SD3, FLUX) receives.

SD3's text sequence is its two CLIP encoders' 77 positions (concatenated features) followed by
T5's ``max_sequence_length`` positions (zeros when the model has no T5); FLUX's is T5's alone.
T5 pads to ``max_sequence_length`` and the pipelines pass no attention mask, so at short prompts
the padding rows outnumber the prompt's own: the capture counts both for every collected prompt
and, with ``text_tokens: prompt``, keeps the real ones only (CLIP: BOS..EOS, T5: the tokens its
tokenizer's attention mask marks, ``</s>`` included; an absent T5's zeros are all padding).
"""

from __future__ import annotations

import inspect

import torch

from nullcov.collection.capture import text_row_mask


def max_sequence_length(pipe) -> int:
    """The T5 length the pipeline (an instance or its class) pads to: its ``__call__``'s default
    ``max_sequence_length`` (SD3: 256, FLUX: 512), which nullcov's pipeline calls keep."""
    cls = pipe if isinstance(pipe, type) else type(pipe)
    return int(inspect.signature(cls.__call__).parameters["max_sequence_length"].default)


def _t5_mask(tokenizer, texts: list[str], length: int) -> torch.Tensor:
    tokens = tokenizer(texts, padding="max_length", max_length=length, truncation=True)
    return torch.as_tensor(tokens.attention_mask, dtype=torch.bool)


def _clip_mask(tokenizer, texts: list[str], length: int) -> torch.Tensor:
    tokens = tokenizer(texts, padding="max_length", max_length=length, truncation=True)
    return text_row_mask(tokens.input_ids, tokenizer.eos_token_id, "prompt")


def sequence_mask(pipe, texts: list[str]) -> torch.Tensor:
    """[B, L] real-token mask of the text sequence ``pipe``'s transformer receives for ``texts``."""
    length = max_sequence_length(pipe)
    if type(pipe).__name__ == "FluxPipeline":
        return _t5_mask(pipe.tokenizer_2, texts, length)
    clip = _clip_mask(pipe.tokenizer, texts, pipe.tokenizer_max_length)
    if pipe.tokenizer_3 is None:  # SD3 without T5: zeros in T5's place
        return torch.cat([clip, torch.zeros(len(texts), length, dtype=torch.bool)], dim=1)
    return torch.cat([clip, _t5_mask(pipe.tokenizer_3, texts, length)], dim=1)


def token_masks(pipe, prompts: list[str], device) -> dict[str, torch.Tensor]:
    """``{"cond": [B, L], "uncond": [B, L]}``: the real tokens of the prompts' text sequences and of
    the negative prompts' (``""``, as the pipelines encode them for CFG), on ``device``."""
    return {"cond": sequence_mask(pipe, prompts).to(device),
            "uncond": sequence_mask(pipe, [""] * len(prompts)).to(device)}
