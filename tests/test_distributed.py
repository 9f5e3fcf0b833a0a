"""Multi-process checks: each script under tests/distributed/ runs with torchrun --nproc_per_node=2 on gloo."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
               str(ROOT / "tests" / "distributed" / script), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


@pytest.mark.distributed
def test_sizes_hold_for_pooled_bags_under_every_sharding_type():
    done = torchrun("sharded_prefix_mask.py")
    assert done.returncode == 0, done.stderr[-4000:]
    for kind in ("table_wise", "row_wise", "column_wise", "table_row_wise", "auto"):
        assert f"ok {kind} sum rowwise_adagrad" in done.stdout and f"ok {kind} mean sgd" in done.stdout
