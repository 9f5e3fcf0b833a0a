"""Seconds and peak memory per rank of one sharded search step on a synthetic CTR model, 1 vs N ranks.

For each total row count (split over 5 tables with power-law sizes) and rank count, runs the real entry point
(``torchrun --nproc_per_node=R training/search.py``) on a generated config with a short reference training and a
few search steps, then reads the run's history: ``step_seconds`` is the median over the search steps (each: agent
+ exploration over the rank's rows, reset to the reference, fine-tune, validation scoring, quality routing, TD3
update, checkpoint). Appends one line per (rows, ranks) to bench/results/scaling.jsonl (append-only) with keys
rows, ranks, backend, sharding, step_seconds, peak_rss_mb_per_rank, git_sha. On a CUDA machine the same command
runs with NCCL.

    python bench/scaling.py                            # 10^6 and 10^7 rows, 1 and 2 ranks, row-wise sharding
    python bench/scaling.py --rows 1000000 --ranks 1 2 --sharding table_wise
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ml1m_baselines import git_sha  # noqa: E402
from ciess_prod.io import append_jsonl  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "scaling.jsonl"
GIT_SHA = git_sha()
SHARES = (0.6, 0.25, 0.1, 0.04, 0.01)  # of the rows, per table


def config_for(rows: int, sharding: str, steps: int, out: Path) -> dict:
    tables = [max(1, int(rows * s)) for s in SHARES]
    tables[0] += rows - sum(tables)
    return {
        "task": "ctr",
        "data": {
            "source": "synthetic",
            "synthetic": {"n_examples": 40_000, "n_dense": 8, "table_sizes": tables, "bag_lengths": [1, 1, 2, 1, 3]},
        },
        "model": {"d_max": 16, "bottom_mlp": [32, 16], "top_mlp": [32]},
        "sharding": {"default": sharding},
        "train": {"batch_size": 1024, "reference_batches": 10, "final_batches": 2, "eval_batch": 8192},
        "search": {
            "budgets": [0.8],
            "episodes": 1,
            "steps_per_episode": steps,
            "top_l": 1,
            "replay_bytes": 64 << 20,
            "rows_per_step": 100_000,
            "environment": {"batches": 5},
        },
        "output_dir": str(out),
    }


def run(rows: int, ranks: int, sharding: str, steps: int, work: Path) -> dict:
    out = work / f"r{rows}-n{ranks}"
    path = work / f"r{rows}-n{ranks}.yaml"
    path.write_text(yaml.safe_dump(config_for(rows, sharding, steps, out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               str(ROOT / "training" / "search.py"), "--config", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"rows {rows} ranks {ranks} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "search.json").read_text())
    history = json.loads((out / "history.json").read_text())["history"]
    import torch

    return {
        "rows": rows,
        "ranks": ranks,
        "backend": "nccl" if torch.cuda.is_available() else "gloo",
        "sharding": sharding,
        "step_seconds": round(statistics.median(h["step_seconds"] for h in history), 3),
        "step_seconds_all": [round(h["step_seconds"], 3) for h in history],
        "peak_rss_mb_per_rank": [round(x, 1) for x in summary["peak_rss_mb_per_rank"]],
        "d_max": 16,
        "tables": len(SHARES),
        "threads_per_rank": 1,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "git_sha": GIT_SHA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sharding", default="row_wise")
    parser.add_argument("--steps", type=int, default=3, help="search steps per run (the median is reported)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    print(f"{'rows':>10} {'ranks':>5} {'step s':>8} {'peak RSS MB per rank':>24}")
    with tempfile.TemporaryDirectory(prefix="ciess-scaling-") as work:
        for rows in args.rows:
            for ranks in args.ranks:
                row = run(rows, ranks, args.sharding, args.steps, Path(work))
                append_jsonl(args.results, row)
                print(f"{rows:>10,d} {ranks:>5} {row['step_seconds']:>8.2f} {str(row['peak_rss_mb_per_rank']):>24}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
