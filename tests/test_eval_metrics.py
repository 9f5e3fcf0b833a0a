"""The chunked ranking metrics must agree with a plain per-user reference to 1e-6."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from ciess_prod.eval.metrics import (
    RankingResult,
    item_hit_quality,
    item_quality,
    rank_users,
    top_k_hits,
    top_k_items,
    user_quality,
)


def _random_csr(rng: np.random.Generator, n_users: int, n_items: int, density: float) -> sp.csr_matrix:
    dense = rng.random((n_users, n_items)) < density
    return sp.csr_matrix(dense.astype(np.float32))


def _reference(scores: np.ndarray, targets: sp.csr_matrix, exclude: list[sp.csr_matrix], k: int):
    """Per-user loops, written as plainly as possible: rank by (-score, item index)."""
    n_users, n_items = scores.shape
    recalls, ndcgs = [], []
    for u in range(n_users):
        excluded = set()
        for m in exclude:
            excluded |= set(m[u].indices.tolist())
        positives = set(targets[u].indices.tolist())
        if not positives:
            recalls.append(0.0)
            ndcgs.append(0.0)
            continue
        ranked = sorted((i for i in range(n_items) if i not in excluded), key=lambda i: (-scores[u, i], i))[:k]
        hits = [1.0 if i in positives else 0.0 for i in ranked]
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        idcg = sum(1.0 / math.log2(r + 2) for r in range(min(len(positives), k)))
        recalls.append(sum(hits) / len(positives))
        ndcgs.append(dcg / idcg)
    return np.array(recalls), np.array(ndcgs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_reference_with_ties_and_empty_users(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items = 37, 53
    # Few distinct score values force many ties, including ties at the top-k boundary.
    scores = rng.integers(0, 4, size=(n_users, n_items)).astype(np.float32)
    train = _random_csr(rng, n_users, n_items, 0.2)
    val = _random_csr(rng, n_users, n_items, 0.1) - train.multiply(_random_csr(rng, n_users, n_items, 1.0))
    val.data[:] = 1.0
    val.eliminate_zeros()
    test = _random_csr(rng, n_users, n_items, 0.15)
    test = (test - test.multiply(train) - test.multiply(val)).tocsr()
    test.eliminate_zeros()
    empty_users = [0, 5, 17]
    test = sp.lil_matrix(test)
    test[empty_users, :] = 0
    test = test.tocsr()
    test.eliminate_zeros()

    score_t = torch.from_numpy(scores)
    result = rank_users(lambda u: score_t[u], test, [train, val], ks=(5, 10, 20), chunk_size=8)
    for k in (5, 10, 20):
        ref_r, ref_n = _reference(scores, test, [train, val], k)
        np.testing.assert_allclose(result.recall[k].numpy(), ref_r, atol=1e-6)
        np.testing.assert_allclose(result.ndcg[k].numpy(), ref_n, atol=1e-6)
    assert not result.has_target[empty_users].any()
    assert result.mean()["recall@20"] == pytest.approx(float(np.mean(_reference(scores, test, [train, val], 20)[0])))


def test_top_k_hits_looks_up_each_users_own_targets():
    targets = sp.csr_matrix(np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 1]], dtype=np.float32))
    top = torch.tensor([[3, 2, 4], [0, 2, 4], [1, 0, 3]])  # 4 = padding (no item)
    hits = top_k_hits(top, targets, np.array([2, 1, 0]))  # list i belongs to user rows[i]
    assert hits.tolist() == [[True, False, False], [False, False, False], [False, True, False]]


def test_top_k_breaks_ties_by_item_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0]])
    assert top_k_items(scores, 2).tolist() == [[1, 2]]
    assert top_k_items(scores, 4).tolist() == [[1, 2, 4, 5]]


def test_quality_signals_follow_their_definitions():
    rng = np.random.default_rng(3)
    train = _random_csr(rng, 20, 30, 0.2)
    test = _random_csr(rng, 20, 30, 0.2)
    test = (test - test.multiply(train)).tocsr()
    test.eliminate_zeros()
    scores = torch.from_numpy(rng.random((20, 30)))
    result = rank_users(lambda u: scores[u], test, [train])
    q_user = user_quality(result)
    expected = sum((result.recall[k] + result.ndcg[k]) / 2 for k in (5, 10, 20)) / 3
    torch.testing.assert_close(q_user, expected)

    q_item = item_quality(q_user, train)
    for i in range(30):
        users = train[:, i].nonzero()[0]
        want = float(q_user[users].mean()) if len(users) else 0.0
        assert float(q_item[i]) == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_item_hit_quality_is_the_item_side_recall(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items = 23, 31
    scores = rng.integers(0, 5, size=(n_users, n_items)).astype(np.float64)  # ties at the cut-offs
    train = _random_csr(rng, n_users, n_items, 0.2)
    val = _random_csr(rng, n_users, n_items, 0.25)
    val = (val - val.multiply(train)).tocsr()
    val.eliminate_zeros()
    result = rank_users(lambda u: torch.from_numpy(scores)[u], val, [train], chunk_size=5)
    q = item_hit_quality(result, val)

    want = np.zeros(n_items)
    for k in (5, 10, 20):
        hits = np.zeros(n_items)
        for u in range(n_users):
            excluded = set(train[u].indices.tolist())
            ranked = sorted((i for i in range(n_items) if i not in excluded), key=lambda i: (-scores[u, i], i))[:k]
            for i in set(ranked) & set(val[u].indices.tolist()):
                hits[i] += 1
        want += hits / np.maximum(val.getnnz(axis=0), 1) / 3
    np.testing.assert_allclose(q.numpy(), want, atol=1e-12)
    assert (q[torch.from_numpy(val.getnnz(axis=0) == 0)] == 0).all()  # no target: 0, so q_n = 1 in the search
    assert q.max() > 0


def test_item_hit_quality_needs_counted_hits():
    result = RankingResult(ks=(5, 10, 20), recall={}, ndcg={}, has_target=torch.zeros(0, dtype=torch.bool))
    with pytest.raises(ValueError, match="counted item hits"):
        item_hit_quality(result, sp.csr_matrix((0, 4)))


def test_rank_users_rejects_bad_score_shapes():
    train = sp.csr_matrix((4, 6), dtype=np.float32)
    with pytest.raises(ValueError, match="score_fn returned shape"):
        rank_users(lambda u: torch.zeros(len(u), 5), train, [train])
