"""The graph models' propagation product on MovieLens-1M's normalised adjacency: scipy's CSR product (the previous
implementation) against the torch CSR view that models/graph.py multiplies through, at 1 and 2 threads.

Appends one JSON line per implementation and thread count to bench/results/sparse_product.jsonl.

    python bench/sparse_product.py [--config configs/ml1m-search-tracked.yaml] [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ml1m_baselines import git_sha  # noqa: E402
from ciess_prod.config import load_yaml  # noqa: E402
from ciess_prod.data import load_dataset  # noqa: E402
from ciess_prod.io import append_jsonl  # noqa: E402
from ciess_prod.models.graph import normalized_adjacency, torch_csr  # noqa: E402
from ciess_prod.runtime import configure_cpu  # noqa: E402
from ciess_prod.search.config import SearchExperimentConfig  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "sparse_product.jsonl"


def milliseconds(product, repeats: int) -> float:
    product()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        product()
    return (time.perf_counter() - start) / repeats * 1000


def main(argv: list[str] | None = None) -> int:
    configure_cpu()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "ml1m-search-tracked.yaml")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    config = load_yaml(SearchExperimentConfig, args.config)
    adjacency = normalized_adjacency(load_dataset(config.data, ROOT).train)
    x = torch.randn(adjacency.shape[0], config.model.d_max)
    products = {"scipy": lambda: torch.from_numpy(np.asarray(adjacency @ x.numpy())),
                "torch_csr": lambda: torch_csr(adjacency) @ x}
    threads_before = torch.get_num_threads()
    print("| implementation | threads | ms per product | nnz | d |")
    print("|---|---|---|---|---|")
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for name, product in products.items():
                ms = milliseconds(product, args.repeats)
                row = {"data": config.data.source, "nodes": adjacency.shape[0], "nnz": int(adjacency.nnz),
                       "d": config.model.d_max, "implementation": name, "threads": threads,
                       "ms_per_product": round(ms, 3), "repeats": args.repeats, "git_sha": git_sha()}
                append_jsonl(args.results, row)
                print(f"| {name} | {threads} | {ms:.2f} | {adjacency.nnz:,} | {config.model.d_max} |")
    finally:
        torch.set_num_threads(threads_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
