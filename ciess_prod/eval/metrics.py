"""Full-ranking Recall@k / NDCG@k, computed in user chunks so no |U| x |I| score matrix ever exists.

Ranking rule (deterministic, so results are reproducible and testable): items are ordered by descending score;
equal scores are ordered by ascending item index. Excluded items (training items, and validation items when
testing) are never ranked. A user with no target items scores 0 on every metric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps a chunk of user indices [B] (int64) to scores over all items [B, n_items] (float)."""

QUALITY_KS = (5, 10, 20)
"""The cut-offs averaged by the CIESS quality signal eval(user)."""


@dataclass(frozen=True)
class RankingResult:
    """Per-user metrics: ``recall[k]`` and ``ndcg[k]`` are float64 tensors of shape [n_users]."""

    ks: tuple[int, ...]
    recall: dict[int, torch.Tensor]
    ndcg: dict[int, torch.Tensor]
    has_target: torch.Tensor  # bool [n_users]: the user has at least one target item
    # item_hits[k]: float64 [n_items], how many of the ranked users' targets at each item were in their top-k
    # (None where the ranking did not count them, e.g. the sharded ranking)
    item_hits: dict[int, torch.Tensor] | None = None

    def mean(self) -> dict[str, float]:
        """Means over ALL users (users without targets count as 0), keyed like ``recall@20``."""
        out: dict[str, float] = {}
        for k in self.ks:
            out[f"recall@{k}"] = float(self.recall[k].mean())
            out[f"ndcg@{k}"] = float(self.ndcg[k].mean())
        return out

    def mean_over_evaluable(self) -> dict[str, float]:
        """Means over users that have at least one target item (the usual reporting convention)."""
        mask = self.has_target
        denom = max(int(mask.sum()), 1)
        out: dict[str, float] = {}
        for k in self.ks:
            out[f"recall@{k}"] = float(self.recall[k][mask].sum() / denom)
            out[f"ndcg@{k}"] = float(self.ndcg[k][mask].sum() / denom)
        return out


def _rows_to_dense(matrix: sp.csr_matrix, rows: np.ndarray) -> torch.Tensor:
    """Densifies a chunk of CSR rows as a bool tensor [len(rows), n_cols]."""
    chunk = matrix[rows]
    dense = torch.zeros(chunk.shape, dtype=torch.bool)
    row_of = np.repeat(np.arange(chunk.shape[0]), np.diff(chunk.indptr))
    dense[torch.from_numpy(row_of), torch.from_numpy(chunk.indices.astype(np.int64))] = True
    return dense


def top_k_items(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] of the k best items per row, ties broken by ascending item index.

    ``torch.topk`` picks arbitrary members of a tie at the cut-off; this keeps its speed and makes the choice
    deterministic: everything strictly above the k-th value is in, and the tied items fill the remaining slots
    lowest index first.
    """
    k = min(k, scores.shape[1])
    kth = torch.topk(scores, k, dim=1, sorted=True).values[:, -1:]
    above = scores > kth
    tied = scores == kth
    slots = k - above.sum(dim=1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(dim=1) <= slots))
    items = chosen.nonzero()[:, 1].view(-1, k)  # row-major, so ascending item index within a row
    order = torch.sort(scores.gather(1, items), dim=1, descending=True, stable=True).indices
    return items.gather(1, order)


def top_k_hits(top: torch.Tensor, targets: sp.csr_matrix, rows: np.ndarray) -> torch.Tensor:
    """Whether each entry of the ranked lists ``top`` [B, k_max] of the users ``rows`` is one of that user's
    targets: bool [B, k_max]. Entries >= n_items are padding (no item: never a hit).

    Looks the (row, item) pairs up among the chunk's target pairs, so memory is O(B x k_max + the chunk's targets)
    rather than a dense [B, n_items] mask.
    """
    stride = targets.shape[1] + 1  # one past the padding index, so pairs of different rows never collide
    chunk = targets[rows]
    row_of = np.repeat(np.arange(chunk.shape[0], dtype=np.int64), np.diff(chunk.indptr))
    wanted = torch.from_numpy(row_of * stride + chunk.indices.astype(np.int64))
    ranked = torch.arange(top.shape[0], dtype=torch.int64).unsqueeze(1) * stride + top.clamp(max=stride - 1)
    return torch.isin(ranked, wanted)


def count_item_hits(top: torch.Tensor, hits: torch.Tensor, n_items: int, ks: Sequence[int]) -> dict[int, torch.Tensor]:
    """Per item, in how many of the ranked lists ``top`` [B, k_max] it is a hit within the top k (``hits`` from
    ``top_k_hits``): float64 [n_items] per k."""
    counts = {}
    for k in ks:
        kk = min(k, top.shape[1])
        counts[k] = torch.bincount(top[:, :kk][hits[:, :kk]], minlength=n_items)[:n_items].to(torch.float64)
    return counts


def top_k_metrics(
    hits: torch.Tensor, n_targets: torch.Tensor, ks: Sequence[int]
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Recall@k and NDCG@k [B] (float64) of ranked lists whose hits are ``hits`` [B, k_max] (``top_k_hits``),
    for users with ``n_targets`` [B] targets each. A user without targets scores 0.
    """
    k_max = hits.shape[1]
    discounts = 1.0 / torch.log2(torch.arange(2, k_max + 2, dtype=torch.float64))
    ideal = torch.cat([torch.zeros(1, dtype=torch.float64), discounts.cumsum(0)])  # ideal[n] = IDCG of n hits
    hits = hits.to(torch.float64)
    count = n_targets.to(torch.float64)
    dcg, found = (hits * discounts).cumsum(1), hits.cumsum(1)
    recall, ndcg = {}, {}
    for k in ks:
        kk = min(k, k_max)
        recall[k] = found[:, kk - 1] / count.clamp(min=1.0)
        ndcg[k] = dcg[:, kk - 1] / ideal[torch.clamp(count, max=kk).long()].clamp(min=1e-12)
    return recall, ndcg


