"""CIESS: one search over per-row embedding sizes that serves a list of memory budgets.

Read top to bottom: train the full-size reference; then for every episode (all sizes start at d_max) and step,
each side's agent proposes sizes from per-row states, exploration perturbs them and walks the size graph, the
critic picks among the visited sizes, the environment trains and ranks at those sizes, rewards
r_n = q_n - lambda (d_n / d_max)^2 go to the replay buffer, and TD3 updates. Every visited configuration is
recorded; the best ``top_l`` per budget (those meeting it, ranked by mean q, or by a short retraining of the best
``probe_top``) are retrained to convergence, the best on validation is tested under the same protocol as the
baselines, and a ``DimensionPlan`` is written.
The state is checkpointed after every step; ``resume=True`` continues from the last completed step. With
``restarts`` > 1 several such searches (seeds seed, seed + 1, ...) run one after another and the plans are chosen
from all of their configurations.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ciess_prod.config import require_same_settings, to_dict
from ciess_prod.data import RecDataset
from ciess_prod.experiment import load_dataset
from ciess_prod.io import write_json_atomic
from ciess_prod.models import SIDES, Recommender, build_model, sparsity
from ciess_prod.search.agent import TD3Agent
from ciess_prod.search.buffer import ReplayBuffer
from ciess_prod.search.config import SearchConfig, SearchExperimentConfig, resumable_settings
from ciess_prod.search.environment import Quality, SizeEnvironment
from ciess_prod.search.exploration import Explorer
from ciess_prod.search.record import ConfigurationRecord, Visited
from ciess_prod.search.report import write_report
from ciess_prod.search.selection import budget_dirs, finished_plan, retrain_budget, retrain_in_workers
from ciess_prod.train.checkpoint import load_checkpoint, save_checkpoint
from ciess_prod.train.protocol import fit_on_train

log = logging.getLogger(__name__)

STATE_FILE = "search_state.pt"


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


def reward_terms(
    config: SearchConfig, quality: Quality, side: str, sizes: torch.Tensor, d_max: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward r_n = gain_n - lambda cost_n as (gain, cost): q_n and (d_n / d_max)^2 [P]; the code's variant uses
    raw eval and ((d_n - 1) / d_max)^2 [C]. Kept apart so the replay buffer prices every transition at the current
    lambda."""
    d = sizes.to(torch.float32)
    if config.reward == "paper":
        return quality.ratio[side], (d / d_max) ** 2
    return quality.raw[side].to(torch.float32), ((d - 1) / d_max) ** 2


PENALTY_RANGE = (1e-3, 1e3)  # bounds on lambda under `loosest`; `signed` keeps |lambda| <= PENALTY_RANGE[1]


def next_penalty(config: SearchConfig, integral: float, sparsity: float) -> tuple[float, float]:
    """(integral, lambda) for the next step: one dual-ascent step of the integral towards the target sparsity (the
    loosest budget plus ``penalty_margin``), and lambda = the integral plus ``penalty_gain`` times the same gap. A
    visited configuration denser than the target raises both and a sparser one lowers them, in proportion to the gap
    relative to the target's density (clipped to +-1). With ``penalty_gain`` 0 lambda is the integral.

    ``loosest`` steps log lambda, so lambda stays positive: once an actor is too sparse its one lever is lambda near
    0, where the gain hardly answers a row's own size and nothing pulls sizes back up. ``signed`` steps lambda itself
    (the target is an equality constraint, so its multiplier is signed): below 0 the reward pays for size."""
    if config.penalty_control == "fixed":
        return integral, integral
    target_density = 1 - (min(config.budgets) + config.penalty_margin)
    gap = min(max(((1 - sparsity) - target_density) / target_density, -1.0), 1.0)
    if config.penalty_control == "signed":
        low, high = -PENALTY_RANGE[1], PENALTY_RANGE[1]
        integral = min(max(integral + config.penalty_rate * gap, low), high)
        return integral, min(max(integral + config.penalty_gain * gap, low), high)
    low, high = PENALTY_RANGE
    integral = min(max(integral * math.exp(config.penalty_rate * gap), low), high)
    return integral, min(max(integral * math.exp(config.penalty_gain * gap), low), high)


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
    settings: dict[str, Any]  # what decides the steps (resumable_settings); resume refuses a state saved with others
    penalty: float  # lambda for the next step (size_penalty unless penalty_control adapts it)
    penalty_integral: float  # the value next_penalty steps; lambda less its proportional term (next_penalty)
    seconds: float = 0.0  # wall time of the completed steps, summed over every run that resumed this search

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "settings": self.settings,
            "seconds": self.seconds,
            "penalty": self.penalty,
            "penalty_integral": self.penalty_integral,
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
        self.penalty = float(state.get("penalty", self.penalty))  # saved before lambda could change: the config's
        self.penalty_integral = float(state.get("penalty_integral", self.penalty))  # saved before the gain: lambda


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


