"""The user/item recommender task of the sharded search: MF, LightGCN and NGCF over sharded user and item tables.

    torchrun --nproc_per_node=2 training/search.py --config configs/smoke.yaml

The user and item tables form one EBC that DistributedModelParallel shards (``environment.ShardedTables``). A
rank OWNS the nodes of its primary row ranges (``layout.py``): their search state, their layer embeddings, their
ranking. No rank holds another rank's rows beyond what one computation needs:

- ego embeddings: each rank looks its owned rows up through the sharded EBC (so the fused optimizer trains
  them), cut to their sizes (the prefix mask);
- LightGCN and NGCF propagation is a distributed sparse product: a rank multiplies its rows of D^-1/2 A D^-1/2
  by its own nodes' layer and the layer of its HALO (the neighbours other ranks own), fetched by an all-to-all
  each layer (differentiable, so gradients flow back to the owners). NGCF's layer weights are replicated, seeded
  alike, and their gradients summed over the ranks before each Adam step;
- a BPR batch is drawn the same on every rank from the shared seed; each rank takes its slice and fetches the
  final and ego embeddings of its users and items from their owners. loss = sum over the slice / global batch,
  so the summed gradients equal one process's;
- ranking is split by users (each rank ranks its own users): item embeddings stream from their owners in pieces,
  each piece is scored and merged into every user's running top-k (ties: lower item index first, as in
  ``eval.metrics``), so no rank ever holds every item;
- per-row quality is the paper's: eval(user) = mean over k in {5, 10, 20} of (Recall@k + NDCG@k) / 2 on
  validation, eval(item) = mean eval(u) over the item's training users, routed to the item's owner.

Differences from the single-process search (``search/search.py``): the tables train with the fused optimizer of
``sharding`` (FBGEMM fuses SGD and row-wise Adagrad on CPU, not Adam) at the constant ``sharding.lr`` in every
phase (reference, search steps, retraining); ``train`` gives the batch size, L2, length and early stopping
(``train.lr``/``lr_decay`` and ``search.environment.lr`` drive Adam on NGCF's layer weights only). NGCF's
message dropout draws per rank. NeuMF (a dense tower over every user-item pair) runs single-process only.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
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
)
from ciess_prod.distributed.layout import route_to_owners
from ciess_prod.distributed.sharding import ShardingConfig
from ciess_prod.eval.metrics import RankingResult, top_k_items, top_k_metrics, user_quality
from ciess_prod.models import SIDES
from ciess_prod.models.graph import normalized_adjacency, sparse_matmul
from ciess_prod.models.lightgcn import lightgcn_layers
from ciess_prod.models.ngcf import NGCFLayers
from ciess_prod.models.sizes import mask_rows
from ciess_prod.search.plan import DimensionPlan
from ciess_prod.search.search import SearchExperimentConfig, model_meta
from ciess_prod.train.protocol import REPORT_KS, retrain_batches
from ciess_prod.train.trainer import TrainConfig, learning_rate

log = logging.getLogger(__name__)
SHARDED_KINDS = ("mf", "lightgcn", "ngcf")


@dataclass(frozen=True)
class ShardedSearchExperimentConfig(SearchExperimentConfig):
    """A recommender search config, plus how its tables are sharded when it runs on several processes."""

    sharding: ShardingConfig = field(default_factory=ShardingConfig)  # table sharding and fused table optimizer
    item_piece: int = 65_536  # items streamed per piece while ranking (bounds the per-rank score memory)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model.kind not in SHARDED_KINDS:
            raise ValueError(f"the sharded search supports model.kind {SHARDED_KINDS}, got {self.model.kind!r}; "
                             "run NeuMF searches in one process")
        if self.search.fill_budget or self.search.reward != "paper":
            raise ValueError("search.fill_budget and search.reward 'code' are not supported by the sharded search")
        if self.item_piece < 1:
            raise ValueError(f"item_piece must be >= 1, got {self.item_piece}")


class RecommenderTables(nn.Module):
    """The user and item tables (names "user", "item", as in ``models.MF``/``LightGCN``), on the meta device."""

    def __init__(self, n_users: int, n_items: int, d_max: int) -> None:
        super().__init__()
        rows = {"user": n_users, "item": n_items}
        self.ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=s, embedding_dim=d_max, num_embeddings=rows[s], feature_names=[s])
                    for s in SIDES],
            device=torch.device("meta"),
        )

    def forward(self, ids: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        return self.ebc(ids).to_dict()


# ---- moving node rows between ranks --------------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """Rows [n, d] sent in per-rank splits; the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.send, ctx.recv = send, recv
        return _exchange(x, send, recv)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _exchange(grad, ctx.recv, ctx.send), None, None


