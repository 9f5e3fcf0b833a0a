"""Baselines on MovieLens-1M: each model at full size and with uniform sizes (ES) at 80/90/95% sparsity.

Appends one JSON line per run to bench/results/ml1m.jsonl (append-only; never edit it by hand) and prints a
table. Each run follows its config's protocol (the committed configs use the authors' "final" protocol: the
training length is chosen on validation, then the model is retrained on train+validation and tested with those
items excluded).

    python bench/ml1m_baselines.py --models lightgcn --methods es --sparsities 0.8 0.9 0.95
    python bench/ml1m_baselines.py --models lightgcn --methods es --retrain-l2 1e-4 3e-4 1e-3 --retrain-patience 12 \
        --retrain-max-batches 10000   # each weight fitted, the best on validation tested (rows: l2, retrain_*)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ciess_prod.cli import non_negative_float  # noqa: E402
from ciess_prod.config import load_yaml, to_dict  # noqa: E402
from ciess_prod.experiment import ExperimentConfig, SizeConfig, run_experiment  # noqa: E402
from ciess_prod.io import append_jsonl  # noqa: E402
from ciess_prod.runtime import configure_cpu  # noqa: E402
from ciess_prod.train.protocol import RetrainConfig  # noqa: E402

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


def add_retrain_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that override a config's ``retrain`` (the searches' bench takes them too)."""
    parser.add_argument("--retrain-l2", nargs="+", type=non_negative_float, metavar="W",
                        help="fit at each of these L2 weights and test the best on validation (retrain.l2); the "
                             "rows record the weight tested as l2 and the weights tried as retrain_l2")
    parser.add_argument("--retrain-max-batches", type=int, metavar="N", help="cap of each fit (retrain.max_batches)")
    parser.add_argument("--retrain-patience", type=int, metavar="N", help="early-stopping patience (retrain.patience)")


def with_retrain_arguments(retrain: RetrainConfig, args: argparse.Namespace) -> RetrainConfig:
    """``retrain`` with the ``add_retrain_arguments`` flags given applied."""
    given = {"l2": tuple(args.retrain_l2) if args.retrain_l2 else None, "max_batches": args.retrain_max_batches,
             "patience": args.retrain_patience}
    return dataclasses.replace(retrain, **{k: v for k, v in given.items() if v is not None})


def retrain_fields(retrain: RetrainConfig) -> dict:
    """A row's record of a retraining that departs from the training recipe (``retrain_l2``, ...; none if not)."""
    return {f"retrain_{k}": v for k, v in to_dict(retrain).items() if v not in (None, [], ())}


def retrain_suffix(retrain: RetrainConfig) -> str:
    """The output directory suffix of runs whose fits depart from the training recipe."""
    fields = retrain_fields(retrain)
    return f"-retrain{hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]}" if fields else ""


def main(argv: list[str] | None = None) -> int:
    configure_cpu()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lightgcn", "ngcf", "neumf"])
    parser.add_argument("--methods", nargs="+", default=["full", "es"], choices=["full", "es"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.8, 0.9, 0.95])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--l2", type=non_negative_float, metavar="W",
                        help="this L2 weight instead of each config's train.l2 (the rows record it as l2)")
    add_retrain_arguments(parser)
    args = parser.parse_args(argv)
    try:  # the flags alone, before any work (each model's config may add to them)
        with_retrain_arguments(RetrainConfig(), args)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)

    sha = git_sha()  # now, not after hours of training while the tree moves on
    rows = []
    for model in args.models:
        base = load_yaml(ExperimentConfig, ROOT / "configs" / f"ml1m-{model}.yaml")
        l2 = base.train.l2 if args.l2 is None else args.l2
        retrain = with_retrain_arguments(base.retrain, args)
        suffix = l2_suffix(l2, base.train.l2) + retrain_suffix(retrain)
        runs = [SizeConfig("full", 0.0)] if "full" in args.methods else []
        runs += [SizeConfig("es", c) for c in args.sparsities] if "es" in args.methods else []
        for sizes in runs:
            config = dataclasses.replace(
                base,
                sizes=sizes,
                train=dataclasses.replace(base.train, seed=args.seed, progress=False, l2=l2),
                retrain=retrain,
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
                "l2": metrics["l2"],
                **retrain_fields(retrain),
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
