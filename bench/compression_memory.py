"""Memory of compressed MovieLens-1M models per plan and dtype, with the test metrics each dtype keeps.

For every plan of a finished search (``<search>/plans/cX.XX`` with the model it was tested with in
``<search>/models/cX.XX``) and every dtype, runs the real ``ciess compress`` path (checkpoint + plan -> artifact
directory -> load) and scores the loaded model on the test split under the search's final protocol. Appends one
``kind: "memory"`` line per (plan, dtype) to bench/results/compression.jsonl (append-only) and prints a table.

    python bench/compression_memory.py                          # runs/ml1m-search, fp32 fp16 int8 int4
    python bench/compression_memory.py --search runs/ml1m-search --dtypes fp32 int8

Bytes: ``compressed_bytes`` is everything the ragged tables hold (values, row offsets, scales/biases, padding);
``ideal_bytes`` is sum(d_n) values at the dtype's width; ``dense_bytes`` the fp32 N x d_max tables they replace.
The metric deltas are against the fp32 masked model's own test metrics stored in the plan; the table errors compare
every stored value (dequantised) with the trained model's masked fp32 tables.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ml1m_baselines import git_sha  # noqa: E402
from ciess_prod.compress.artifact import load_artifact  # noqa: E402
from ciess_prod.compress.compressor import compress  # noqa: E402
from ciess_prod.experiment import load_trained_model  # noqa: E402
from ciess_prod.io import append_jsonl  # noqa: E402
from ciess_prod.runtime import configure_cpu  # noqa: E402
from ciess_prod.search.plan import DimensionPlan  # noqa: E402
from ciess_prod.train.protocol import split_metrics  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "compression.jsonl"
GIT_SHA = git_sha()


def plan_dirs(search: Path) -> list[Path]:
    plans = sorted(p for p in (search / "plans").glob("c*") if p.is_dir())
    if not plans:
        raise SystemExit(f"{search}: no plans/cX.XX directories (run the search first)")
    return plans


def measure(plan_dir: Path, model_dir: Path, dtype: str, work: Path, base_dir: Path) -> dict:
    plan = DimensionPlan.load(plan_dir)
    manifest = compress(plan_dir, model_dir, dtype, work / f"{plan_dir.name}-{dtype}", base_dir)
    trained = load_trained_model(model_dir, base_dir)  # the dataset as the model was trained (final protocol)
    model = load_artifact(work / f"{plan_dir.name}-{dtype}").model
    test = split_metrics(model, trained.dataset, "test", trained.config.train.eval_chunk)
    with torch.no_grad():  # the lookup error of this dtype: every stored value against the masked fp32 tables
        errors = torch.cat([(model.tables[name].to_dense() - trained.model.masked_table(name)).flatten()
                            for name in trained.model.tables])
        values = torch.cat([trained.model.masked_table(name).flatten() for name in trained.model.tables])
    reference = plan.metrics["test"]
    b = manifest["bytes"]
    return {
        "kind": "memory",
        "dataset": trained.dataset.name,
        "model": plan.model,
        "target_sparsity": plan.target_sparsity,
        "achieved_sparsity": round(plan.achieved_sparsity, 6),
        "dtype": dtype,
        "compressed_bytes": b["compressed_bytes"],
        "ideal_bytes": b["ideal_bytes"],
        "dense_bytes": b["dense_bytes"],
        "compressed_over_ideal": round(b["compressed_bytes"] / b["ideal_bytes"], 4),
        "artifact_file_bytes": sum(f["bytes"] for f in manifest["files"].values()),
        "head_bytes": b["head_bytes"],
        "graph_bytes": b["graph_bytes"],
        "table_max_abs_error": float(errors.abs().max()),
        "table_rms_error": float(errors.square().mean().sqrt()),
        "table_rms_value": float(values.square().mean().sqrt()),
        "recall@20": test["recall@20"],
        "ndcg@20": test["ndcg@20"],
        "recall@20_change": test["recall@20"] - reference["recall@20"],
        "ndcg@20_change": test["ndcg@20"] - reference["ndcg@20"],
        "plan": str(plan_dir),
        "git_sha": GIT_SHA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    configure_cpu()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--search", type=Path, default=ROOT / "runs" / "ml1m-search", help="a finished search")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "fp16", "int8", "int4"])
    parser.add_argument("--plans", nargs="+", help="plan directory names to measure (default: every plans/cX.XX)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--base-dir", type=Path, default=ROOT, help="relative data paths resolve against it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    print(f"{'plan':>6} {'dtype':>5} {'compressed':>12} {'ideal':>12} {'dense':>12} {'c/ideal':>7} "
          f"{'R@20':>7} {'N@20':>7} {'dR@20':>8} {'dN@20':>8}")
    with tempfile.TemporaryDirectory(prefix="ciess-compress-") as work:
        for plan_dir in plan_dirs(args.search):
            if args.plans and plan_dir.name not in args.plans:
                continue
            for dtype in args.dtypes:
                row = measure(plan_dir, args.search / "models" / plan_dir.name, dtype, Path(work), args.base_dir)
                append_jsonl(args.results, row)
                print(f"{plan_dir.name:>6} {dtype:>5} {row['compressed_bytes']:>12,d} {row['ideal_bytes']:>12,d} "
                      f"{row['dense_bytes']:>12,d} {row['compressed_over_ideal']:>7.3f} {row['recall@20']:>7.4f} "
                      f"{row['ndcg@20']:>7.4f} {row['recall@20_change']:>+8.4f} {row['ndcg@20_change']:>+8.4f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
