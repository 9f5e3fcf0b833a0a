"""Does a short retraining rank a finished search's configurations better than the warm fine-tune's mean q?

For one budget of a finished search (default: the loosest) it probes the best ``--pool`` visited configurations by
mean q, prepared as the selection prepares them (``search.probe_top`` with ``--pool``: shrunk, filled), each retrained
from scratch for ``--probe-batches``. Then it fully retrains the top ``--full`` by probe and the top ``--full`` by mean
q, the two rankings' picks. Probes and fits go to the search's own stores, so the search's selection later reads them
instead of retraining. Prints a table and appends one JSON line to bench/results/probe_ranking.jsonl.

    OMP_NUM_THREADS=2 python bench/probe_ranking.py runs/ml1m-search-scaled --config configs/ml1m-search-scaled.yaml \
        --pool 6 --full 1 --workers 2 > probe_ranking.log 2>&1 &
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ml1m_baselines import git_sha  # noqa: E402
from ciess_prod.cli import positive_int  # noqa: E402
from ciess_prod.config import load_yaml  # noqa: E402
from ciess_prod.data import RecDataset  # noqa: E402
from ciess_prod.experiment import load_dataset  # noqa: E402
from ciess_prod.io import append_jsonl  # noqa: E402
from ciess_prod.runtime import configure_cpu  # noqa: E402
from ciess_prod.search.candidates import CandidateFit, CandidateFits  # noqa: E402
from ciess_prod.search.config import SearchExperimentConfig  # noqa: E402
from ciess_prod.search.record import ConfigurationRecord, Visited  # noqa: E402
from ciess_prod.search.search import STATE_FILE  # noqa: E402
from ciess_prod.search.selection import (  # noqa: E402
    candidate_fits,
    fit_candidate,
    fit_in_worker,
    probe_config,
    probe_fits,
    probe_pool,
)

RESULTS = ROOT / "bench" / "results" / "probe_ranking.jsonl"
GIT_SHA = git_sha()  # at start-up: the code this run loaded, not the HEAD when it ends


def fitted(config: SearchExperimentConfig, dataset: RecDataset, store: CandidateFits, configurations: list[Visited],
           workers: int) -> list[CandidateFit]:
    """Each configuration's fit under ``config``'s recipe, read from ``store`` or run (in ``workers`` processes)."""
    missing = [v for v in configurations if store.get(v.sizes) is None]
    if workers > 1 and len(missing) > 1:
        threads = max(1, torch.get_num_threads() // workers)
        level = logging.getLogger().getEffectiveLevel()
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            jobs = [pool.submit(fit_in_worker, config, ROOT, v.sizes, f"step {v.step}", threads, level)
                    for v in missing]
            for job in jobs:
                job.result()  # a worker's error is raised here
    else:
        for v in missing:
            fit_candidate(config, dataset, v.sizes, store)
    fits = [store.get(v.sizes) for v in configurations]
    if any(fit is None for fit in fits):
        raise RuntimeError(f"a fit was run but is not readable from {store.directory}")
    return fits


def main(argv: list[str] | None = None) -> int:
    configure_cpu()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a search's output_dir, holding its finished search_state.pt")
    parser.add_argument("--config", type=Path, required=True, help="the search's config")
    parser.add_argument("--budget", type=float, help="the budget whose pool is probed (default: the loosest)")
    parser.add_argument("--pool", type=positive_int, default=6, help="configurations probed, the best by mean q")
    parser.add_argument("--probe-batches", type=positive_int, help="the probe's length (default: the config's)")
    parser.add_argument("--full", type=positive_int, default=1, help="full fits per ranking (probe, mean q)")
    parser.add_argument("--workers", type=positive_int, default=1, help="fit in this many processes at once")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)

    base = load_yaml(SearchExperimentConfig, args.config)
    search = dataclasses.replace(base.search, probe_top=args.pool, top_l=min(base.search.top_l, args.pool),
                                 probe_batches=args.probe_batches or base.search.probe_batches)
    config = dataclasses.replace(base, search=search, output_dir=str(args.run_dir))
    c = args.budget if args.budget is not None else min(search.budgets)
    if c not in search.budgets:
        parser.error(f"--budget must be one of the search's budgets {list(search.budgets)}, got {c}")
    state_path = args.run_dir / STATE_FILE
    if not state_path.is_file():
        parser.error(f"{state_path} does not exist: run the search's steps first")
    record = ConfigurationRecord(tuple(search.budgets), search.recorded)
    record.load_state_dict(torch.load(state_path, weights_only=True)["record"])
    pool = probe_pool(config, record, c)
    if not pool:
        parser.error(f"the search visited no configuration meeting the pool's budget for c = {c}")
    if len(pool) < args.pool:
        logging.warning("the record holds %d configurations for this budget, not %d: the search kept its top %d",
                        len(pool), args.pool, record.keep)

    dataset = load_dataset(config.data, ROOT)
    probes = fitted(probe_config(config), dataset, probe_fits(config, dataset, args.run_dir), pool, args.workers)
    by_probe = sorted(range(len(pool)), key=lambda i: -probes[i].val["recall@20"])[: args.full]
    by_q = list(range(min(args.full, len(pool))))  # the pool is ordered by mean q
    picked = sorted(set(by_probe) | set(by_q))
    fulls = dict(zip(picked, fitted(config, dataset, candidate_fits(config, dataset, args.run_dir),
                                     [pool[i] for i in picked], args.workers), strict=True))

    configurations = []
    print(f"| rank by q | step | mean q | probe R@20 ({search.probe_batches} batches) | full R@20 | full batches |")
    print("|---|---|---|---|---|---|")
    for i, (visited, probe) in enumerate(zip(pool, probes, strict=True)):
        full = fulls.get(i)
        entry = {"step": visited.step, "mean_q": visited.mean_q, "probe_recall@20": probe.val["recall@20"],
                 "probe_best_batches": probe.best_batches, "probe_seconds": round(probe.seconds, 1)}
        if full is not None:
            entry.update({"full_recall@20": full.val["recall@20"], "full_best_batches": full.best_batches,
                          "full_seconds": round(full.seconds, 1)})
        configurations.append(entry)
        full_text = f"{full.val['recall@20']:.4f} | {full.best_batches}" if full else "- | -"
        print(f"| {i + 1} | {visited.step} | {visited.mean_q:.4f} | {probe.val['recall@20']:.4f} | {full_text} |")
    best_probe, best_q = fulls[by_probe[0]], fulls[by_q[0]]
    print(f"probe's pick: step {pool[by_probe[0]].step}, full R@20 {best_probe.val['recall@20']:.4f}; "
          f"mean q's pick: step {pool[by_q[0]].step}, full R@20 {best_q.val['recall@20']:.4f}")
    append_jsonl(args.results, {
        "dataset": config.data.source, "model": config.model.kind, "run_dir": str(args.run_dir),
        "search_seed": search.seed, "budget": c, "candidates_from": search.candidates_from,
        "fill_budget": search.fill_budget, "pool": len(pool), "probe_batches": search.probe_batches,
        "max_batches": config.train.max_batches, "configurations": configurations,
        "probe_pick_step": pool[by_probe[0]].step, "probe_pick_full_recall@20": best_probe.val["recall@20"],
        "q_pick_step": pool[by_q[0]].step, "q_pick_full_recall@20": best_q.val["recall@20"],
        "git_sha": GIT_SHA,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
