"""A job's log: stderr and ``logging`` sent to the file a rule's ``log:`` names (:func:`logging_to`)."""

from __future__ import annotations

import contextlib
import logging
import sys

log = logging.getLogger(__name__)


@contextlib.contextmanager
def logging_to(path):
    """Send stderr and ``logging`` (INFO) to a job's log file for the duration of the job.

    The root logger's handlers and level are restored afterwards, so this also serves a
    ``run:`` block inside the Snakemake process (rule ``schedule``).
    """
    root = logging.getLogger()
    with open(path, "w", buffering=1) as handle:
        saved_stderr, saved_handlers, saved_level = sys.stderr, root.handlers[:], root.level
        handler = logging.StreamHandler(handle)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        sys.stderr = handle
        root.handlers = [handler]
        root.setLevel(logging.INFO)
        try:
            yield
        except BaseException:
            log.exception("job failed")
            raise
        finally:
            sys.stderr, root.handlers = saved_stderr, saved_handlers
            root.setLevel(saved_level)


