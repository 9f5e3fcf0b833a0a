"""Why a search chose what it chose: reads a search's saved state (agents, replay buffers, history).

Per run and side (users, items) it appends one JSON line to bench/results/search_diagnosis.jsonl and prints:
- the mean observed per-row reward by size bucket (from the replay buffer: what the environment paid);
- the critic's Q at a few sizes for buffer states at full size and at small size (< 8);
- the actor's mean size and pre-tanh output on those states (|pre-tanh| > 3: saturated, its gradient ~ 0);
- the mean reward and sparsity per step over stretches of the search (from the history);
- how many visited configurations meet each budget (what the final retraining can choose from);
- after a random warm-up (`--random-steps`), reward and q by size over its transitions, where sizes were drawn at
  random: what a row's own size does to its quality, free of the actor's choices.
- for each plan the run saved, how its sizes spread within the side and how much of that spread popularity explains
  (the spread left within 20 equal popularity bins, the correlation with log popularity): a plan's per-row choices
  carry a popularity signal only where the within-bin spread is well below the whole spread.

    python bench/search_diagnosis.py runs/ml1m-search runs/ml1m-search-no-walk [--config configs/ml1m-search.yaml]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ml1m_baselines import git_sha  # noqa: E402
from bench.ml1m_search import with_search_settings  # noqa: E402
from ciess_prod.config import load_yaml  # noqa: E402
from ciess_prod.experiment import load_dataset  # noqa: E402
from ciess_prod.io import append_jsonl  # noqa: E402
from ciess_prod.models import SIDES  # noqa: E402
from ciess_prod.runtime import configure_cpu  # noqa: E402
from ciess_prod.search.agent import STATE_DIM, TD3Agent  # noqa: E402
from ciess_prod.search.config import SearchExperimentConfig  # noqa: E402
from ciess_prod.search.plan import MANIFEST_NAME, DimensionPlan  # noqa: E402
from ciess_prod.search.search import STATE_FILE  # noqa: E402
from ciess_prod.search.selection import budget_dirs  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "search_diagnosis.jsonl"
SIZE_EDGES = (1, 4, 8, 16, 32, 64)  # reward buckets [1, 4), [4, 8), ..., [64, d_max]
STRETCHES = ((0, 10), (10, 30), (30, 100), (100, 200), (200, 300))  # steps [a, b) of the history
PROBE_ROWS = 2000  # buffer states per probe
POPULARITY_BINS = 20  # equal-count bins of a side's rows by train popularity (plan_scatter)


def mean_by_size(sizes: torch.Tensor, values: torch.Tensor, d_max: int) -> dict[str, float | None]:
    """Mean of ``values`` [T] per size bucket of ``sizes`` [T] (None where a bucket is empty)."""
    edges = torch.tensor([*(e for e in SIZE_EDGES if e <= d_max), d_max + 1], dtype=torch.float32)
    n = len(edges) - 1
    bucket = torch.bucketize(sizes.contiguous(), edges, right=True) - 1  # [T] bucket [edges[i], edges[i+1])
    counts = torch.bincount(bucket, minlength=n)[:n]
    sums = torch.bincount(bucket, weights=values.double(), minlength=n)[:n]
    return {f"[{lo},{hi})": (round(float(s / n), 4) if n else None)
            for lo, hi, s, n in zip(edges[:-1].int().tolist(), edges[1:].int().tolist(), sums, counts, strict=True)}


def size_response(sizes: torch.Tensor, q: torch.Tensor, popularity: torch.Tensor, d_max: int,
                  **others: torch.Tensor) -> dict:
    """Mean q, q by size (all rows and the most popular third) and each of ``others`` by size (``<name>_by_size``);
    every tensor [T] over the same rows."""
    popular = popularity >= torch.quantile(popularity.double(), 2 / 3)
    return {"mean_q": round(float(q.double().mean()), 4), "q_by_size": mean_by_size(sizes, q, d_max),
            "q_by_size_popular_third": mean_by_size(sizes[popular], q[popular], d_max),
            **{f"{name}_by_size": mean_by_size(sizes, values, d_max) for name, values in others.items()}}


def warm_up_response(buffer: torch.Tensor, transitions: int, d_max: int) -> dict:
    """Reward and q by size over the random warm-up's transitions (the buffer's first ``transitions``): sizes drawn
    at random, so unlike the whole buffer these show what a row's own size does to its quality, unconfounded."""
    part = buffer[:transitions]
    sizes, reward, q = part[:, STATE_DIM], part[:, STATE_DIM + 1], part[:, STATE_DIM + 2 + 2]
    return {"transitions": len(part), **size_response(sizes, q, part[:, 0], d_max, reward=reward)}