def rank_users(
    score_fn: ScoreFn,
    targets: sp.csr_matrix,
    exclude: Sequence[sp.csr_matrix],
    ks: Sequence[int] = (5, 10, 20),
    users: np.ndarray | None = None,
    chunk_size: int = 1024,
) -> RankingResult:
    """Ranks all items for each user and scores the top-k against ``targets``.

    ``exclude`` holds interaction matrices whose items are removed from the ranking (training items for
    validation; training and validation items for test). Only ``users`` (default: all) are scored; the others
    get 0. Memory is O(chunk_size x n_items).
    """
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise ValueError(f"ranking cut-offs must be positive integers, got {ks}")
    n_users, n_items = targets.shape
    for m in exclude:
        if m.shape != targets.shape:
            raise ValueError(f"exclusion matrix shape {m.shape} does not match targets {targets.shape}")
    users = np.arange(n_users) if users is None else np.asarray(users, dtype=np.int64)
    k_max = max(ks)
    recall = {k: torch.zeros(n_users, dtype=torch.float64) for k in ks}
    ndcg = {k: torch.zeros(n_users, dtype=torch.float64) for k in ks}
    item_hits = {k: torch.zeros(n_items, dtype=torch.float64) for k in ks}
    n_targets = torch.from_numpy(np.diff(targets.indptr).astype(np.int64))

    for start in range(0, len(users), chunk_size):
        rows = users[start : start + chunk_size]
        rows_t = torch.from_numpy(rows)
        with torch.no_grad():
            scores = score_fn(rows_t).detach().to(torch.float64)
        if scores.shape != (len(rows), n_items):
            raise ValueError(f"score_fn returned shape {tuple(scores.shape)}, expected {(len(rows), n_items)}")
        scores = scores.clone()
        for m in exclude:
            scores[_rows_to_dense(m, rows)] = -torch.inf
        top = top_k_items(scores, k_max)
        hits = top_k_hits(top, targets, rows)
        chunk_recall, chunk_ndcg = top_k_metrics(hits, n_targets[rows_t], ks)
        chunk_hits = count_item_hits(top, hits, n_items, ks)
        for k in ks:
            recall[k][rows_t] = chunk_recall[k]
            ndcg[k][rows_t] = chunk_ndcg[k]
            item_hits[k] += chunk_hits[k]
    has_target = n_targets > 0
    for k in ks:
        recall[k][~has_target] = 0.0
        ndcg[k][~has_target] = 0.0
    return RankingResult(ks=ks, recall=recall, ndcg=ndcg, has_target=has_target, item_hits=item_hits)


def user_quality(result: RankingResult) -> torch.Tensor:
    """CIESS eval(user): mean over k in {5, 10, 20} of (Recall@k + NDCG@k) / 2, shape [n_users]."""
    missing = [k for k in QUALITY_KS if k not in result.ks]
    if missing:
        raise ValueError(f"user quality needs cut-offs {QUALITY_KS}; the ranking lacks {missing}")
    return torch.stack([(result.recall[k] + result.ndcg[k]) / 2 for k in QUALITY_KS]).mean(0)


def item_quality(user_q: torch.Tensor, train: sp.csr_matrix) -> torch.Tensor:
    """CIESS eval(item): mean eval(u) over the item's training users (0 for items with none), shape [n_items]."""
    coo = train.tocoo()
    users = torch.from_numpy(coo.row.astype(np.int64))
    items = torch.from_numpy(coo.col.astype(np.int64))
    n_items = train.shape[1]
    total = torch.zeros(n_items, dtype=user_q.dtype).index_add_(0, items, user_q[users])
    count = torch.zeros(n_items, dtype=user_q.dtype).index_add_(0, items, torch.ones_like(users, dtype=user_q.dtype))
    return total / count.clamp(min=1)


def item_hit_quality(result: RankingResult, targets: sp.csr_matrix) -> torch.Tensor:
    """eval(item) from the item's own targets: mean over k in {5, 10, 20} of the share of them ranked in their
    user's top-k (the item-side Recall@k; 0 for items with no target), shape [n_items]. ``result`` ranks every
    user (``rank_users``' default), as ``targets`` counts all of them.

    Unlike ``item_quality`` it moves with the item's own embedding rather than with its users' rankings of all
    items, so a search can credit an item's size to the item.
    """
    if result.item_hits is None:
        raise ValueError("item hit quality needs a ranking that counted item hits (rank_users)")
    missing = [k for k in QUALITY_KS if k not in result.ks]
    if missing:
        raise ValueError(f"item hit quality needs cut-offs {QUALITY_KS}; the ranking lacks {missing}")
    per_item = torch.from_numpy(np.asarray(targets.getnnz(axis=0), dtype=np.float64))
    return torch.stack([result.item_hits[k] for k in QUALITY_KS]).mean(0) / per_item.clamp(min=1.0)
