"""The stream tables of docs/model-families.md at the real SD3, SD3.5 and FLUX.1 sizes, from their published configs.

``CONFIGS`` (:data:`nullcov.models.mmdit_dims.PUBLISHED_CONFIGS`) holds each model's
``transformer/config.json`` as published on the Hugging Face hub (the keys that size the hooked linears,
copied by hand: nothing is downloaded and no weights are read).
:func:`streams_tables` runs them through :func:`nullcov.models.mmdit_dims.stream_widths` (the same
arithmetic the plan uses) and renders one table per model: every stream, its keys, width and float64
bytes per step, then the totals of the default streams and of every stream. It is the
``<!-- render: mmdit-streams -->`` block of ``tools/render_docs.py``; ``tests/workflow/test_plan.py``
holds the arithmetic equal to a meta-device transformer built from each of these configs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nullcov.measurement import human_bytes
from nullcov.models.family import DEFAULT_STREAMS, JOINT_ATTENTION, SINGLE_BLOCK, TEXT_PATH
from nullcov.models.mmdit_dims import PUBLISHED_CONFIGS as CONFIGS
from nullcov.models.mmdit_dims import stream_widths
from nullcov.statistics.store import moments_file_bytes

#: stream -> the linears whose input it is (the block's, or the transformer's for the text path).
_LINEARS = {
    **{stream: ", ".join(f"`{linears.module_path(name)}`" for name in linears.sharing(linear))
       for linears in (JOINT_ATTENTION, SINGLE_BLOCK) for stream, linear in linears.features},
    **{stream: f"`{key}`" for stream, key in TEXT_PATH},
}


def _ranges(indices: list[int]) -> str:
    """``0..18`` for a run of consecutive block indices, ``0..21, 23`` otherwise."""
    parts, start = [], None
    for position, index in enumerate(indices):
        if start is None:
            start = index
        if position + 1 == len(indices) or indices[position + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}..{index}")
            start = None
    return ", ".join(parts)


def _key_pattern(keys: list[str]) -> str:
    """The keys of one stream as one pattern: ``transformer_blocks.{0..23}/attn.to_q``."""
    if len(keys) == 1 and "/" not in keys[0]:
        return f"`{keys[0]}`"
    blocks = [key.split("/")[0] for key in keys]
    container, linear = blocks[0].rpartition(".")[0], keys[0].split("/")[1]
    return f"`{container}.{{{_ranges([int(block.rpartition('.')[2]) for block in blocks])}}}/{linear}`"


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def stream_table(config: dict) -> str:
    """One model's table: per stream its keys, width, float64 bytes per step (full matrices, as a feature
    job holds them; packed, as in a step file), then the default streams' and every stream's totals."""
    widths = stream_widths(config)
    text_path = {stream for stream, _ in TEXT_PATH}
    rows, totals = [], {"default streams": [0, 0], "every stream": [0, 0]}
    for stream, keys in widths.items():
        memory = sum(8 * (d * d + d) for d in keys.values())
        packed = moments_file_bytes(keys) - moments_file_bytes({})
        when = "once (`text.h5`)" if stream in text_path else "per step"
        rows.append([f"`{stream}`" + ("" if stream in DEFAULT_STREAMS else " (on request)"),
                     _key_pattern(list(keys)), len(keys), ", ".join(str(d) for d in sorted(set(keys.values()))),
                     _LINEARS[stream], f"{human_bytes(memory)} {when}", human_bytes(packed)])
        if stream not in text_path:
            for choice in ("default streams", "every stream"):
                if choice == "every stream" or stream in DEFAULT_STREAMS:
                    totals[choice][0] += memory
                    totals[choice][1] += packed
    for choice, (memory, packed) in totals.items():
        rows.append([f"**{choice}** (per step)", "", "", "", "", f"**{human_bytes(memory)}**",
                     f"**{human_bytes(packed)}**"])
    return _table(("stream", "keys", "#", "d", "input of", "float64 (full matrices)", "step file (packed)"), rows)


def streams_tables() -> str:
    """The ``mmdit-streams`` render block: one table per model of :data:`CONFIGS`."""
    parts = []
    for title, (hub_ids, config) in CONFIGS.items():
        sizing = ", ".join(f"`{key}` {config[key]}" for key in ("num_layers", "num_single_layers",
                                                                  "num_attention_heads", "attention_head_dim",
                                                                  "joint_attention_dim", "pooled_projection_dim")
                           if key in config)
        dual = config.get("dual_attention_layers")
        if dual:
            sizing += f", `dual_attention_layers` {_ranges(dual)}"
        parts.append(f"**{title}** ({', '.join(f'`{hub}`' for hub in hub_ids)}; {sizing}):\n\n"
                     + stream_table(config))
    return ("\n".join(parts) + "\n<sub>Computed by `tools/mmdit_tables.py` from the published transformer configs "
            "through `nullcov.models.mmdit_dims` (no weights); decimal units.</sub>\n")


if __name__ == "__main__":
    print(streams_tables())
