"""CIESS: one search over per-row embedding sizes that serves a list of memory budgets.

Read top to bottom: train the full-size reference; then for every episode (all sizes start at d_max) and step,
each side's agent proposes sizes from per-row states, exploration perturbs them and walks the size graph, the
critic picks among the visited sizes, the environment trains and ranks at those sizes, rewards
r_n = q_n - lambda (d_n / d_max)^2 go to the replay buffer, and TD3 updates. Every visited configuration is
recorded; the best ``top_l`` per budget (those meeting it, ranked by mean q) are retrained to convergence, the
best on validation is tested under the same protocol as the baselines, and a ``DimensionPlan`` is written.
The state is checkpointed after every step; ``resume=True`` continues from the last completed step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ciess_prod.config import ConfigError, from_dict, to_dict
from ciess_prod.data import RecDataset
from ciess_prod.experiment import DataConfig, load_dataset
from ciess_prod.io import write_json_atomic
from ciess_prod.models import SIDES, ModelConfig, Recommender, build_model, sparsity
from ciess_prod.models.basis import ROTATABLE_KINDS
from ciess_prod.search.agent import TD3Agent, TD3Config
from ciess_prod.search.buffer import ReplayBuffer
from ciess_prod.search.candidates import CandidateFit, CandidateFits, fit_key
from ciess_prod.search.environment import EnvironmentConfig, Quality, SizeEnvironment
from ciess_prod.search.exploration import ExplorationConfig, Explorer
from ciess_prod.search.plan import MANIFEST_NAME, DimensionPlan, fill_to_budget, repair_to_budget
from ciess_prod.search.report import write_report
from ciess_prod.train.checkpoint import load_checkpoint, save_checkpoint
from ciess_prod.train.protocol import Protocol, fit_on_train, score_with_protocol
from ciess_prod.train.trainer import TrainConfig

log = logging.getLogger(__name__)

STATE_FILE = "search_state.pt"


@dataclass(frozen=True)
class SearchConfig:
    budgets: tuple[float, ...] = (0.8, 0.9, 0.95)  # target sparsities c served by one search [P]
    episodes: int = 30  # M [P]
    steps_per_episode: int = 10  # T [P] (the authors' code: 11)
    size_penalty: float = 0.4  # lambda in r = q - lambda (d / d_max)^2; 0.4 best on ML-1M [P]
    reward: Literal["paper", "code"] = "paper"  # code: raw eval - lambda ((d - 1) / d_max)^2 instead of q [C]
    top_l: int = 3  # configurations per budget retrained to convergence [P]
    fill_budget: bool = False  # grow each candidate by one common factor into its budget's slack (fill_to_budget) [I]
    replay_bytes: int = 256 << 20  # replay buffer bound per agent (bytes)
    rows_per_step: int | None = None  # subsample this many rows per side into the buffer each step (large tables)
    td3: TD3Config = field(default_factory=TD3Config)
    exploration: ExplorationConfig = field(default_factory=ExplorationConfig)
    environment: EnvironmentConfig = field(default_factory=EnvironmentConfig)
    seed: int = 0  # seeds agents, exploration, buffers and every environment step

    def __post_init__(self) -> None:
        if not self.budgets or any(not 0.0 <= c < 1.0 for c in self.budgets):
            raise ValueError(f"budgets must be sparsities in [0, 1), got {self.budgets}")
        for name in ("episodes", "steps_per_episode", "top_l"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.size_penalty < 0:
            raise ValueError(f"size_penalty must be >= 0, got {self.size_penalty}")
        if self.rows_per_step is not None and self.rows_per_step < 1:
            raise ValueError(f"rows_per_step must be >= 1 or null, got {self.rows_per_step}")


@dataclass(frozen=True)
class SearchExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # reference model and final retraining recipe
    search: SearchConfig = field(default_factory=SearchConfig)
    protocol: Protocol = "final"  # how the chosen configuration is tested (same as the baselines)
    output_dir: str = "runs/search"  # reference/, search_state.pt, plans/, models/, report/, search.json
    reference_dir: str | None = None  # cached full-size reference; default <output_dir>/reference (shareable)

    def __post_init__(self) -> None:
        if self.search.environment.reference_basis == "principal" and self.model.kind not in ROTATABLE_KINDS:
            raise ValueError(f"search.environment.reference_basis 'principal' keeps scores only for "
                             f"{ROTATABLE_KINDS}, not {self.model.kind}")
        impossible = [c for c in self.search.budgets if (1 - c) * self.model.d_max < 1]
        if impossible:
            raise ValueError(
                f"search.budgets {impossible} leave less than one column per row at d_max {self.model.d_max}"
            )


# ---- per-row states and rewards ----------------------------------------------------------------------------
def normalise_popularity(popularity: np.ndarray) -> torch.Tensor:
    """Min-max normalised to [-1, 1] within one side [P][C]."""
    pop = torch.from_numpy(popularity.astype(np.float32))
    span = (pop.max() - pop.min()).clamp(min=1e-12)
    return (pop - pop.min()) / span * 2 - 1


def build_states(popularity: torch.Tensor, sizes: torch.Tensor, quality: torch.Tensor, d_max: int) -> torch.Tensor:
    """Per-row state (popularity in [-1, 1], size in [-1, 1], q in [0, 1]): [N, 3] float32."""
    size = (sizes.to(torch.float32) - 1) / max(d_max - 1, 1) * 2 - 1
    return torch.stack([popularity, size, quality.to(torch.float32)], dim=1)


def rewards(config: SearchConfig, quality: Quality, side: str, sizes: torch.Tensor, d_max: int) -> torch.Tensor:
    """r_n = q_n - lambda (d_n / d_max)^2 [P]; the code's variant uses raw eval and ((d_n - 1) / d_max)^2 [C]."""
    d = sizes.to(torch.float32)
    if config.reward == "paper":
        return quality.ratio[side] - config.size_penalty * (d / d_max) ** 2
    return quality.raw[side].to(torch.float32) - config.size_penalty * ((d - 1) / d_max) ** 2


