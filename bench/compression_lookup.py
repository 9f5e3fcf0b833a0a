"""Lookup speed of the compressed (ragged) embedding table against a dense FBGEMM TBE at d_max, timed in one run.

A synthetic table of ``--rows`` rows (default 10^6) x ``--d-max`` (default 128, the width the reference notes
measured) gets per-row sizes drawn from a real dimension plan's distribution of d_n / d_max (all tables' rows
together, sampled with a seeded generator), rescaled to each target sparsity c so that sum(d_n) is exactly the plan
budget floor((1 - c) * rows * d_max) with every d_n in [0, d_max] (``rescale_sizes``). One fp32 weight
(random normal, seeded) is built once; per sparsity the dense baseline holds it masked to the sizes, and every
dtype's compressed table is built from it with ``RaggedEmbedding.from_dense``.

    dense        FBGEMM SplitTableBatchedEmbeddingBagsCodegen (training TBE; one rows x d_max fp32 table,
                 EmbeddingLocation.HOST, ComputeDevice.CPU, PoolingMode.SUM, no bounds check), forward under
                 torch.no_grad; pooling 1 is bags of one id.
    compressed   RaggedEmbedding.lookup(ids) for pooling 1, .pooled(ids, offsets, "sum") otherwise; both give the
                 same fp32 [batch, d_max] as the dense TBE.

Ids are drawn uniformly over the rows (``--ids zipf`` draws Zipf(``--zipf-alpha``) ranks mapped through a seeded
permutation of the rows, so popularity is not tied to size), a fresh batch per repeat, the same batches for both
tables. Before timing, each configuration is checked: fp32 against the dense TBE on the masked weight (tight
assert_close: only summation order may differ), the other dtypes against the pure-torch ragged path on the same
stored values (same results by design); a failing configuration is logged and skipped, and the exit code is 1.

Timing: ``--warmup`` calls of each, then ``--repeats`` rounds interleaved dense/compressed (the order alternates
per round, ABBA, so neither side always runs second); the median seconds per batch of each side gives
lookups_per_s = batch * pooling / median (ids looked up per second) and dense_lookups_per_s; speedup is their ratio.
Both sides see the same machine load, so the ratio is what to compare across runs on a shared machine.

One JSON object per (sparsity, dtype, pooling) is appended to bench/results/compression.jsonl (append-only) with
kind "lookup" and keys device, target_sparsity, achieved_sparsity, dtype, pooling, batch, rows, d_max,
lookups_per_s, dense_lookups_per_s, speedup, compressed_bytes, dense_bytes, threads, plan, git_sha, created, plus
ids, repeats, seed, dense_ms, compressed_ms, cpu and load_avg_1m.

Memory at 10^6 x 128: the fp32 weight and the TBE's copy (2 x 512 MB), the mask (128 MB, transient), one
compressed table at a time (<= 103 MB for fp32 at 80%), id batches (repeats x batch x pooling x 8 B = 33 MB).

    python bench/compression_lookup.py                                   # 10^6 rows, 80/90/95%, 4 dtypes, 1 and 20
    python bench/compression_lookup.py --rows 100000 --dtypes fp32 int8 --sparsities 0.9 --repeats 20
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.ml1m_baselines import git_sha  # noqa: E402
from ciess_prod.compress.ragged import FORMATS, RaggedEmbedding  # noqa: E402
from ciess_prod.io import append_jsonl  # noqa: E402
from ciess_prod.runtime import configure_cpu  # noqa: E402
from ciess_prod.search.plan import DimensionPlan, budget_for  # noqa: E402

log = logging.getLogger("compression_lookup")

RESULTS = ROOT / "bench" / "results" / "compression.jsonl"
PLAN_CANDIDATES = (ROOT / "runs" / "ml1m-search" / "plans" / "c0.90", ROOT / "runs" / "smoke" / "plans" / "c0.90")
FP32_RTOL, FP32_ATOL = 1e-6, 1e-5  # fp32 sums of the same values in another order


def label(path: Path) -> str:
    """A path relative to the repository when inside it (results stay comparable across checkouts)."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- sizes ---------------------------------------------------------------------------------------------------
def plan_fractions(plan: DimensionPlan) -> torch.Tensor:
    """float64 [total rows]: d_n / d_max of every row of every table of the plan."""
    return torch.cat([s.to(torch.float64) for s in plan.sizes.values()]) / plan.d_max


