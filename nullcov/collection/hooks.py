"""Registering torch forward hooks for the length of a block, and always removing them.

The capture (:mod:`nullcov.collection.capture`), the attention probe (:mod:`nullcov.report.attention`), the
null-energy probe (:mod:`nullcov.proof.null_energy`) and the proof's attn2 drift (:mod:`nullcov.proof.experiment`)
all hook modules of a UNet that outlives them: a hook
left behind after an error would keep collecting (or fail) in every later call. They register
through :func:`forward_hooks`, which removes every hook it registered when the block ends,
whether it ends normally, by an exception, or by a failure halfway through registering.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Hook:
    """``function`` on ``module``: a forward pre-hook (``before``: it runs before the module, sees
    its inputs and may replace them), or a forward hook (after the module; it also sees the output).
    ``with_kwargs``: the hook also receives the module's keyword arguments (torch's own flag)."""

    module: object
    function: Callable
    before: bool = False
    with_kwargs: bool = False

    def register(self):
        """Register the hook; returns torch's removable handle."""
        if self.before:
            return self.module.register_forward_pre_hook(self.function, with_kwargs=self.with_kwargs)
        return self.module.register_forward_hook(self.function, with_kwargs=self.with_kwargs)


@contextlib.contextmanager
def forward_hooks(hooks: Iterable[Hook]) -> Iterator[None]:
    """Register ``hooks`` for the length of the ``with`` block; every one registered is removed at
    its end, also after an exception (in the block, or in registering a later hook)."""
    with contextlib.ExitStack() as registered:
        for hook in hooks:
            registered.callback(hook.register().remove)
        yield
