"""torchrun entry point of the CIESS search.

    torchrun --nproc_per_node=1 training/search.py --config configs/smoke.yaml [--resume]

Initialises the process group torchrun describes (gloo on CPU, NCCL on GPU) and runs the search; rank 0 writes
the plans and the report. Multi-process sharding of the tables is the next stage of the project; per-row state
is kept as row-indexed tensors so it shards by rows.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ciess_prod.config import load_yaml  # noqa: E402
from ciess_prod.search.search import SearchExperimentConfig, run_search  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--resume", action="store_true", help="continue from the last completed step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        if dist.get_world_size() > 1:
            raise SystemExit("training/search.py: multi-process sharding is not implemented yet; use one process")
    try:
        config = load_yaml(SearchExperimentConfig, args.config)
        summary = run_search(config, base_dir=ROOT, resume=args.resume)
        for budget, plan in summary.get("plans", {}).items():
            print(f"c={budget}: {plan['path']} (achieved sparsity {plan['achieved_sparsity']:.4f})")
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
