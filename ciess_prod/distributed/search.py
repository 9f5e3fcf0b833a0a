"""Sharded CIESS over every table of a model under ONE global budget, run by torchrun on N ranks.

    torchrun --nproc_per_node=N training/search.py --config configs/ctr-smoke.yaml [--resume]
    torchrun --nproc_per_node=N training/search.py --config configs/smoke.yaml [--resume]

Read top to bottom. The task's environment (``ctr.py``: a DLRM; ``recommender.py``: user/item tables) holds this
rank's shards of the DMP-wrapped model (``environment.py``). It trains the full-size reference, saves it with
torch.distributed.checkpoint, and measures every kept row's reference quality. Then, for every episode (all sizes
back at d_max) and step:

1. one TD3 agent (replicated; gradients all-reduced, so replicas stay identical) proposes a size for every row
   whose state this rank keeps (the rows of its column-0 shards, ``layout.py``), exploration perturbs and walks;
2. the environment resets the model to the reference (``warm``) or to a fresh initialisation (``paper``), enforces
   the sizes on the local shards (column-wise co-holders get them from the row's primary rank), trains for
   ``environment.batches`` global batches (enforcing after every fused-optimizer step), and measures each kept
   row's raw quality (the task says what it is; it reaches the row's rank by all-to-all);
3. q_n = min(1, raw_n / raw_n^ref) (1 where the reference scores 0: no evidence of harm), rewards
   r = q - lambda (d / d_max)^2 go to the rank's replay buffer, the agent updates, the configuration is recorded,
   and the step is checkpointed.

ONE global budget: sparsity = 1 - sum_n d_n / (rows * d_max) over every row of every table (all-reduced), so rows
of different tables compete for the same parameters. At the end, the top-l configurations per budget are
retrained from a fresh initialisation, the best on the task's validation metric is tested (under the task's
protocol), and rank 0 writes one
``DimensionPlan`` per budget (tables named by the EBC's table names) and the model it was tested with, the same
formats as the single-process search.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from ciess_prod.config import ConfigError, require_same_settings
from ciess_prod.distributed.checkpoint import latest_step, load_state, save_state
from ciess_prod.distributed.environment import KeptRows, all_reduce, full_sizes, kept_rows
from ciess_prod.distributed.layout import TableLayout
from ciess_prod.io import write_json_atomic
from ciess_prod.search.agent import TD3Agent
from ciess_prod.search.buffer import ReplayBuffer
from ciess_prod.search.config import SearchConfig
from ciess_prod.search.exploration import Explorer
from ciess_prod.search.plan import DimensionPlan, repair_to_budget
from ciess_prod.search.search import build_states
from ciess_prod.search.selection import budget_dirs, known_mean_q
from ciess_prod.train.checkpoint import save_checkpoint

log = logging.getLogger(__name__)
SETTINGS_FILE = "settings.json"  # what decided the checkpoints' steps (resumable_settings), beside them


class SearchTask(Protocol):
    """What the search needs of a task's environment (``ctr.CTREnvironment``, ``recommender.RecEnvironment``)."""

    name: str  # the plans' model name
    selection_metric: str  # the validation metric that picks a budget's candidate
    popularity_log_scale: bool  # the popularity state is min-max of log(1 + count) instead of count
    fingerprint: str  # of the dataset
    config_dict: dict[str, Any]  # the whole experiment config (stored in the plans)
    tables: list[str]
    layouts: dict[str, TableLayout]
    sharding_types: dict[str, str]
    model: torch.nn.Module

    def row_counts(self) -> list[np.ndarray]: ...  # per table: training occurrences of every row
    def checkpoint_state(self) -> dict[str, Any]: ...  # every weight, as views DCP saves from and loads into
    def reset_fresh(self) -> None: ...
    def snapshot_reference(self) -> None: ...
    def reset_to_reference(self) -> None: ...
    def snapshot(self) -> dict[str, Any]: ...
    def restore(self, snapshot: dict[str, Any]) -> None: ...
    def apply_sizes(self, kept: KeptRows, sizes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...
    def train_reference(self, held_sizes: dict[str, torch.Tensor]) -> None: ...
    def fine_tune(self, n_batches: int, held_sizes: dict[str, torch.Tensor], seed: int, warm: bool) -> None: ...
    # per kept row: raw quality float64 (higher is better, >= 0); plus scalars for the history
    def row_quality(self, kept: KeptRows) -> tuple[dict[str, torch.Tensor], dict[str, float]]: ...
    def retrain(self, held_sizes: dict[str, torch.Tensor]) -> dict[str, float]: ...  # fresh model: val metrics
    def test(self, held_sizes: dict[str, torch.Tensor]) -> dict[str, float]: ...  # the chosen one: test metrics
    def export_state(self, sizes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None: ...
    def model_meta(self, plan: DimensionPlan) -> dict[str, Any]: ...


LOWER_IS_BETTER = {"logloss"}


def better(metric: str, value: float, than: float) -> bool:
    return value < than if metric in LOWER_IS_BETTER else value > than


def quality_ratio(raw: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """q = min(1, raw / raw^ref); 1 where the reference scores 0 (nothing can be lost there). float32."""
    q = torch.where(reference > 0, raw / reference.clamp(min=1e-300), torch.ones_like(raw))
    return q.clamp(max=1.0).to(torch.float32)


# ---- checkpointed search state -------------------------------------------------------------------------------------
@dataclass
class Candidate:
    step: int
    sparsity: float
    mean_q: float
    sizes: dict[str, torch.Tensor]  # table -> int16 [kept rows of this rank]


@dataclass
class RankState:
    step: int
    sizes: dict[str, torch.Tensor]  # table -> int64 [kept rows]
    quality: dict[str, torch.Tensor]  # table -> float32 [kept rows]
    history: list[dict[str, float]]
    best: dict[float, list[Candidate]]
    sparsest: Candidate | None

    def record(self, visited: Candidate, budgets: tuple[float, ...], top_l: int) -> None:
        """Top-l per budget by mean q (ties: earliest step), and the sparsest: the same choice on every rank."""
        for c in budgets:
            if visited.sparsity >= c:
                self.best[c] = sorted([*self.best[c], visited], key=lambda v: (-v.mean_q, v.step))[:top_l]
        if self.sparsest is None or visited.sparsity > self.sparsest.sparsity:
            self.sparsest = visited


def global_sparsity(sizes: dict[str, torch.Tensor], total_rows: int, d_max: int) -> float:
    (kept,) = all_reduce(float(sum(int(s.sum()) for s in sizes.values())))
    return 1.0 - kept / (total_rows * d_max)


def sync_mean(module: torch.nn.Module) -> None:
    """All-reduce mean of a replicated network's gradients."""
    world = dist.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


# ---- the search ----------------------------------------------------------------------------------------------------
def run_sharded_search(
    env: SearchTask,
    search: SearchConfig,
    d_max: int,
    output_dir: str | Path,
    settings: dict[str, Any],
    resume: bool = False,
    fail_at_step: int | None = None,
) -> dict[str, Any]:
    """Runs (or resumes from the last complete checkpoint) the sharded search; rank 0 writes the plans.

    ``settings``: what decides the steps (``resumable_settings`` of the experiment config); a resume refuses
    checkpoints saved with other settings, or on another number of ranks.
    ``fail_at_step``: SIGKILL this process once that many steps are checkpointed (fault-tolerance tests).
    """
    if search.restarts != 1:
        raise ConfigError(f"search.restarts {search.restarts}: the sharded search runs one search; run one per seed "
                          "(search.seed), or the single-process search (run_search), which pools its restarts")
    out = Path(output_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    started = time.perf_counter()
    total_rows = sum(layout.rows for layout in env.layouts.values())
    kept = kept_rows(env.layouts, env.row_counts(), env.popularity_log_scale)

    # the settings the checkpoints were saved with (none: saved before they were kept, reused as before)
    settings, settings_path = {**settings, "world_size": world}, out / SETTINGS_FILE
    saved = json.loads(settings_path.read_text()) if settings_path.is_file() else None
    if resume:
        require_same_settings(saved, settings, f"the checkpoints in {out}")
    recipe = {key: value for key, value in settings.items() if key != "search"}  # what the reference depends on
    stale_reference = saved is not None and {k: v for k, v in saved.items() if k != "search"} != recipe
    dist.barrier()  # every rank has read the saved settings before rank 0 replaces them
    checkpoints = out / "checkpoints"
    if rank == 0:
        if not resume:  # a fresh start: a previous run's later steps must not be resumed after this run's
            shutil.rmtree(checkpoints, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(settings_path, settings)

    # the full-size reference: trained once, saved with torch.distributed.checkpoint, reloaded while its recipe holds
    reference_dir = out / "reference"
    env.reset_fresh()
    full = env.apply_sizes(kept, full_sizes(kept, d_max))
    if stale_reference or latest_step(reference_dir) is None:
        env.train_reference(full)
        save_state(reference_dir, 0, env.checkpoint_state())
    else:
        load_state(reference_dir, 0, env.checkpoint_state())
    env.snapshot_reference()
    ref_raw, ref_summary = env.row_quality(kept)

    agent = TD3Agent(search.td3, d_max, seed=search.seed)  # same seed on every rank: identical replicas
    explorer = Explorer(search.exploration, d_max, sum(kept.count(t) for t in env.tables), seed=search.seed + 1 + rank)
    buffer = ReplayBuffer(max(search.replay_bytes // world, 4096), seed=search.seed + 2 + rank)
    per_rank_batch = max(1, search.td3.batch_size // world)
    ones = {t: torch.ones(kept.count(t)) for t in env.tables}
    state = RankState(0, full_sizes(kept, d_max), ones, [], {c: [] for c in search.budgets}, None)
    if resume and (last := latest_step(checkpoints)) is not None:
        blob = {"rank": _state_blob(state, agent, explorer, buffer)}
        load_state(checkpoints, last, blob, per_rank=True)
        _restore(blob["rank"], state, agent, explorer, buffer)
        log.info("rank %d resumed from step %d", rank, state.step)

    order = env.tables
    warm = search.environment.protocol == "warm"
    total_steps = search.episodes * search.steps_per_episode
    while state.step < total_steps:
        step_started = time.perf_counter()
        episode, step = divmod(state.step, search.steps_per_episode)
        if step == 0:
            state.sizes, state.quality = full_sizes(kept, d_max), dict(ones)
            explorer.reset()
        pop = torch.cat([kept.popularity[t] for t in order])
        sizes_now = torch.cat([state.sizes[t] for t in order])
        q_now = torch.cat([state.quality[t] for t in order])
        states = build_states(pop, sizes_now, q_now, d_max)
        if state.step < search.exploration.random_steps:
            chosen = explorer.uniform(len(states))
        else:
            chosen = explorer.choose(states, agent.act(states), agent.q_values) if len(states) else sizes_now
        new_sizes = dict(zip(order, torch.split(chosen, [kept.count(t) for t in order]), strict=True))

        env.reset_to_reference() if warm else env.reset_fresh()
        held_sizes = env.apply_sizes(kept, new_sizes)
        env.fine_tune(search.environment.batches, held_sizes, seed=search.seed * 100_003 + state.step, warm=warm)
        raw, summary = env.row_quality(kept)
        new_q = {t: quality_ratio(raw[t], ref_raw[t]) for t in order}
        q_cat = torch.cat([new_q[t] for t in order])
        next_states = build_states(pop, chosen, q_cat, d_max)
        reward = q_cat - search.size_penalty * (chosen.float() / d_max) ** 2
        done = step == search.steps_per_episode - 1
        if len(states):
            buffer.add(states, chosen.float(), reward, next_states, done, max_rows=search.rows_per_step)
        (min_len,) = all_reduce(len(buffer), op=dist.ReduceOp.MIN)
        losses = agent.update(buffer, per_rank_batch, sync_mean) if min_len >= per_rank_batch else {}

        sparsity = global_sparsity(new_sizes, total_rows, d_max)
        q_sum, n_rows, r_sum = all_reduce(float(q_cat.double().sum()), float(len(q_cat)), float(reward.double().sum()))
        entry = {"episode": episode, "step": step, "global_step": state.step, "sparsity": sparsity,
                 "mean_q": q_sum / n_rows, "mean_reward": r_sum / n_rows, **summary, **losses,
                 "step_seconds": time.perf_counter() - step_started}
        state.record(Candidate(state.step, sparsity, entry["mean_q"], {t: new_sizes[t].to(torch.int16) for t in order}),
                     tuple(search.budgets), search.top_l)
        state.history.append(entry)
        state.sizes, state.quality = new_sizes, new_q
        state.step += 1
        save_state(checkpoints, state.step, {"rank": _state_blob(state, agent, explorer, buffer)}, per_rank=True)
        if rank == 0:
            log.info("step %d: %s", state.step, {k: round(v, 4) for k, v in entry.items()})
        if fail_at_step is not None and state.step == fail_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
    search_seconds = time.perf_counter() - started
    replicas_identical = _replicas_identical(agent)

    plans = {}
    for c in search.budgets:
        plans[c], model_state = choose_plan(env, search, d_max, kept, state, c)
        if rank == 0:  # the model first: a saved plan implies its model
            plan_dir, model_dir = budget_dirs(out, c)
            save_checkpoint(model_dir, model_state, env.model_meta(plans[c]))
            plans[c].save(plan_dir)
    peak: list[Any] = [None] * world
    dist.all_gather_object(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    summary = {
        "finished": True,
        "completed_steps": state.step,
        "world_size": world,
        "sharding": env.sharding_types,
        **{f"reference_{k}": v for k, v in ref_summary.items()},
        "agent_replicas_identical": replicas_identical,
        "peak_rss_mb_per_rank": peak,
        "search_seconds": search_seconds,
        "total_seconds": time.perf_counter() - started,
        "plans": {f"{c:.2f}": {"path": str(budget_dirs(out, c)[0]), "model": str(budget_dirs(out, c)[1]),
                               "achieved_sparsity": p.achieved_sparsity,
                               "repaired": p.repaired, **p.metrics} for c, p in plans.items()},
    }
    if rank == 0:
        write_json_atomic(out / "history.json", {"history": state.history})
        write_json_atomic(out / "search.json", summary)
    dist.barrier()
    return summary


def _replicas_identical(agent: TD3Agent) -> bool:
    """Whether every rank's agent holds bit-identical networks (element-wise max == min across ranks)."""
    nets = (agent.actor, agent.qf1, agent.qf2, agent.actor_target, agent.qf1_target, agent.qf2_target)
    flat = torch.cat([p.detach().flatten() for net in nets for p in net.parameters()])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return bool(torch.equal(high, low))


def _state_blob(state: RankState, agent: TD3Agent, explorer: Explorer, buffer: ReplayBuffer) -> dict[str, Any]:
    def candidate(v: Candidate | None) -> dict[str, Any] | None:
        return None if v is None else dataclasses.asdict(v)

    return {
        "step": state.step,
        "sizes": state.sizes,
        "quality": state.quality,
        "history": state.history,
        "best": {str(c): [candidate(v) for v in vs] for c, vs in state.best.items()},
        "sparsest": candidate(state.sparsest),
        "agent": agent.state_dict(),
        "explorer": explorer.state_dict(),
        "buffer": buffer.state_dict(),
    }


def _restore(blob: dict[str, Any], state: RankState, agent: TD3Agent, explorer: Explorer, buffer: ReplayBuffer) -> None:
    state.step, state.sizes, state.quality = blob["step"], blob["sizes"], blob["quality"]
    state.history = blob["history"]
    state.best = {c: [Candidate(**v) for v in blob["best"][str(c)]] for c in state.best}
    state.sparsest = Candidate(**blob["sparsest"]) if blob["sparsest"] else None
    agent.load_state_dict(blob["agent"])
    explorer.load_state_dict(blob["explorer"])
    buffer.load_state_dict(blob["buffer"])


# ---- final retraining and the plans --------------------------------------------------------------------------------
def choose_plan(
    env: SearchTask, search: SearchConfig, d_max: int, kept: KeptRows, state: RankState, c: float
) -> tuple[DimensionPlan, dict[str, torch.Tensor] | None]:
    """Retrains the budget's candidates from a fresh model, keeps the best on validation, tests it.

    Returns the plan and, on rank 0, the state dict of the single-process model holding that model (gathered
    whole: the export the compressor reads); None on other ranks.
    """
    table_sizes = [env.layouts[t].rows for t in env.tables]
    candidates, repaired = state.best[c], False
    if not candidates:  # nothing visited fits: the documented order-keeping repair of the sparsest, over ALL rows
        gathered = gather_sizes(kept, state.sparsest.sizes, env.tables, table_sizes)
        repaired_sizes = repair_to_budget(gathered, d_max, c)
        mine = {t: repaired_sizes[t][s[0] : s[1]] if s else repaired_sizes[t][:0] for t, s in kept.span.items()}
        candidates, repaired = [Candidate(-1, float("nan"), float("nan"), mine)], True
    best = None
    for candidate in candidates:
        env.reset_fresh()
        held = env.apply_sizes(kept, {t: s.to(torch.int64) for t, s in candidate.sizes.items()})
        val = env.retrain(held)
        if dist.get_rank() == 0:
            log.info("budget %.2f: candidate from step %d val %s", c, candidate.step, val)
        if best is None or better(env.selection_metric, val[env.selection_metric], best[1][env.selection_metric]):
            best = (candidate, val, env.snapshot())
    candidate, val, weights = best
    env.restore(weights)
    held = env.apply_sizes(kept, {t: s.to(torch.int64) for t, s in candidate.sizes.items()})
    test = env.test(held)  # leaves the tested model in place (the final protocol retrains it)
    sizes = gather_sizes(kept, candidate.sizes, env.tables, table_sizes)
    plan = DimensionPlan(
        sizes=sizes,
        d_max=d_max,
        model=env.name,
        dataset_fingerprint=env.fingerprint,
        target_sparsity=c,
        metrics={"val": val, "test": test, "selection": {"step": candidate.step, **known_mean_q(candidate.mean_q)}},
        seed=search.seed,
        config=env.config_dict,
        repaired=repaired,
    )
    return plan, env.export_state(sizes)


def gather_sizes(
    kept: KeptRows, local: dict[str, torch.Tensor], tables: list[str], table_sizes: list[int]
) -> dict[str, torch.Tensor]:
    """Every table's int16 sizes, assembled from each rank's kept rows (the plan is written whole)."""
    pieces: list[Any] = [None] * dist.get_world_size()
    mine = {t: (kept.span[t], local[t].to(torch.int16)) for t in tables if kept.span[t] is not None}
    dist.all_gather_object(pieces, mine)
    out = {t: torch.zeros(n, dtype=torch.int16) for t, n in zip(tables, table_sizes, strict=True)}
    for piece in pieces:
        for t, (span, sizes) in piece.items():
            out[t][span[0] : span[1]] = sizes
    return out
