"""Sharded CIESS over every table of a CTR model (DLRM) under ONE global budget, run by torchrun on N ranks.

    torchrun --nproc_per_node=N training/search.py --config configs/ctr-smoke.yaml [--resume]

Read top to bottom. Every rank loads the data (replicated; each rank takes its slice of every global batch),
builds the DLRM with its tables on the meta device and shards them with DistributedModelParallel
(``sharding.py``), and initialises its shards from a hash of (seed, table, row, column), so the model is the same
whatever the sharding and world size. It trains the full-size reference, saves it with torch.distributed.checkpoint,
and scores its slice of the validation examples. Then, for every episode (all sizes back at d_max) and step:

1. one TD3 agent (replicated; gradients all-reduced, so replicas stay identical) proposes a size for every row
   whose state this rank keeps (the rows of its column-0 shards, ``layout.py``), exploration perturbs and walks;
2. the environment resets the model to the reference (``warm``) or to a fresh initialisation (``paper``), enforces
   the sizes on the local shards (column-wise co-holders get them from the row's primary rank), fine-tunes for
   ``environment.batches`` global batches (enforcing after every fused-optimizer step), and scores validation;
3. per-row quality (below) is routed to the rows' ranks (all-to-all), rewards r = q - lambda (d / d_max)^2 go to
   the rank's replay buffer, the agent updates, the configuration is recorded, and the step is checkpointed.

Per-row quality generalises the paper's item quality: q_n = min(1, P_n / P_n^ref), where P_n is the mean over the
validation examples whose bags contain row n of p(y | x), the probability the model gives the true label
(exp(-log-loss): higher is better, in (0, 1]), and P_n^ref the same for the full-size reference. Rows in no
validation example get q = 1 (no evidence of harm); the size penalty then shrinks them.

ONE global budget: sparsity = 1 - sum_n d_n / (rows * d_max) over every row of every table (all-reduced), so rows
of different tables compete for the same parameters; popularity is min-max normalised (log counts) within each
table. At the end, the top-l configurations per budget are retrained from a fresh initialisation, the best on
validation log-loss is tested (log-loss, AUC), and rank 0 writes one ``DimensionPlan`` per budget (tables named
by the EBC's table names), the same format as the single-process search.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ciess_prod.config import to_dict
from ciess_prod.data.ctr import CTRDataset, SyntheticCTRConfig, load_ctr
from ciess_prod.distributed.checkpoint import latest_step, load_state, save_state
from ciess_prod.distributed.layout import TableLayout, route_to_owners, table_layouts
from ciess_prod.distributed.rows import LocalShard, enforce_sizes, held_rows, init_shards, local_shards
from ciess_prod.distributed.sharding import ShardingConfig, shard_model
from ciess_prod.io import write_json_atomic
from ciess_prod.models.dlrm import DLRM, DLRMConfig
from ciess_prod.search.agent import TD3Agent
from ciess_prod.search.buffer import ReplayBuffer
from ciess_prod.search.exploration import Explorer
from ciess_prod.search.plan import DimensionPlan, repair_to_budget
from ciess_prod.search.search import SearchConfig, build_states
from ciess_prod.train.checkpoint import save_checkpoint

log = logging.getLogger(__name__)
EBC = "ebc"  # the DLRM's EmbeddingBagCollection attribute


# ---- configs -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CTRDataConfig:
    source: Literal["synthetic", "criteo", "avazu"] = "synthetic"  # which loader
    path: str | None = None  # file or directory of a real dataset (relative: to the working dir, then the repo)
    synthetic: SyntheticCTRConfig = field(default_factory=SyntheticCTRConfig)  # generator settings (synthetic)
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train / validation / test fractions
    split_seed: int = 0  # seed of the example permutation
    min_count: int = 1  # rarer raw values share the out-of-vocabulary row 0 (real data)


@dataclass(frozen=True)
class CTRTrainConfig:
    batch_size: int = 1024  # GLOBAL batch; each rank takes batch_size / world consecutive examples of it
    dense_lr: float = 1e-3  # Adam learning rate of the dense MLPs (tables use sharding.optimizer, fused)
    reference_batches: int = 300  # full-size reference training length
    final_batches: int = 300  # training length of each candidate plan, from a fresh initialisation
    eval_batch: int = 8192  # examples per rank per evaluation batch
    seed: int = 0  # model initialisation and batch order

    def __post_init__(self) -> None:
        for name in ("batch_size", "reference_batches", "final_batches", "eval_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.dense_lr <= 0:
            raise ValueError(f"train.dense_lr must be > 0, got {self.dense_lr}")


@dataclass(frozen=True)
class CTRSearchExperimentConfig:
    task: Literal["ctr"] = "ctr"  # marks a CTR search config (training/search.py dispatches on it)
    data: CTRDataConfig = field(default_factory=CTRDataConfig)
    model: DLRMConfig = field(default_factory=DLRMConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    train: CTRTrainConfig = field(default_factory=CTRTrainConfig)
    # budgets, episodes, TD3, exploration; environment.batches/lr: each step's fine-tune (warm: Adam lr of the dense
    # part; the tables keep sharding.lr)
    search: SearchConfig = field(default_factory=SearchConfig)
    output_dir: str = "runs/ctr-search"  # reference/, checkpoints/, plans/, history.json, search.json

    def __post_init__(self) -> None:
        if self.model.d_max < 2:
            raise ValueError(f"model.d_max must be >= 2 for a search, got {self.model.d_max}")
        if self.search.fill_budget or self.search.reward != "paper":
            raise ValueError("search.fill_budget and search.reward 'code' are not supported by the sharded search")
        impossible = [c for c in self.search.budgets if (1 - c) * self.model.d_max < 1]
        if impossible:
            raise ValueError(
                f"search.budgets {impossible} leave less than one column per row at d_max {self.model.d_max}"
            )


# ---- data ----------------------------------------------------------------------------------------------------------
def load_ctr_data(config: CTRDataConfig, base_dir: Path | None) -> CTRDataset:
    if config.source == "synthetic":
        return load_ctr("synthetic", config.synthetic)
    if config.path is None:
        raise ValueError(f"data.path is required for source {config.source!r}")
    path = Path(config.path)
    if not path.is_absolute() and not path.exists() and base_dir is not None:
        path = base_dir / path
    return load_ctr(config.source, path, min_count=config.min_count)


def rank_slice(indices: np.ndarray) -> np.ndarray:
    """This rank's consecutive share of a global batch (ranks may get one example more or less)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    bounds = np.linspace(0, len(indices), world + 1).round().astype(int)
    return indices[bounds[rank] : bounds[rank + 1]]


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN with a single class."""
    positives = labels > 0.5
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores.double())
    sorted_scores = scores.double()[order]
    ranks = torch.empty(len(scores), dtype=torch.float64)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    mean_rank = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, ranks[order]) / counts
    ranks[order] = mean_rank[inverse]
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def all_reduce(*values: float, op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
    """Element-wise reduction of a few scalars over the ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.tolist()


