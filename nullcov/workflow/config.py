"""Parse-time reading of the workflow config: what users type, and the report's selections.

Importing this module is cheap (numpy only), so rules/common.smk uses it at parse time.
"""

from __future__ import annotations

import numpy as np

from nullcov.docs import see
from nullcov.files import NULL_WORDS
from nullcov.models.family import guidance_input


def nullable_keys(schema: dict) -> list[str]:
    """Top-level keys whose JSON-schema type admits null (``type: [..., "null"]`` or ``enum`` with null)."""
    keys = []
    for key, spec in schema.get("properties", {}).items():
        types = spec.get("type", [])
        types = [types] if isinstance(types, str) else types
        if "null" in types or None in spec.get("enum", ()):
            keys.append(key)
    return keys


def normalise_nulls(config: dict, schema: dict) -> list[str]:
    """Replace the word ``null`` (any of :data:`NULL_WORDS`) by None in every nullable key.

    Changes ``config`` in place (before schema validation) and returns the keys it changed.
    Keys that do not admit null keep their value, so the schema names them if it is wrong.
    """
    changed = []
    for key in nullable_keys(schema):
        value = config.get(key)
        if isinstance(value, str) and value.strip() in NULL_WORDS:
            config[key] = None
            changed.append(key)
    return changed


def select_steps(num_steps: int, selection) -> list[int]:
    """Step indices: a count spread evenly over the schedule (first and last included) or a list."""
    if isinstance(selection, int) and not isinstance(selection, bool):
        count = min(selection, num_steps)
        return sorted({int(round(i)) for i in np.linspace(0, num_steps - 1, count)})
    indices = [int(index) for index in selection]
    bad = [index for index in indices if not 0 <= index < num_steps]
    if bad:
        raise ValueError(f"report_steps: step indices {bad} are out of range; the schedule has {num_steps} steps"
                         f"{see('report-step-or-attention-prompt-out-of-range')}")
    return sorted(set(indices))


def select_prompts(num_prompts: int, selection) -> list[int]:
    """Prompt indices (0-based, in the prompt file): the first ``selection`` prompts, or a list."""
    if isinstance(selection, int) and not isinstance(selection, bool):
        return list(range(min(selection, num_prompts)))
    indices = [int(index) for index in selection]
    bad = [index for index in indices if not 0 <= index < num_prompts]
    if bad:
        raise ValueError(f"attention_prompts: prompt indices {bad} are out of range; there are {num_prompts} prompts"
                         f"{see('report-step-or-attention-prompt-out-of-range')}")
    return list(dict.fromkeys(indices))


def check_unconditional_branch(config: dict, unet_config: dict) -> None:
    """``unconditional_branch: true`` needs UNet calls with an unconditional half: a CFG batch
    (``guidance_scale`` > 1) of the real sampler (``collection: trajectory``) on a UNet that takes
    guidance as a batch, not as an embedding (``time_cond_proj_dim``, LCM). Raise otherwise."""
    if not config["unconditional_branch"]:
        return
    why = []
    if config["guidance_scale"] <= 1:
        why.append(f"guidance_scale is {config['guidance_scale']} (CFG runs only above 1)")
    if config["collection"] != "trajectory":
        why.append(f"collection {config['collection']!r} calls the UNet with the conditional embedding only")
    if guidance_input(unet_config) == "embedding":
        why.append("the model's UNet takes guidance as an embedding (time_cond_proj_dim, LCM): no unconditional pass")
    if why:
        raise ValueError("unconditional_branch: true, but the UNet calls have no unconditional half: "
                         f"{'; '.join(why)}. Set unconditional_branch: false"
                         f"{see('no-unconditional-half-for-unconditional_branch')}")


def check_finetune_proof(config: dict, unet_config: dict) -> None:
    """The fine-tune proof constrains every attn2 linear, so it needs all of them collected, and each
    ``finetune_branches`` setting must be one the model can collect. Raise naming the key otherwise."""
    if not config["finetune_proof"]:
        return
    missing = [name for name, on in config["collect_features"].items() if not on]
    if missing or config["cross_attention_layers"] != "all":
        raise ValueError("finetune_proof constrains every attn2 linear of every layer: set collect_features "
                         f"q, k, v and out to true (now false: {missing}) and cross_attention_layers: all "
                         f"(now {config['cross_attention_layers']!r}){see('fine-tune-proof-needs-every-attn2-linear')}")
    if True in config["finetune_branches"]:
        try:
            check_unconditional_branch(config | {"unconditional_branch": True}, unet_config)
        except ValueError as err:
            raise ValueError(f"finetune_branches includes true: {err}; or set finetune_branches: [false]"
                             f"{see('fine-tune-branches-need-an-unconditional-half')}") from None


def finetune_variant_names(config: dict) -> list[str]:
    """The fine-tune proof's variants (:func:`nullcov.proof.plan.plan_variants`) from the config alone."""
    from nullcov.proof.plan import compared_projection_settings, plan_variants

    return [variant.name for variant in plan_variants(config, compared_projection_settings(config))]
