"""BPR sampler: valid triples, exact reproducibility and resumption, and the sampling distributions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from ciess_prod.data import BPRSampler, DataError


def _train(n_users: int = 300, n_items: int = 200, seed: int = 0) -> sp.csr_matrix:
    """Skewed degrees, including an empty user and a user who has every item."""
    rng = np.random.default_rng(seed)
    degrees = np.minimum(rng.zipf(1.6, n_users), n_items - 1)
    degrees[0], degrees[1], degrees[2] = 0, n_items, n_items - 1
    rows = np.repeat(np.arange(n_users), degrees)
    cols = np.concatenate([rng.choice(n_items, d, replace=False) for d in degrees])
    return sp.csr_matrix((np.ones(rows.size, np.float32), (rows, cols)), shape=(n_users, n_items))


def _in_train(train: sp.csr_matrix, users: torch.Tensor, items: torch.Tensor) -> np.ndarray:
    return np.asarray(train[users.numpy().copy(), items.numpy().copy()]).ravel() > 0


@pytest.mark.parametrize("mode", ["users", "interactions"])
def test_triples_are_valid(mode: str) -> None:
    train = _train()
    sampler = BPRSampler(train, batch_size=4096, seed=0, mode=mode)
    for _ in range(5):
        users, pos, neg = sampler.sample()
        for t in (users, pos, neg):
            assert t.dtype == torch.int64 and t.shape == (4096,)
        assert np.all(_in_train(train, users, pos))
        assert not np.any(_in_train(train, users, neg))
        assert int(neg.min()) >= 0 and int(neg.max()) < train.shape[1]
        drawn = set(users.tolist())
        assert 0 not in drawn and 1 not in drawn  # no train item / no possible negative
    assert 2 in set(
        BPRSampler(train, 20_000, seed=1).sample()[0].tolist()
    )  # one negative left: still sampled


def test_next_batch_is_a_kjt_usable_by_torchrec() -> None:
    train = _train()
    sampler = BPRSampler(train, batch_size=64, seed=3)
    kjt = sampler.next_batch()
    assert kjt.keys() == ["user", "pos_item", "neg_item"]
    assert torch.equal(kjt.lengths(), torch.ones(192, dtype=kjt.lengths().dtype))
    users, pos, neg = BPRSampler(train, batch_size=64, seed=3).sample()
    assert torch.equal(kjt.values(), torch.cat([users, pos, neg]))
    assert torch.equal(kjt["pos_item"].values(), pos)
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name="user_table", embedding_dim=8, num_embeddings=train.shape[0], feature_names=["user"]
            ),
            EmbeddingBagConfig(
                name="item_table",
                embedding_dim=8,
                num_embeddings=train.shape[1],
                feature_names=["pos_item", "neg_item"],
            ),
        ]
    )
    out = ebc(kjt).to_dict()
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "user": (64, 8),
        "pos_item": (64, 8),
        "neg_item": (64, 8),
    }
    assert next(iter(sampler)).keys() == ["user", "pos_item", "neg_item"]


def test_same_seed_same_sequence_and_resume() -> None:
    train = _train()
    a, b = BPRSampler(train, 128, seed=7), BPRSampler(train, 128, seed=7)
    seq_a = [a.next_batch().values() for _ in range(5)]
    seq_b = [next(b).values() for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(seq_a, seq_b, strict=True))
    c = BPRSampler(train, 128, seed=8)
    assert not torch.equal(c.next_batch().values(), seq_a[0])

    state = a.state_dict()
    expected = [a.next_batch().values() for _ in range(3)]
    resumed = BPRSampler(train, 128, seed=0)
    resumed.load_state_dict(state)
    assert resumed.batches_drawn == 5 and resumed.seed == 7
    assert all(torch.equal(resumed.next_batch().values(), e) for e in expected)
    state["bit_generator"]["state"]["state"] = 0  # the saved dict is a copy, not the live generator
    assert a.state_dict()["bit_generator"]["state"]["state"] != 0

    with pytest.raises(DataError, match=r"state does not match this sampler.*batch_size"):
        BPRSampler(train, 64, seed=7).load_state_dict(a.state_dict())
    with pytest.raises(DataError, match=r"state does not match this sampler.*mode"):
        BPRSampler(train, 128, seed=7, mode="interactions").load_state_dict(a.state_dict())


def test_user_and_interaction_distributions() -> None:
    train = _train(n_users=300)
    degree = np.diff(train.indptr)
    eligible = (degree > 0) & (degree < train.shape[1])
    n = 200_000
    by_user = BPRSampler(train, n, seed=0, mode="users").sample()[0].numpy()
    counts = np.bincount(by_user, minlength=train.shape[0])[eligible]
    expected = n / eligible.sum()
    assert np.all(np.abs(counts - expected) < 6 * np.sqrt(expected))  # ~uniform over users
    by_pair = BPRSampler(train, n, seed=0, mode="interactions").sample()[0].numpy()
    share = np.bincount(by_pair, minlength=train.shape[0])[eligible] / n
    target = degree[eligible] / degree[eligible].sum()
    assert np.abs(share - target).max() < 0.01  # proportional to degree
    assert np.corrcoef(share, target)[0, 1] > 0.99


def test_negatives_uniform_over_complement() -> None:
    n_items = 50
    train = sp.csr_matrix((np.ones(5, np.float32), ([0] * 5, [0, 7, 8, 20, 49])), shape=(1, n_items))
    neg = BPRSampler(train, 100_000, seed=0).sample()[2].numpy()
    counts = np.bincount(neg, minlength=n_items)
    assert np.all(counts[[0, 7, 8, 20, 49]] == 0)
    allowed = np.setdiff1d(np.arange(n_items), [0, 7, 8, 20, 49])
    expected = 100_000 / allowed.size
    assert np.all(np.abs(counts[allowed] - expected) < 6 * np.sqrt(expected))


def test_invalid_arguments() -> None:
    train = _train()
    with pytest.raises(DataError, match=r"unknown mode 'pairs'; valid modes are \['users', 'interactions'\]"):
        BPRSampler(train, 8, seed=0, mode="pairs")
    with pytest.raises(DataError, match=r"batch_size must be a positive integer"):
        BPRSampler(train, 0, seed=0)
    with pytest.raises(DataError, match=r"train must be a 2-D scipy sparse matrix"):
        BPRSampler(np.ones((2, 2)), 8, seed=0)  # type: ignore[arg-type]
    full = sp.csr_matrix(np.ones((3, 4), np.float32))
    with pytest.raises(DataError, match=r"no user has both a train item and a possible negative"):
        BPRSampler(full, 8, seed=0)
