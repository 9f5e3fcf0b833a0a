"""Full ranking split over ranks by users, with item embeddings streamed from their owners.

Each rank ranks the users it owns. The owners of the items broadcast their final item embeddings one piece at a
time; every piece is scored against the rank's users (in chunks), masked, and merged into each user's running
top-k, ties broken toward the lower item index as in ``eval.metrics``. No rank ever holds every item, and the
result equals the single-process ranking of the same embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist

from ciess_prod.distributed.environment import all_reduce
from ciess_prod.distributed.layout import Shard
from ciess_prod.eval.metrics import RankingResult, top_k_hits, top_k_items, top_k_metrics


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


@torch.no_grad()
def rank_streamed(
    users: np.ndarray,
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    item_shards: tuple[Shard, ...],
    targets: sp.csr_matrix,
    exclude: list[sp.csr_matrix],
    ks: tuple[int, ...],
    chunk: int,
    piece: int,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda users, items: users @ items.T,
) -> Ranking:
    """Ranks every item for this rank's ``users`` (collective).

    users: global ids [U_r]; user_emb [U_r, d] their final embeddings; item_emb [I_r, d] the final embeddings of
    this rank's primary item rows; item_shards: every primary item range (``TableLayout.primary``); exclude:
    interaction matrices whose items are never ranked. ``chunk`` users and ``piece`` items are scored at once, by
    ``score`` ([B, d] users x [P, d] items -> [B, P]; default the dot product).
    """
    n_items, k = targets.shape[1], max(ks)
    top_scores = torch.full((len(users), k), -torch.inf, dtype=torch.float64)
    top_items = torch.full((len(users), k), n_items, dtype=torch.int64)  # padding: no item
    excluded = [m[users] for m in exclude]
    for shard in item_shards:  # every owner streams its items, one piece at a time
        for lo in range(0, shard.rows, piece):
            hi = min(lo + piece, shard.rows)
            mine = shard.rank == dist.get_rank()
            emb = item_emb[lo:hi].contiguous() if mine else torch.empty(hi - lo, item_emb.shape[1])
            dist.broadcast(emb, src=shard.rank)
            first = shard.row_offset + lo
            for start in range(0, len(users), chunk):
                part = slice(start, start + chunk)
                scores = score(user_emb[part], emb).to(torch.float64)
                for m in excluded:
                    block = m[part, first : first + hi - lo].tocoo()
                    scores[torch.from_numpy(block.row).long(), torch.from_numpy(block.col).long()] = -torch.inf
                best = top_k_items(scores, k)
                merged_scores = torch.cat([top_scores[part], scores.gather(1, best)], dim=1)
                merged_items = torch.cat([top_items[part], best + first], dim=1)
                by_item = torch.argsort(merged_items, dim=1, stable=True)  # ties: lower item first
                order = by_item.gather(1, torch.argsort(merged_scores.gather(1, by_item), dim=1, descending=True,
                                                        stable=True))[:, :k]
                top_scores[part], top_items[part] = merged_scores.gather(1, order), merged_items.gather(1, order)
    n_targets = torch.from_numpy(np.diff(targets.indptr)[users].astype(np.int64))
    recall, ndcg = top_k_metrics(top_k_hits(top_items, targets, users), n_targets, ks)
    has_target = n_targets > 0
    return Ranking(RankingResult(ks, recall, ndcg, has_target), targets.shape[0])
