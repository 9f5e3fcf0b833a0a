"""The seeded per-user split: fractions, guarantees, determinism, folds, fingerprints and id mappings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from ciess_prod.data import (
    FOLD_TEST,
    FOLD_TRAIN,
    FOLD_VAL,
    DataError,
    InteractionLog,
    RecDataset,
    SplitConfig,
    build_dataset,
    load_interactions,
    load_mapping,
)

SHARED = Path("/work/shared/data")


def _random_log(seed: int = 0, n: int = 20_000, n_users: int = 500, n_items: int = 800) -> InteractionLog:
    """Sparse original ids (gaps, large values) and some duplicate pairs, like real logs."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n) * 7 + 1_000_000
    items = (rng.zipf(1.3, n) % n_items) * 3 + 5
    return InteractionLog(users=users.astype(np.int64), items=items.astype(np.int64), source="random")


def _pairs(matrix: sp.csr_matrix) -> set[tuple[int, int]]:
    coo = matrix.tocoo()
    return set(zip(coo.row.tolist(), coo.col.tolist(), strict=True))


def _check_well_formed(ds: RecDataset) -> None:
    for matrix in (ds.train, ds.val, ds.test):
        assert isinstance(matrix, sp.csr_matrix)
        assert matrix.shape == (ds.n_users, ds.n_items)
        assert matrix.dtype == np.float32
        assert matrix.has_sorted_indices
        assert np.all(matrix.data == 1.0)
    assert ds.user_ids.dtype == np.int64 and ds.item_ids.dtype == np.int64
    assert np.all(np.diff(ds.user_ids) > 0) and np.all(np.diff(ds.item_ids) > 0)
    assert len(ds.fingerprint[:64]) == 64 and int(ds.fingerprint[:64], 16) >= 0


def test_split_config_validation() -> None:
    SplitConfig(0.8, 0.0, 0.2)
    SplitConfig(0.7, 0.1, 0.2, seed=3)
    for bad in ((0.5, 0.25, 0.3), (0.0, 0.5, 0.5), (0.5, 0.5, 0.0), (1.2, -0.1, -0.1), (0.5, -0.1, 0.6)):
        with pytest.raises(DataError, match=r"SplitConfig"):
            SplitConfig(*bad)
    with pytest.raises(DataError, match=r"seed must be an integer >= 0"):
        SplitConfig(seed=-1)
    with pytest.raises(DataError, match=r"train must be a finite number"):
        SplitConfig(train=float("nan"))


def test_reindex_dedup_disjoint_union() -> None:
    log = _random_log()
    ds = build_dataset(log, SplitConfig(), "random")
    _check_well_formed(ds)
    assert np.array_equal(ds.user_ids, np.unique(log.users))
    assert np.array_equal(ds.item_ids, np.unique(log.items))
    train, val, test = _pairs(ds.train), _pairs(ds.val), _pairs(ds.test)
    assert not (train & val) and not (train & test) and not (val & test)
    originals = {(int(ds.user_ids[u]), int(ds.item_ids[i])) for u, i in train | val | test}
    expected = set(zip(log.users.tolist(), log.items.tolist(), strict=True))
    assert originals == expected  # duplicates dropped, nothing lost
    assert ds.train.nnz + ds.val.nnz + ds.test.nnz == len(expected) < len(log)


def test_split_fractions_and_guarantees() -> None:
    ds = build_dataset(_random_log(), SplitConfig(0.6, 0.2, 0.2, seed=1), "random")
    n_train, n_val, n_test = np.diff(ds.train.indptr), np.diff(ds.val.indptr), np.diff(ds.test.indptr)
    n_u = n_train + n_val + n_test
    assert np.all(n_train >= 1)  # every user keeps a train item
    assert np.all(n_test[n_u >= 3] >= 1)  # users with >= 3 interactions keep a test item
    big = n_u >= 20
    assert np.all(np.abs(n_train[big] - 0.6 * n_u[big]) <= 1.0)
    assert np.all(np.abs(n_val[big] - 0.2 * n_u[big]) <= 1.0)
    total = n_u.sum()
    assert abs(n_train.sum() / total - 0.6) < 0.02 and abs(n_test.sum() / total - 0.2) < 0.02


def test_small_users() -> None:
    users = np.array([0, 1, 1, 2, 2, 2, 3, 3, 3, 3])
    items = np.array([0, 0, 1, 0, 1, 2, 0, 1, 2, 3])
    for seed in range(20):
        ds = build_dataset(InteractionLog(users, items, "tiny"), SplitConfig(0.5, 0.25, 0.25, seed), "tiny")
        n_train, n_test = np.diff(ds.train.indptr), np.diff(ds.test.indptr)
        assert n_train.tolist()[0] == 1 and np.all(n_train >= 1)
        assert np.all(n_test[2:] >= 1)
    no_val = build_dataset(InteractionLog(users, items, "tiny"), SplitConfig(0.8, 0.0, 0.2), "tiny")
    assert no_val.val.nnz == 0 and np.all(np.diff(no_val.test.indptr)[2:] >= 1)


def test_determinism_and_seed_sensitivity() -> None:
    log = _random_log()
    a = build_dataset(log, SplitConfig(seed=0), "r")
    b = build_dataset(log, SplitConfig(seed=0), "r")
    c = build_dataset(log, SplitConfig(seed=1), "r")
    assert a.fingerprint == b.fingerprint
    for x, y in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert (x != y).nnz == 0
    assert c.fingerprint != a.fingerprint and (a.train != c.train).nnz > 0
    assert a.train.nnz == c.train.nnz  # same per-user counts, different items
    # Row order of the log does not matter: the split is a function of the set of interactions.
    perm = np.random.default_rng(5).permutation(len(log))
    shuffled = InteractionLog(log.users[perm], log.items[perm], "shuffled")
    d = build_dataset(shuffled, SplitConfig(seed=0), "r")
    assert d.fingerprint == a.fingerprint and (d.test != a.test).nnz == 0
    other = SplitConfig(0.5, 0.3, 0.2, seed=0)
    assert build_dataset(log, other, "r").fingerprint != a.fingerprint


