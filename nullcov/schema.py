"""The workflow's config schema (``config/schema.yaml``, shipped beside the package): its defaults.

The schema is the one place a config key's default is written: the workflow validates every
config against it (``set_default``), and code that needs a key's default without a config (the
fine-tune proof's :class:`nullcov.proof.plan.ProofSettings`) reads it here. Importing this module
is cheap (yaml only when the schema is read).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

#: The schema of the workflow that ships this package (``<workflow>/config/schema.yaml``).
SCHEMA = Path(__file__).resolve().parent.parent / "config" / "schema.yaml"


def schema_defaults(schema: dict) -> dict:
    """Every top-level key's ``default`` from the config schema: the config of an empty config file."""
    return {key: spec["default"] for key, spec in schema.get("properties", {}).items() if "default" in spec}


@lru_cache(maxsize=1)
def _shipped_defaults() -> dict:
    import yaml

    return schema_defaults(yaml.safe_load(SCHEMA.read_text()))


def schema_default(key: str):
    """The default of one config key in the shipped schema (:data:`SCHEMA`, read once)."""
    return _shipped_defaults()[key]
