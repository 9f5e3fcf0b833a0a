"""CIESS on MovieLens-1M (LightGCN, warm protocol) against MR, frequency and the no-walk ablation.

Appends to bench/results/ml1m.jsonl one row per budget and method, with the same keys as bench/ml1m_baselines.py plus
`search_seconds`, `retrain_seconds` (summed over resumed runs; `wall_seconds` is their sum) and `peak_rss_mb`. Methods:
`ciess`, `ciess_no_walk`, `mr`, `freq`, `ciess_fill` (the finished `ciess` search retrained with `search.fill_budget`),
`ciess_scaled` (retrained with every budget taking the loosest budget's best configurations, shrunk into it and
filled: `search.candidates_from: loosest`) and `ciess_even` (`ciess_scaled`'s candidates with each side's total shared
equally by its rows: `search.within_side: even`); with `--own-steps` these three run their own steps, so that one
process times a whole search. `--size-penalty`, `--gamma`, `--item-quality`, `--random-steps`, `--reference-basis`,
`--probe-top`, `--penalty-control`, `--penalty-gain` and `--seed` run them at another lambda, TD3 discount, eval(item),
random warm-up, warm reference basis, candidate ranking, lambda control, lambda's proportional gain or search seed (rows
record them as `size_penalty`, `gamma`, `item_quality`, `random_steps`, `reference_basis`, `probe_top`,
`penalty_control`, `penalty_gain` and `seed`; and the config's `top_l`, `probe_spread`, `probe` (with `probe_l2`
when full), `fill_budget`, `candidates_from` and `within_side`).
`--restarts K` runs K searches at successive seeds and chooses every budget's plan from all of them (rows record
`restarts` and the chosen plan's `chosen_seed`). `--retrain-l2 W ..`, `--retrain-max-batches` and `--retrain-patience`
(or the config's `retrain`) fit every candidate, `mr` and `freq` at each L2 weight and test the best on validation, in
<output_dir>-retrain<hash> (rows record the weight tested as `l2`, the settings as `retrain_l2`, `retrain_max_batches`,
`retrain_patience`). `--steps-from DIR` retrains the finished steps of the search run in DIR (reusing its stored fits)
instead of running them, so that a search is retrained under other `--retrain-*` settings. Every row is tested
under the same protocol as the `es` rows (configs/ml1m-search.yaml: `final`).
Takes an hour or more on 2 cores: run it in the background with a log.

    OMP_NUM_THREADS=1 python bench/ml1m_search.py > ml1m_search.log 2>&1 &
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ml1m_baselines import (  # noqa: E402
    add_retrain_arguments,
    git_sha,
    l2_suffix,
    print_row,
    retrain_fields,
    retrain_suffix,
    with_retrain_arguments,
)
from ciess_prod.cli import non_negative_float, positive_int  # noqa: E402
from ciess_prod.config import load_yaml  # noqa: E402
from ciess_prod.data import load_dataset  # noqa: E402
from ciess_prod.io import append_jsonl  # noqa: E402
from ciess_prod.models import SIDES, build_model  # noqa: E402
from ciess_prod.runtime import configure_cpu  # noqa: E402
from ciess_prod.search import DimensionPlan  # noqa: E402
from ciess_prod.search.baselines import frequency_sizes, random_sizes  # noqa: E402
from ciess_prod.search.config import SearchExperimentConfig  # noqa: E402
from ciess_prod.search.search import STATE_FILE, run_search  # noqa: E402
from ciess_prod.search.selection import FITS_DIR, budget_dirs  # noqa: E402
from ciess_prod.train.protocol import train_and_test  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "ml1m.jsonl"
GIT_SHA = git_sha()  # at start-up: the code this run loaded


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def seconds(value: float | None) -> float | None:
    """Rounded; None where unknown (search.json's null: work saved before it was timed)."""
    return None if value is None else round(value, 1)


def row(config: SearchExperimentConfig, method: str, c: float, sizes: dict, test: dict, wall: float, **extra) -> dict:
    """One results line; bytes are the ideal fp32 payload of the sized tables."""
    total = sum(int(s.to(torch.int64).sum()) for s in sizes.values())
    rows = sum(s.numel() for s in sizes.values())
    return {
        "dataset": "ml-1m",
        "model": config.model.kind,
        "method": method,
        "target_sparsity": c,
        "achieved_sparsity": round(1 - total / (rows * config.model.d_max), 6),
        "recall@5": test["recall@5"],
        "recall@20": test["recall@20"],
        "ndcg@5": test["ndcg@5"],
        "ndcg@20": test["ndcg@20"],
        "embedding_bytes": total * 4,
        "wall_seconds": seconds(wall),
        "seed": config.search.seed,
        "git_sha": GIT_SHA,
        "protocol": config.protocol,
        "final_length": config.train.final_length,
        "l2": config.train.l2,  # or, where retrain tries several, the weight tested (in extra)
        **retrain_fields(config.retrain),
        "peak_rss_mb": peak_rss_mb(),
        **extra,
    }


SEARCHES = ("ciess", "ciess_no_walk", "ciess_fill", "ciess_scaled", "ciess_even")
# only the final retraining differs: the steps are the `ciess` run's
RETRAINED = ("ciess_fill", "ciess_scaled", "ciess_even")


def shared_reference(base: SearchExperimentConfig) -> str:
    """The reference model a derived search shares with ``base`` (same data, model and recipe)."""
    return base.reference_dir or str(ROOT / base.output_dir / "reference")


def with_l2(base: SearchExperimentConfig, l2: float | None) -> SearchExperimentConfig:
    """The config at another L2 weight, in ``<output_dir>-l2<L2>`` with a reference of its own: the L2 weight is part
    of the training recipe, so the reference model, the warm steps and every retraining change with it."""
    if l2 is None or l2 == base.train.l2:
        return base
    return dataclasses.replace(base, train=dataclasses.replace(base.train, l2=l2),
                               output_dir=base.output_dir + l2_suffix(l2, base.train.l2), reference_dir=None)


def with_search_settings(base: SearchExperimentConfig, size_penalty: float | None = None, gamma: float | None = None,
                         item_quality: str | None = None, random_steps: int | None = None,
                         reference_basis: str | None = None, probe_top: int | None = None,
                         penalty_control: str | None = None, seed: int | None = None,
                         penalty_gain: float | None = None, restarts: int | None = None) -> SearchExperimentConfig:
    """The config's search at another lambda, TD3 discount, item quality signal, number of random warm-up steps,
    reference basis, candidate ranking, lambda control, lambda's proportional gain, search seed or number of restarts,
    in its own output directory (``<output_dir>-lambda2-gamma0-items-hits-random20-principal-probe6-track-gain1-seed1-
    restarts3``; its variants get their suffix after it)."""
    search, suffix = base.search, ""
    if size_penalty is not None and size_penalty != search.size_penalty:
        search, suffix = dataclasses.replace(search, size_penalty=size_penalty), f"{suffix}-lambda{size_penalty:g}"
    if gamma is not None and gamma != search.td3.gamma:
        search = dataclasses.replace(search, td3=dataclasses.replace(search.td3, gamma=gamma))
        suffix = f"{suffix}-gamma{gamma:g}"
    if item_quality is not None and item_quality != search.environment.item_quality:
        environment = dataclasses.replace(search.environment, item_quality=item_quality)
        search, suffix = dataclasses.replace(search, environment=environment), f"{suffix}-items-{item_quality}"
    if random_steps is not None and random_steps != search.exploration.random_steps:
        exploration = dataclasses.replace(search.exploration, random_steps=random_steps)
        search, suffix = dataclasses.replace(search, exploration=exploration), f"{suffix}-random{random_steps}"
    if reference_basis is not None and reference_basis != search.environment.reference_basis:
        environment = dataclasses.replace(search.environment, reference_basis=reference_basis)
        search, suffix = dataclasses.replace(search, environment=environment), f"{suffix}-{reference_basis}"
    if probe_top is not None and probe_top != search.probe_top:
        search, suffix = dataclasses.replace(search, probe_top=probe_top), f"{suffix}-probe{probe_top}"
    if penalty_control is not None and penalty_control != search.penalty_control:
        control_suffix = {"fixed": "-fixed", "loosest": "-track", "signed": "-signed"}[penalty_control]
        search, suffix = dataclasses.replace(search, penalty_control=penalty_control), suffix + control_suffix
    if penalty_gain is not None and penalty_gain != search.penalty_gain:
        search, suffix = dataclasses.replace(search, penalty_gain=penalty_gain), f"{suffix}-gain{penalty_gain:g}"
    if seed is not None and seed != search.seed:  # the search's agents and exploration; the data split stays
        search, suffix = dataclasses.replace(search, seed=seed), f"{suffix}-seed{seed}"
    if restarts is not None and restarts != search.restarts:
        search, suffix = dataclasses.replace(search, restarts=restarts), f"{suffix}-restarts{restarts}"
    if not suffix:
        return base
    return dataclasses.replace(base, search=search, output_dir=base.output_dir + suffix,
                               reference_dir=shared_reference(base))


def variant(base: SearchExperimentConfig, method: str) -> SearchExperimentConfig:
    """The config of one search method; the variants reuse the `ciess` run's reference model (same recipe)."""
    if method == "ciess":
        return base
    if method == "ciess_no_walk":
        search = dataclasses.replace(base.search, exploration=dataclasses.replace(base.search.exploration, walk=False))
        suffix = "-no-walk"
    elif method == "ciess_fill":
        search, suffix = dataclasses.replace(base.search, fill_budget=True), "-fill"
    elif method == "ciess_scaled":
        search, suffix = dataclasses.replace(base.search, fill_budget=True, candidates_from="loosest"), "-scaled"
    else:  # ciess_even
        search = dataclasses.replace(base.search, fill_budget=True, candidates_from="loosest", within_side="even")
        suffix = "-even"
    return dataclasses.replace(base, search=search, output_dir=base.output_dir + suffix,
                               reference_dir=shared_reference(base))


def reuse_search_state(source: Path, dest: Path, total_steps: int) -> None:
    """Starts `ciess_fill` or `ciess_scaled` from the `ciess` search's finished steps, so that only the retraining
    runs (the `ciess` run's own retraining need not have finished)."""
    if (dest / STATE_FILE).is_file():
        return
    done = torch.load(source / STATE_FILE, weights_only=True)["step"] if (source / STATE_FILE).is_file() else 0
    if done < total_steps:
        raise SystemExit(f"{dest.name} reuses the `ciess` search's {total_steps} steps; {source} has {done}: run "
                         "--methods ciess first")
    dest.mkdir(parents=True, exist_ok=True)
    copy_atomic(source / STATE_FILE, dest / STATE_FILE)


def copy_atomic(source: Path, target: Path) -> None:
    """A copy that an interrupted run never leaves half-written under the target's name."""
    shutil.copyfile(source, target.with_name(target.name + ".tmp"))
    os.replace(target.with_name(target.name + ".tmp"), target)


def take_steps(source: Path, dest: Path, total_steps: int) -> None:
    """--steps-from: another run's finished steps and stored fits seed this run's directory, so that its budgets are
    retrained under this run's settings without running the steps again. A stored fit is read back only under its
    own recipe and sizes (candidates.fit_key), so what this run's retraining changes is fitted afresh."""
    reuse_search_state(source, dest, total_steps)
    fits = dest / FITS_DIR
    fits.mkdir(exist_ok=True)
    for entry in sorted((source / FITS_DIR).glob("*.json")):
        if not (fits / entry.name).exists():
            copy_atomic(entry, fits / entry.name)


def main(argv: list[str] | None = None) -> int:
    configure_cpu()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "ml1m-search.yaml")
    parser.add_argument("--methods", nargs="+", default=["ciess", "mr", "freq", "ciess_no_walk"])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--resume", action="store_true", help="resume interrupted searches")
    parser.add_argument("--retrain-budgets", type=float, nargs="+", metavar="C",
                        help="searches, with --resume once the steps are done: retrain only these budgets, so that "
                             "one process per group retrains in parallel; each process writes its budgets' rows "
                             "(retrain_seconds: that budget's; rows record the group as retrain_budgets)")
    parser.add_argument("--reference-basis", choices=["trained", "principal"],
                        help="searches: this warm reference basis instead of the config's, in <output_dir>-principal "
                             "(the rows record it as reference_basis)")
    parser.add_argument("--retrain-workers", type=positive_int, default=1, metavar="N",
                        help="searches: fit the candidates and test the budgets in N processes at once (rows record "
                             "it, and process_seconds: this process's wall time)")
    parser.add_argument("--own-steps", action="store_true",
                        help="ciess_fill, ciess_scaled: run their own search steps instead of copying the `ciess` "
                             "search's, so that process_seconds times a whole search (rows record it as own_steps)")
    parser.add_argument("--steps-from", type=Path, metavar="DIR",
                        help="searches: take the finished steps and stored fits of the search run in DIR (its step "
                             "settings must be this run's) and only retrain, e.g. under other --retrain-* settings "
                             "(rows record DIR's name as steps_from)")
    parser.add_argument("--budgets", type=float, nargs="+", help="mr/freq: only these budgets (default: the config's)")
    parser.add_argument("--size-penalty", type=float, metavar="LAMBDA",
                        help="searches: this lambda instead of the config's, in <output_dir>-lambda<LAMBDA> (the rows "
                             "record it as size_penalty)")
    parser.add_argument("--gamma", type=float, metavar="G",
                        help="searches: this TD3 discount instead of the config's, in <output_dir>-gamma<G> (0: the "
                             "contextual-bandit form; the rows record it as gamma)")
    parser.add_argument("--item-quality", choices=["users", "hits"],
                        help="searches: this eval(item) instead of the config's, in <output_dir>-items-<Q> (hits: the "
                             "item's own validation hit rate; the rows record it as item_quality)")
    parser.add_argument("--random-steps", type=int, metavar="N",
                        help="searches: the first N steps size every row uniformly at random, in "
                             "<output_dir>-random<N> (the rows record it as random_steps)")
    parser.add_argument("--probe-top", type=int, metavar="N",
                        help="searches: rank the best N configurations per budget by a short retraining before the "
                             "top-l are fully retrained (0: by mean q), in <output_dir>-probe<N> (the rows record it "
                             "as probe_top)")
    parser.add_argument("--penalty-control", choices=["fixed", "loosest", "signed"],
                        help="searches: loosest adapts lambda (kept positive) so the visited sparsity tracks the "
                             "loosest budget, in <output_dir>-track; signed lets lambda go below 0, in "
                             "<output_dir>-signed; fixed keeps it, in <output_dir>-fixed (the rows record it as "
                             "penalty_control)")
    parser.add_argument("--penalty-gain", type=float, metavar="KP",
                        help="searches: lambda's proportional gain under an adapted --penalty-control (a PI "
                             "controller; 0: pure dual ascent), in <output_dir>-gain<KP> (rows record it as "
                             "penalty_gain)")
    parser.add_argument("--l2", type=non_negative_float, metavar="W",
                        help="every method: this L2 weight instead of the config's train.l2; searches run in "
                             "<output_dir>-l2<W> with their own reference (the rows record it as l2)")
    parser.add_argument("--seed", type=int, metavar="N",
                        help="searches: this search seed (agents, exploration, step training) instead of the "
                             "config's, in <output_dir>-seed<N>; the data split and reference stay (rows record it "
                             "as seed)")
    parser.add_argument("--restarts", type=positive_int, metavar="K",
                        help="searches: K searches at seeds seed .. seed + K - 1, every budget's plan chosen from all "
                             "of them, in <output_dir>-restarts<K> (rows record it as restarts, and the chosen "
                             "plan's seed as chosen_seed)")
    add_retrain_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    base = load_yaml(SearchExperimentConfig, args.config)
    base = with_l2(base, args.l2)
    try:
        retrain = with_retrain_arguments(base.retrain, args)
    except ValueError as error:
        parser.error(str(error))
    if retrain != base.retrain:
        base = dataclasses.replace(base, retrain=retrain, output_dir=base.output_dir + retrain_suffix(retrain))
    if args.size_penalty is not None and not args.size_penalty >= 0:
        parser.error(f"--size-penalty must be a number >= 0, got {args.size_penalty}")
    if args.gamma is not None and not 0 <= args.gamma <= 1:
        parser.error(f"--gamma must lie in [0, 1], got {args.gamma}")
    if args.penalty_gain is not None and not args.penalty_gain >= 0:
        parser.error(f"--penalty-gain must be a number >= 0, got {args.penalty_gain}")
    if args.random_steps is not None and args.random_steps < 0:
        parser.error(f"--random-steps must be >= 0, got {args.random_steps}")
    if args.own_steps and not set(args.methods) & set(RETRAINED):
        parser.error(f"--own-steps applies to {', '.join(RETRAINED)} only (the others always run their own steps)")
    if args.steps_from is not None and (args.own_steps or not set(args.methods) & set(SEARCHES)):
        parser.error("--steps-from applies to searches that do not run their own steps")
    if args.probe_top and args.probe_top < base.search.top_l:
        parser.error(f"--probe-top must be 0 or >= the config's top_l ({base.search.top_l}), got {args.probe_top}")
    searched = with_search_settings(base, args.size_penalty, args.gamma, args.item_quality, args.random_steps,
                                    args.reference_basis, args.probe_top, args.penalty_control, args.seed,
                                    penalty_gain=args.penalty_gain, restarts=args.restarts)
    dataset = load_dataset(base.data, ROOT)

    for method in args.methods:
        if method in SEARCHES:
            config = variant(searched, method)
            config = dataclasses.replace(config, output_dir=str(ROOT / config.output_dir))
            total_steps = searched.search.episodes * searched.search.steps_per_episode
            reused = args.steps_from is not None or (method in RETRAINED and not args.own_steps)
            if args.steps_from is not None:
                take_steps(args.steps_from, Path(config.output_dir), total_steps)
            elif reused:
                reuse_search_state(ROOT / searched.output_dir, Path(config.output_dir), total_steps)
            summary = run_search(config, base_dir=ROOT, resume=args.resume or reused,
                                 retrain_budgets=args.retrain_budgets, retrain_workers=args.retrain_workers)
            if not summary["finished"]:
                print(f"{method}: budgets {summary['pending_budgets']} are left to other processes")
                if args.retrain_budgets is None:
                    continue
            for c in args.retrain_budgets or config.search.budgets:  # each process writes the budgets it was given
                plan = DimensionPlan.load(budget_dirs(Path(config.output_dir), c)[0])
                retrain = (summary["retrain_seconds"] if args.retrain_budgets is None  # every budget's, or this one's
                           else plan.metrics["selection"].get("retrain_seconds"))
                search_seconds = summary["search_seconds"]
                wall = None if search_seconds is None or retrain is None else search_seconds + retrain
                record = row(config, method, c, plan.sizes, plan.metrics["test"], wall,
                             l2=plan.metrics["selection"].get("l2", config.train.l2),
                             search_seconds=seconds(search_seconds), retrain_seconds=seconds(retrain),
                             repaired=plan.repaired,
                             size_penalty=config.search.size_penalty, gamma=config.search.td3.gamma,
                             item_quality=config.search.environment.item_quality,
                             random_steps=config.search.exploration.random_steps,
                             reference_basis=config.search.environment.reference_basis,
                             top_l=config.search.top_l, probe_top=config.search.probe_top,
                             probe_spread=config.search.probe_spread, probe=config.search.probe,
                             **({"probe_l2": config.search.probe_l2} if config.search.probe == "full" else {}),
                             penalty_control=config.search.penalty_control,
                             penalty_gain=config.search.penalty_gain,
                             fill_budget=config.search.fill_budget, candidates_from=config.search.candidates_from,
                             within_side=config.search.within_side,
                             retrain_workers=args.retrain_workers, process_seconds=seconds(summary["process_seconds"]),
                             own_steps=not reused, restarts=config.search.restarts, chosen_seed=plan.seed,
                             **({"retrain_budgets": args.retrain_budgets} if args.retrain_budgets else {}),
                             **({"steps_from": args.steps_from.name} if args.steps_from is not None else {}))
                append_jsonl(args.results, record)
                print_row(record)
            continue
        for c in args.budgets or base.search.budgets:
            start = time.perf_counter()
            if method == "mr":
                sizes = random_sizes({"user": dataset.n_users, "item": dataset.n_items}, base.model.d_max, c,
                                     seed=base.search.seed)
            else:
                popularity = {"user": dataset.user_popularity(), "item": dataset.item_popularity()}
                sizes = frequency_sizes(popularity, base.model.d_max, c)

            def make(d, sizes=sizes):
                model = build_model(base.model, d.n_users, d.n_items, d.train)
                for side in SIDES:
                    model.set_row_sizes(side, sizes[side])
                return model

            outcome = train_and_test(dataset, make, base.train, base.protocol, base.retrain)
            record = row(base, method, c, sizes, outcome.test, time.perf_counter() - start, l2=outcome.train.l2)
            append_jsonl(args.results, record)
            print_row(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
