"""Docs generated from the workflow itself, so they cannot drift: the rule graph and the config reference.

Both are render blocks of ``tools/render_docs.py`` (``<!-- render: rulegraph -->`` in README.md,
``<!-- render: config-reference -->`` in docs/configuration.md), checked by the test suite.

- :func:`rulegraph`: the union of ``snakemake --rulegraph mermaid-js`` over configurations that switch
  every optional rule on (the shipped model, a built-in tiny model, exports, the fine-tune proof,
  merge groups, and the ``plan`` target), as a Mermaid flowchart; a rule that ``snakemake
  --list-rules`` knows but no configuration reaches is an error, so a new rule cannot be left out.
- :func:`config_reference`: one table row per key of ``config/schema.yaml`` (default, allowed values,
  description).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "config" / "schema.yaml"
#: Configurations whose union reaches every rule (the first is the shipped default).
RULEGRAPH_CONFIGS = (
    # the proof's own statistics rules run when the run's CFG branches and statistic differ from those compared
    ["finetune_proof=True", 'exports=["nullbooth","safetensors"]', "unconditional_branch=True", "statistic=covariance"],
    ["model=builtin:tiny", "prompts_per_shard=1", "shards_per_merge_group=2"],
)
NODE = re.compile(r"^\s*(id\d+)\[(\w+)\]\s*$")
EDGE = re.compile(r"^\s*(id\d+) --> (id\d+)\s*$")


def _snakemake(*args: str) -> str:
    command = [str(Path(sys.executable).parent / "snakemake"), "--cores", "1", *args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def rule_edges() -> tuple[set[str], set[tuple[str, str]]]:
    """Every rule and every (upstream, downstream) edge of the configurations, ``all`` left out."""
    rules, edges = set(), set()
    for config in RULEGRAPH_CONFIGS:
        names = {}
        for line in _snakemake("all", "plan", "--rulegraph", "mermaid-js", "--config", *config).splitlines():
            if node := NODE.match(line):
                names[node.group(1)] = node.group(2)
            elif edge := EDGE.match(line):
                edges.add((names[edge.group(1)], names[edge.group(2)]))
        rules |= set(names.values())
    rules.discard("all")
    edges = {(upstream, downstream) for upstream, downstream in edges if downstream != "all"}
    listed = _snakemake("--list-rules").splitlines()
    known = {line.split()[0] for line in listed if line and not line[0].isspace()} - {"all"}
    if known - rules:
        raise RuntimeError(f"rules no configuration of RULEGRAPH_CONFIGS reaches: {sorted(known - rules)}; "
                           "add a configuration that runs them")
    return rules, edges


def rulegraph() -> str:
    """The complete rule graph as a Mermaid flowchart (renders on code hosts; a code block elsewhere)."""
    rules, edges = rule_edges()
    lonely = sorted(rule for rule in rules if not any(rule in edge for edge in edges))
    lines = ["```mermaid", "flowchart TB"]
    lines += [f"    {upstream} --> {downstream}" for upstream, downstream in sorted(edges)]
    lines += [f"    {rule}" for rule in lonely]
    return "\n".join([*lines, "```", ""])


def _inline(value) -> str:
    """A value as one line of YAML-like flow text (what one writes in a config file)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_inline(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_inline(item) for item in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, str) else json.dumps(value)


def _allowed(spec: dict) -> str:
    """The values a key admits, from its schema (type, enum, bounds, pattern)."""
    if "enum" in spec:
        return ", ".join(f"`{_inline(item)}`" for item in spec["enum"])
    kinds = spec.get("type", "")
    parts = [" or ".join(kinds) if isinstance(kinds, list) else kinds]
    bounds = [f"{word} {spec[key]}" for key, word in (("minimum", "≥"), ("exclusiveMinimum", ">"),
                                                    ("maximum", "≤"), ("exclusiveMaximum", "<")) if key in spec]
    if bounds:
        parts.append(", ".join(bounds))
    if "pattern" in spec:
        parts.append(f"string matching `{spec['pattern']}`")
    if "items" in spec and "enum" in spec["items"]:
        parts.append("items: " + ", ".join(f"`{item}`" for item in spec["items"]["enum"]))
    if "properties" in spec:
        parts.append("keys " + ", ".join(f"`{key}`" for key in spec["properties"]))
    return "; ".join(part for part in parts if part)


def config_reference() -> str:
    """One row per key of config/schema.yaml: key, default, allowed values, what it means."""
    import yaml

    schema = yaml.safe_load(SCHEMA.read_text())
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for key, spec in schema["properties"].items():
        if "description" not in spec or "default" not in spec:
            raise ValueError(f"{SCHEMA.relative_to(REPO)}: key {key!r} lacks a description or a default")
        description = " ".join(spec["description"].split()).replace("|", "\\|")
        allowed = _allowed(spec).replace("|", "\\|")
        rows.append(f"| `{key}` | `{_inline(spec['default'])}` | {allowed} | {description} |")
    return "\n".join([*rows, ""])
