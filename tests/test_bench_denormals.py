"""The denormals benchmark on tiny synthetic data: one row per mode, each fit timed in its own process."""

import json

import pytest
import yaml

from bench.denormals import main

TINY = {
    "data": {"source": "synthetic", "synthetic": {"n_users": 200, "n_items": 150, "interactions_per_user": 10,
                                                  "seed": 0}},
    "model": {"kind": "lightgcn", "d_max": 16, "n_layers": 2},
    "train": {"batch_size": 256},
    "search": {"budgets": [0.8]},
}


def test_one_row_per_mode_with_every_chunk_timed(tmp_path):
    config, results = tmp_path / "tiny.yaml", tmp_path / "denormals.jsonl"
    config.write_text(yaml.safe_dump(TINY))
    assert main(["--config", str(config), "--batches", "25", "--chunk", "10", "--results", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["denormals"] for r in rows] == ["keep", "flush"]
    assert [r["flushed"] for r in rows] == [False, True]  # the flush child really flushed
    for r in rows:
        assert len(r["chunk_seconds"]) == 3 and all(s > 0 for s in r["chunk_seconds"])  # 10 + 10 + 5 batches
        assert r["plan"] == "freq" and r["target_sparsity"] == 0.8 and r["batches"] == 25 and r["threads"] >= 1
    assert rows[1]["vs_flush"] == 1.0
    keep, flush = (sum(r["chunk_seconds"]) for r in rows)
    assert rows[0]["vs_flush"] == pytest.approx(keep / flush, rel=0.1)