def plan_scatter(sizes: torch.Tensor, popularity: torch.Tensor, bins: int = POPULARITY_BINS) -> dict:
    """How one side's sizes [N] spread and how much of it train popularity [N] explains: the standard deviation
    left within ``bins`` equal-count popularity bins (pooled), the correlation with log(1 + popularity), the mean
    size per bin from the least to the most popular."""
    s = sizes.double()
    rank = torch.empty_like(popularity, dtype=torch.int64)
    rank[torch.argsort(popularity, stable=True)] = torch.arange(len(popularity))
    bin_of = rank * bins // len(popularity)  # [N] in [0, bins)
    counts = torch.bincount(bin_of, minlength=bins).double()
    means = torch.bincount(bin_of, weights=s, minlength=bins) / counts.clamp(min=1)
    within = ((s - means[bin_of]) ** 2).mean().sqrt()
    log_pop = torch.log1p(popularity.double())
    corr = torch.corrcoef(torch.stack([log_pop, s]))[0, 1] if s.std() > 0 and log_pop.std() > 0 else torch.tensor(0.0)
    return {"mean": round(float(s.mean()), 3), "std": round(float(s.std(correction=0)), 3),
            "std_within_popularity_bins": round(float(within), 3), "corr_log_popularity": round(float(corr), 3),
            "mean_by_popularity_bin": [round(float(m), 2) for m in means[counts > 0]]}


def plans_scatter(run: Path, budgets: tuple[float, ...], side: str, popularity: torch.Tensor) -> dict[str, dict]:
    """``plan_scatter`` of each budget's saved plan in ``run`` (budgets without one are left out)."""
    out = {}
    for c in budgets:
        path = budget_dirs(run, c)[0]
        if (path / MANIFEST_NAME).is_file():
            out[f"{c}"] = plan_scatter(DimensionPlan.load(path).sizes[side], popularity)
    return out


def diagnose_side(agent: TD3Agent, buffer: torch.Tensor, d_max: int) -> dict:
    """buffer: the replay data [T, 2 * STATE_DIM + 3] (state, size, reward, next_state, done)."""
    states, sizes, reward = buffer[:, :STATE_DIM], buffer[:, STATE_DIM].contiguous(), buffer[:, STATE_DIM + 1]
    rewards = mean_by_size(sizes, reward, d_max)
    previous = (states[:, 1] + 1) / 2 * (d_max - 1) + 1  # the state's current size, back in size units
    probe_sizes = torch.tensor([d for d in (1, 4, 16, 32, 64) if d < d_max] + [d_max], dtype=torch.float32)
    probes = {}
    for name, mask in (("from_full", previous > d_max - 0.5), ("from_small", previous < 8)):
        s = states[mask][:PROBE_ROWS]
        if len(s) == 0:
            continue
        with torch.no_grad():
            q = agent.q_values(s, probe_sizes.expand(len(s), -1).contiguous()).mean(0)
            pre = agent.actor.pre_tanh(s.to(agent.device))
        probes[name] = {
            "rows": len(s),
            "critic_q": {int(d): round(float(v), 4) for d, v in zip(probe_sizes, q, strict=True)},
            "actor_mean_size": round(float(agent.act(s).mean()), 2),
            "pre_tanh_mean": round(float(pre.mean()), 3),
            "pre_tanh_abs_min": round(float(pre.abs().min()), 3),
        }
    return {"transitions": len(sizes), "reward_by_size": rewards, "probes": probes}