def restart_dir(out: Path, restart: int) -> Path:
    """Where a restart keeps its steps: restart 0 is the search at its own seed, in ``out`` itself, so that raising
    ``restarts`` on a finished search keeps its steps."""
    return out if restart == 0 else out / f"restart{restart}"


def restart_config(config: SearchExperimentConfig, restart: int) -> SearchExperimentConfig:
    """One restart as a search of its own: the same settings at seed ``seed + restart``, so its steps are those of a
    search started alone at that seed (and its saved state can be one)."""
    search = dataclasses.replace(config.search, seed=config.search.seed + restart, restarts=1)
    return dataclasses.replace(config, search=search, output_dir=str(restart_dir(Path(config.output_dir), restart)))


def run_steps(
    config: SearchExperimentConfig,
    dataset: RecDataset,
    env: SizeEnvironment,
    full: Quality,
    pop_state: dict[str, torch.Tensor],
    resume: bool,
    max_steps: int | None,
) -> tuple[SearchState, int]:
    """Runs (or resumes) one search's steps, at most ``max_steps`` of them in this call (0: only load the saved
    state); returns the state and the steps this call ran. ``pop_state``: each side's normalised popularity."""
    search, d_max = config.search, config.model.d_max
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_rows = {"user": dataset.n_users, "item": dataset.n_items}
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
        record=ConfigurationRecord(tuple(search.budgets), search.recorded),
        settings={**resumable_settings(config), "data_fingerprint": dataset.fingerprint},
        penalty=search.size_penalty,
        penalty_integral=search.size_penalty,
    )
    state_path = out / STATE_FILE
    if resume and state_path.is_file():
        saved = torch.load(state_path, weights_only=True)
        require_same_settings(saved.get("settings"), state.settings, f"the search state {state_path}")
        state.load_state_dict(saved)
        log.info("resumed %s from step %d", out, state.step)

    total = search.episodes * search.steps_per_episode
    last = total if max_steps is None else min(total, state.step + max_steps)
    if state.step >= last:
        return state, 0
    bar = tqdm(total=total, initial=state.step, desc=f"ciess search (seed {search.seed})",
               disable=not config.train.progress)
    steps_this_run = 0
    while state.step < last:
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
        step_rewards = []
        for s in SIDES:
            next_states = build_states(pop_state[s], new_sizes[s], quality.ratio[s], d_max)
            gain, cost = reward_terms(search, quality, s, new_sizes[s], d_max)
            state.buffers[s].add(
                states[s], new_sizes[s].float(), gain, next_states, done, max_rows=search.rows_per_step, costs=cost
            )
            losses = state.agents[s].update(state.buffers[s], penalty=state.penalty)
            reward = gain - state.penalty * cost
            step_rewards.append(reward)
            entry[f"mean_reward_{s}"] = float(reward.mean())
            entry[f"mean_size_{s}"] = float(new_sizes[s].float().mean())
            entry[f"mean_q_{s}"] = float(quality.ratio[s].mean())
            entry.update({f"{k}_{s}": v for k, v in losses.items()})
        entry["mean_reward"] = float(torch.cat(step_rewards).mean())
        entry["sparsity"] = sparsity([new_sizes[s] for s in SIDES], d_max)
        entry["size_penalty"] = state.penalty
        state.penalty_integral, state.penalty = next_penalty(search, state.penalty_integral, entry["sparsity"])
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
    bar.close()
    return state, steps_this_run


def restarts_history(states: Sequence[SearchState], episodes: int, total: int) -> list[dict[str, float]]:
    """The restarts' step histories one after another, each entry tagged with its restart and its episode and global
    step counted on from the previous restart's, so the report's per-episode summary keeps them apart."""
    return [
        {**h, "restart": r, "episode": h["episode"] + r * episodes, "global_step": h["global_step"] + r * total}
        for r, state in enumerate(states)
        for h in state.history
    ]


