"""Superseded: the report's figures are in ``nullcov.figures_<stage>`` (projection, training_curve,
attention, validation) and the run summary in :mod:`nullcov.run_summary`.

Only :func:`~nullcov.figures_attention.attention_figure` is still importable from here, for
:mod:`nullcov.attention`, until that module imports it from :mod:`nullcov.figures_attention`;
then this module goes.
"""

from nullcov.figures_attention import attention_figure

__all__ = ["attention_figure"]