def rescale_sizes(fractions: torch.Tensor, d_max: int, budget: int) -> torch.Tensor:
    """int64 sizes in [0, d_max] proportional to ``fractions`` (clamped at d_max) with sum exactly ``budget``.

    The scale s solving sum(min(s * f_n * d_max, d_max)) = budget is found by bisection (the left end is kept, so
    the flooring below never overshoots); the floors then fall short by less than the number of fractional rows,
    and the shortfall goes +1 to the rows with the largest fractional parts (stable order: ties by row index).
    Rows with fraction 0 stay 0. Vectorised; ValueError when no sizes in range can reach the budget.
    """
    f = torch.as_tensor(fractions, dtype=torch.float64)
    if f.dim() != 1 or (f.numel() and (not bool(torch.isfinite(f).all()) or float(f.min()) < 0)):
        raise ValueError("fractions must be a 1-D tensor of finite values >= 0")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    x = f * d_max
    positive = x > 0
    capacity = int(positive.sum()) * d_max
    if budget > capacity:
        raise ValueError(f"budget {budget} exceeds the {capacity} values that rows with a nonzero fraction can hold")
    if budget == 0:
        return torch.zeros(f.numel(), dtype=torch.int64)

    def total(scale: float) -> float:
        return float(torch.clamp(x * scale, max=d_max).sum())

    lo = budget / float(x.sum())  # clamping only lowers the total, so total(lo) <= budget
    hi = d_max / float(x[positive].min())  # every positive row at d_max: total(hi) = capacity >= budget
    for _ in range(200):
        if hi - lo <= 1e-15 * hi:
            break
        mid = 0.5 * (lo + hi)
        if total(mid) <= budget:
            lo = mid
        else:
            hi = mid
    values = torch.clamp(x * lo, max=d_max)
    sizes = values.floor().to(torch.int64)
    frac = values - sizes
    deficit = budget - int(sizes.sum())
    while deficit > 0:  # one pass in practice; more only if float error left the bisection short by whole values
        order = torch.argsort(-frac, stable=True)
        order = order[sizes[order] < d_max][:deficit]
        sizes[order] += 1
        frac[order] = -1.0  # a later pass prefers rows not yet raised
        deficit -= order.numel()
    return sizes


def sample_sizes(
    fractions: torch.Tensor, rows: int, d_max: int, target_sparsity: float, generator: torch.Generator
) -> torch.Tensor:
    """Draws ``rows`` fractions from the empirical ones (with replacement) and rescales them to the budget of c."""
    picked = fractions[torch.randint(0, fractions.numel(), (rows,), generator=generator)]
    return rescale_sizes(picked, d_max, budget_for(rows, d_max, target_sparsity))