# ---- the rows this rank keeps the state of -------------------------------------------------------------------------
@dataclass
class KeptRows:
    """Per table: the row range whose search state lives here (None: none), its popularity state, its sizes."""

    span: dict[str, tuple[int, int] | None]
    popularity: dict[str, torch.Tensor]  # table -> float32 [kept rows] in [-1, 1]

    @property
    def tables(self) -> list[str]:
        return [t for t, s in self.span.items() if s is not None]

    def count(self, table: str) -> int:
        span = self.span[table]
        return 0 if span is None else span[1] - span[0]


def kept_rows(layouts: dict[str, TableLayout], counts: list[np.ndarray]) -> KeptRows:
    """Spans from the layout; popularity = min-max of log(1 + count) within each table (min/max all-reduced)."""
    rank = dist.get_rank()
    span = {t: layout.primary_rows(rank) for t, layout in layouts.items()}
    popularity = {}
    for (t, s), count in zip(span.items(), counts, strict=True):
        local = torch.from_numpy(np.log1p(count[s[0] : s[1]] if s else count[:0]).astype(np.float64))
        bounds = torch.tensor([-local.min().item() if len(local) else -math.inf,
                               local.max().item() if len(local) else -math.inf], dtype=torch.float64)
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
        lo, hi = -bounds[0].item(), bounds[1].item()
        popularity[t] = ((local - lo) / max(hi - lo, 1e-12) * 2 - 1).to(torch.float32)
    return KeptRows(span, popularity)


