"""Ending a torchrun worker after its process group is destroyed."""

from __future__ import annotations

import logging
import os
import sys


def exit_skipping_finalisation(code: int) -> None:
    """Flushes logs and output, then exits without the interpreter's finalisation.

    gloo worker threads can still hold tensors after ``destroy_process_group``; freeing them during finalisation
    aborts the process now and then ("terminate called without an active exception", exit code -6, seen after
    complete runs and under load), which torchrun reports as a failure. Call it only once everything is written.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
