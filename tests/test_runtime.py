"""Every entry point flushes denormal floats before its first tensor operation (ciess_prod/runtime.py).

Each check runs in a fresh interpreter: the setting is process-wide and must not leak into the other tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Prints what a denormal times one gives: 0.0 once denormals are flushed (DAZ), the denormal itself otherwise.
PROBE = "import torch; print(float(torch.tensor([1e-39]) * 1.0))"


def run_python(code: str) -> float:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip().splitlines()[-1])


def test_a_fresh_process_keeps_denormals():
    """The control: without configure_cpu the probe sees the denormal, so the checks below can fail."""
    assert run_python(PROBE) == pytest.approx(1e-39, rel=1e-3)


def test_configure_cpu_flushes_denormals():
    assert run_python(f"from ciess_prod.runtime import configure_cpu; assert configure_cpu(); {PROBE}") == 0.0


@pytest.mark.parametrize(
    "entry",
    [
        # the `ciess` command, stopped by a missing checkpoint after its set-up (exit 2)
        "from ciess_prod.cli import main; assert main(['evaluate', '--checkpoint', '/nonexistent']) == 2",
        # the torchrun entry point, stopped by a missing config
        "import runpy, sys; sys.argv = ['search.py', '--config', '/nonexistent.yaml']\n"
        "try:\n    runpy.run_path('training/search.py', run_name='__main__')\nexcept SystemExit:\n    pass",
        # a retraining worker process's set-up
        "import logging; from ciess_prod.search.selection import _worker_logging\n"
        "_worker_logging(1, logging.INFO, 'w')",
    ],
    ids=["ciess", "training-search", "retrain-worker"],
)
def test_entry_points_flush_denormals(entry: str):
    assert run_python(f"{entry}\n{PROBE}") == 0.0
