"""Seeded BPR triples (user, positive, negative) delivered as TorchRec KeyedJaggedTensors.

BPR training needs millions of triples; drawing them with per-sample Python code would dominate the step time
on CPU, so every draw here is a handful of vectorised numpy calls. The generator state is checkpointable so a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ciess_prod.data.errors import DataError

MODES = ("users", "interactions")
KEYS = ["user", "pos_item", "neg_item"]


class BPRSampler:
    """Seeded, vectorised BPR triples (user, positive, negative not in the user's training items).

    ``mode="users"``: a user uniformly among eligible users, then one of their train items uniformly (the
    CIESS/LightGCN authors' recipe). ``mode="interactions"``: a train (user, item) pair uniformly.

    Negatives are drawn exactly uniformly from the items the user has NOT interacted with, without rejection:
    draw ``r`` uniform in ``[0, n_items - deg(u))`` and map it to the r-th non-train item of ``u`` with one
    ``searchsorted`` over the sorted train items (item ``s_j`` of a row has ``s_j - j`` non-items before it).
    This has the same distribution as resampling collisions until none remain, but takes one fixed-size step.
    Users whose train set covers every item have no possible negative and are never drawn (in either mode);
    if no user is left, the constructor raises :class:`DataError`.
    """

    def __init__(self, train: sp.spmatrix, batch_size: int, seed: int, mode: str = "users") -> None:
        if mode not in MODES:
            raise DataError(f"BPRSampler: unknown mode {mode!r}; valid modes are {list(MODES)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise DataError(f"BPRSampler: batch_size must be a positive integer, got {batch_size!r}")
        if not sp.issparse(train) or train.ndim != 2:
            raise DataError("BPRSampler: train must be a 2-D scipy sparse matrix")
        csr = sp.csr_matrix(train, copy=True)
        csr.eliminate_zeros()
        csr.sum_duplicates()  # also sorts indices
        self.n_users, self.n_items = (int(d) for d in csr.shape)
        self.batch_size = int(batch_size)
        self.mode = mode
        self.seed = int(seed)
        self._indptr = csr.indptr.astype(np.int64)
        self._indices = csr.indices.astype(np.int64)
        self._degree = np.diff(self._indptr)
        eligible = (self._degree > 0) & (self._degree < self.n_items)
        self._users = np.flatnonzero(eligible).astype(np.int64)
        if self._users.size == 0:
            raise DataError(
                f"BPRSampler: no user has both a train item and a possible negative "
                f"(train matrix {self.n_users}x{self.n_items}, {csr.nnz} positives)"
            )
        row_of = np.repeat(np.arange(self.n_users, dtype=np.int64), self._degree)
        self._interactions = np.flatnonzero(eligible[row_of]).astype(np.int64)
        self._row_of = row_of
        # "Gap" keys u * n_items + (s_j - j) are non-decreasing, so one global searchsorted serves all rows.
        rank_in_row = np.arange(csr.nnz, dtype=np.int64) - self._indptr[row_of]
        self._gap_keys = row_of * self.n_items + (self._indices - rank_in_row)
        self._rng = np.random.default_rng(self.seed)
        self.batches_drawn = 0

    # ----------------------------------------------------------------------------------------------- sampling
    def _negatives(self, users: np.ndarray) -> np.ndarray:
        r = self._rng.integers(0, self.n_items - self._degree[users])
        below = np.searchsorted(self._gap_keys, users * self.n_items + r, side="right") - self._indptr[users]
        return r + below

    def sample(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batch of (users, positives, negatives), each int64 of shape [batch_size]."""
        if self.mode == "users":
            users = self._users[self._rng.integers(0, self._users.size, self.batch_size)]
            offsets = self._rng.integers(0, self._degree[users])
            pos = self._indices[self._indptr[users] + offsets]
        else:
            idx = self._interactions[self._rng.integers(0, self._interactions.size, self.batch_size)]
            users = self._row_of[idx]
            pos = self._indices[idx]
        neg = self._negatives(users)
        self.batches_drawn += 1
        return torch.from_numpy(users), torch.from_numpy(pos), torch.from_numpy(neg)

    def next_batch(self) -> KeyedJaggedTensor:
        """The next batch as a KJT with keys ["user", "pos_item", "neg_item"], one id per bag."""
        users, pos, neg = self.sample()
        return KeyedJaggedTensor(
            keys=list(KEYS),
            values=torch.cat([users, pos, neg]),
            lengths=torch.ones(3 * self.batch_size, dtype=torch.int32),
        )

    def __iter__(self) -> BPRSampler:
        return self

    def __next__(self) -> KeyedJaggedTensor:
        return self.next_batch()

    # --------------------------------------------------------------------------------------------- checkpoint
    def _identity(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "batch_size": self.batch_size,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "nnz": int(self._indices.size),
        }

    def state_dict(self) -> dict[str, Any]:
        """Generator state plus what it is valid for; restoring it continues the batch sequence exactly."""
        return {
            **self._identity(),
            "seed": self.seed,
            "batches_drawn": self.batches_drawn,
            "bit_generator": copy.deepcopy(self._rng.bit_generator.state),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses a state saved for another train matrix, mode or batch size."""
        mismatched = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if mismatched:
            raise DataError(f"BPRSampler: state does not match this sampler (saved, current): {mismatched}")
        try:
            self._rng.bit_generator.state = copy.deepcopy(state["bit_generator"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"BPRSampler: invalid generator state ({exc})") from exc
        self.seed = int(state.get("seed", self.seed))
        self.batches_drawn = int(state.get("batches_drawn", 0))
