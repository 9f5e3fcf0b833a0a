"""Baselines on MovieLens-1M: each model at full size and with uniform sizes (ES) at 80/90/95% sparsity.

Appends one JSON line per run to bench/results/ml1m.jsonl (append-only; never edit it by hand) and prints a
table. Each run follows its config's protocol (the committed configs use the authors' "final" protocol: the
training length is chosen on validation, then the model is retrained on train+validation and tested with those
items excluded).

    python bench/ml1m_baselines.py --models lightgcn --methods es --sparsities 0.8 0.9 0.95
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ciess_prod.cli import non_negative_float  # noqa: E402
from ciess_prod.config import load_yaml  # noqa: E402
from ciess_prod.experiment import ExperimentConfig, SizeConfig, run_experiment  # noqa: E402
from ciess_prod.io import append_jsonl  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "ml1m.jsonl"
# Paper, MovieLens-1M, ES rows (Recall@20, NDCG@20), for the ratio column.
PAPER_ES = {
    "lightgcn": {0.8: (0.2248, 0.3969), 0.9: (0.2105, 0.3787), 0.95: (0.1752, 0.3272)},
    "ngcf": {0.8: (0.2232, 0.3858), 0.9: (0.2069, 0.3679), 0.95: (0.1977, 0.3595)},
    "neumf": {0.8: (0.2080, 0.3682), 0.9: (0.1973, 0.3546), 0.95: (0.1841, 0.3358)},
}


def git_sha() -> str:
    """The commit the code was loaded from (call at start-up), suffixed -dirty if code files differ from it."""
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
        changed = subprocess.check_output(
            ["git", "status", "--porcelain", "--", "ciess_prod", "bench/*.py", "configs"], cwd=ROOT, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if changed.strip() else "")


def l2_suffix(l2: float, default: float) -> str:
    """The output directory suffix of a run at another L2 weight than its config's (the searches use it too)."""
    return "" if l2 == default else f"-l2{l2:g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lightgcn", "ngcf", "neumf"])
    parser.add_argument("--methods", nargs="+", default=["full", "es"], choices=["full", "es"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.8, 0.9, 0.95])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--l2", type=non_negative_float, metavar="W",
                        help="this L2 weight instead of each config's train.l2 (the rows record it as l2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)

    sha = git_sha()  # now, not after hours of training while the tree moves on
    rows = []
    for model in args.models:
        base = load_yaml(ExperimentConfig, ROOT / "configs" / f"ml1m-{model}.yaml")
        l2 = base.train.l2 if args.l2 is None else args.l2
        suffix = l2_suffix(l2, base.train.l2)
        runs = [SizeConfig("full", 0.0)] if "full" in args.methods else []
        runs += [SizeConfig("es", c) for c in args.sparsities] if "es" in args.methods else []
        for sizes in runs:
            config = dataclasses.replace(
                base,
                sizes=sizes,
                train=dataclasses.replace(base.train, seed=args.seed, progress=False, l2=l2),
                output_dir=str(ROOT / "runs" / "bench" / f"ml1m-{model}-{sizes.method}-{sizes.sparsity}{suffix}"),
            )
            metrics = run_experiment(config, base_dir=ROOT)
            test = metrics["test"]
            row = {
                "dataset": "ml-1m",
                "model": model,
                "method": sizes.method,
                "target_sparsity": sizes.sparsity,
                "achieved_sparsity": round(metrics["achieved_sparsity"], 6),
                "recall@5": test["recall@5"],
                "recall@20": test["recall@20"],
                "ndcg@5": test["ndcg@5"],
                "ndcg@20": test["ndcg@20"],
                "embedding_bytes": metrics["embedding_bytes"],
                "wall_seconds": round(metrics["wall_seconds"], 1),
                "seed": args.seed,
                "git_sha": sha,
                "protocol": metrics["protocol"],
                "best_batches": metrics["best_batches"],
                "final_length": metrics["final_length"],
                "retrain_batches": metrics["retrain_batches"],
                "l2": l2,
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
            append_jsonl(args.results, row)
            rows.append(row)
            print_row(row)
    return 0


def print_row(row: dict) -> None:
    paper = PAPER_ES.get(row["model"], {}).get(row["target_sparsity"])
    ratio = f"{row['recall@20'] / paper[0]:.0%} / {row['ndcg@20'] / paper[1]:.0%}" if paper else "-"
    print(
        f"{row['model']:9s} {row['method']:5s} c={row['target_sparsity']:<5} "
        f"R@20 {row['recall@20']:.4f} N@20 {row['ndcg@20']:.4f} R@5 {row['recall@5']:.4f} N@5 {row['ndcg@5']:.4f} "
        f"bytes {row['embedding_bytes']:>10,d} {row['wall_seconds']:>7.0f}s  vs paper ES {ratio}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