# ---- tables and ids ------------------------------------------------------------------------------------------
def dense_tbe(rows: int, d_max: int) -> tuple[Any, torch.Tensor]:
    """FBGEMM training TBE, one fp32 table on the CPU host; returns (module, its weight view [rows, d_max])."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode, EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    root = logging.getLogger()  # the TBE logs a dozen INFO lines about its optimizer through the root logger
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(rows, d_max, EmbeddingLocation.HOST, ComputeDevice.CPU)],
            pooling_mode=PoolingMode.SUM,
            bounds_check_mode=BoundsCheckMode.NONE,  # the fastest dense path; the ids are in range by construction
            device="cpu",
        )
    finally:
        root.setLevel(level)
    (weight,) = tbe.split_embedding_weights()
    return tbe, weight


def draw_ids(kind: str, rows: int, n: int, generator: torch.Generator, alpha: float) -> torch.Tensor:
    """int64 [n] ids: uniform over the rows, or Zipf(alpha) ranks through a seeded permutation of the rows."""
    if kind == "uniform":
        return torch.randint(0, rows, (n,), generator=generator)
    weights = torch.arange(1, rows + 1, dtype=torch.float64).pow_(-alpha)
    ranks = torch.multinomial(weights, n, replacement=True, generator=generator)
    return torch.randperm(rows, generator=generator)[ranks]


# ---- timing --------------------------------------------------------------------------------------------------
def time_pair(
    dense: Callable[[int], object], compressed: Callable[[int], object], repeats: int, warmup: int
) -> tuple[float, float]:
    """Median seconds per call of each, interleaved ABBA over ``repeats`` rounds (call r gets batch r)."""
    for r in range(warmup):
        dense(r % repeats)
        compressed(r % repeats)
    times: dict[str, list[float]] = {"dense": [], "compressed": []}
    for r in range(repeats):
        pair = (("dense", dense), ("compressed", compressed))
        for name, fn in pair if r % 2 == 0 else pair[::-1]:
            t = time.perf_counter()
            fn(r)
            times[name].append(time.perf_counter() - t)
    return statistics.median(times["dense"]), statistics.median(times["compressed"])


def check(table: RaggedEmbedding, tbe: Any, ids: torch.Tensor, offsets: torch.Tensor, pooling: int) -> tuple[bool, str]:
    """Compressed output vs its reference on one batch; returns (ok, message)."""
    out = table.lookup(ids) if pooling == 1 else table.pooled(ids, offsets, "sum", include_last_offset=True)
    if table.dtype == "fp32":
        reference, tol = tbe(ids, offsets), {"rtol": FP32_RTOL, "atol": FP32_ATOL}
    else:  # quantised values: the pure-torch path on the same stored values must agree with the compiled op
        backend, table.backend = table.backend, "torch"
        try:
            reference = table.lookup(ids) if pooling == 1 else table.pooled(ids, offsets, "sum", True)
        finally:
            table.backend = backend
        tol = {}
    try:
        torch.testing.assert_close(out, reference, **tol)
    except AssertionError as e:
        return False, str(e)
    return True, ""


def fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}"


def main(argv: list[str] | None = None) -> int:
    configure_cpu()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--plan",
        type=Path,
        default=None,
        help="a DimensionPlan directory (default: first of " + ", ".join(map(label, PLAN_CANDIDATES)) + " that exists)",
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--d-max", type=int, default=128)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.8, 0.9, 0.95])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "fp16", "int8", "int4"], choices=sorted(FORMATS))
    parser.add_argument("--poolings", nargs="+", type=int, default=[1, 20])
    parser.add_argument("--batch", type=int, default=4096, help="bags per batch")
    parser.add_argument("--repeats", type=int, default=50, help="timed rounds (one fresh id batch each)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--ids", choices=["uniform", "zipf"], default="uniform")
    parser.add_argument("--zipf-alpha", type=float, default=1.05)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)

    if args.plan is None:
        args.plan = next((p for p in PLAN_CANDIDATES if p.is_dir()), None)
        if args.plan is None:
            parser.error("no dimension plan found at " + " or ".join(map(str, PLAN_CANDIDATES)) + "; pass --plan DIR")
    if args.d_max < 4 or args.d_max % 4:
        parser.error(f"--d-max must be a positive multiple of 4 (FBGEMM's training TBE), got {args.d_max}")
    if args.rows < 1 or args.batch < 1 or args.repeats < 1 or args.warmup < 0 or min(args.poolings) < 1:
        parser.error("--rows, --batch, --repeats and --poolings must be >= 1, --warmup >= 0")
    if not all(0.0 <= c < 1.0 for c in args.sparsities):
        parser.error("--sparsities must lie in [0, 1)")

    sha = git_sha()  # now, not after the tree has moved on
    torch.set_num_threads(args.threads)
    plan = DimensionPlan.load(args.plan)
    fractions = plan_fractions(plan)
    plan_label = label(args.plan)
    log.info(
        "plan %s: %d rows, d_max %d, sparsity %.4f", plan_label, fractions.numel(), plan.d_max, plan.achieved_sparsity
    )

    rows, d_max, batch = args.rows, args.d_max, args.batch
    g = torch.Generator().manual_seed(args.seed)
    weight = torch.randn(rows, d_max, generator=g)
    picked = fractions[torch.randint(0, fractions.numel(), (rows,), generator=g)]  # one draw, rescaled per c
    ids_by_pooling = {
        p: draw_ids(args.ids, rows, args.repeats * batch * p, g, args.zipf_alpha).view(args.repeats, batch * p)
        for p in args.poolings
    }
    tbe, tbe_weight = dense_tbe(rows, d_max)
    columns = torch.arange(d_max)
    dense_bytes = rows * d_max * 4
    device, cpu = "cpu", cpu_name()

    header = (
        f"{'c':>5} {'achieved':>9} {'dtype':>5} {'pool':>4} {'dense ms':>9} {'comp ms':>9} "
        f"{'dense M/s':>10} {'comp M/s':>9} {'speedup':>8} {'comp MiB':>9} {'dense MiB':>9}"
    )
    lines, failed = [], 0
    for c in args.sparsities:
        sizes = rescale_sizes(picked, d_max, budget_for(rows, d_max, c))
        achieved = 1.0 - int(sizes.sum()) / (rows * d_max)
        with torch.no_grad():  # the dense baseline is the masked table: the same rows the compressed one gives
            tbe_weight.copy_(weight).masked_fill_(columns >= sizes.unsqueeze(1), 0.0)
        for dtype in args.dtypes:
            t0 = time.perf_counter()
            table = RaggedEmbedding.from_dense(weight, sizes, dtype)
            log.info("c=%.2f %s: built in %.1f s (%s)", c, dtype, time.perf_counter() - t0, table)
            for p in args.poolings:
                ids = ids_by_pooling[p]
                offsets = torch.arange(0, batch * p + 1, p, dtype=torch.int64)  # [batch + 1]
                with torch.no_grad():  # not inference_mode: the TBE's CPU forward sits behind its autograd key
                    ok, message = check(table, tbe, ids[0], offsets, p)
                    if not ok:
                        failed += 1
                        log.error(
                            "c=%.2f %s pooling %d: compressed output differs, row skipped:\n%s", c, dtype, p, message
                        )
                        continue
                    if p == 1:

                        def compressed(r: int, table: RaggedEmbedding = table, ids: torch.Tensor = ids) -> object:
                            return table.lookup(ids[r])
                    else:

                        def compressed(
                            r: int,
                            table: RaggedEmbedding = table,
                            ids: torch.Tensor = ids,
                            offsets: torch.Tensor = offsets,
                        ) -> object:
                            return table.pooled(ids[r], offsets, "sum", include_last_offset=True)

                    def dense(r: int, ids: torch.Tensor = ids, offsets: torch.Tensor = offsets) -> object:
                        return tbe(ids[r], offsets)

                    load_before = os.getloadavg()[0]
                    dense_s, compressed_s = time_pair(dense, compressed, args.repeats, args.warmup)
                row = {
                    "kind": "lookup",
                    "device": device,
                    "cpu": cpu,
                    "target_sparsity": c,
                    "achieved_sparsity": round(achieved, 9),
                    "dtype": dtype,
                    "pooling": p,
                    "batch": batch,
                    "rows": rows,
                    "d_max": d_max,
                    "ids": args.ids if args.ids == "uniform" else f"zipf({args.zipf_alpha})",
                    "lookups_per_s": batch * p / compressed_s,
                    "dense_lookups_per_s": batch * p / dense_s,
                    "speedup": dense_s / compressed_s,
                    "compressed_ms": compressed_s * 1e3,
                    "dense_ms": dense_s * 1e3,
                    "compressed_bytes": table.nbytes()["total"],
                    "dense_bytes": dense_bytes,
                    "repeats": args.repeats,
                    "threads": torch.get_num_threads(),
                    "seed": args.seed,
                    "plan": plan_label,
                    "load_avg_1m": round(max(load_before, os.getloadavg()[0]), 2),
                    "git_sha": sha,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                }
                append_jsonl(args.results, row)
                line = (
                    f"{c:>5.2f} {achieved:>9.6f} {dtype:>5} {p:>4} {dense_s * 1e3:>9.3f} "
                    f"{compressed_s * 1e3:>9.3f} "
                    f"{fmt_rate(row['dense_lookups_per_s']):>10} {fmt_rate(row['lookups_per_s']):>9} "
                    f"{row['speedup']:>7.2f}x {row['compressed_bytes'] / 2**20:>9.1f} "
                    f"{dense_bytes / 2**20:>9.1f}"
                )
                lines.append(line)
                log.info("%s", line)
            del table
            gc.collect()

    print(
        f"lookups: {rows} rows x d_max {d_max}, batch {batch}, {args.ids} ids, {torch.get_num_threads()} thread(s), "
        f"median of {args.repeats} interleaved rounds, dense = FBGEMM training TBE fp32; M/s = 10^6 ids / s"
    )
    print(header)
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
