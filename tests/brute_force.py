"""The independent reference the collection tests compare against: every raw input of every hooked
linear, kept per UNet call in float64 (shared by tests/collection/test_capture.py and
tests/models/test_families.py); and which projection each linear of an SD3/FLUX transformer takes,
walked from its blocks (tests/training/test_mmdit_training.py, tests/proof/test_flow_proof.py)."""

import numpy as np

from nullcov.models.model import cross_attention_modules


class LinearInputs:
    """What every reference shares: forward pre-hooks that keep a linear's raw input (float64) in the
    current call's record (``self.calls[-1]``), and their removal."""

    def _linear(self, key):
        def hook(module, args):
            self.calls[-1][key] = args[0].double().clone()

        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


class RawInputs(LinearInputs):
    """Independent reference: keep every raw input of every hooked linear, per UNet call."""

    def __init__(self, unet):
        self.calls = []  # per UNet call: {"timestep", "batch", "states", key: tensor}
        self.handles = [unet.register_forward_pre_hook(self._unet, with_kwargs=True)]
        for name, module in cross_attention_modules(unet):
            for linear, target in (("to_q", module.to_q), ("to_out", module.to_out[0]), ("to_k", module.to_k)):
                self.handles.append(target.register_forward_pre_hook(self._linear(f"{name}/{linear}")))

    def _unet(self, module, args, kwargs):
        self.calls.append({"timestep": float(args[1]), "states": kwargs["encoder_hidden_states"].double().clone()})


def assert_close_to_float64(actual, expected, rtol=2e-6):
    """float32 products summed in float64: errors scale with the matrix's largest entry."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * np.abs(expected).max())


def mmdit_projection_keys(transformer) -> dict[str, tuple[str, str]]:
    """Module name -> (``step`` or ``text``, key of its projection), by walking the blocks: a joint block's
    q/k/v take the image stream's input (``attn.to_q``), add_q/k/v the text stream's (``attn.add_q_proj``),
    the output projections their own; a single block's q/k/v and proj_mlp the ``attn.to_q`` input,
    ``proj_out`` its own; the text path its text-file key."""
    found = {}
    for index, block in enumerate(transformer.transformer_blocks):
        name = f"transformer_blocks.{index}"
        for linear in ("to_q", "to_k", "to_v"):
            found[f"{name}.attn.{linear}"] = ("step", f"{name}/attn.to_q")
        for linear in ("add_q_proj", "add_k_proj", "add_v_proj"):
            found[f"{name}.attn.{linear}"] = ("step", f"{name}/attn.add_q_proj")
        found[f"{name}.attn.to_out.0"] = ("step", f"{name}/attn.to_out")
        if block.attn.to_add_out is not None:
            found[f"{name}.attn.to_add_out"] = ("step", f"{name}/attn.to_add_out")
    for index, _ in enumerate(getattr(transformer, "single_transformer_blocks", None) or ()):
        name = f"single_transformer_blocks.{index}"
        for linear in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"):
            found[f"{name}.{linear}"] = ("step", f"{name}/attn.to_q")
        found[f"{name}.proj_out"] = ("step", f"{name}/proj_out")
    for path in ("context_embedder", "time_text_embed.text_embedder.linear_1"):
        found[path] = ("text", path)
    return found
