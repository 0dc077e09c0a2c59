"""The independent reference the collection tests compare against: every raw input of every hooked
linear, kept per UNet call in float64 (shared by tests/collection/test_capture.py and
tests/models/test_families.py)."""

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
