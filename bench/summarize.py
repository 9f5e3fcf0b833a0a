"""Prints the results files as markdown tables (for docs/benchmarks.md): ML-1M quality with ratios to the paper,
the RL step timings, the compressed tables' memory and lookup speed, the sharded search's scaling, a row's
quality by its own size, hand-made size plans (bench/plan_families.py) and what denormal floats cost a fit.

    python bench/summarize.py ml1m | ml1m-compare | rl | memory | lookup | scaling | own-size | plan-families
        | plan-curves | denormals
    python bench/summarize.py --update-docs
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ml1m_baselines import PAPER_ES  # noqa: E402
from ciess_prod.search.config import SearchConfig  # noqa: E402
from ciess_prod.train.trainer import TrainConfig  # noqa: E402

DEFAULT_SIZE_PENALTY = SearchConfig().size_penalty
DEFAULT_GAMMA = SearchConfig().td3.gamma
DEFAULT_ITEM_QUALITY = SearchConfig().environment.item_quality
DEFAULT_L2 = TrainConfig().l2

# Paper, MovieLens-1M, CIESS rows (Recall@20, NDCG@20).
PAPER_CIESS = {
    "lightgcn": {0.8: (0.2436, 0.4257), 0.9: (0.2248, 0.4023), 0.95: (0.2009, 0.3664)},
    "ngcf": {0.8: (0.2148, 0.3854), 0.9: (0.2082, 0.3779), 0.95: (0.2055, 0.3727)},
    "neumf": {0.8: (0.2221, 0.3828), 0.9: (0.2131, 0.3750), 0.95: (0.1982, 0.3587)},
}


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read(name: str) -> list[dict]:
    path = ROOT / "bench" / "results" / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ml1m_table() -> None:
    rows = read("ml1m.jsonl")
    print("| model | method | c | achieved | protocol | retrain length | R@20 | N@20 | R@5 | N@5 | "
          "vs paper (R@20 / N@20) | embedding bytes | wall s | git |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        paper = (PAPER_CIESS if r["method"].startswith("ciess") else PAPER_ES).get(r["model"], {})
        ref = paper.get(r["target_sparsity"])
        vs = f"{r['recall@20'] / ref[0]:.1%} / {r['ndcg@20'] / ref[1]:.1%}" if ref and r["method"] != "full" else "-"
        length = r.get("final_length", "batches")
        print(f"| {r['model']} | {method_label(r)} | {r['target_sparsity']} | {r['achieved_sparsity']:.3f} | "
              f"{r['protocol']} | {length} | "
              f"{r['recall@20']:.4f} | {r['ndcg@20']:.4f} | {r['recall@5']:.4f} | {r['ndcg@5']:.4f} | {vs} | "
              f"{r['embedding_bytes']:,} | {r['wall_seconds']:.0f} | {r['git_sha'][:7]} |")


SIZE_METHODS = ("es", "mr", "freq", "ciess", "ciess_no_walk", "ciess_fill", "ciess_scaled", "ciess_even")


def method_label(r: dict) -> str:
    """The method, with its lambda, TD3 discount, item quality signal, random warm-up, reference basis, probe ranking,
    lambda control, its proportional gain, L2 weight, seed and restarts where a run used other than the defaults
    (``--size-penalty``, ``--gamma``, ``--item-quality``, ``--random-steps``, ``--reference-basis``, ``--probe-top``,
    ``--penalty-control``, ``--penalty-gain``, ``--l2`` or ``--retrain-*``, ``--seed``, ``--restarts``, or a config
    setting them)."""
    label = r["method"]
    if r.get("size_penalty") not in (None, DEFAULT_SIZE_PENALTY):
        label += f" λ={r['size_penalty']:g}"
    if r.get("gamma") not in (None, DEFAULT_GAMMA):
        label += f" γ={r['gamma']:g}"
    if r.get("item_quality") not in (None, DEFAULT_ITEM_QUALITY):
        label += f" items={r['item_quality']}"
    if r.get("random_steps"):
        label += f" random={r['random_steps']}"
    if r.get("reference_basis") not in (None, "trained"):
        label += f" basis={r['reference_basis']}"
    if r.get("top_l", 1) > 1:  # rows written before top_l was recorded carry no label: docs/benchmarks.md names them
        label += f" top={r['top_l']}"
    if r.get("probe_top"):
        label += f" probe={r['probe_top']}"
    if r.get("probe_spread"):
        label += f" spread={r['probe_spread']:g}"
    if r.get("probe_top") and r.get("candidates_from") == "budget":  # otherwise every budget probes the loosest pool
        label += " per-budget"
    if r.get("probe") == "full":  # every budget ranks the pool by full fits at this weight
        label += f" full@{r['probe_l2']:g}"
    if r.get("penalty_control") not in (None, "fixed"):
        label += f" λ:{r['penalty_control']}"
    if r.get("penalty_gain"):
        label += f" Kp={r['penalty_gain']:g}"
    if r.get("retrain_l2"):  # the L2 weight chosen per row on validation among these: the label names the grid
        label += " L2∈{" + ",".join(f"{w:g}" for w in r["retrain_l2"]) + "}"
    elif r.get("l2") not in (None, DEFAULT_L2):  # another training recipe: its rows compare only with each other
        label += f" L2={r['l2']:g}"
    if r.get("retrain_patience"):  # fits stopped later (or sooner) than the recipe's
        label += f" patience={r['retrain_patience']}"
    if r.get("retrain_max_batches"):
        label += f" cap={r['retrain_max_batches']}"
    if r.get("seed"):  # another training (es) or search (ciess) seed: a measure of seed-to-seed spread
        label += f" seed={r['seed']}"
    if r.get("restarts", 1) > 1:  # the best of several searches (seeds seed ..), chosen by their probes
        label += f" restarts={r['restarts']}"
    return label


def ml1m_compare_table() -> None:
    """LightGCN's size methods side by side per budget: the latest `final`-protocol, epoch-length row of each."""
    latest = {}
    for r in read("ml1m.jsonl"):
        if r["model"] == "lightgcn" and r["method"] in SIZE_METHODS and r.get("final_length") == "epochs":
            latest[method_label(r), r["target_sparsity"]] = r
    order = {m: i for i, m in enumerate(SIZE_METHODS)}
    methods = sorted({key[0] for key in latest}, key=lambda m: (order[m.split(" ")[0]], m))
    print("| c | " + " | ".join(methods) + " |")
    print("|---" * (len(methods) + 1) + "|")
    for c in sorted({key[1] for key in latest}):
        cells = []
        for m in methods:
            r = latest.get((m, c))
            cells.append(f"{r['recall@20']:.4f} / {r['ndcg@20']:.4f} ({r['achieved_sparsity']:.3f})" if r else "-")
        print(f"| {c} | " + " | ".join(cells) + " |")
    shas = [sorted({r["git_sha"][:7] for key, r in latest.items() if key[0] == m}) for m in methods]
    print("| git | " + " | ".join(", ".join(s) for s in shas) + " |")  # which code wrote each method's rows


