"""The ``ciess`` command line: one entry point, one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from ciess_prod.config import ConfigError, load_yaml, read_yaml_mapping


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (NaN and inf refused)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from ciess_prod.data import fetch_dataset

    path = fetch_dataset(args.name, Path(args.dest), timeout=args.timeout)
    print(f"{args.name}: ready at {path}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ciess_prod.experiment import ExperimentConfig, run_experiment

    config = load_yaml(ExperimentConfig, args.config)
    if args.output_dir:
        config = dataclasses.replace(config, output_dir=args.output_dir)
    metrics = run_experiment(config, base_dir=Path(args.config).resolve().parent.parent)
    summary = {k: metrics[k] for k in ("dataset", "model", "protocol", "method", "achieved_sparsity", "best_batches")}
    print(json.dumps({**summary, "val": metrics["val"], "test": metrics["test"]}, indent=2))
    print(f"checkpoint: {Path(config.output_dir) / 'checkpoint'}")
    print(f"metrics:    {Path(config.output_dir) / 'metrics.json'}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ciess_prod.experiment import evaluate_checkpoint

    metrics = evaluate_checkpoint(Path(args.checkpoint), args.split)
    print(json.dumps({"split": args.split, **metrics}, indent=2))
    return 0


SHARDED_ONLY_KEYS = {"task", "sharding", "item_piece"}  # config keys only training/search.py's sharded search reads


def _cmd_search(args: argparse.Namespace) -> int:
    from ciess_prod.search.config import SearchExperimentConfig
    from ciess_prod.search.search import run_search

    sharded_keys = SHARDED_ONLY_KEYS & set(read_yaml_mapping(args.config))
    if sharded_keys:
        raise ConfigError(f"{args.config}: {sorted(sharded_keys)} belong to the sharded search; run it with "
                          f"torchrun --nproc_per_node=N training/search.py --config {args.config}")
    config = load_yaml(SearchExperimentConfig, args.config)
    if args.output_dir:
        config = dataclasses.replace(config, output_dir=args.output_dir)
    summary = run_search(config, base_dir=Path(args.config).resolve().parent.parent, resume=args.resume,
                         retrain_budgets=args.retrain_budgets, retrain_workers=args.retrain_workers)
    if not summary["finished"]:
        print(f"budgets still to retrain (by other processes): {summary['pending_budgets']}")
        return 0
    for budget, plan in summary["plans"].items():
        test = plan.get("test", {})
        print(
            f"c={budget}: plan {plan['path']} sparsity {plan['achieved_sparsity']:.4f}"
            f"{' (repaired)' if plan['repaired'] else ''} test recall@20 {test.get('recall@20', float('nan')):.4f}"
        )
    print(f"report: {Path(config.output_dir) / 'report'}")
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from ciess_prod.compress.compressor import compress

    manifest = compress(Path(args.plan), Path(args.checkpoint), args.dtype, Path(args.out))
    b = manifest["bytes"]
    print(
        f"{args.out}: {manifest['model'].get('kind', manifest['architecture'])} {args.dtype} tables "
        f"{b['compressed_bytes']} bytes "
        f"({b['compressed_bytes'] / b['dense_bytes']:.1%} of dense {b['dense_bytes']}, "
        f"{b['compressed_bytes'] / max(b['ideal_bytes'], 1):.3f}x ideal {b['ideal_bytes']})"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ciess_prod.compress.artifact import load_artifact
    from ciess_prod.compress.onnx_export import export_onnx

    model = load_artifact(Path(args.artifact)).model
    path = export_onnx(model, Path(args.out), top_k=args.top_k)
    if hasattr(model, "n_items"):
        print(f"{path}: {model.config.kind} {model.dtype} ONNX (users -> scores, top-{min(args.top_k, model.n_items)})")
    else:
        print(f"{path}: dlrm {model.dtype} ONNX (dense features + id bags -> click probability)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ciess", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    fetch = data.add_parser("fetch", help="download a public dataset and verify its sha256")
    fetch.add_argument("name", choices=["ml-1m", "ml-100k"])
    fetch.add_argument("--dest", required=True, help="directory to unpack into")
    fetch.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
    fetch.set_defaults(func=_cmd_data_fetch)

    train = sub.add_parser("train", help="train a base recommender from a YAML config")
    train.add_argument("--config", required=True)
    train.add_argument("--output-dir", help="overrides output_dir of the config")
    train.set_defaults(func=_cmd_train)

    search = sub.add_parser("search", help="run the CIESS search and write one dimension plan per budget")
    search.add_argument("--config", required=True)
    search.add_argument("--output-dir", help="overrides output_dir of the config")
    search.add_argument("--resume", action="store_true", help="continue from the last completed step")
    search.add_argument("--retrain-budgets", type=float, nargs="+", metavar="C",
                        help="with --resume on a finished search: retrain only these budgets (run one process per "
                             "group to retrain in parallel; the last one to finish writes the report)")
    search.add_argument("--retrain-workers", type=positive_int, default=1, metavar="N",
                        help="fit the candidates and test the budgets in N processes at once, sharing this one's "
                             "threads (default 1)")
    search.set_defaults(func=_cmd_search)

    evaluate = sub.add_parser("evaluate", help="score a checkpoint on the validation or test split")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--split", choices=["val", "test"], default="test")
    evaluate.set_defaults(func=_cmd_evaluate)

    compress = sub.add_parser("compress", help="repack a trained model into ragged tables at a plan's sizes")
    compress.add_argument("--plan", required=True, help="a dimension plan directory (plans/cX.XX of a search)")
    compress.add_argument("--checkpoint", required=True, help="the model trained with that plan (models/cX.XX)")
    compress.add_argument("--dtype", choices=["fp32", "fp16", "int8", "int4"], default="fp32")
    compress.add_argument("--out", required=True, help="artifact directory to write (replaced whole)")
    compress.set_defaults(func=_cmd_compress)

    export = sub.add_parser("export", help="export a compressed artifact for serving")
    export.add_argument("--artifact", required=True, help="an artifact directory written by `ciess compress`")
    export.add_argument("--format", choices=["onnx"], default="onnx")
    export.add_argument("--out", required=True, help="the .onnx file to write (replaced atomically)")
    export.add_argument("--top-k", type=int, default=20, help="items returned per user besides all scores")
    export.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s", force=True
    )
    from ciess_prod.compress.artifact import ArtifactError
    from ciess_prod.data import DataError
    from ciess_prod.runtime import configure_cpu
    from ciess_prod.search.plan import PlanError
    from ciess_prod.train.checkpoint import CheckpointError

    configure_cpu()  # before any tensor work, so that torch's threads inherit it

    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, PlanError, ArtifactError) as exc:
        print(f"ciess: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
