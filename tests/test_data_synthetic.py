"""Synthetic logs: determinism, power-law skew, and a planted signal that a low-rank model can learn."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse.linalg import svds

from ciess_prod.data import (
    DataError,
    RecDataset,
    SplitConfig,
    SyntheticConfig,
    build_dataset,
    generate_interactions,
)

SMALL = SyntheticConfig(n_users=600, n_items=400, interactions_per_user=30.0, seed=3)


def test_deterministic_from_seed() -> None:
    a, b = generate_interactions(SMALL), generate_interactions(SMALL)
    assert np.array_equal(a.users, b.users) and np.array_equal(a.items, b.items)
    c = generate_interactions(SyntheticConfig(n_users=600, n_items=400, interactions_per_user=30.0, seed=4))
    assert len(a) != len(c) or not np.array_equal(a.items, c.items)
    assert "seed=3" in a.source and a.folds is None


def test_ids_counts_and_no_duplicates() -> None:
    log = generate_interactions(SMALL)
    assert log.users.dtype == np.int64 and log.items.dtype == np.int64
    assert log.users.min() >= 0 and log.users.max() < SMALL.n_users
    assert log.items.min() >= 0 and log.items.max() < SMALL.n_items
    assert np.all(np.diff(log.users) >= 0)  # grouped by user
    per_user = np.bincount(log.users, minlength=SMALL.n_users)
    assert per_user.min() >= 5 and per_user.max() <= SMALL.n_items // 2
    assert abs(per_user.mean() - SMALL.interactions_per_user) < 1.0
    assert np.unique(log.users * SMALL.n_items + log.items).size == len(log)  # drawn without replacement


def test_power_law_popularity_and_activity() -> None:
    log = generate_interactions(
        SyntheticConfig(n_users=1000, n_items=800, interactions_per_user=30.0, seed=1)
    )
    item_deg = np.sort(np.bincount(log.items, minlength=800))[::-1]
    top_share = item_deg[:80].sum() / item_deg.sum()
    assert top_share > 0.25  # uniform popularity would give 0.10
    user_deg = np.sort(np.bincount(log.users, minlength=1000))[::-1]
    assert user_deg[:100].sum() / user_deg.sum() > 0.3
    assert user_deg[0] > 5 * np.median(user_deg)
    flat = generate_interactions(
        SyntheticConfig(n_users=1000, n_items=800, interactions_per_user=30.0, item_exponent=0.0, seed=1)
    )
    flat_deg = np.sort(np.bincount(flat.items, minlength=800))[::-1]
    assert flat_deg[:80].sum() / flat_deg.sum() < top_share  # the exponent controls the skew


def _recall_at(scores: np.ndarray, ds: RecDataset, k: int = 20) -> float:
    seen = (ds.train + ds.val).tocoo()
    scores = scores.copy()
    scores[seen.row, seen.col] = -np.inf
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    hits = np.take_along_axis(ds.test.toarray(), top, axis=1).sum(axis=1)
    n_test = np.diff(ds.test.indptr)
    mask = n_test > 0
    return float((hits[mask] / np.minimum(n_test[mask], k)).mean())


def test_planted_signal_beats_popularity() -> None:
    """A rank-16 PureSVD (the cheapest matrix factorisation) must clearly beat popularity ranking."""
    ds = build_dataset(generate_interactions(SyntheticConfig()), SplitConfig(), "synthetic")
    observed = (ds.train + ds.val).astype(np.float64)
    u, s, vt = svds(observed, k=16, random_state=0)
    mf = _recall_at((u * s) @ vt, ds)
    popularity = _recall_at(np.broadcast_to(np.asarray(observed.sum(axis=0)), (ds.n_users, ds.n_items)), ds)
    assert mf > 1.4 * popularity, (mf, popularity)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_users": 0}, "n_users must be >= 1"),
        ({"n_items": 8}, "n_items must be >= 10"),
        ({"interactions_per_user": 3.0}, r"interactions_per_user must lie in \[5, 750\]"),
        ({"interactions_per_user": 1000.0}, r"interactions_per_user must lie in \[5, 750\]"),
        ({"n_factors": 0}, "n_factors must be >= 1"),
        ({"item_exponent": -1.0}, "item_exponent must be a finite number >= 0"),
        ({"affinity_scale": float("inf")}, "affinity_scale must be a finite number >= 0"),
        ({"seed": -2}, "seed must be >= 0"),
        ({"n_users": 10.5}, "n_users must be an integer"),
    ],
)
def test_config_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(DataError, match=message):
        SyntheticConfig(**kwargs)  # type: ignore[arg-type]
