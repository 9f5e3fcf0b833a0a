"""Choosing each budget's plan from a finished search's record: its candidates (top-l, filled, or repaired), their
retraining on train (stored by what determines them), the best on validation tested under the baselines' protocol,
and the worker processes that do this in parallel."""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from ciess_prod.config import ConfigError, from_dict, to_dict
from ciess_prod.data import RecDataset
from ciess_prod.experiment import load_dataset
from ciess_prod.models import SIDES, Recommender, build_model, sparsity
from ciess_prod.runtime import configure_cpu
from ciess_prod.search.candidates import CandidateFit, CandidateFits, fit_key
from ciess_prod.search.config import SearchExperimentConfig
from ciess_prod.search.plan import (
    MANIFEST_NAME,
    DimensionPlan,
    even_within_tables,
    fill_to_budget,
    repair_to_budget,
    size_distance,
)
from ciess_prod.search.record import ConfigurationRecord, Visited
from ciess_prod.train.checkpoint import save_checkpoint
from ciess_prod.train.protocol import fit_on_train, score_with_protocol

log = logging.getLogger(__name__)
FITS_DIR = "candidates"  # under a search's output_dir: the stored outcomes of its probes and candidate fits


def retrain_budget(
    config: SearchExperimentConfig, dataset: RecDataset, record: ConfigurationRecord, c: float
) -> DimensionPlan:
    """Chooses and saves budget c's plan and the model it was tested with (the model first: a saved plan implies
    its model)."""
    path, model_path = budget_dirs(Path(config.output_dir), c)
    plan, model, recipe = choose_plan(config, dataset, record, c)
    save_checkpoint(model_path, model, model_meta(recipe, plan))
    plan.save(path)
    return plan


def _worker_logging(threads: int, log_level: int, label: str) -> None:
    configure_cpu()
    torch.set_num_threads(threads)
    # force: an import may already have given the fresh process's root logger a handler, which would mute this one
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [{label}] %(message)s", force=True)


def fit_in_worker(
    config: SearchExperimentConfig, base_dir: Path | None, sizes: dict[str, torch.Tensor], label: str, threads: int,
    log_level: int,
) -> None:
    """One candidate's retraining on train in a spawned process; its outcome goes to the search's fit store."""
    _worker_logging(threads, log_level, label)
    dataset = load_dataset(config.data, base_dir)
    log.info("retraining a candidate at L2 %g for up to %d batches (%s)", config.train.l2, config.train.max_batches,
             summarise_sizes(sizes))
    fit_candidate(config, dataset, sizes, candidate_fits(config, dataset, Path(config.output_dir)))


def _retrain_worker(
    config: SearchExperimentConfig, base_dir: Path | None, record: ConfigurationRecord, c: float, threads: int,
    log_level: int,
) -> None:
    """One budget's fits and test in a spawned process."""
    _worker_logging(threads, log_level, f"c={c:.2f}")
    retrain_budget(config, load_dataset(config.data, base_dir), record, c)