def rl_table() -> None:
    print("| rows | seconds | s per 10^6 rows | peak RSS MB | critic scoring s | actor s | walk s | TD3 update s "
          "| load avg | git |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in read("rl_step.jsonl"):
        p = r["phases"]
        print(f"| {r['rows']:,} | {r['seconds']:.2f} | {r['seconds'] / r['rows'] * 1e6:.1f} | {r['peak_rss_mb']:.0f} | "
              f"{p['score']:.2f} | {p['act']:.2f} | {p['walk']:.2f} | {p['update']:.3f} | "
              f"{r.get('load_avg_1m', float('nan')):.1f} | {r['git_sha'][:7]} |")


def memory_table() -> None:
    print("| dataset | model | c | dtype | compressed bytes | ideal bytes | dense bytes | compressed / ideal | "
          "table RMS error / RMS value | R@20 | N@20 | change R@20 / N@20 vs fp32 | git |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in read("compression.jsonl"):
        if r["kind"] == "memory":
            print(f"| {r['dataset']} | {r['model']} | {r['target_sparsity']} | {r['dtype']} | "
                  f"{r['compressed_bytes']:,} | {r['ideal_bytes']:,} | {r['dense_bytes']:,} | "
                  f"{r['compressed_over_ideal']:.3f} | {r['table_rms_error']:.2e} / {r['table_rms_value']:.2e} | "
                  f"{r['recall@20']:.4f} | {r['ndcg@20']:.4f} | {r['recall@20_change']:+.4f} / "
                  f"{r['ndcg@20_change']:+.4f} | {r['git_sha'][:7]} |")


def lookup_table() -> None:
    print("| c | dtype | pooling | rows | batch | compressed lookups/s | dense TBE lookups/s | speedup | "
          "compressed MiB | dense MiB | plan | load avg | git |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in read("compression.jsonl"):
        if r["kind"] == "lookup":
            print(f"| {r['target_sparsity']} | {r['dtype']} | {r['pooling']} | {r['rows']:,} | {r['batch']} | "
                  f"{r['lookups_per_s']:,.0f} | {r['dense_lookups_per_s']:,.0f} | {r['speedup']:.2f}x | "
                  f"{r['compressed_bytes'] / 2**20:.1f} | {r['dense_bytes'] / 2**20:.1f} | {r.get('plan', '-')} | "
                  f"{r.get('load_avg_1m', float('nan')):.1f} | {r['git_sha'][:7]} |")


def scaling_table() -> None:
    print("| rows | ranks | backend | sharding | step s | peak RSS MB per rank | load avg | git |")
    print("|---|---|---|---|---|---|---|---|")
    for r in read("scaling.jsonl"):
        print(f"| {r['rows']:,} | {r['ranks']} | {r['backend']} | {r['sharding']} | {r['step_seconds']:.2f} | "
              f"{', '.join(f'{x:.0f}' for x in r['peak_rss_mb_per_rank'])} | {r.get('load_avg_1m', float('nan')):.1f} "
              f"| {r['git_sha'][:7]} |")


def plan_width_table() -> None:
    print("| plan | users x items | ms per batch | x full size | validation s | x full size | threads | git |")
    print("|---|---|---|---|---|---|---|---|")
    for r in read("plan_width.jsonl"):
        print(f"| {r['plan']} | {r['user_size']} x {r['item_size']} | {r['ms_per_batch']:.1f} | "
              f"{r['batch_vs_full']:.2f} | {r['eval_seconds']:.2f} | {r['eval_vs_full']:.2f} | {r['threads']} | "
              f"{r['git_sha'][:7]} |")


def own_size_table() -> None:
    """q by a row's own size (bench/own_size_response.py): one line per run and side, buckets in size order."""
    rows = read("own_size.jsonl")
    buckets = sorted({b for r in rows for b in r["q_by_size"]}, key=lambda b: int(b[1:].split(",")[0]))
    print("| side | protocol | basis | batches | seed | " + " | ".join(f"q {b}" for b in buckets)
          + " | popular third " + " / ".join(buckets) + " | git |")
    print("|---|---|---|---|---|" + "---|" * len(buckets) + "---|---|")

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for r in rows:
        popular = " / ".join(cell(r["q_by_size_popular_third"].get(b)) for b in buckets)
        print(f"| {r['side']} | {r['protocol']} | {r.get('reference_basis', 'trained')} | {r['batches']} | "
              f"{r['seed']} | " + " | ".join(cell(r["q_by_size"].get(b)) for b in buckets)
              + f" | {popular} | {r['git_sha'][:7]} |")


def plan_family_rows() -> list[dict]:
    """bench/plan_families.py's rows, the prototype's (``params``, ``hist``; H200, 2026-12-04) in the script's form."""
    rows = []
    for r in read("plan_families_prototype.jsonl"):
        params = r.get("params", {})
        rows.append({"max_batches": 4000, "fit_only": False, **r, "share": params.get("share"),
                     "alpha": params.get("alpha", 0.0), "history": r["hist"], "git": "prototype",
                     "device": "NVIDIA H200"})
    return rows + read("plan_families.jsonl")


def plan_label(r: dict) -> str:
    if r["plan"] in ("es", "full"):
        return r["plan"]
    share = "" if r["share"] is None or abs(r["share"] - 6040 / 9746) < 1e-3 else f" users {r['share']:g}"
    return (f"pop α={r['alpha']:g}" if r["plan"] == "pop" else "split") + share


def plan_families_table() -> None:
    """Final-protocol rows by budget and L2 weight, with the paper's CIESS row and uniform sizes at the same weight."""
    rows = sorted((r for r in plan_family_rows() if r.get("test")),
                  key=lambda r: (r["c"], r["l2"], r["plan"] != "es", plan_label(r), r["seed"], r["max_batches"]))
    es = {recipe(r): r["test"]["recall@20"] for r in rows if r["plan"] == "es"}
    print("| c | L2 | plan | users / items (mean) | achieved | cap | best batches | val R@20 | test R@20 / N@20 | "
          "vs paper CIESS | vs es (same L2, cap, patience) | seed | device | git |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        test = r["test"]
        paper = PAPER_CIESS["lightgcn"].get(r["c"])
        vs_paper = f"{test['recall@20'] / paper[0]:.1%} / {test['ndcg@20'] / paper[1]:.1%}" if paper else "-"
        uniform = es.get(recipe(r))
        vs_es = f"{test['recall@20'] / uniform - 1:+.1%}" if uniform and r["plan"] != "es" else "-"
        patience = f" (patience {r['patience']})" if r.get("patience", 4) != 4 else ""
        print(f"| {r['c']} | {r['l2']:g} | {plan_label(r)}{patience} | {r['users_mean']} / {r['items_mean']} | "
              f"{r['achieved']:.3f} | {r['max_batches']} | {r['best_batches']} | {r['val']['recall@20']:.4f} | "
              f"{test['recall@20']:.4f} / {test['ndcg@20']:.4f} | {vs_paper} | {vs_es} | {r['seed']} | "
              f"{r['device']} | {short_sha(r['git'])} |")


def recipe(r: dict) -> tuple:
    """What a final-protocol row is compared with es on: its budget, L2 weight, cap and early-stopping patience."""
    return r["c"], r["l2"], r["max_batches"], r.get("patience", 4)


def short_sha(git: str) -> str:
    return git if git == "prototype" else git[:7]


def same_run(r: dict) -> tuple:
    """What makes two fit-only rows comparable: one grid on one split and device, at one budget, weight and cap (a
    grid resumed after a lost run spans two commits, so the commit is not part of it)."""
    return r.get("grid"), r.get("split"), r["device"], r["c"], r["l2"], r["max_batches"]


def plan_curves_table() -> None:
    """Validation Recall@20 of the fit-only rows at the default 4000-batch cap and at their best."""
    print("| c | L2 | plan | cap | val R@20 at 2000 | at 4000 | best (batches) | gain of best over 4000 | "
          "best vs es (same grid and split) | device | git |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    fits = [r for r in plan_family_rows() if r.get("fit_only")]
    uniform = {same_run(r): r["val"]["recall@20"] for r in fits if r["plan"] == "es"}
    for r in fits:
        es = uniform.get(same_run(r))
        vs_es = f"{r['val']['recall@20'] / es - 1:+.1%}" if es and r["plan"] != "es" else "-"
        curve = dict((int(b), v) for b, v in r["history"])
        at = {b: max((v for x, v in curve.items() if x <= b), default=None) for b in (2000, 4000)}
        best = max(curve.values())
        gain = f"{best / at[4000] - 1:+.1%}" if at[4000] and r["max_batches"] > 4000 else "-"
        cell = {b: f"{v:.4f}" if v is not None else "-" for b, v in at.items()}
        print(f"| {r['c']} | {r['l2']:g} | {plan_label(r)} | {r['max_batches']} | {cell[2000]} | "
              f"{cell[4000] if max(curve) >= 4000 else '-'} | {best:.4f} ({r['best_batches']}) | "
              f"{gain if max(curve) >= 4000 else '-'} | {vs_es} | {r['device']} | {short_sha(r['git'])} |")


def denormals_table() -> None:
    """bench/denormals.py: a fit's seconds per chunk with denormals kept and flushed."""
    print("| plan | L2 | denormals | batches | seconds per chunk | total s | x flush | threads | load avg | git |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in read("denormals.jsonl"):
        print(f"| {r['plan']} c={r['target_sparsity']} | {r['l2']:g} | {r['denormals']} | {r['batches']} "
              f"({r['chunk']} a chunk) | {' '.join(f'{s:.1f}' for s in r['chunk_seconds'])} | "
              f"{r['total_seconds']:.1f} | {r['vs_flush']:.2f} | {r['threads']} | {r['load_avg_1m']:.1f} | "
              f"{r['git_sha'][:7]} |")


TABLES = {
    "ml1m": ml1m_table,
    "ml1m-compare": ml1m_compare_table,
    "rl": rl_table,
    "memory": memory_table,
    "lookup": lookup_table,
    "scaling": scaling_table,
    "own-size": own_size_table,
    "plan-width": plan_width_table,
    "plan-families": plan_families_table,
    "plan-curves": plan_curves_table,
    "denormals": denormals_table,
}


def update_docs(path: Path = ROOT / "docs" / "benchmarks.md") -> None:
    """Rewrites every ``<!-- table:NAME -->`` ... ``<!-- /table:NAME -->`` block from the results files."""
    text = path.read_text()
    for name, table in TABLES.items():
        start, end = f"<!-- table:{name} -->", f"<!-- /table:{name} -->"
        if start not in text or end not in text:
            continue
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            table()
        head, rest = text.split(start, 1)
        text = head + start + "\n" + buffer.getvalue() + end + rest.split(end, 1)[1]
    write_text_atomic(path, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", nargs="?", default="ml1m", choices=sorted(TABLES), help="the table to print")
    parser.add_argument("--update-docs", action="store_true",
                        help="rewrite every table block of docs/benchmarks.md instead of printing one")
    args = parser.parse_args(argv)
    if args.update_docs:
        update_docs()
    else:
        TABLES[args.table]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
