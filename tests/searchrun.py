"""Runs training/search.py under torchrun on a config derived from a base dict (shared by the distributed tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from ciess_prod.search import DimensionPlan

ROOT = Path(__file__).resolve().parent.parent
TINY_SEARCH = {  # a few seconds of search for the multi-process tests
    "budgets": [0.8, 0.9],
    "episodes": 2,
    "steps_per_episode": 3,
    "top_l": 1,
    "replay_bytes": 1 << 21,
    "td3": {"batch_size": 128},
    "environment": {"batches": 5},
}


def run_search(
    base: dict, tmp_path: Path, name: str, nproc: int, extra_args=(), env_extra=None, script_args=(), **changes
) -> Path:
    """Writes ``base`` with top-level sections updated by ``changes`` and runs it under torchrun (``extra_args``)
    with ``script_args`` for training/search.py; returns the output dir."""
    done, out = launch(base, tmp_path, name, nproc, extra_args, env_extra, script_args, **changes)
    assert done.returncode == 0, done.stderr[-6000:]
    return out


def launch(
    base: dict, tmp_path: Path, name: str, nproc: int, extra_args=(), env_extra=None, script_args=(), **changes
) -> tuple[subprocess.CompletedProcess, Path]:
    """``run_search`` that may fail: the finished process (stderr without torch's warnings) and the output dir."""
    config = json.loads(json.dumps(base))
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    out = tmp_path / name
    config["output_dir"] = str(out)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *extra_args, str(ROOT / "training" / "search.py"), "--config", str(path), *script_args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    noise = ("is_fx_tracing", "warnings.warn")
    done.stderr = "\n".join(line for line in done.stderr.splitlines() if not any(n in line for n in noise))
    return done, out


def assert_same_search(out: Path, reference: Path, budgets: list[float]) -> None:
    """Two runs ended with identical plans (sizes and metrics) and identical histories (timings aside)."""
    for c in budgets:
        plan, expected = (DimensionPlan.load(o / "plans" / f"c{c:.2f}") for o in (out, reference))
        for table in plan.sizes:
            assert torch.equal(plan.sizes[table], expected.sizes[table]), (c, table)
        assert plan.metrics == expected.metrics
    strip = lambda h: [{k: v for k, v in e.items() if k != "step_seconds"} for e in h]  # noqa: E731
    history, uninterrupted = (json.loads((o / "history.json").read_text())["history"] for o in (out, reference))
    assert strip(history) == strip(uninterrupted)