def _exchange(x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
    d = x.shape[1]
    out = torch.empty(sum(recv) * d, dtype=x.dtype)
    dist.all_to_all_single(out, x.detach().contiguous().view(-1), output_split_sizes=[c * d for c in recv],
                           input_split_sizes=[c * d for c in send])
    return out.view(-1, d)


class NodeFetch:
    """Fetches given rows of a node-sharded tensor from their owners (collective; differentiable).

    ``wanted``: global node ids [n]; ``owner``: their owner ranks [n]; ``local_index``: maps node ids this rank
    owns to rows of its owned tensor. The requests go out once here; every call then moves values only.
    """

    def __init__(self, wanted: torch.Tensor, owner: torch.Tensor, local_index: Callable[[torch.Tensor], torch.Tensor]):
        world = dist.get_world_size()
        order = torch.argsort(owner, stable=True)
        self.inverse = torch.argsort(order)
        asked = torch.bincount(owner, minlength=world)
        serve = torch.empty_like(asked)
        dist.all_to_all_single(serve, asked)
        self.recv, self.send = asked.tolist(), serve.tolist()
        requests = torch.empty(sum(self.send), dtype=torch.int64)
        dist.all_to_all_single(requests, wanted[order].contiguous(), output_split_sizes=self.send,
                               input_split_sizes=self.recv)
        self.serve_rows = local_index(requests)

    def __call__(self, owned: torch.Tensor) -> torch.Tensor:
        """Rows of ``wanted`` in its order [n, d], from every rank's ``owned`` [n_owned, d]."""
        return _AllToAll.apply(owned[self.serve_rows], self.send, self.recv)[self.inverse]


@dataclass
class Nodes:
    """The graph's nodes (users, then items offset by n_users) and which rank owns each."""

    n_users: int
    n_items: int
    owned: torch.Tensor  # sorted global node ids this rank owns [n_owned]
    user_span: tuple[int, int] | None
    item_span: tuple[int, int] | None
    user_owner: Callable[[torch.Tensor], torch.Tensor]
    item_owner: Callable[[torch.Tensor], torch.Tensor]

    @property
    def n_owned_users(self) -> int:
        return 0 if self.user_span is None else self.user_span[1] - self.user_span[0]

    def owner(self, nodes: torch.Tensor) -> torch.Tensor:
        is_user = nodes < self.n_users
        out = torch.empty_like(nodes)
        out[is_user] = self.user_owner(nodes[is_user])
        out[~is_user] = self.item_owner(nodes[~is_user] - self.n_users)
        return out

    def local_index(self, nodes: torch.Tensor) -> torch.Tensor:
        """Row of each owned node in the owned tensor (owned users first, then owned items)."""
        index = torch.searchsorted(self.owned, nodes)
        if len(nodes) and (index.max() >= len(self.owned) or not torch.equal(self.owned[index], nodes)):
            raise ValueError("asked for nodes this rank does not own")
        return index

    def fetch(self, nodes: torch.Tensor) -> NodeFetch:
        return NodeFetch(nodes, self.owner(nodes), self.local_index)


class ShardedGraph:
    """This rank's rows of D^-1/2 A D^-1/2 over (owned nodes, then halo nodes), and the halo's fetch."""

    def __init__(self, train: sp.csr_matrix, nodes: Nodes) -> None:
        rows = normalized_adjacency(train)[nodes.owned.numpy()]
        columns = np.unique(rows.indices)
        owned = nodes.owned.numpy()
        position = np.searchsorted(owned, columns).clip(max=max(len(owned) - 1, 0))
        is_owned = (owned[position] == columns) if len(owned) else np.zeros(len(columns), dtype=bool)
        halo = columns[~is_owned]
        column_of = np.empty(int(columns.max()) + 1 if len(columns) else 0, dtype=np.int64)
        column_of[columns[is_owned]] = position[is_owned]
        column_of[halo] = len(owned) + np.arange(len(halo))
        shape = (len(owned), len(owned) + len(halo))
        self.matrix = sp.csr_matrix((rows.data, column_of[rows.indices], rows.indptr), shape=shape)
        self.transposed = self.matrix.T.tocsr()
        self.halo = nodes.fetch(torch.from_numpy(halo.astype(np.int64)))

    def propagate(self, layer: torch.Tensor) -> torch.Tensor:
        """The next layer of the owned nodes from their current layer [n_owned, d] (collective)."""
        return sparse_matmul(self.matrix, self.transposed, torch.cat([layer, self.halo(layer)]))


# ---- the environment -----------------------------------------------------------------------------------------------
class RecEnvironment(ShardedTables):
    """MF or LightGCN over this rank's shards: BPR training, user-split ranking, the paper's per-row quality."""

    selection_metric = "recall@20"  # candidates are chosen on the highest validation Recall@20
    popularity_log_scale = False  # as the single-process search: min-max of the training degrees

    def __init__(self, config: ShardedSearchExperimentConfig, dataset: RecDataset, device: torch.device) -> None:
        check_batch_size(config.train.batch_size)
        self.config, self.dataset = config, dataset
        self.name, self.fingerprint, self.config_dict = config.model.kind, dataset.fingerprint, to_dict(config)
        model = RecommenderTables(dataset.n_users, dataset.n_items, config.model.d_max)
        super().__init__(model, config.sharding, device, config.model.d_max, config.model.init_std, config.train.seed)
        spans = {s: self.layouts[s].primary_rows(dist.get_rank()) for s in SIDES}
        owned = [torch.arange(*spans["user"]) if spans["user"] else torch.zeros(0, dtype=torch.int64),
                 torch.arange(*spans["item"]) + dataset.n_users if spans["item"] else torch.zeros(0, dtype=torch.int64)]
        self.nodes = Nodes(dataset.n_users, dataset.n_items, torch.cat(owned), spans["user"], spans["item"],
                           self.layouts["user"].owners, self.layouts["item"].owners)
        graph_model = config.model.kind in ("lightgcn", "ngcf")
        self.graph = ShardedGraph(dataset.train, self.nodes) if config.model.n_layers and graph_model else None
        # NGCF's layer weights: replicated (same seed on every rank), their gradients summed over the ranks
        torch.manual_seed(config.train.seed)
        self.layers = NGCFLayers(config.model) if config.model.kind == "ngcf" else None
        self.layers_init = copy.deepcopy(self.layers.state_dict()) if self.layers else None
        layers = config.model.n_layers + 1 if self.layers else 1
        self.out_dim = config.model.d_max * layers  # width of the final embeddings
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
        """Owned nodes' layer-0 embeddings [n_owned, d_max], cut to their sizes (collective EBC lookup)."""
        n_user, n_item = (len(self.sizes[s]) for s in SIDES)
        stride = max(n_user, n_item, 1)  # every feature has `stride` bags; the padding bags are empty
        lengths = torch.zeros(2, stride, dtype=torch.int32)
        lengths[0, :n_user], lengths[1, :n_item] = 1, 1
        ids = torch.cat([self.nodes.owned[:n_user], self.nodes.owned[n_user:] - self.dataset.n_users])
        pooled = self.model(KeyedJaggedTensor(keys=list(SIDES), values=ids, lengths=lengths.view(-1)))
        return torch.cat([mask_rows(pooled["user"][:n_user], self.sizes["user"]),
                          mask_rows(pooled["item"][:n_item], self.sizes["item"])])

    def final(self, ego: torch.Tensor, graph: ShardedGraph | None) -> torch.Tensor:
        """Owned nodes' final embeddings [n_owned, out_dim]: the model's layers over the distributed product."""
        if graph is None:
            return ego
        if self.layers is not None:
            return self.layers(graph.propagate, ego)
        return lightgcn_layers(graph.propagate, ego, self.config.model.n_layers)

    # -- weights: the sharded tables plus the replicated NGCF layers
    def reset_fresh(self) -> None:
        super().reset_fresh()
        if self.layers is not None:
            self.layers.load_state_dict(self.layers_init)

    def snapshot(self) -> dict[str, Any]:
        layers = copy.deepcopy(self.layers.state_dict()) if self.layers is not None else None
        return {**super().snapshot(), "layers": layers}

    def restore(self, snapshot: dict[str, Any]) -> None:
        super().restore(snapshot)
        if self.layers is not None:
            self.layers.load_state_dict(snapshot["layers"])

    # -- training
    def fit(
        self, held_sizes: dict[str, torch.Tensor], seed: int, n_batches: int | None = None,
        data: RecDataset | None = None, graph: ShardedGraph | None = None, schedule: TrainConfig | None = None,
    ) -> dict[str, float]:
        """BPR training: ``n_batches`` exactly, or early-stopped on validation Recall@20 keeping the best weights
        (then returns the best validation means and sets ``best_batches``). ``data``/``graph``: the final
        protocol's train+validation view. ``schedule``: the Adam lr schedule of NGCF's layers (default train)."""
        cfg, schedule = self.config.train, schedule or self.config.train
        data, graph = data or self.dataset, graph or self.graph
        optimizer = torch.optim.Adam(self.layers.parameters(), lr=schedule.lr) if self.layers is not None else None
        sampler = BPRSampler(data.train, batch_size=cfg.batch_size, seed=seed, mode=cfg.sampling)
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
            bpr = F.softplus((final_u * final_n).sum(-1) - (final_u * final_p).sum(-1)).sum()
            l2 = (ego_u.pow(2).sum() + ego_p.pow(2).sum() + ego_n.pow(2).sum()) / 2
            loss = (bpr + cfg.l2 * l2) / cfg.batch_size
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()  # the fused table optimizer steps here
            if optimizer is not None:  # each rank's gradient is its slice's share: their sum is the batch's
                for p in self.layers.parameters():
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
        """One step's training; warm fine-tunes NGCF's layers at the constant ``search.environment.lr``."""
        env = self.config.search.environment
        schedule = dataclasses.replace(self.config.train, lr=env.lr, lr_decay=1.0) if warm else None
        self.fit(held_sizes, seed=seed, n_batches=n_batches, schedule=schedule)

    def train_mode(self, training: bool) -> None:
        self.model.train(training)
        if self.layers is not None:
            self.layers.train(training)

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
        graph = graph or self.graph_of(data)
        final = self.final(self.ego(), graph)
        n_owned_users = self.nodes.n_owned_users
        users_emb, items_emb = final[:n_owned_users], final[n_owned_users:]
        users = self.nodes.owned[:n_owned_users].numpy()
        k, chunk = max(REPORT_KS), self.config.train.eval_chunk
        top_scores = torch.full((len(users), k), -torch.inf, dtype=torch.float64)
        top_items = torch.full((len(users), k), data.n_items, dtype=torch.int64)  # padding: no item
        excluded = [m[users] for m in exclude]
        piece = self.config.item_piece
        for shard in self.layouts["item"].primary:  # every owner streams its items, one piece at a time
            for lo in range(0, shard.rows, piece):
                hi = min(lo + piece, shard.rows)
                mine = shard.rank == dist.get_rank()
                emb = items_emb[lo:hi].contiguous() if mine else torch.empty(hi - lo, self.out_dim)
                dist.broadcast(emb, src=shard.rank)
                first = shard.row_offset + lo
                for start in range(0, len(users), chunk):
                    part = slice(start, start + chunk)
                    scores = (users_emb[part] @ emb.T).to(torch.float64)
                    for m in excluded:
                        block = m[part, first : first + hi - lo].tocoo()
                        scores[torch.from_numpy(block.row).long(), torch.from_numpy(block.col).long()] = -torch.inf
                    best = top_k_items(scores, k)
                    merged_scores = torch.cat([top_scores[part], scores.gather(1, best)], dim=1)
                    merged_items = torch.cat([top_items[part], best + first], dim=1)
                    by_item = torch.argsort(merged_items, dim=1, stable=True)  # ties: lower item first
                    order = by_item.gather(1, torch.argsort(merged_scores.gather(1, by_item), dim=1,
                                                            descending=True, stable=True))[:, :k]
                    top_scores[part], top_items[part] = merged_scores.gather(1, order), merged_items.gather(1, order)
        recall, ndcg = top_k_metrics(top_items, targets, users, REPORT_KS)
        has_target = torch.from_numpy(np.diff(targets.indptr)[users] > 0)
        return Ranking(RankingResult(REPORT_KS, recall, ndcg, has_target), data.n_users)

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
        """Rank 0: the state dict of the single-process ``models.MF``/``LightGCN``/``NGCF`` at ``sizes``; else None."""
        tables = self.gather_tables()
        if tables is None:
            return None
        state = {f"{EBC}.embedding_bags.{s}.weight": tables[s] for s in SIDES}
        state.update({f"{s}_sizes": sizes[s].to(torch.int32) for s in SIDES})
        if self.layers is not None:
            state.update({f"layers.{k}": v.detach().clone() for k, v in self.layers.state_dict().items()})
        return state

    def model_meta(self, plan: DimensionPlan) -> dict[str, Any]:
        return model_meta(self.config, plan)


@dataclass
class Ranking:
    """This rank's users' metrics, and their means over ALL users of the dataset (all-reduced on creation)."""

    result: RankingResult
    n_users: int
    means: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        names = [f"{m}@{k}" for k in self.result.ks for m in ("recall", "ndcg")]
        sums = [float(getattr(self.result, m)[k].sum()) for k in self.result.ks for m in ("recall", "ndcg")]
        self.means = {n: s / self.n_users for n, s in zip(names, all_reduce(*sums), strict=True)}