# ---- the environment: the sharded model, trained and scored at given sizes ---------------------------------------
class ShardedEnvironment:
    """The DMP-wrapped DLRM of this rank, its shards, the data slices, and the reference it restarts from."""

    def __init__(self, config: CTRSearchExperimentConfig, dataset: CTRDataset, device: torch.device) -> None:
        self.config, self.dataset, self.device = config, dataset, device
        self.train_idx, self.val_idx, self.test_idx = dataset.split_indices(config.data.split, config.data.split_seed)
        torch.manual_seed(config.train.seed)  # dense MLP init: the same on every rank
        model = DLRM(config.model, dataset.n_dense, dataset.table_sizes, dataset.feature_names, row_sizes="enforced")
        self.tables = list(model.table_names)
        self.table_ids = {t: i for i, t in enumerate(self.tables)}
        self.dense_init = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(EBC)}
        self.model = shard_model(model, EBC, config.sharding, device)
        self.layouts = table_layouts(self.model.plan, EBC, self.tables)
        self.shards: dict[str, list[LocalShard]] = local_shards(self.model, self.tables)
        self.held = {t: held_rows(s) for t, s in self.shards.items()}  # rows of any local shard (any column)
        self.reference: dict[str, Any] | None = None

    # -- state of the weights
    def reset_fresh(self) -> None:
        """The hashed initialisation of every shard and the seeded dense initialisation: a fresh model."""
        init_shards(self.shards, self.table_ids, self.config.model.init_std, self.config.train.seed)
        self._load_dense(self.dense_init)
        self._zero_fused_state()

    def snapshot_reference(self) -> None:
        self.reference = self.snapshot()

    def reset_to_reference(self) -> None:
        self.restore(self.reference)
        self._zero_fused_state()

    def snapshot(self) -> dict[str, Any]:
        """This rank's weights (local shards and dense part), to restore later."""
        return {
            "shards": {t: [s.weight.detach().clone() for s in parts] for t, parts in self.shards.items()},
            "dense": self._dense_state(),
        }

    def restore(self, snapshot: dict[str, Any]) -> None:
        with torch.no_grad():
            for t, parts in self.shards.items():
                for shard, saved in zip(parts, snapshot["shards"][t], strict=True):
                    shard.weight.copy_(saved)
        self._load_dense(snapshot["dense"])

    def gather_state(self, sizes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Rank 0: the state dict of a single-process masked DLRM with these weights and ``sizes``; else None.

        Collective. Every table is assembled whole on rank 0 from the ranks' shards: this is the export step.
        """
        pieces = {t: [(s.row_offset, s.col_offset, s.weight.detach().clone()) for s in parts]
                  for t, parts in self.shards.items()}
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.gather_object(pieces, gathered if dist.get_rank() == 0 else None, dst=0)
        if dist.get_rank() != 0:
            return None
        state = self._dense_state()
        for i, t in enumerate(self.tables):
            full = torch.zeros(self.layouts[t].rows, self.config.model.d_max)
            for rank_pieces in gathered:
                for row, col, weight in rank_pieces[t]:
                    full[row : row + weight.shape[0], col : col + weight.shape[1]] = weight
            state[f"ebc.embedding_bags.{t}.weight"] = full
            state[f"sizes_{i}"] = sizes[t].to(torch.int32)
        return state

    def _dense_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items() if ".embedding_bags." not in k}

    def _load_dense(self, state: dict[str, torch.Tensor]) -> None:
        current = self.model.state_dict()
        with torch.no_grad():
            for key, value in current.items():
                if ".embedding_bags." in key or not isinstance(value, torch.Tensor):
                    continue
                source = state.get(key, state.get(key.split("module.", 1)[-1]))
                value.copy_(source)

    def _zero_fused_state(self) -> None:
        """Fresh fused-optimizer state (e.g. row-wise Adagrad accumulators): every step starts alike."""
        with torch.no_grad():
            for per_param in self.model.fused_optimizer.state.values():
                for value in per_param.values():
                    if hasattr(value, "local_shards"):  # a ShardedTensor: its local shards are views
                        for shard in value.local_shards():
                            shard.tensor.zero_()
                    elif isinstance(value, torch.Tensor):
                        value.zero_()

    # -- sizes
    def apply_sizes(self, kept: KeptRows, sizes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Enforces the kept rows' sizes, sharing them with column-wise co-holders; returns held-row sizes."""
        held_sizes = {}
        for t in self.tables:
            layout, held = self.layouts[t], self.held[t]
            if layout.replicated_rows:  # every holder of these rows needs their sizes: the primary broadcasts
                full = torch.zeros(layout.rows, dtype=torch.int64)
                for shard in layout.primary:
                    part = full[shard.row_offset : shard.row_offset + shard.rows]
                    if shard.rank == dist.get_rank():
                        part.copy_(sizes[t])
                    dist.broadcast(part.contiguous(), src=shard.rank)
                    full[shard.row_offset : shard.row_offset + shard.rows] = part
                held_sizes[t] = full[held[0] : held[1]] if held else full[:0]
            else:
                held_sizes[t] = sizes[t] if held else torch.zeros(0, dtype=torch.int64)
            enforce_sizes(self.shards[t], held_sizes[t])
        return held_sizes

    # -- training and scoring
    def train(self, n_batches: int, held_sizes: dict[str, torch.Tensor], seed: int, dense_lr: float) -> None:
        """``n_batches`` global batches (this rank's slice of each), fresh Adam on the dense part at ``dense_lr``."""
        cfg = self.config.train
        optimizer = torch.optim.Adam(
            [p for n, p in self.model.named_parameters() if ".embedding_bags." not in n], lr=dense_lr
        )
        rng = np.random.default_rng(seed)
        self.model.train()
        for _ in range(n_batches):
            global_batch = rng.choice(self.train_idx, size=min(cfg.batch_size, len(self.train_idx)), replace=False)
            batch = self.dataset.batch(rank_slice(np.sort(global_batch)))
            logits = self.model(batch["dense"], batch["sparse"])
            loss = F.binary_cross_entropy_with_logits(logits, batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # the fused table optimizer steps here, trailing columns included
            optimizer.step()
            for t in self.tables:
                enforce_sizes(self.shards[t], held_sizes[t])

    @torch.no_grad()
    def predict(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(p(true label) [n], logits [n], per-feature bags as (example, id) pairs) for this rank's slice."""
        self.model.eval()
        mine, size = rank_slice(indices), self.config.train.eval_batch
        # Every rank must run the same number of forwards (the sharded EBC's all-to-alls are collective): a rank
        # with fewer chunks runs a throw-away forward of one example (an empty KJT does not pass through the EBC).
        (chunks,) = all_reduce(-(-len(mine) // size), op=dist.ReduceOp.MAX)
        chunks = int(chunks)
        p_true, logits_all, bags = [], [], [[] for _ in self.tables]
        for lo in range(0, chunks * size, size):
            part = mine[lo : lo + size]
            if len(part) == 0:
                filler = self.dataset.batch(indices[:1])
                self.model(filler["dense"], filler["sparse"])
                continue
            batch = self.dataset.batch(part)
            logits = self.model(batch["dense"], batch["sparse"])
            p = torch.sigmoid(logits)
            p_true.append(torch.where(batch["labels"] > 0.5, p, 1 - p).double())
            logits_all.append(logits)
            for f, jt in batch["sparse"].to_dict().items():
                example = torch.repeat_interleave(torch.arange(len(part)) + lo, jt.lengths().long())
                bags[self.dataset.feature_names.index(f)].append(torch.stack([example, jt.values()]))
        cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0)  # noqa: E731
        pairs = [torch.cat(b, dim=1) if b else torch.zeros(2, 0, dtype=torch.int64) for b in bags]
        return cat(p_true), cat(logits_all), pairs

    def row_means(self, p_true: torch.Tensor, pairs: list[torch.Tensor], kept: KeptRows) -> dict[str, torch.Tensor]:
        """Per kept row: (sum of p(true label) over validation examples containing it, count), routed to it."""
        out = {}
        for t, layout, pair in zip(self.tables, self.layouts.values(), pairs, strict=True):
            unique = torch.unique(pair, dim=1) if pair.numel() else pair  # an example counts once per row
            ids, example = unique[1], unique[0]
            values = torch.stack([p_true[example], torch.ones(len(ids), dtype=torch.float64)], dim=1)
            got_ids, got = route_to_owners(ids, values, layout.owners(ids))
            span = kept.span[t]
            sums = torch.zeros(kept.count(t), 2, dtype=torch.float64)
            if span is not None and len(got_ids):
                sums.index_add_(0, got_ids - span[0], got)
            out[t] = sums
        return out


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


def full_sizes(kept: KeptRows, d_max: int) -> dict[str, torch.Tensor]:
    return {t: torch.full((kept.count(t),), d_max, dtype=torch.int64) for t in kept.span}


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
    config: CTRSearchExperimentConfig,
    base_dir: Path | None = None,
    resume: bool = False,
    fail_at_step: int | None = None,
) -> dict[str, Any]:
    """Runs (or resumes from the last complete checkpoint) the sharded search; rank 0 writes the plans.

    ``fail_at_step``: SIGKILL this process once that many steps are checkpointed (fault-tolerance tests).
    """
    search, d_max = config.search, config.model.d_max
    out = Path(config.output_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    started = time.perf_counter()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if config.train.batch_size < world:
        raise ValueError(f"train.batch_size {config.train.batch_size} leaves some of the {world} ranks no example")
    dataset = load_ctr_data(config.data, base_dir)
    env = ShardedEnvironment(config, dataset, device)
    total_rows = sum(dataset.table_sizes)
    kept = kept_rows(env.layouts, dataset.row_popularity(env.train_idx))

    # the full-size reference: trained once, saved with torch.distributed.checkpoint, reloaded on resume
    reference_dir = out / "reference"
    env.reset_fresh()
    full = env.apply_sizes(kept, full_sizes(kept, d_max))
    if latest_step(reference_dir) is None:
        env.train(config.train.reference_batches, full, seed=config.train.seed, dense_lr=config.train.dense_lr)
        save_state(reference_dir, 0, {"model": env.model.state_dict()})
    else:
        load_state(reference_dir, 0, {"model": env.model.state_dict()})
    env.snapshot_reference()
    p_ref, _, pairs = env.predict(env.val_idx)  # validation examples (and their bags) are fixed: computed once
    ref_sums = env.row_means(p_ref, pairs, kept)
    loss_sum, n_val = all_reduce(float(-torch.log(p_ref).sum()), float(len(p_ref)))
    ref_logloss = loss_sum / n_val

    def quality(p_true: torch.Tensor) -> dict[str, torch.Tensor]:
        sums = env.row_means(p_true, pairs, kept)
        q = {}
        for t in env.tables:
            seen = ref_sums[t][:, 1] > 0
            ratio = torch.ones(kept.count(t), dtype=torch.float64)
            ratio[seen] = (sums[t][seen, 0] / ref_sums[t][seen, 0]).clamp(max=1.0)
            q[t] = ratio.to(torch.float32)
        return q

    agent = TD3Agent(search.td3, d_max, seed=search.seed)  # same seed on every rank: identical replicas
    explorer = Explorer(search.exploration, d_max, sum(kept.count(t) for t in env.tables), seed=search.seed + 1 + rank)
    buffer = ReplayBuffer(max(search.replay_bytes // world, 4096), seed=search.seed + 2 + rank)
    per_rank_batch = max(1, search.td3.batch_size // world)
    ones = {t: torch.ones(kept.count(t)) for t in env.tables}
    state = RankState(0, full_sizes(kept, d_max), ones, [], {c: [] for c in search.budgets}, None)
    checkpoints = out / "checkpoints"
    if resume and (last := latest_step(checkpoints)) is not None:
        blob = {"rank": _state_blob(state, agent, explorer, buffer)}
        load_state(checkpoints, last, blob, per_rank=True)
        _restore(blob["rank"], state, agent, explorer, buffer)
        log.info("rank %d resumed from step %d", rank, state.step)

    order = env.tables
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
        chosen = explorer.choose(states, agent.act(states), agent.q_values) if len(states) else sizes_now
        new_sizes = dict(zip(order, torch.split(chosen, [kept.count(t) for t in order]), strict=True))

        if search.environment.protocol == "warm":
            env.reset_to_reference()
        else:
            env.reset_fresh()
        held_sizes = env.apply_sizes(kept, new_sizes)
        step_lr = search.environment.lr if search.environment.protocol == "warm" else config.train.dense_lr
        env.train(search.environment.batches, held_sizes, seed=search.seed * 100_003 + state.step, dense_lr=step_lr)
        p_true, _, _ = env.predict(env.val_idx)
        new_q = quality(p_true)
        q_cat = torch.cat([new_q[t] for t in order])
        next_states = build_states(pop, chosen, q_cat, d_max)
        reward = q_cat - search.size_penalty * (chosen.float() / d_max) ** 2
        done = step == search.steps_per_episode - 1
        if len(states):
            buffer.add(states, chosen.float(), reward, next_states, done, max_rows=search.rows_per_step)
        (min_len,) = all_reduce(len(buffer), op=dist.ReduceOp.MIN)
        losses = agent.update(buffer, per_rank_batch, sync_mean) if min_len >= per_rank_batch else {}

        sparsity = global_sparsity(new_sizes, total_rows, d_max)
        q_sum, n_rows, r_sum, loss_sum, n_val = all_reduce(
            float(q_cat.double().sum()), float(len(q_cat)), float(reward.double().sum()),
            float(-torch.log(p_true).sum()), float(len(p_true)),
        )
        entry = {"episode": episode, "step": step, "global_step": state.step, "sparsity": sparsity,
                 "mean_q": q_sum / n_rows, "mean_reward": r_sum / n_rows, "val_logloss": loss_sum / n_val, **losses,
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
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
    search_seconds = time.perf_counter() - started
    replicas_identical = _replicas_identical(agent)

    plans = {}
    for c in search.budgets:
        plans[c], model_state = choose_plan(config, env, kept, state, c, dataset)
        if rank == 0:  # the model first: a saved plan implies its model
            save_checkpoint(out / "models" / f"c{c:.2f}", model_state, model_meta(config, dataset, plans[c]))
            plans[c].save(out / "plans" / f"c{c:.2f}")
    peak: list[Any] = [None] * world
    dist.all_gather_object(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    summary = {
        "finished": True,
        "completed_steps": state.step,
        "world_size": world,
        "sharding": {t: env.model.plan.plan[EBC][t].sharding_type for t in env.tables},
        "reference_val_logloss": ref_logloss,
        "agent_replicas_identical": replicas_identical,
        "peak_rss_mb_per_rank": peak,
        "search_seconds": search_seconds,
        "total_seconds": time.perf_counter() - started,
        "plans": {f"{c:.2f}": {"path": str(out / "plans" / f"c{c:.2f}"), "model": str(out / "models" / f"c{c:.2f}"),
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
    config: CTRSearchExperimentConfig,
    env: ShardedEnvironment,
    kept: KeptRows,
    state: RankState,
    c: float,
    dataset: CTRDataset,
) -> tuple[DimensionPlan, dict[str, torch.Tensor] | None]:
    """Retrains the budget's candidates from a fresh model, keeps the best validation log-loss, tests it.

    Returns the plan and, on rank 0, the state dict of a single-process (masked) DLRM holding that model
    (gathered whole: the export the compressor reads); None on other ranks.
    """
    d_max = config.model.d_max
    candidates, repaired = state.best[c], False
    if not candidates:  # nothing visited fits: the documented order-keeping repair of the sparsest, over ALL rows
        gathered = gather_sizes(kept, state.sparsest.sizes, env.tables, dataset.table_sizes)
        repaired_sizes = repair_to_budget(gathered, d_max, c)
        mine = {t: repaired_sizes[t][s[0] : s[1]] if s else repaired_sizes[t][:0] for t, s in kept.span.items()}
        candidates, repaired = [Candidate(-1, float("nan"), float("nan"), mine)], True
    best = None
    for candidate in candidates:
        val, test = retrain_and_score(config, env, kept, candidate.sizes)
        if best is None or val["logloss"] < best[1]["logloss"]:
            best = (candidate, val, test, env.snapshot())
    candidate, val, test, weights = best
    env.restore(weights)
    sizes = gather_sizes(kept, candidate.sizes, env.tables, dataset.table_sizes)
    plan = DimensionPlan(
        sizes=sizes,
        d_max=d_max,
        model="dlrm",
        dataset_fingerprint=dataset.fingerprint,
        target_sparsity=c,
        metrics={"val": val, "test": test, "selection": {"step": candidate.step, "mean_q": candidate.mean_q}},
        seed=config.search.seed,
        config=to_dict(config),
        repaired=repaired,
    )
    return plan, env.gather_state(sizes)


def model_meta(config: CTRSearchExperimentConfig, dataset: CTRDataset, plan: DimensionPlan) -> dict[str, Any]:
    """What ``load_trained_dlrm`` rebuilds the model from, plus provenance."""
    return {
        "task": "ctr",
        "config": to_dict(config),
        "n_dense": dataset.n_dense,
        "feature_names": list(dataset.feature_names),
        "table_sizes": [int(n) for n in dataset.table_sizes],
        "metrics": {"dataset_fingerprint": dataset.fingerprint, **plan.metrics},
        "plan_target_sparsity": plan.target_sparsity,
    }


def retrain_and_score(
    config: CTRSearchExperimentConfig, env: ShardedEnvironment, kept: KeptRows, sizes: dict[str, torch.Tensor]
) -> tuple[dict[str, float], dict[str, float]]:
    env.reset_fresh()
    held = env.apply_sizes(kept, {t: s.to(torch.int64) for t, s in sizes.items()})
    env.train(config.train.final_batches, held, seed=config.train.seed + 1, dense_lr=config.train.dense_lr)
    return score(env, env.val_idx), score(env, env.test_idx)


def score(env: ShardedEnvironment, indices: np.ndarray) -> dict[str, float]:
    """Log-loss and AUC over ``indices`` (each rank scores its slice; logits gathered for the AUC)."""
    p_true, logits, _ = env.predict(indices)
    loss_sum, n = all_reduce(float(-torch.log(p_true.clamp(min=1e-12)).sum()), float(len(p_true)))
    labels = torch.from_numpy(env.dataset.labels[rank_slice(indices)])
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (logits.double(), labels))
    all_logits = torch.cat([g[0] for g in gathered])
    all_labels = torch.cat([g[1] for g in gathered])
    return {"logloss": loss_sum / n, "auc": auc(all_logits, all_labels)}


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