# ---- the record of visited configurations --------------------------------------------------------------
@dataclass
class Visited:
    step: int
    sparsity: float
    mean_q: float
    sizes: dict[str, torch.Tensor]  # side -> int16 [rows]


class ConfigurationRecord:
    """Top-l visited configurations per budget by mean q, plus the sparsest one (the repair's starting point)."""

    def __init__(self, budgets: tuple[float, ...], top_l: int) -> None:
        self.budgets, self.top_l = budgets, top_l
        self.best: dict[float, list[Visited]] = {c: [] for c in budgets}
        self.sparsest: Visited | None = None

    def add(self, visited: Visited) -> None:
        for c in self.budgets:
            if visited.sparsity >= c:
                kept = sorted([*self.best[c], visited], key=lambda v: (-v.mean_q, v.step))
                self.best[c] = kept[: self.top_l]
        if self.sparsest is None or visited.sparsity > self.sparsest.sparsity:
            self.sparsest = visited

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": {str(c): [dataclasses.asdict(v) for v in vs] for c, vs in self.best.items()},
            "sparsest": dataclasses.asdict(self.sparsest) if self.sparsest else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = {c: [Visited(**v) for v in state["best"][str(c)]] for c in self.budgets}
        self.sparsest = Visited(**state["sparsest"]) if state["sparsest"] else None


# ---- the search ----------------------------------------------------------------------------------------
@dataclass
class SearchState:
    """Everything that changes between steps; saved after each completed step."""

    step: int  # completed steps
    sizes: dict[str, torch.Tensor]
    quality: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    agents: dict[str, TD3Agent]
    explorers: dict[str, Explorer]
    buffers: dict[str, ReplayBuffer]
    record: ConfigurationRecord
    seconds: float = 0.0  # wall time of the completed steps, summed over every run that resumed this search

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "seconds": self.seconds,
            "sizes": self.sizes,
            "quality": self.quality,
            "history": self.history,
            "agents": {s: a.state_dict() for s, a in self.agents.items()},
            "explorers": {s: e.state_dict() for s, e in self.explorers.items()},
            "buffers": {s: b.state_dict() for s, b in self.buffers.items()},
            "record": self.record.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.sizes, self.quality, self.history = (
            state["step"],
            state["sizes"],
            state["quality"],
            state["history"],
        )
        for s in SIDES:
            self.agents[s].load_state_dict(state["agents"][s])
            self.explorers[s].load_state_dict(state["explorers"][s])
            self.buffers[s].load_state_dict(state["buffers"][s])
        self.record.load_state_dict(state["record"])
        self.seconds = float(state.get("seconds", float("nan")))  # NaN: saved before the steps were timed