def diagnose(run: Path, config: SearchExperimentConfig, popularity: dict[str, torch.Tensor]) -> list[dict]:
    """``config``: the search's config (its d_max, TD3 network shape and budgets); ``popularity``: each side's train
    popularity [N]."""
    state = torch.load(run / STATE_FILE, weights_only=True)
    steps = state["history"]  # the same list report/history.json gets, there before the retraining ends
    d_max = config.model.d_max
    by_stretch, sparsity_by_stretch = {}, {}
    for lo, hi in STRETCHES:
        part = steps[lo:hi]
        if part:
            by_stretch[f"{lo}-{hi}"] = round(sum(e["mean_reward"] for e in part) / len(part), 4)
            sparsity_by_stretch[f"{lo}-{hi}"] = round(sum(e["sparsity"] for e in part) / len(part), 4)
    # how many visited configurations each budget could choose from (the record keeps its top-l of them)
    meeting = {f"{c}": sum(e["sparsity"] >= c for e in steps) for c in config.search.budgets}
    records = []
    for side in SIDES:
        agent = TD3Agent(config.search.td3, d_max, seed=0)
        agent.load_state_dict(state["agents"][side])
        buffer = state["buffers"][side]
        record = {"run": run.name, "side": side, "completed_steps": state["step"],
                  "mean_reward_by_steps": by_stretch, "mean_sparsity_by_steps": sparsity_by_stretch,
                  "visited_meeting_budget": meeting, **diagnose_side(agent, buffer["data"], d_max),
                  "plan_scatter": plans_scatter(run, config.search.budgets, side, popularity[side]),
                  "git_sha": git_sha()}
        warm_up = min(config.search.exploration.random_steps, state["step"]) * len(state["sizes"][side])
        # every warm-up row is still in the buffer only if no step subsampled rows and it never wrapped
        if warm_up and config.search.rows_per_step is None and buffer["size"] < buffer["capacity"]:
            record["warm_up"] = warm_up_response(buffer["data"], warm_up, d_max)
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    configure_cpu()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="search output directories")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "ml1m-search.yaml")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--random-steps", type=int, metavar="N",
                        help="the search's random warm-up steps, where the config differs (bench --random-steps)")
    args = parser.parse_args(argv)
    config = load_yaml(SearchExperimentConfig, args.config)
    if args.random_steps is not None:
        config = with_search_settings(config, random_steps=args.random_steps)
    dataset = load_dataset(config.data, ROOT)
    popularity = {"user": torch.from_numpy(dataset.user_popularity()),
                  "item": torch.from_numpy(dataset.item_popularity())}
    for run in args.runs:
        for record in diagnose(run, config, popularity):
            append_jsonl(args.results, record)
            print(f"{record['run']} {record['side']}: reward by size {record['reward_by_size']}")
            for name, probe in record["probes"].items():
                print(f"  {name}: critic Q {probe['critic_q']} actor size {probe['actor_mean_size']} "
                      f"pre-tanh {probe['pre_tanh_mean']}")
            print(f"  mean reward by steps {record['mean_reward_by_steps']}")
            print(f"  mean sparsity by steps {record['mean_sparsity_by_steps']}")
            print(f"  visited configurations meeting each budget {record['visited_meeting_budget']}")
            for c, scatter in record["plan_scatter"].items():
                print(f"  plan c={c}: size mean {scatter['mean']} std {scatter['std']}, within popularity bins "
                      f"{scatter['std_within_popularity_bins']}, corr(log popularity) {scatter['corr_log_popularity']}")
            if "warm_up" in record:
                print(f"  random warm-up ({record['warm_up']['transitions']} transitions): q by size "
                      f"{record['warm_up']['q_by_size']}, popular third {record['warm_up']['q_by_size_popular_third']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
