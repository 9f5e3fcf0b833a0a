"""bench/compression_lookup.py: exact size rescaling, and a tiny end-to-end run writing its JSONL rows."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from ciess_prod.search.plan import DimensionPlan, budget_for

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("fbgemm_gpu")


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_compression_lookup", ROOT / "bench" / "compression_lookup.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

KEYS = set(
    "kind device target_sparsity achieved_sparsity dtype pooling batch rows d_max lookups_per_s dense_lookups_per_s "
    "speedup compressed_bytes dense_bytes threads plan git_sha created".split()
)


@pytest.mark.parametrize("c", [0.0, 0.5, 0.8, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("d_max", [8, 128])
def test_rescale_hits_the_budget_exactly_within_bounds(c: float, d_max: int) -> None:
    g = torch.Generator().manual_seed(3)
    fractions = torch.randint(1, 33, (5001,), generator=g).double() / 32  # plan-like, many ties, some at 1.0
    budget = budget_for(fractions.numel(), d_max, c)
    sizes = bench.rescale_sizes(fractions, d_max, budget)
    assert sizes.dtype == torch.int64 and sizes.shape == fractions.shape
    assert int(sizes.sum()) == budget
    assert int(sizes.min()) >= 0 and int(sizes.max()) <= d_max
    by_size = torch.argsort(sizes, stable=True)
    order = by_size[torch.argsort(fractions[by_size], stable=True)]  # by fraction, ties by size
    assert bool((torch.diff(sizes[order]) >= 0).all())  # a larger fraction never gets a smaller size
    for f in fractions.unique():  # equal fractions get sizes at most 1 apart
        tied = sizes[fractions == f]
        assert int(tied.max()) - int(tied.min()) <= 1
    assert torch.equal(sizes, bench.rescale_sizes(fractions, d_max, budget))  # deterministic


def test_rescale_edges() -> None:
    f = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert bench.rescale_sizes(f, 4, 12).tolist() == [0, 4, 4, 4]  # zero fractions stay 0; the rest saturate
    assert bench.rescale_sizes(f, 4, 0).tolist() == [0, 0, 0, 0]
    assert int(bench.rescale_sizes(f, 4, 7).sum()) == 7
    with pytest.raises(ValueError, match="exceeds"):
        bench.rescale_sizes(f, 4, 13)
    with pytest.raises(ValueError, match="fractions"):
        bench.rescale_sizes(torch.tensor([-0.5, 1.0]), 4, 1)


def _plan(directory: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    sizes = {"user": torch.randint(1, 17, (300,), generator=g), "item": torch.randint(1, 5, (200,), generator=g)}
    plan = DimensionPlan(sizes=sizes, d_max=16, model="mf", dataset_fingerprint="0" * 64, target_sparsity=0.9)
    return plan.save(directory / "plan")


def test_main_appends_checked_rows(tmp_path: Path, one_torch_thread: None, capsys: pytest.CaptureFixture) -> None:
    results = tmp_path / "compression.jsonl"
    results.write_text('{"kind": "earlier"}\n')  # append-only: an existing line stays
    args = ["--plan", str(_plan(tmp_path)), "--results", str(results), "--sparsities", "0.8", "0.95"]
    args += "--rows 2000 --batch 64 --repeats 2 --warmup 1 --d-max 32".split()
    assert bench.main(args) == 0
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert lines[0] == {"kind": "earlier"}
    rows = lines[1:]
    assert len(rows) == 2 * 4 * 2  # sparsities x dtypes x poolings
    assert {(r["target_sparsity"], r["dtype"], r["pooling"]) for r in rows} == {
        (c, d, p) for c in (0.8, 0.95) for d in ("fp32", "fp16", "int8", "int4") for p in (1, 20)
    }
    for r in rows:
        assert KEYS <= set(r)
        assert r["kind"] == "lookup" and r["device"] == "cpu" and r["rows"] == 2000 and r["batch"] == 64
        assert r["d_max"] == 32 and r["threads"] == 1
        target = r["target_sparsity"]
        assert target <= r["achieved_sparsity"] < target + 1 / (2000 * 32) + 1e-12  # sum(d_n) is exactly the budget
        assert r["lookups_per_s"] > 0 and r["dense_lookups_per_s"] > 0
        assert r["speedup"] == pytest.approx(r["lookups_per_s"] / r["dense_lookups_per_s"])
        assert r["dense_bytes"] == 2000 * 32 * 4 and 0 < r["compressed_bytes"] < r["dense_bytes"]
        assert r["plan"].endswith("plan")
    fp32 = {(r["target_sparsity"], r["pooling"]): r["compressed_bytes"] for r in rows if r["dtype"] == "fp32"}
    assert fp32[(0.8, 1)] > fp32[(0.95, 1)]
    out = capsys.readouterr().out
    assert "speedup" in out and out.count(" fp32 ") == 4


def test_missing_plan_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="does not exist"):
        bench.main(["--plan", str(tmp_path / "nope"), "--rows", "10", "--results", str(tmp_path / "r.jsonl")])


def test_no_default_plan_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(bench, "PLAN_CANDIDATES", (tmp_path / "a", tmp_path / "b"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--rows", "10", "--results", str(tmp_path / "r.jsonl")])
    assert e.value.code == 2 and "no dimension plan found" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


def test_zipf_ids_run(tmp_path: Path, one_torch_thread: None) -> None:
    results = tmp_path / "r.jsonl"
    args = ["--plan", str(_plan(tmp_path)), "--results", str(results), "--ids", "zipf", "--dtypes", "int4"]
    assert bench.main(args + "--rows 500 --batch 16 --repeats 2 --sparsities 0.9 --d-max 16".split()) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["ids"] for r in rows] == ["zipf(1.05)"] * 2