def save_state(path: Path, state: SearchState) -> None:
    """Atomic: a search killed while saving keeps the previous step's state."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state.state_dict(), tmp)
    os.replace(tmp, path)


def train_reference(config: SearchExperimentConfig, dataset: RecDataset, path: Path) -> Recommender:
    """The full-size model whose per-row quality is the denominator of q.

    Reused from ``path`` only when it was trained on the same data with the same model and training configs, so
    searches that differ only in search settings (e.g. an ablation) can share one.
    """
    model = build_model(config.model, dataset.n_users, dataset.n_items, dataset.train)
    recipe = {"dataset_fingerprint": dataset.fingerprint, "model": to_dict(config.model)}
    recipe["train"] = to_dict(config.train)
    if (path / "checkpoint.json").is_file():
        checkpoint = load_checkpoint(path)
        if all(checkpoint.meta.get(key) == value for key, value in recipe.items()):
            model.load_state_dict(checkpoint.state)
            log.info("reusing the reference model in %s", path)
            return model
    torch.manual_seed(config.train.seed)
    model, result, val = fit_on_train(
        dataset, lambda d: build_model(config.model, d.n_users, d.n_items, d.train), config.train
    )
    save_checkpoint(path, model, {**recipe, "val": val, "best_batches": result.best_batches})
    return model


def run_search(
    config: SearchExperimentConfig,
    base_dir: Path | None = None,
    resume: bool = False,
    stop_after_steps: int | None = None,
    retrain_budgets: Sequence[float] | None = None,
    retrain_workers: int = 1,
) -> dict[str, Any]:
    """Runs (or resumes) the search and the final retraining; returns the summary written to search.json.

    ``stop_after_steps`` ends the process-local run after that many completed steps (used to test resuming).
    ``retrain_budgets`` (with ``resume``, on a finished search) chooses only those budgets' plans in this process, so
    that separate processes retrain one search's budgets in parallel; the process that completes the last plan
    writes the report and search.json, the others return ``{"finished": False, "pending_budgets": [...]}``.
    ``retrain_workers`` > 1 retrains this process's budgets in that many worker processes at once, each with an
    equal share of this process's threads (the steps are sequential, the budgets' retrainings are not).
    """
    search, d_max = config.search, config.model.d_max
    if retrain_workers < 1:
        raise ValueError(f"retrain_workers must be >= 1, got {retrain_workers}")
    if retrain_budgets is not None:
        unknown = sorted(set(retrain_budgets) - set(search.budgets))
        if unknown or not resume:
            raise ValueError(f"retrain_budgets must be budgets of the search {list(search.budgets)} and needs "
                             f"resume=True, got {list(retrain_budgets)} (unknown: {unknown}), resume={resume}")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dataset = load_dataset(config.data, base_dir)
    reference = train_reference(config, dataset, Path(config.reference_dir or out / "reference"))
    env = SizeEnvironment(dataset, config.model, config.train, search.environment, reference)
    popularity = {"user": dataset.user_popularity(), "item": dataset.item_popularity()}
    pop_state = {s: normalise_popularity(popularity[s]) for s in SIDES}
    n_rows = {"user": dataset.n_users, "item": dataset.n_items}

    full = env.full_size_quality()
    state = SearchState(
        step=0,
        sizes={s: torch.full((n_rows[s],), d_max, dtype=torch.int64) for s in SIDES},
        quality=dict(full.ratio),
        history=[],
        agents={s: TD3Agent(search.td3, d_max, seed=search.seed + 10 * i) for i, s in enumerate(SIDES)},
        explorers={
            s: Explorer(search.exploration, d_max, n_rows[s], seed=search.seed + 10 * i + 1)
            for i, s in enumerate(SIDES)
        },
        buffers={s: ReplayBuffer(search.replay_bytes, seed=search.seed + 10 * i + 2) for i, s in enumerate(SIDES)},
        record=ConfigurationRecord(tuple(search.budgets), search.top_l),
    )
    state_path = out / STATE_FILE
    if resume and state_path.is_file():
        state.load_state_dict(torch.load(state_path, weights_only=True))
        log.info("resumed from step %d", state.step)

    total = search.episodes * search.steps_per_episode
    if retrain_budgets is not None and state.step < total:
        raise ValueError(f"retrain_budgets needs a finished search; {out} has {state.step} of {total} steps")
    bar = tqdm(total=total, initial=state.step, desc="ciess search", disable=not config.train.progress)
    steps_this_run = 0
    while state.step < total:
        step_started = time.perf_counter()
        episode, step = divmod(state.step, search.steps_per_episode)
        if step == 0:  # every episode starts at full size, where q = 1 by definition
            state.sizes = {s: torch.full((n_rows[s],), d_max, dtype=torch.int64) for s in SIDES}
            state.quality = dict(full.ratio)
            for explorer in state.explorers.values():
                explorer.reset()
        states = {s: build_states(pop_state[s], state.sizes[s], state.quality[s], d_max) for s in SIDES}
        new_sizes = {}
        for s in SIDES:
            agent, explorer = state.agents[s], state.explorers[s]
            if state.step < search.exploration.random_steps:
                new_sizes[s] = explorer.uniform(n_rows[s])
            else:
                new_sizes[s] = explorer.choose(states[s], agent.act(states[s]), agent.q_values)
        quality = env.evaluate(new_sizes, step_seed=search.seed * 100_003 + state.step)
        done = step == search.steps_per_episode - 1
        entry: dict[str, float] = {"episode": episode, "step": step, "global_step": state.step}
        for s in SIDES:
            next_states = build_states(pop_state[s], new_sizes[s], quality.ratio[s], d_max)
            reward = rewards(search, quality, s, new_sizes[s], d_max)
            state.buffers[s].add(
                states[s], new_sizes[s].float(), reward, next_states, done, max_rows=search.rows_per_step
            )
            losses = state.agents[s].update(state.buffers[s])
            entry[f"mean_reward_{s}"] = float(reward.mean())
            entry[f"mean_size_{s}"] = float(new_sizes[s].float().mean())
            entry[f"mean_q_{s}"] = float(quality.ratio[s].mean())
            entry.update({f"{k}_{s}": v for k, v in losses.items()})
        entry["mean_reward"] = float(
            torch.cat([rewards(search, quality, s, new_sizes[s], d_max) for s in SIDES]).mean()
        )
        entry["sparsity"] = sparsity([new_sizes[s] for s in SIDES], d_max)
        entry["mean_q"] = quality.mean_ratio
        state.record.add(
            Visited(state.step, entry["sparsity"], entry["mean_q"], {s: new_sizes[s].to(torch.int16) for s in SIDES})
        )
        state.history.append(entry)
        state.sizes, state.quality = new_sizes, dict(quality.ratio)
        state.step += 1
        state.seconds += time.perf_counter() - step_started
        save_state(state_path, state)
        bar.update(1)
        bar.set_postfix(sparsity=f"{entry['sparsity']:.3f}", q=f"{entry['mean_q']:.3f}")
        log.info("step %d: %s", state.step, {k: round(v, 4) for k, v in entry.items()})
        steps_this_run += 1
        if stop_after_steps is not None and steps_this_run >= stop_after_steps and state.step < total:
            bar.close()
            return {"completed_steps": state.step, "finished": False}
    bar.close()

    # each plan is saved when chosen, so a resumed run skips finished budgets
    plans = {c: finished_plan(*budget_dirs(out, c), config, dataset) if resume else None for c in search.budgets}
    mine = [c for c, plan in plans.items() if plan is None and (retrain_budgets is None or c in retrain_budgets)]
    if retrain_workers > 1 and len(mine) > 1:
        retrain_in_workers(config, base_dir, dataset, state.record, mine, retrain_workers)
    else:
        for c in mine:
            plans[c] = retrain_budget(config, dataset, state.record, c)
    for c in search.budgets:  # workers, or other processes, may have finished budgets meanwhile
        plans[c] = plans[c] or finished_plan(*budget_dirs(out, c), config, dataset)
    pending = [c for c, plan in plans.items() if plan is None]
    if pending:
        return {"finished": False, "completed_steps": state.step, "pending_budgets": pending}
    write_report(out / "report", state.history, plans, popularity)
    retrain_seconds = sum(p.metrics["selection"].get("retrain_seconds", float("nan")) for p in plans.values())
    summary = {
        "finished": True,
        "completed_steps": state.step,
        "search_seconds": known(state.seconds),  # the steps, over all runs of this search
        "retrain_seconds": known(retrain_seconds),  # choosing every budget's plan, over all runs
        "total_seconds": known(state.seconds + retrain_seconds),  # the two above (the cached reference not included)
        "process_seconds": time.perf_counter() - started,  # this process only (a resumed run does part of the work)
        "plans": {
            f"{c:.2f}": {
                "path": str(budget_dirs(out, c)[0]),
                "model": str(budget_dirs(out, c)[1]),
                "achieved_sparsity": p.achieved_sparsity,
                "repaired": p.repaired,
                **p.metrics,
            }
            for c, p in plans.items()
        },
    }
    write_json_atomic(out / "search.json", summary)
    return summary


def retrain_budget(
    config: SearchExperimentConfig, dataset: RecDataset, record: ConfigurationRecord, c: float
) -> DimensionPlan:
    """Chooses and saves budget c's plan and the model it was tested with (the model first: a saved plan implies
    its model)."""
    out = Path(config.output_dir)
    path, model_path = budget_dirs(out, c)
    plan, model = choose_plan(config, dataset, record, c, candidate_fits(config, dataset, out))
    save_checkpoint(model_path, model, model_meta(config, plan))
    plan.save(path)
    return plan


def _worker_logging(threads: int, log_level: int, label: str) -> None:
    torch.set_num_threads(threads)
    # force: an import may already have given the fresh process's root logger a handler, which would mute this one
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [{label}] %(message)s", force=True)


def _fit_worker(
    config: SearchExperimentConfig, base_dir: Path | None, sizes: dict[str, torch.Tensor], label: str, threads: int,
    log_level: int,
) -> None:
    """One candidate's retraining on train in a spawned process; its outcome goes to the search's fit store."""
    _worker_logging(threads, log_level, label)
    dataset = load_dataset(config.data, base_dir)
    log.info("retraining a candidate (%s)", summarise_sizes(sizes))
    fit_candidate(config, dataset, sizes, candidate_fits(config, dataset, Path(config.output_dir)))


def _retrain_worker(config: SearchExperimentConfig, base_dir: Path | None, c: float, threads: int, log_level: int):
    """One budget's retraining in a spawned process, from the finished search's saved record."""
    _worker_logging(threads, log_level, f"c={c:.2f}")
    search = config.search
    record = ConfigurationRecord(tuple(search.budgets), search.top_l)
    record.load_state_dict(torch.load(Path(config.output_dir) / STATE_FILE, weights_only=True)["record"])
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

    Under ``final`` the unit of work is one candidate's fit, not one budget: every budget's unfitted candidates
    (each distinct one once) are queued first, and a budget's test protocol is queued as soon as its candidates are
    fitted, reading their outcomes from the fit store. Three budgets on two workers then leave no worker idle for a
    whole budget. ``train_only`` tests the fitted weights, so there each budget is one unit. A failure is raised
    here, naming its budgets, after the other work has finished (their plans stay saved).
    """
    store = candidate_fits(config, dataset, Path(config.output_dir))
    errors: dict[float, BaseException] = {}
    waiting: dict[float, set[str]] = {}  # budget -> keys of the candidate fits it waits for
    to_fit: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}  # key -> (the first budget needing it, sizes)
    for c in budgets:
        waiting[c] = set()
        if config.protocol != "final":
            continue
        try:
            candidates, _ = budget_candidates(config, record, c)
        except Exception as error:  # noqa: BLE001 - reported with its budget below, like a worker's
            errors[c] = error
            continue
        for candidate in candidates:
            key = fit_key(store.recipe, candidate.sizes)
            if key in to_fit or store.get(candidate.sizes) is None:
                to_fit.setdefault(key, (f"c={c:.2f}", candidate.sizes))
                waiting[c].add(key)
    ready = [c for c in budgets if c not in errors and not waiting[c]]
    workers = min(workers, max(len(to_fit), len(budgets) - len(errors), 1))
    threads = max(1, torch.get_num_threads() // workers)
    level = logging.getLogger().getEffectiveLevel()
    log.info("retraining budgets %s in %d processes of %d thread(s) each: %d candidate fit(s), then the tests",
             list(budgets), workers, threads, len(to_fit))
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch's thread pools
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        running: dict[Future, tuple[str, Any]] = {
            pool.submit(_fit_worker, config, base_dir, sizes, label, threads, level): ("fit", key)
            for key, (label, sizes) in to_fit.items()
        }
        while ready or running:
            for c in ready:
                running[pool.submit(_retrain_worker, config, base_dir, c, threads, level)] = ("budget", c)
            ready = []
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for job in done:
                kind, what = running.pop(job)
                error = job.exception()
                if kind == "budget":
                    if error is not None:
                        errors[what] = error
                    continue
                for c, keys in waiting.items():
                    if what in keys:
                        keys.discard(what)
                        if error is not None:
                            errors.setdefault(c, error)
                        elif not keys and c not in errors:
                            ready.append(c)
    if errors:
        raise RuntimeError(f"retraining failed for budgets {sorted(errors)}: "
                           + "; ".join(f"c={c}: {error!r}" for c, error in sorted(errors.items())))


def summarise_sizes(sizes: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{s} mean size {sizes[s].double().mean().item():.1f}" for s in SIDES)


def candidate_fits(config: SearchExperimentConfig, dataset: RecDataset, out: Path) -> CandidateFits:
    """The search's store of candidate retrainings, keyed by everything a retraining on train depends on."""
    recipe = {"data": dataset.fingerprint, "model": to_dict(config.model), "train": to_dict(config.train)}
    return CandidateFits(out / "candidates", recipe)


def known_mean_q(mean_q: float) -> dict[str, float]:
    """The selection's mean q, left out for a repaired plan (its sizes were never visited, so never measured)."""
    return {"mean_q": mean_q} if math.isfinite(mean_q) else {}


def known(seconds: float) -> float | None:
    """None (null in search.json) for NaN: work saved before it was timed."""
    return None if math.isnan(seconds) else seconds


def budget_dirs(out: Path, c: float) -> tuple[Path, Path]:
    """Where budget c's plan and the model it was tested with are saved."""
    return out / "plans" / f"c{c:.2f}", out / "models" / f"c{c:.2f}"


def model_meta(config: SearchExperimentConfig, plan: DimensionPlan) -> dict[str, Any]:
    """Checkpoint metadata in the shape ``ciess train`` writes, so evaluation and the compressor rebuild it alike."""
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
    config: SearchExperimentConfig, record: ConfigurationRecord, c: float
) -> tuple[list[Visited], bool]:
    """Budget c's candidates and whether they were repaired: its top-l visited configurations (grown into the budget's
    unused part under ``fill_budget``), or, when none was visited, the sparsest visited one shrunk into it."""
    d_max = config.model.d_max
    candidates = record.best[c]
    if not candidates:  # nothing visited fits: shrink the sparsest visited configuration (order kept)
        if record.sparsest is None:
            raise RuntimeError("the search visited no configuration")
        sizes = repair_to_budget(record.sparsest.sizes, d_max, c)
        return [Visited(-1, sparsity(list(sizes.values()), d_max), float("nan"), sizes)], True
    if config.search.fill_budget:  # visited configurations may leave part of the budget unused
        candidates = [
            dataclasses.replace(v, sizes=fill_to_budget(v.sizes, d_max, c), sparsity=float("nan")) for v in candidates
        ]
    return list(candidates), False


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
    config: SearchExperimentConfig, dataset: RecDataset, record: ConfigurationRecord, c: float, fits: CandidateFits
) -> tuple[DimensionPlan, Recommender]:
    """Retrains the budget's top-l configurations, keeps the best on validation, tests it under the protocol.

    Returns the plan and the model it was tested with (under ``final``: retrained on train+validation). ``fits``
    holds the retrainings done before, for this budget, another, or a worker.
    """
    d_max = config.model.d_max
    candidates, repaired = budget_candidates(config, record, c)
    # `final` retrains the chosen sizes on train+validation, so a fit known from its outcome serves as well as one
    # in memory; `train_only` tests the fitted weights, so it always retrains.
    reads_fits = config.protocol == "final"
    best, reused, fit_seconds = None, 0, 0.0
    for candidate in candidates:
        fitted, fit = None, fits.get(candidate.sizes) if reads_fits else None
        if fit is None:
            fitted, fit = fit_candidate(config, dataset, candidate.sizes, fits)
        else:
            reused += 1
        fit_seconds += fit.seconds
        log.info("budget %.2f: candidate from step %d%s val %s", c, candidate.step,
                 " (retrained before)" if fitted is None else "", fit.val)
        if best is None or fit.val["recall@20"] > best[1].val["recall@20"]:
            best = (candidate, fit, fitted)
    candidate, fit, fitted = best
    started = time.perf_counter()
    model, _, test = score_with_protocol(
        dataset, sized_model(config, candidate.sizes), config.train, config.protocol, fitted, fit.best_batches
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
                "step": candidate.step,
                **known_mean_q(candidate.mean_q),
                "best_batches": fit.best_batches,
                "reused_fits": reused,  # candidates whose retraining another budget, run or worker had already done
                # its candidates' fits (as timed when they ran, whoever ran them; a fit two budgets share counts in
                # both) plus the test protocol: a sum of work, not the wall time of parallel workers
                "retrain_seconds": fit_seconds + test_seconds,
            },
        },
        seed=config.search.seed,
        config=to_dict(config),
        repaired=repaired,
    )
    return plan, model
