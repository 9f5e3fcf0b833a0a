"""The user/item recommender task of the sharded search: MF, NeuMF, NGCF and LightGCN over sharded tables.

    torchrun --nproc_per_node=2 training/search.py --config configs/smoke.yaml

The model's tables (named as in the single-process model) form one EBC that DistributedModelParallel shards
(``environment.ShardedTables``); the search sizes two row groups, users and items (NeuMF's GMF and MLP rows of an
entity share one size). A rank OWNS the nodes of its primary row ranges (``layout.py``): their search state, their
layer embeddings, their ranking. No rank holds another rank's rows beyond what one computation needs:

- ego embeddings: each rank looks its owned rows up through the sharded EBC, in every table of their group (so
  the fused optimizer trains them), cut to their sizes (the prefix mask);
- LightGCN and NGCF propagation is a distributed sparse product: a rank multiplies its rows of D^-1/2 A D^-1/2
  by its own nodes' layer and the layer of its HALO (the neighbours other ranks own), fetched by an all-to-all
  each layer (differentiable, so gradients flow back to the owners; ``nodes.py``);
- the dense part (NGCF's layers, NeuMF's head) is replicated, seeded alike, and its gradients summed over the
  ranks before each Adam step;
- a BPR batch is drawn the same on every rank from the shared seed; each rank takes its slice and fetches the
  final and ego embeddings of its users and items from their owners. loss = sum over the slice / global batch,
  so the summed gradients equal one process's;
- ranking is split by users (each rank ranks its own users): item embeddings stream from their owners in pieces,
  each piece is scored and merged into every user's running top-k (ties: lower item index first, as in
  ``eval.metrics``), so no rank ever holds every item (``ranking.py``);
- per-row quality is the paper's: eval(user) = mean over k in {5, 10, 20} of (Recall@k + NDCG@k) / 2 on
  validation, eval(item) = mean eval(u) over the item's training users, routed to the item's owner.

Differences from the single-process search (``search/search.py``): the tables train with the fused optimizer of
``sharding`` (FBGEMM fuses SGD and row-wise Adagrad on CPU, not Adam) at the constant ``sharding.lr`` in every
phase (reference, search steps, retraining); ``train`` gives the batch size, L2, length and early stopping
(``train.lr``/``lr_decay`` and ``search.environment.lr`` drive Adam on the dense part only). NGCF's message
dropout draws per rank.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from ciess_prod.config import to_dict
from ciess_prod.data import BPRSampler, RecDataset
from ciess_prod.distributed.environment import (
    EBC,
    KeptRows,
    ShardedTables,
    all_reduce,
    check_batch_size,
    rank_slice,
    refuse_unsupported,
)
from ciess_prod.distributed.layout import route_to_owners
from ciess_prod.distributed.nodes import Nodes, ShardedGraph
from ciess_prod.distributed.ranking import Ranking, rank_streamed
from ciess_prod.distributed.sharding import ShardingConfig
from ciess_prod.eval.metrics import user_quality
from ciess_prod.models import SIDES
from ciess_prod.models.lightgcn import LightGCN, lightgcn_layers
from ciess_prod.models.mf import MF
from ciess_prod.models.neumf import NeuMF, NeuMFHead
from ciess_prod.models.ngcf import NGCF, NGCFLayers
from ciess_prod.models.sizes import mask_rows
from ciess_prod.search.config import SearchExperimentConfig
from ciess_prod.search.plan import DimensionPlan
from ciess_prod.search.selection import model_meta
from ciess_prod.train.protocol import REPORT_KS, RetrainConfig, retrain_batches
from ciess_prod.train.trainer import TrainConfig, learning_rate

log = logging.getLogger(__name__)
MODELS = {"mf": MF, "neumf": NeuMF, "ngcf": NGCF, "lightgcn": LightGCN}  # their table names and dense parts


@dataclass(frozen=True)
class ShardedSearchExperimentConfig(SearchExperimentConfig):
    """A recommender search config, plus how its tables are sharded when it runs on several processes."""

    sharding: ShardingConfig = field(default_factory=ShardingConfig)  # table sharding and fused table optimizer
    item_piece: int = 65_536  # items streamed per piece while ranking (bounds the per-rank score memory)

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_unsupported(self.search)
        if self.retrain != RetrainConfig():
            raise ValueError("retrain (several L2 weights, another cap or patience for the candidates' fits) is not "
                             "supported by the sharded search")
        if self.item_piece < 1:
            raise ValueError(f"item_piece must be >= 1, got {self.item_piece}")


class RecommenderTables(nn.Module):
    """The single-process model's tables (``tables``: name -> side, e.g. ``models.NeuMF.tables``) as one EBC on
    the meta device; each table's feature is its own name."""

    def __init__(self, tables: dict[str, str], n_users: int, n_items: int, d_max: int) -> None:
        super().__init__()
        rows = {"user": n_users, "item": n_items}
        self.ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=t, embedding_dim=d_max, num_embeddings=rows[s], feature_names=[t])
                    for t, s in tables.items()],
            device=torch.device("meta"),
        )

    def forward(self, ids: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        return self.ebc(ids).to_dict()


# ---- the environment -----------------------------------------------------------------------------------------------
class RecEnvironment(ShardedTables):
    """MF or LightGCN over this rank's shards: BPR training, user-split ranking, the paper's per-row quality."""

    selection_metric = "recall@20"  # candidates are chosen on the highest validation Recall@20
    popularity_log_scale = False  # as the single-process search: min-max of the training degrees

    def __init__(self, config: ShardedSearchExperimentConfig, dataset: RecDataset, device: torch.device) -> None:
        check_batch_size(config.train.batch_size)
        self.config, self.dataset = config, dataset
        self.name, self.fingerprint, self.config_dict = config.model.kind, dataset.fingerprint, to_dict(config)
        tables = MODELS[config.model.kind].tables
        groups = {side: [t for t, s in tables.items() if s == side] for side in SIDES}  # NeuMF: GMF and MLP tables
        model = RecommenderTables(tables, dataset.n_users, dataset.n_items, config.model.d_max)
        super().__init__(model, config.sharding, device, config.model.d_max, config.model.init_std, config.train.seed,
                         row_groups=groups)
        spans = {s: self.layouts[s].primary_rows(dist.get_rank()) for s in SIDES}
        owned = [torch.arange(*spans["user"]) if spans["user"] else torch.zeros(0, dtype=torch.int64),
                 torch.arange(*spans["item"]) + dataset.n_users if spans["item"] else torch.zeros(0, dtype=torch.int64)]
        # row-wise pooled outputs are reduce-scattered: every rank must send the same number of bags
        self.stride = int(max(all_reduce(*(float(len(o)) for o in owned), 1.0, op=dist.ReduceOp.MAX)))
        self.nodes = Nodes(dataset.n_users, torch.cat(owned), len(owned[0]),
                           self.layouts["user"].owners, self.layouts["item"].owners)
        graph_model = config.model.kind in ("lightgcn", "ngcf")
        self.graph = ShardedGraph(dataset.train, self.nodes) if config.model.n_layers and graph_model else None
        # the dense part (NGCF's layers, NeuMF's head): replicated (same seed on every rank), gradients summed
        torch.manual_seed(config.train.seed)
        kind, d_max = config.model.kind, config.model.d_max
        self.dense = {"ngcf": NGCFLayers, "neumf": NeuMFHead}[kind](config.model) if kind in ("ngcf", "neumf") else None
        self.dense_name = {"ngcf": "layers", "neumf": "head"}.get(kind)  # its attribute in the single-process model
        self.dense_start = copy.deepcopy(self.dense.state_dict()) if self.dense else None
        self.ego_dim = d_max * len(groups["user"])  # NeuMF: [GMF | MLP] columns
        self.out_dim = d_max * (config.model.n_layers + 1) if kind == "ngcf" else self.ego_dim  # final embeddings
        self.sizes: dict[str, torch.Tensor] = {}  # the owned rows' sizes (set by apply_sizes)
        self.best_batches = 0  # of the last early-stopped fit

    def graph_of(self, data: RecDataset) -> ShardedGraph | None:
        """The propagation graph of ``data``'s training interactions (None for MF)."""
        if self.graph is None or data is self.dataset:
            return self.graph
        return ShardedGraph(data.train, self.nodes)

    def row_counts(self) -> list[np.ndarray]:
        return [self.dataset.user_popularity(), self.dataset.item_popularity()]

    def apply_sizes(self, kept: KeptRows, sizes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.sizes = {s: sizes[s].to(torch.int64) for s in SIDES}
        return super().apply_sizes(kept, sizes)

    # -- the model
    def ego(self) -> torch.Tensor:
        """Owned nodes' layer-0 embeddings [n_owned, ego_dim] (NeuMF: GMF then MLP columns), cut to their sizes
        (a collective EBC lookup)."""
        n_user = len(self.sizes["user"])
        owned = {"user": self.nodes.owned[:n_user], "item": self.nodes.owned[n_user:] - self.dataset.n_users}
        stride = self.stride  # every feature has `stride` bags on every rank; the padding bags are empty
        keys = [t for s in SIDES for t in self.row_groups[s]]
        lengths = torch.zeros(len(keys), stride, dtype=torch.int32)
        values = []
        for i, t in enumerate(keys):
            ids = owned["user" if t in self.row_groups["user"] else "item"]
            lengths[i, : len(ids)] = 1
            values.append(ids)
        pooled = self.model(KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=lengths.view(-1)))
        sides = [torch.cat([mask_rows(pooled[t][: len(owned[s])], self.sizes[s]) for t in self.row_groups[s]], dim=1)
                 for s in SIDES]
        return torch.cat(sides)

    def score_pairs(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of paired final embeddings [B, out_dim] x [B, out_dim] -> [B]."""
        if self.dense_name != "head":
            return (users * items).sum(-1)
        d, head = self.d_max, self.dense
        return head.score(users[:, :d], items[:, :d], head.mlp_user_in(users[:, d:]), head.mlp_item_in(items[:, d:]))

    def score_all(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of every user against every item: [B, out_dim] x [P, out_dim] -> [B, P]."""
        if self.dense_name != "head":
            return users @ items.T
        d = self.d_max
        return self.dense.score_all_items(users[:, :d], users[:, d:], items[:, :d], items[:, d:])

    def final(self, ego: torch.Tensor, graph: ShardedGraph | None) -> torch.Tensor:
        """Owned nodes' final embeddings [n_owned, out_dim]: the model's layers over the distributed product."""
        if graph is None:
            return ego
        if self.dense_name == "layers":
            return self.dense(graph.propagate, ego)
        return lightgcn_layers(graph.propagate, ego, self.config.model.n_layers)

    # -- weights: the sharded tables plus the replicated dense part
    def reset_fresh(self) -> None:
        super().reset_fresh()
        if self.dense is not None:
            self.dense.load_state_dict(self.dense_start)

    def checkpoint_state(self) -> dict[str, Any]:
        state = super().checkpoint_state()
        return state if self.dense is None else {**state, "dense": self.dense.state_dict()}

    def snapshot(self) -> dict[str, Any]:
        dense = copy.deepcopy(self.dense.state_dict()) if self.dense is not None else None
        return {**super().snapshot(), "replicated": dense}

    def restore(self, snapshot: dict[str, Any]) -> None:
        super().restore(snapshot)
        if self.dense is not None:
            self.dense.load_state_dict(snapshot["replicated"])

    # -- training
    def fit(
        self, held_sizes: dict[str, torch.Tensor], seed: int, n_batches: int | None = None,
        data: RecDataset | None = None, graph: ShardedGraph | None = None, schedule: TrainConfig | None = None,
    ) -> dict[str, float]:
        """BPR training: ``n_batches`` exactly, or early-stopped on validation Recall@20 keeping the best weights
        (then returns the best validation means and sets ``best_batches``). ``data``/``graph``: the final
        protocol's train+validation view. ``schedule``: the Adam lr schedule of the dense part (default train)."""
        cfg, schedule = self.config.train, schedule or self.config.train
        data, graph = data or self.dataset, graph or self.graph
        optimizer = torch.optim.Adam(self.dense.parameters(), lr=schedule.lr) if self.dense is not None else None
        sampler = BPRSampler(data.train, batch_size=cfg.batch_size, seed=seed, mode=cfg.sampling)
        torch.manual_seed(seed * 7919 + dist.get_rank())  # NGCF's dropout: seeded per fit, so a resumed run repeats it
        early_stop = n_batches is None and data.val.nnz > 0
        total = cfg.max_batches if n_batches is None else n_batches
        best, best_val, stale = None, {}, 0
        mine = torch.from_numpy(rank_slice(np.arange(cfg.batch_size)))
        n_users = self.dataset.n_users
        for step in range(total):
            self.train_mode(True)
            users, pos, neg = (t[mine] for t in sampler.sample())
            ego = self.ego()
            rows = self.nodes.fetch(torch.cat([users, pos + n_users, neg + n_users]))
            fetched = rows(torch.cat([self.final(ego, graph), ego], dim=1))
            final_u, final_p, final_n = fetched[:, : self.out_dim].split(len(users))
            ego_u, ego_p, ego_n = fetched[:, self.out_dim :].split(len(users))
            bpr = F.softplus(self.score_pairs(final_u, final_n) - self.score_pairs(final_u, final_p)).sum()
            l2 = (ego_u.pow(2).sum() + ego_p.pow(2).sum() + ego_n.pow(2).sum()) / 2
            loss = (bpr + cfg.l2 * l2) / cfg.batch_size
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()  # the fused table optimizer steps here
            if optimizer is not None:  # each rank's gradient is its slice's share: their sum is the batch's
                for p in self.dense.parameters():
                    dist.all_reduce(p.grad)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(schedule, step)
                optimizer.step()
            self.enforce(held_sizes)
            done = step + 1
            if early_stop and (done % cfg.eval_every == 0 or done == total):
                val = self.ranking("val").means
                if dist.get_rank() == 0:
                    log.info("batch %d val %s", done, {k: round(v, 4) for k, v in val.items()})
                if best is None or val["recall@20"] > best_val["recall@20"]:
                    best, best_val, stale, self.best_batches = self.snapshot(), val, 0, done
                else:
                    stale += 1
                    if stale >= cfg.patience:
                        break
        if best is not None:
            self.restore(best)
        else:
            self.best_batches = total
        return best_val

    def train_reference(self, held_sizes: dict[str, torch.Tensor]) -> None:
        self.fit(held_sizes, seed=self.config.train.seed)

    def fine_tune(self, n_batches: int, held_sizes: dict[str, torch.Tensor], seed: int, warm: bool) -> None:
        """One step's training; warm fine-tunes the dense part at the constant ``search.environment.lr``."""
        env = self.config.search.environment
        schedule = dataclasses.replace(self.config.train, lr=env.lr, lr_decay=1.0) if warm else None
        self.fit(held_sizes, seed=seed, n_batches=n_batches, schedule=schedule)

    def train_mode(self, training: bool) -> None:
        self.model.train(training)
        if self.dense is not None:
            self.dense.train(training)

    def retrain(self, held_sizes: dict[str, torch.Tensor]) -> dict[str, float]:
        """A candidate from a fresh model, early-stopped on validation: its validation means."""
        val = self.fit(held_sizes, seed=self.config.train.seed)
        return val or self.ranking("val").means

    def test(self, held_sizes: dict[str, torch.Tensor]) -> dict[str, float]:
        """Test means under ``config.protocol``; ``final`` retrains a fresh model on train+validation first."""
        if self.config.protocol == "train_only":
            return self.ranking("test").means
        merged = self.dataset.with_validation_merged()
        self.reset_fresh()
        self.enforce(held_sizes)
        n_batches = retrain_batches(self.config.train, self.dataset, merged, self.best_batches)
        graph = self.graph_of(merged)
        self.fit(held_sizes, seed=self.config.train.seed, n_batches=n_batches, data=merged, graph=graph)
        return self.ranking("test", data=merged, graph=graph).means

    # -- ranking and quality
    @torch.no_grad()
    def ranking(self, split: str, data: RecDataset | None = None, graph: ShardedGraph | None = None) -> Ranking:
        """Full ranking of this rank's users on ``split`` (collective): validation excludes training items; test
        excludes training and validation items (under ``final``, ``data`` has them merged into training)."""
        data = data or self.dataset
        targets, exclude = (data.val, [data.train]) if split == "val" else (data.test, [data.train, data.val])
        self.train_mode(False)
        final = self.final(self.ego(), graph or self.graph_of(data))
        n_owned_users = self.nodes.n_owned_users
        users = self.nodes.owned[:n_owned_users].numpy()
        return rank_streamed(users, final[:n_owned_users], final[n_owned_users:], self.layouts["item"].primary,
                             targets, exclude, REPORT_KS, self.config.train.eval_chunk, self.config.item_piece,
                             score=self.score_all)

    def row_quality(self, kept: KeptRows) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """eval(user) of the owned users and eval(item) of the owned items on validation, and the mean Recall@20."""
        ranking = self.ranking("val")
        user_q = user_quality(ranking.result)
        users = self.nodes.owned[: self.nodes.n_owned_users].numpy()
        interactions = self.dataset.train[users].tocoo()
        items = torch.from_numpy(interactions.col.astype(np.int64))
        values = torch.stack([user_q[torch.from_numpy(interactions.row).long()],
                              torch.ones(len(items), dtype=torch.float64)], dim=1)
        got_items, got = route_to_owners(items, values, self.layouts["item"].owners(items))
        sums = torch.zeros(kept.count("item"), 2, dtype=torch.float64)
        if kept.span["item"] is not None and len(got_items):
            sums.index_add_(0, got_items - kept.span["item"][0], got)
        item_q = sums[:, 0] / sums[:, 1].clamp(min=1)
        return {"user": user_q, "item": item_q}, {"val_recall@20": ranking.means["recall@20"]}

    # -- export
    def export_state(self, sizes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Rank 0: the state dict of the single-process model (``models.MF``, ``NeuMF``, ...) at ``sizes``; else
        None."""
        tables = self.gather_tables()
        if tables is None:
            return None
        state = {f"{EBC}.embedding_bags.{t}.weight": weight for t, weight in tables.items()}
        state.update({f"{s}_sizes": sizes[s].to(torch.int32) for s in SIDES})
        if self.dense is not None:
            state.update({f"{self.dense_name}.{k}": v.detach().clone() for k, v in self.dense.state_dict().items()})
        return state

    def model_meta(self, plan: DimensionPlan) -> dict[str, Any]:
        return model_meta(self.config, plan)