def retrain_in_workers(
    config: SearchExperimentConfig,
    base_dir: Path | None,
    dataset: RecDataset,
    record: ConfigurationRecord,
    budgets: Sequence[float],
    workers: int,
) -> None:
    """Retrains ``budgets`` in up to ``workers`` spawned processes sharing this process's threads.

    Under ``final`` the unit of work is one probe or one candidate's fit at one of ``retrain``'s recipes, not
    one budget: every budget's unrun probes (each distinct one once) are queued first; once a budget's probes are
    stored its candidates are known and their unfitted fits are queued; once those are stored its test protocol is
    queued, reading their outcomes from the stores. Three budgets on two workers then leave no worker idle for a
    whole budget. ``train_only`` tests the fitted weights, so there each budget is one unit after its probes. A
    failure is raised here, naming its budgets, after the other work has finished (their plans stay saved).
    """
    out = Path(config.output_dir)
    # a full probe is a fit at probe_l2, so it is the same unit as that fit (no budget queues it twice)
    probe_kind = "probe" if config.search.probe == "short" else fit_kind(probe_config(config))
    configs = {probe_kind: probe_config(config)} | {fit_kind(v): v for v in fit_configs(config)}
    stores = {kind: candidate_fits(v, dataset, out) for kind, v in configs.items()}
    errors: dict[float, BaseException] = {}
    waiting: dict[float, set[tuple[str, str]]] = {c: set() for c in budgets}  # the (kind, key)s a budget waits for
    stage = dict.fromkeys(budgets, "probe")  # what a budget queues next: its probes, its fits, its test
    queued: dict[tuple[str, str], tuple[str, dict[str, torch.Tensor]]] = {}  # unfinished (kind, key) -> label, sizes
    failed: dict[tuple[str, str], BaseException] = {}
    ready: list[float] = []
    reads_fits = config.protocol == "final"  # train_only tests the fitted weights: its budgets fit in their own unit

    def advance(c: float) -> None:
        """Queues budget c's next units: its probes, then its candidates' fits, then (once none is left) its test."""
        try:
            while not waiting[c] and stage[c] != "test":
                probing = stage[c] == "probe"
                needed = probe_pool(config, record, c) if probing else budget_candidates(
                    config, record, c, stores[probe_kind])[0]
                kinds = [probe_kind] if probing else [k for k in configs if k != "probe"]
                stage[c] = "fit" if probing and reads_fits else "test"
                for visited in needed:
                    for kind in kinds:
                        unit = (kind, fit_key(stores[kind].recipe, visited.sizes))
                        if unit in failed:
                            raise failed[unit]
                        if unit in queued or stores[kind].get(visited.sizes) is None:
                            queued.setdefault(unit, (f"c={c:.2f} {kind}", visited.sizes))
                            waiting[c].add(unit)
        except Exception as error:  # noqa: BLE001 - reported with its budget below, like a worker's
            errors[c] = error
            return
        if not waiting[c]:
            ready.append(c)

    for c in budgets:
        advance(c)
    first_units = len(queued)
    workers = min(workers, max(first_units, len(budgets) - len(errors), 1))
    threads = max(1, torch.get_num_threads() // workers)
    level = logging.getLogger().getEffectiveLevel()
    log.info("retraining budgets %s in %d processes of %d thread(s) each: %d probe(s) and candidate fit(s) first, "
             "then the tests", list(budgets), workers, threads, first_units)
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch's thread pools
    running: dict[Future, tuple[str, Any]] = {}
    tested: set[float] = set()
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        while True:
            in_flight = {what for kind, what in running.values() if kind == "unit"}
            for unit, (label, sizes) in list(queued.items()):
                if unit not in in_flight:
                    job = pool.submit(fit_in_worker, configs[unit[0]], base_dir, sizes, label, threads, level)
                    running[job] = ("unit", unit)
            for c in ready:
                running[pool.submit(_retrain_worker, config, base_dir, record, c, threads, level)] = ("budget", c)
                tested.add(c)
            ready.clear()
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for job in done:
                kind, what = running.pop(job)
                error = job.exception()
                if kind == "budget":
                    if error is not None:
                        errors[what] = error
                    continue
                del queued[what]
                if error is not None:
                    failed[what] = error
                for c, units in waiting.items():
                    if what in units:
                        units.discard(what)
                        if error is not None:
                            errors.setdefault(c, error)
                        elif not units and c not in errors:
                            advance(c)
    for c in set(budgets) - tested - set(errors):  # a guard: every budget ends tested or failed
        errors[c] = RuntimeError(f"budget {c} was never tested (waiting for {sorted(waiting[c])})")
    if errors:
        raise RuntimeError(f"retraining failed for budgets {sorted(errors)}: "
                           + "; ".join(f"c={c}: {error!r}" for c, error in sorted(errors.items())))


def summarise_sizes(sizes: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{s} mean size {sizes[s].double().mean().item():.1f}" for s in SIDES)


def candidate_fits(config: SearchExperimentConfig, dataset: RecDataset, out: Path) -> CandidateFits:
    """The search's store of candidate retrainings, keyed by everything a retraining on train depends on."""
    recipe = {"data": dataset.fingerprint, "model": to_dict(config.model), "train": to_dict(config.train)}
    return CandidateFits(out / FITS_DIR, recipe)


def probe_fits(config: SearchExperimentConfig, dataset: RecDataset, out: Path) -> CandidateFits:
    """The store of the probes' retrainings (the same directory; a short probe's recipe differs in ``max_batches``, a
    full probe's is a candidate fit's)."""
    return candidate_fits(probe_config(config), dataset, out)


def known_mean_q(mean_q: float) -> dict[str, float]:
    """The selection's mean q, left out for a repaired plan (its sizes were never visited, so never measured)."""
    return {"mean_q": mean_q} if math.isfinite(mean_q) else {}


def budget_dirs(out: Path, c: float) -> tuple[Path, Path]:
    """Where budget c's plan and the model it was tested with are saved."""
    return out / "plans" / f"c{c:.2f}", out / "models" / f"c{c:.2f}"


def fit_configs(config: SearchExperimentConfig) -> list[SearchExperimentConfig]:
    """The config as each candidate's fits run it: one per recipe of ``config.retrain`` (its L2 weights, length and
    patience in ``train``), each with its own fit store."""
    return [dataclasses.replace(config, train=recipe) for recipe in config.retrain.recipes(config.train)]


def fit_kind(config: SearchExperimentConfig) -> str:
    """A fit recipe's name among a budget's units of work (``fit_configs`` differ only in their L2 weight)."""
    return f"fit l2={config.train.l2:g}"


def model_meta(config: SearchExperimentConfig, plan: DimensionPlan) -> dict[str, Any]:
    """Checkpoint metadata in the shape ``ciess train`` writes, so evaluation and the compressor rebuild it alike
    (``config``: as the tested model was trained, its recipe the one chosen from ``retrain``)."""
    experiment = {"data": to_dict(config.data), "model": to_dict(config.model), "train": to_dict(config.train)}
    experiment["protocol"] = config.protocol
    metrics = {"dataset_fingerprint": plan.dataset_fingerprint, **plan.metrics}
    return {"config": experiment, "metrics": metrics, "plan_target_sparsity": plan.target_sparsity}


def finished_plan(
    path: Path, model_path: Path, config: SearchExperimentConfig, dataset: RecDataset
) -> DimensionPlan | None:
    """The plan an interrupted run already chose for this budget, if it belongs to this search."""
    if not (path / MANIFEST_NAME).is_file() or not (model_path / "checkpoint.json").is_file():
        return None
    plan = DimensionPlan.load(path)
    try:  # through the dataclass, so keys added since the plan was written count at their defaults
        saved = to_dict(from_dict(type(config), plan.config))
    except ConfigError:
        return None
    if plan.dataset_fingerprint != dataset.fingerprint or saved != to_dict(config):
        return None
    log.info("reusing the plan already chosen in %s", path)
    return plan


def budget_candidates(
    config: SearchExperimentConfig, record: ConfigurationRecord, c: float, probes: CandidateFits | None = None
) -> tuple[list[Visited], bool]:
    """Budget c's candidates and whether they were repaired.

    The candidates are its own top-l visited configurations, or under ``candidates_from: loosest`` the loosest
    budget's, shrunk into c by one common factor where they exceed it; under ``fill_budget`` each then grows into
    the budget's unused part. Under ``probe_top`` the top-l are those of the probe pool (``probe_pool``) that
    scored best on validation in their probe (read from ``probes``, which must hold them all). When no candidate
    was visited, the sparsest visited configuration is shrunk into c and the plan is marked repaired.
    """
    d_max, search = config.model.d_max, config.search
    visited = record.best[source_budget(config, c)]
    if not visited:  # nothing visited fits: shrink the sparsest visited configuration (order kept)
        if record.sparsest is None:
            raise RuntimeError("the search visited no configuration")
        repaired = dataclasses.replace(shrunk(record.sparsest, d_max, c), step=-1, mean_q=float("nan"))
        return [evened(config, repaired)], True
    if search.probe_top:
        if probes is None:
            raise ValueError("search.probe_top ranks the candidates by their probes: pass the probe store")
        members = probe_members(config, record, c)
        scores = [probe_score(probes, probed) for _, probed in members]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep the order by mean q
        visited = [members[i][0] for i in order]
    return [prepared(config, v, c) for v in visited[: search.top_l]], False


def prepared(config: SearchExperimentConfig, visited: Visited, c: float) -> Visited:
    """A visited configuration as budget c retrains it: shrunk into c where it exceeds it, then filled under
    ``fill_budget`` (visited configurations may leave part of the budget unused), then evened under ``within_side``."""
    d_max = config.model.d_max
    v = visited if visited.sparsity >= c else shrunk(visited, d_max, c)
    if config.search.fill_budget:
        v = dataclasses.replace(v, sizes=fill_to_budget(v.sizes, d_max, c), sparsity=float("nan"))
    return evened(config, v)


def evened(config: SearchExperimentConfig, visited: Visited) -> Visited:
    """Under ``within_side: even``, the configuration with each side's total shared equally by its rows (the same
    totals, so the same sparsity)."""
    if config.search.within_side == "keep":
        return visited
    return dataclasses.replace(visited, sizes=even_within_tables(visited.sizes, config.model.d_max))


def probe_pool(config: SearchExperimentConfig, record: ConfigurationRecord, c: float) -> list[Visited]:
    """The configurations ``probe_top`` retrains to rank budget c's candidates (``probe_members``). Under
    ``candidates_from: loosest`` every budget shares the loosest budget's pool, so its short probes run once (full
    probes run per budget). Empty without ``probe_top``."""
    return [probed for _, probed in probe_members(config, record, c)]


def probe_members(
    config: SearchExperimentConfig, record: ConfigurationRecord, c: float
) -> list[tuple[Visited, Visited]]:
    """Budget c's probe pool as (visited, as probed) pairs: each restart's best ``probe_top`` by mean q, skipping any
    whose sizes prepared for the source budget lie within ``probe_spread`` (``size_distance``) of one that restart
    pooled before (spacing 0 takes each restart's first ``probe_top``). Short probes train those sizes; full probes
    train the member prepared for c, the sizes budget c would retrain, so the pool is the same for every budget."""
    search = config.search
    if not search.probe_top:
        return []
    source = source_budget(config, c)
    pooled: list[tuple[Visited, Visited]] = []  # (visited, prepared for the source budget)
    for visited in record.best[source]:  # by mean q, restarts interleaved
        own = [spaced for v, spaced in pooled if v.restart == visited.restart]
        if len(own) == search.probe_top:
            continue
        spaced = prepared(config, visited, source)
        if all(size_distance(o.sizes, spaced.sizes) >= search.probe_spread for o in own):
            pooled.append((visited, spaced))
    if search.probe == "short":
        return pooled
    return [(visited, prepared(config, visited, c)) for visited, _ in pooled]


def source_budget(config: SearchExperimentConfig, c: float) -> float:
    """The budget whose recorded configurations become budget c's candidates (``candidates_from``)."""
    return min(config.search.budgets) if config.search.candidates_from == "loosest" else c


def probe_config(config: SearchExperimentConfig) -> SearchExperimentConfig:
    """The probe's recipe. Short: the training recipe stopped after ``probe_batches`` (its fits are stored apart,
    under their own recipe). Full: the candidates' fit at ``probe_l2``, so that fit's store already holds a probed
    candidate's fit at that weight."""
    if config.search.probe == "full":
        return next(v for v in fit_configs(config) if v.train.l2 == config.search.probe_l2)
    train = dataclasses.replace(config.train, max_batches=config.search.probe_batches)
    return dataclasses.replace(config, train=train)


def probe_score(probes: CandidateFits, visited: Visited) -> float:
    fit = probes.get(visited.sizes)
    if fit is None:
        raise RuntimeError(f"the configuration of step {visited.step} has no probe in {probes.directory}")
    return fit.val["recall@20"]


def shrunk(visited: Visited, d_max: int, c: float) -> Visited:
    """A visited configuration scaled into budget c by ``repair_to_budget``; its step and measured mean q are kept."""
    sizes = repair_to_budget(visited.sizes, d_max, c)
    return dataclasses.replace(visited, sizes=sizes, sparsity=sparsity(list(sizes.values()), d_max))


def sized_model(config: SearchExperimentConfig, sizes: dict[str, torch.Tensor]):
    """A ``make_model`` for the training protocols: a fresh model of the config's kind with these per-row sizes."""

    def make(d: RecDataset) -> Recommender:
        model = build_model(config.model, d.n_users, d.n_items, d.train)
        for s in SIDES:
            model.set_row_sizes(s, sizes[s])
        return model

    return make


def fit_candidate(
    config: SearchExperimentConfig, dataset: RecDataset, sizes: dict[str, torch.Tensor], fits: CandidateFits
) -> tuple[Recommender, CandidateFit]:
    """Retrains one candidate on train with early stopping and stores its outcome."""
    fitted, result, val = fit_on_train(dataset, sized_model(config, sizes), config.train)
    fit = CandidateFit(val=val, best_batches=result.best_batches, seconds=result.seconds)
    fits.put(sizes, fit)
    return fitted, fit


def choose_plan(
    config: SearchExperimentConfig, dataset: RecDataset, record: ConfigurationRecord, c: float
) -> tuple[DimensionPlan, Recommender, SearchExperimentConfig]:
    """Retrains the budget's top-l configurations at each of ``retrain``'s recipes, keeps the best (configuration,
    recipe) on validation, tests it under the protocol at that recipe.

    Returns the plan, the model it was tested with (under ``final``: retrained on train+validation) and the config
    of the recipe chosen. Retrainings done before, for this budget, another, or a worker, are read from the stores.
    """
    d_max, out = config.model.d_max, Path(config.output_dir)
    probes = probe_fits(config, dataset, out)
    probe_seconds, probe_recall = 0.0, {}  # (restart, step) -> the probe's validation recall@20
    for visited in probe_pool(config, record, c):  # each probe once; another budget, run or worker may have run it
        probe = probes.get(visited.sizes) or fit_candidate(probe_config(config), dataset, visited.sizes, probes)[1]
        probe_seconds += probe.seconds
        probe_recall[visited.restart, visited.step] = probe.val["recall@20"]
        log.info("budget %.2f: probe of restart %d step %d (mean q %.4f): val recall@20 %.4f after %d batches", c,
                 visited.restart, visited.step, visited.mean_q, probe.val["recall@20"], probe.best_batches)
    candidates, repaired = budget_candidates(config, record, c, probes)
    # `final` retrains the chosen sizes on train+validation, so a fit known from its outcome serves as well as one
    # in memory; `train_only` tests the fitted weights, so it always retrains.
    reads_fits = config.protocol == "final"
    best, reused, fit_seconds = None, 0, 0.0
    recipes = [(v, candidate_fits(v, dataset, out)) for v in fit_configs(config)]
    for candidate in candidates:
        for recipe, fits in recipes:
            fitted, fit = None, fits.get(candidate.sizes) if reads_fits else None
            if fit is None:
                fitted, fit = fit_candidate(recipe, dataset, candidate.sizes, fits)
            else:
                reused += 1
            fit_seconds += fit.seconds
            log.info("budget %.2f: candidate from restart %d step %d at L2 %g%s: val %s", c, candidate.restart,
                     candidate.step, recipe.train.l2, " (retrained before)" if fitted is None else "", fit.val)
            if best is None or fit.val["recall@20"] > best[1].val["recall@20"]:
                best = (candidate, fit, fitted, recipe)
    candidate, fit, fitted, recipe = best
    found_by = {"restart": candidate.restart} if config.search.restarts > 1 else {}
    key = (candidate.restart, candidate.step)
    probed = {"probe_recall@20": probe_recall[key]} if key in probe_recall else {}
    started = time.perf_counter()
    model, _, test = score_with_protocol(
        dataset, sized_model(config, candidate.sizes), recipe.train, config.protocol, fitted, fit.best_batches
    )
    test_seconds = time.perf_counter() - started
    plan = DimensionPlan(
        sizes={s: candidate.sizes[s].to(torch.int16) for s in SIDES},
        d_max=d_max,
        model=config.model.kind,
        dataset_fingerprint=dataset.fingerprint,
        target_sparsity=c,
        metrics={
            "val": fit.val,
            "test": test,
            "selection": {
                **found_by,
                "step": candidate.step,
                **known_mean_q(candidate.mean_q),
                "best_batches": fit.best_batches,
                "l2": recipe.train.l2,  # the L2 weight tested: train.l2, or the best on validation of retrain.l2
                "reused_fits": reused,  # fits (candidate, L2 weight) that another budget, run or worker had done
                **probed,
                # its probes' and candidates' fits (as timed when they ran, whoever ran them; a fit two budgets share
                # counts in both) plus the test protocol: a sum of work, not the wall time of parallel workers
                "retrain_seconds": probe_seconds + fit_seconds + test_seconds,
            },
        },
        seed=config.search.seed + candidate.restart,  # the seed of the search that visited it
        config=to_dict(config),
        repaired=repaired,
    )
    return plan, model, recipe
