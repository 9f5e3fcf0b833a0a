"""The memory benchmark on a tiny finished search: one row per (plan, dtype), fp32 keeps the plan's metrics."""

import dataclasses
import json

from bench.compression_memory import main
from ciess_prod.search.search import run_search
from tests.test_search import TINY


def test_memory_rows_per_plan_and_dtype(tmp_path, one_torch_thread):
    config = dataclasses.replace(TINY, output_dir=str(tmp_path / "search"))
    run_search(config)
    results = tmp_path / "compression.jsonl"
    assert main(["--search", str(tmp_path / "search"), "--dtypes", "fp32", "int4", "--results", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["target_sparsity"], r["dtype"]) for r in rows] == [
        (c, d) for c in TINY.search.budgets for d in ("fp32", "int4")
    ]
    for r in rows:
        assert r["kind"] == "memory" and r["ideal_bytes"] < r["compressed_bytes"] < r["dense_bytes"]
        assert r["compressed_over_ideal"] == round(r["compressed_bytes"] / r["ideal_bytes"], 4)
        if r["dtype"] == "fp32":  # the artifact scores exactly like the model the plan was tested with
            assert r["recall@20_change"] == 0.0 and r["ndcg@20_change"] == 0.0
            assert r["table_max_abs_error"] == 0.0
        else:
            assert 0 < r["table_rms_error"] < r["table_rms_value"]
