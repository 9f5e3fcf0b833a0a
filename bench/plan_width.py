"""What one LightGCN training batch and one validation ranking cost on MovieLens-1M at the sizes of a plan.

Retraining a plan's candidates dominates a search's time, and every plan trains at d_max columns with its rows
masked. Each plan here is timed against the full-size model in the same run, so the ratio says how much of the
full-size cost a plan still pays.

Appends one JSON line per plan to bench/results/plan_width.jsonl.

    python bench/plan_width.py [--config configs/ml1m-search-tracked.yaml] [--batches 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ml1m_baselines import git_sha  # noqa: E402
from ciess_prod.config import load_yaml  # noqa: E402
from ciess_prod.data import BPRSampler, RecDataset, load_dataset  # noqa: E402
from ciess_prod.io import append_jsonl  # noqa: E402
from ciess_prod.models import build_model  # noqa: E402
from ciess_prod.runtime import configure_cpu  # noqa: E402
from ciess_prod.search.config import SearchExperimentConfig  # noqa: E402
from ciess_prod.train.trainer import evaluate, train_step  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "plan_width.jsonl"

PLANS: dict[str, tuple[int, int]] = {
    "full size": (128, 128),
    "es c=0.80": (25, 25),
    "es c=0.90": (12, 12),
    "es c=0.95": (6, 6),
    "evened c=0.90 (ciess_even's shape)": (20, 3),
}
"""Plan -> (user size, item size); uniform within a side, at d_max 128."""


def time_plan(config: SearchExperimentConfig, dataset: RecDataset, sizes: tuple[int, int], batches: int) -> dict:
    """Median seconds of a training batch (forward, backward, Adam) and seconds of one validation ranking."""
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, dataset.n_users, dataset.n_items, dataset.train)
    for side, size, rows in (("user", sizes[0], dataset.n_users), ("item", sizes[1], dataset.n_items)):
        model.set_row_sizes(side, torch.full((rows,), size, dtype=torch.int32))
    sampler = BPRSampler(dataset.train, batch_size=config.train.batch_size, seed=config.train.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    model.train()
    seconds = []
    for step in range(batches + 2):  # the first two warm up
        start = time.perf_counter()
        train_step(model, sampler.next_batch(), optimizer, config.train, step=0)  # the recipe's first lr
        if step >= 2:
            seconds.append(time.perf_counter() - start)
    start = time.perf_counter()
    evaluate(model, dataset, "val", chunk_size=config.train.eval_chunk)
    return {"ms_per_batch": statistics.median(seconds) * 1000, "eval_seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    configure_cpu()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "ml1m-search-tracked.yaml")
    parser.add_argument("--batches", type=int, default=30, help="timed training batches per plan")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    config = load_yaml(SearchExperimentConfig, args.config)
    if config.model.kind != "lightgcn" or config.model.d_max != 128:
        raise SystemExit(f"the plans are LightGCN shapes at d_max 128; {args.config} has {config.model}")
    dataset = load_dataset(config.data, ROOT)
    sha = git_sha()
    print("| plan | users x items | ms per batch | x full size | validation s | x full size |")
    print("|---|---|---|---|---|---|")
    full: dict = {}
    for name, sizes in PLANS.items():
        timing = time_plan(config, dataset, sizes, args.batches)
        full = full or timing
        batch_ratio = timing["ms_per_batch"] / full["ms_per_batch"]
        eval_ratio = timing["eval_seconds"] / full["eval_seconds"]
        append_jsonl(args.results, {
            "data": config.data.source, "model": config.model.kind, "plan": name, "user_size": sizes[0],
            "item_size": sizes[1], "ms_per_batch": round(timing["ms_per_batch"], 2),
            "eval_seconds": round(timing["eval_seconds"], 3), "batch_vs_full": round(batch_ratio, 3),
            "eval_vs_full": round(eval_ratio, 3), "batches": args.batches, "threads": torch.get_num_threads(),
            "git_sha": sha,
        })
        print(f"| {name} | {sizes[0]} x {sizes[1]} | {timing['ms_per_batch']:.1f} | {batch_ratio:.2f} | "
              f"{timing['eval_seconds']:.2f} | {eval_ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