def run_search(
    config: SearchExperimentConfig,
    base_dir: Path | None = None,
    resume: bool = False,
    stop_after_steps: int | None = None,
    retrain_budgets: Sequence[float] | None = None,
    retrain_workers: int = 1,
) -> dict[str, Any]:
    """Runs (or resumes) the search, every restart's steps in turn, and the final retraining; returns the summary
    written to search.json.

    ``stop_after_steps`` ends the process-local run after that many completed steps (used to test resuming).
    ``retrain_budgets`` (with ``resume``, on a finished search) chooses only those budgets' plans in this process, so
    that separate processes retrain one search's budgets in parallel; the process that completes the last plan
    writes the report and search.json, the others return ``{"finished": False, "pending_budgets": [...], ...}`` with
    the search's and this process's seconds.
    ``retrain_workers`` > 1 retrains this process's budgets in that many worker processes at once, each with an
    equal share of this process's threads (the steps are sequential, the budgets' retrainings are not).
    """
    search = config.search
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
    full = env.full_size_quality()
    popularity = {"user": dataset.user_popularity(), "item": dataset.item_popularity()}
    pop_state = {s: normalise_popularity(popularity[s]) for s in SIDES}

    total = search.episodes * search.steps_per_episode
    states, steps_this_run = [], 0
    for restart in range(search.restarts):
        if retrain_budgets is not None:
            may_run = 0  # only load the state: retraining needs finished steps
        else:
            may_run = None if stop_after_steps is None else stop_after_steps - steps_this_run
        state, ran = run_steps(restart_config(config, restart), dataset, env, full, pop_state, resume, may_run)
        states.append(state)
        steps_this_run += ran
        if retrain_budgets is not None and state.step < total:
            raise ValueError(f"retrain_budgets needs a finished search; {restart_dir(out, restart)} has "
                             f"{state.step} of {total} steps")
        if state.step < total:
            return {"completed_steps": sum(s.step for s in states), "finished": False}
    record = ConfigurationRecord.pooled([s.record for s in states])  # one restart: its own record
    history = states[0].history if len(states) == 1 else restarts_history(states, search.episodes, total)
    search_seconds, completed_steps = sum(s.seconds for s in states), sum(s.step for s in states)

    # each plan is saved when chosen, so a resumed run skips finished budgets
    plans = {c: finished_plan(*budget_dirs(out, c), config, dataset) if resume else None for c in search.budgets}
    mine = [c for c, plan in plans.items() if plan is None and (retrain_budgets is None or c in retrain_budgets)]
    if retrain_workers > 1 and len(mine) > 1:
        retrain_in_workers(config, base_dir, dataset, record, mine, retrain_workers)
    else:
        for c in mine:
            plans[c] = retrain_budget(config, dataset, record, c)
    for c in search.budgets:  # workers, or other processes, may have finished budgets meanwhile
        plans[c] = plans[c] or finished_plan(*budget_dirs(out, c), config, dataset)
    pending = [c for c, plan in plans.items() if plan is None]
    if pending:  # the search's seconds, so that a process can report the budgets it retrained
        return {"finished": False, "completed_steps": completed_steps, "pending_budgets": pending,
                "search_seconds": known(search_seconds), "process_seconds": time.perf_counter() - started}
    write_report(out / "report", history, plans, popularity)
    retrain_seconds = sum(p.metrics["selection"].get("retrain_seconds", float("nan")) for p in plans.values())
    summary = {
        "finished": True,
        "completed_steps": completed_steps,  # over every restart
        "search_seconds": known(search_seconds),  # the steps, over all runs and restarts of this search
        "retrain_seconds": known(retrain_seconds),  # choosing every budget's plan, over all runs
        "total_seconds": known(search_seconds + retrain_seconds),  # the two above (the cached reference not included)
        "process_seconds": time.perf_counter() - started,  # this process only (a resumed run does part of the work)
        **({"restarts": [{"seed": search.seed + r, "completed_steps": s.step, "search_seconds": known(s.seconds)}
                         for r, s in enumerate(states)]} if len(states) > 1 else {}),
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


def known(seconds: float) -> float | None:
    """None (null in search.json) for NaN: work saved before it was timed."""
    return None if math.isnan(seconds) else seconds