def test_predefined_folds() -> None:
    rng = np.random.default_rng(0)
    train_u = np.repeat(np.arange(50), 10)
    train_i = np.concatenate([rng.choice(100, 10, replace=False) for _ in range(50)])
    test_u = np.repeat(np.arange(50), 4)
    test_i = np.concatenate(
        [np.setdiff1d(np.arange(100), train_i[k * 10 : k * 10 + 10])[:4] for k in range(50)]
    )
    test_u = np.concatenate([test_u, [50, 50, 50, 50, 51]])  # users 50/51 exist only in test.txt
    test_i = np.concatenate([test_i, [0, 1, 2, 3, 150]])  # item 150 exists only in test.txt
    log = InteractionLog(
        users=np.concatenate([train_u, test_u]),
        items=np.concatenate([train_i, test_i]),
        source="lightgcn",
        folds=np.concatenate([np.full(train_u.size, FOLD_TRAIN), np.full(test_u.size, FOLD_TEST)]).astype(
            np.int8
        ),
    )
    ds = build_dataset(log, SplitConfig(seed=2), "lg")
    _check_well_formed(ds)
    assert ds.n_users == 52 and ds.n_items == 101  # union over all splits
    train = _pairs(ds.train)
    assert {p for p in train if p[0] < 50} == set(zip(train_u.tolist(), train_i.tolist(), strict=True))
    n_val, n_test = np.diff(ds.val.indptr), np.diff(ds.test.indptr)
    assert np.all(n_val[:50] == 2) and np.all(n_test[:50] == 2)  # the test fold halves into val and test
    assert (
        np.diff(ds.train.indptr)[50] >= 1 and np.diff(ds.train.indptr)[51] == 1
    )  # test-only users get train
    test_fold = set(zip(test_u[:200].tolist(), test_i[:200].tolist(), strict=True))
    assert {p for p in _pairs(ds.val) | _pairs(ds.test) if p[0] < 50} == test_fold
    all_test = build_dataset(log, SplitConfig(0.8, 0.0, 0.2), "lg")
    assert all_test.val.nnz == 0 and np.all(np.diff(all_test.test.indptr)[:50] == 4)
    with_val_fold = InteractionLog(
        log.users, log.items, "f", folds=np.where(log.folds == 2, 1, 0).astype(np.int8)
    )
    assert build_dataset(with_val_fold, SplitConfig(), "f").val.nnz > 0
    assert FOLD_VAL == 1


def test_popularity_merge_summary_mapping(tmp_path: Path) -> None:
    ds = build_dataset(_random_log(), SplitConfig(), "random")
    user_pop, item_pop = ds.user_popularity(), ds.item_popularity()
    assert user_pop.dtype == np.int64 and item_pop.dtype == np.int64
    assert user_pop.sum() == item_pop.sum() == ds.train.nnz
    assert np.array_equal(item_pop, np.asarray(ds.train.sum(axis=0)).ravel().astype(np.int64))

    merged = ds.with_validation_merged()
    _check_well_formed(merged)
    assert merged.train.nnz == ds.train.nnz + ds.val.nnz and merged.val.nnz == 0
    assert merged.val.shape == ds.val.shape and (merged.test != ds.test).nnz == 0
    assert merged.fingerprint.startswith(ds.fingerprint) and merged.fingerprint != ds.fingerprint
    assert merged.with_validation_merged() is merged

    summary = ds.summary()
    json.dumps(summary)
    assert summary["n_train"] + summary["n_val"] + summary["n_test"] == summary["n_interactions"]
    assert summary["n_users"] == ds.n_users and summary["fingerprint"] == ds.fingerprint
    assert 0 < summary["density"] < 1

    path = tmp_path / "maps" / "mapping.npz"
    ds.save_mapping(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["mapping.npz"]  # no temp file left
    back = load_mapping(path)
    assert np.array_equal(back["user_ids"], ds.user_ids) and np.array_equal(back["item_ids"], ds.item_ids)
    assert back["fingerprint"] == ds.fingerprint and back["name"] == "random"
    with pytest.raises(DataError, match=r"missing\.npz: no such mapping file"):
        load_mapping(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_text("junk")
    with pytest.raises(DataError, match=r"junk\.npz: not a valid id-mapping file"):
        load_mapping(tmp_path / "junk.npz")


def test_real_movielens_1m() -> None:
    path = SHARED / "movielens-1m" / "ratings.csv.gz"
    if not path.is_file():
        pytest.skip("shared ML-1M copy not available")
    log = load_interactions(path)
    assert len(log) == 1_000_209
    ds = build_dataset(log, SplitConfig(), "ml-1m")
    assert (ds.n_users, ds.n_items) == (6040, 3706)
    s = ds.summary()
    assert s["n_interactions"] == 1_000_209
    assert abs(s["n_train"] / 1_000_209 - 0.5) < 0.005
    assert abs(s["n_val"] / 1_000_209 - 0.25) < 0.005
    assert abs(s["n_test"] / 1_000_209 - 0.25) < 0.005
    assert s["users_with_test"] == 6040
    assert ds.user_ids[0] == 1 and ds.user_ids[-1] == 6040
