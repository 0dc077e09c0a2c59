"""Rare identifier tokens for ``builtin:shapes``: one token each, an embedding of its own, never trained on.

DreamBooth binds a new concept to a rare identifier: a word the tokenizer keeps as one token and
the model has (almost) never seen, so the concept inherits no prior. A made-up word the shapes
tokenizer splits into letters (``sks`` -> ``s``, ``k``, ``s``) is three tokens instead. This module
gives the tokenizer :data:`RARE_TOKENS`: for each, the BPE merges that join its letters into one
token and the vocabulary entries those merges make, appended after every existing entry (so every
existing id, and every grammar caption's tokens, stay what they were), and one new row of the text
encoder's token embedding per new entry, drawn from CLIP's own initialisation (normal, standard
deviation ``initializer_range x initializer_factor``) with a fixed seed: what a token that never
appears in a training caption keeps after training, up to AdamW's weight decay.

:func:`add_rare_tokens` is applied by ``python -m nullcov.shapes.train`` to the folder it writes
(after training, whose captions hold none of these words), and was applied the same way to the
shipped model: its other weights are unchanged.
"""

from __future__ import annotations

from pathlib import Path

from nullcov.files import read_json, write_text
from nullcov.models.tiny_model import write_model_json
from nullcov.shapes import grammar as shapes

#: Made-up words, each one token once added; none is a grammar word or in any training caption.
RARE_TOKENS = ("sks", "zwx", "qlv", "vyk")
#: Seed of the new embedding rows.
EMBEDDING_SEED = 1234


def word_merges(word: str) -> list[tuple[str, str]]:
    """The BPE merges that join ``word``'s letters, left to right, into the one token ``word</w>``."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    merges, joined = [], pieces[0]
    for piece in pieces[1:]:
        merges.append((joined, piece))
        joined += piece
    return merges


def extend_tokenizer(folder: Path, words=RARE_TOKENS) -> list[str]:
    """Append the merges and vocabulary entries of ``words`` to the CLIP tokenizer files in ``folder``;
    returns the new vocabulary entries in id order (none when every word is already one token)."""
    clash = sorted(set(words) & set(shapes.vocabulary()))
    if clash:
        raise ValueError(f"rare tokens {clash} are grammar words: a rare identifier must never be in a caption")
    vocab = read_json(folder / "vocab.json")
    lines = (folder / "merges.txt").read_text().splitlines()
    known = set(lines[1:])
    added: list[str] = []
    for word in words:
        for left, right in word_merges(word):
            if f"{left} {right}" not in known:
                known.add(f"{left} {right}")
                lines.append(f"{left} {right}")
            if left + right not in vocab:
                vocab[left + right] = len(vocab)
                added.append(left + right)
    write_text(folder / "merges.txt", "\n".join(lines) + "\n")
    write_model_json(folder / "vocab.json", vocab)
    return added


def extend_embeddings(text_encoder, count: int, seed: int = EMBEDDING_SEED) -> None:
    """Append ``count`` rows to the text encoder's token embedding, from CLIP's initialisation, seeded."""
    import torch

    config = text_encoder.config
    old = text_encoder.get_input_embeddings().weight.detach()
    generator = torch.Generator().manual_seed(seed)
    std = config.initializer_range * config.initializer_factor
    rows = torch.randn((count, old.shape[1]), generator=generator, dtype=torch.float32).to(old.dtype) * std
    embedding = torch.nn.Embedding(old.shape[0] + count, old.shape[1], dtype=old.dtype)
    with torch.no_grad():
        embedding.weight.copy_(torch.cat([old, rows]))
    text_encoder.set_input_embeddings(embedding)
    config.vocab_size = old.shape[0] + count


def add_rare_tokens(folder: Path, words=RARE_TOKENS, seed: int = EMBEDDING_SEED) -> dict:
    """Give the model folder's tokenizer ``words`` as single tokens and its text encoder their rows;
    returns the record ``training.json`` keeps (tokens, their ids, the rows' seed and std)."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    added = extend_tokenizer(folder / "tokenizer", words)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32)
    if added:
        extend_embeddings(text_encoder, len(added), seed)
        text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    ids = {}
    for word in words:
        tokens = tokenizer.tokenize(word)
        if tokens != [word + "</w>"]:
            raise ValueError(f"{folder / 'tokenizer'}: {word!r} tokenizes as {tokens}, not as one token")
        ids[word] = tokenizer.convert_tokens_to_ids(tokens[0])
    if len(tokenizer) != text_encoder.config.vocab_size:
        raise ValueError(f"{folder}: tokenizer has {len(tokenizer)} tokens, the text encoder "
                         f"{text_encoder.config.vocab_size} embedding rows")
    config = text_encoder.config
    return {"tokens": ids, "seed": seed, "std": config.initializer_range * config.initializer_factor}
