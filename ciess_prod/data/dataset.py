"""Contiguous re-indexing and the seeded per-user train/val/test split of an interaction log.

The split is the experimental protocol: CIESS searches embedding sizes against validation quality and reports
test quality, so the split must be deterministic for a seed, disjoint, and identified by a fingerprint that
goes into every checkpoint and result file. The whole build is vectorised (sorts and offsets, no per-user
Python code).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ciess_prod.data.errors import DataError
from ciess_prod.data.interactions import FOLD_TEST, FOLD_TRAIN, FOLD_VAL, InteractionLog

_FINGERPRINT_VERSION = b"ciess-dataset-v1"
_MERGED_SUFFIX = "+val-merged"


@dataclass(frozen=True)
class SplitConfig:
    """Per-user split fractions; ``val`` may be 0 (no validation split)."""

    train: float = 0.5
    val: float = 0.25
    test: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        where = f"SplitConfig({asdict(self)})"
        for name in ("train", "val", "test"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise DataError(f"{where}: {name} must be a finite number, got {value!r}")
        if not 0 < self.train < 1 or not 0 < self.test < 1 or not 0 <= self.val < 1:
            raise DataError(f"{where}: need 0 < train < 1, 0 < test < 1 and 0 <= val < 1")
        if abs(self.train + self.val + self.test - 1.0) > 1e-9:
            raise DataError(f"{where}: train + val + test must be 1, got {self.train + self.val + self.test}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise DataError(f"{where}: seed must be an integer >= 0")


def _empty_like(matrix: sp.csr_matrix) -> sp.csr_matrix:
    return sp.csr_matrix(matrix.shape, dtype=np.float32)


@dataclass(frozen=True, eq=False)
class RecDataset:
    """A split, contiguously indexed implicit-feedback dataset (``eq=False``: sparse matrices lack ``==``)."""

    name: str
    n_users: int
    n_items: int
    train: sp.csr_matrix  # [n_users, n_items] float32, 1.0 per positive, sorted indices
    val: sp.csr_matrix
    test: sp.csr_matrix
    user_ids: np.ndarray  # int64 original id of each contiguous user index
    item_ids: np.ndarray  # int64 original id of each contiguous item index
    fingerprint: str  # sha256 hex over the (sorted) interactions + split config: identifies data+split

    def user_popularity(self) -> np.ndarray:
        """Train degree of every user (int64)."""
        return np.diff(self.train.indptr).astype(np.int64)

    def item_popularity(self) -> np.ndarray:
        """Train degree of every item (int64); CIESS uses it to order rows and to report head/tail quality."""
        return np.bincount(self.train.indices, minlength=self.n_items).astype(np.int64)

    def with_validation_merged(self) -> RecDataset:
        """Train on train+val, keep test: the final-retrain protocol. The fingerprint gains a suffix."""
        if self.fingerprint.endswith(_MERGED_SUFFIX):
            return self
        merged = (self.train + self.val).tocsr()
        merged.data[:] = 1.0  # the splits are disjoint, but stay binary even if a caller broke that
        merged.sort_indices()
        return RecDataset(
            name=self.name,
            n_users=self.n_users,
            n_items=self.n_items,
            train=merged.astype(np.float32),
            val=_empty_like(self.val),
            test=self.test,
            user_ids=self.user_ids,
            item_ids=self.item_ids,
            fingerprint=self.fingerprint + _MERGED_SUFFIX,
        )

    def save_mapping(self, path: str | Path) -> None:
        """Write the contiguous-index -> original-id mappings as ``.npz``, atomically (tmp file + os.replace).

        Serving needs them to translate model indices back to catalogue ids; ``load_mapping`` reads them.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh,
                    user_ids=self.user_ids,
                    item_ids=self.item_ids,
                    name=np.array(self.name),
                    fingerprint=np.array(self.fingerprint),
                )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def summary(self) -> dict[str, Any]:
        """Counts and degree statistics as plain Python types (ready for ``json.dumps``)."""
        n_train, n_val, n_test = int(self.train.nnz), int(self.val.nnz), int(self.test.nnz)
        total = n_train + n_val + n_test
        user_deg, item_deg = self.user_popularity(), self.item_popularity()
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "n_users": int(self.n_users),
            "n_items": int(self.n_items),
            "n_interactions": total,
            "n_train": n_train,
            "n_val": n_val,
            "n_test": n_test,
            "density": total / float(self.n_users * self.n_items),
            "users_with_val": int((np.diff(self.val.indptr) > 0).sum()),
            "users_with_test": int((np.diff(self.test.indptr) > 0).sum()),
            "items_without_train": int((item_deg == 0).sum()),
            "train_user_degree": {
                "min": int(user_deg.min()),
                "max": int(user_deg.max()),
                "mean": float(user_deg.mean()),
            },
            "train_item_degree": {
                "min": int(item_deg.min()),
                "max": int(item_deg.max()),
                "mean": float(item_deg.mean()),
            },
        }


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a mapping written by :meth:`RecDataset.save_mapping`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such mapping file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {
                "user_ids": npz["user_ids"].astype(np.int64),
                "item_ids": npz["item_ids"].astype(np.int64),
                "name": str(npz["name"]),
                "fingerprint": str(npz["fingerprint"]),
            }
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: not a valid id-mapping file ({exc})") from exc


def _assign_splits(
    users: np.ndarray, train_frac: np.ndarray, val_frac: np.ndarray, n_users: int, rng: np.random.Generator
) -> np.ndarray:
    """Seeded per-user split code (0 train, 1 val, 2 test) for interactions in canonical (user, item) order.

    Each user's interactions get random keys and are sorted by (user, key); the first round(train * n_u) go to
    train, the next round(val * n_u) to val, the rest to test. ``train_frac``/``val_frac`` are per user so the
    LightGCN path can split only its test fold. Guarantees: >= 1 train item per user with train_frac > 0, and
    >= 1 test item for users with >= 3 interactions (or >= 1 when train_frac is 0).
    """
    keys = rng.random(users.size)
    order = np.lexsort((keys, users))
    sorted_users = users[order]
    counts = np.bincount(users, minlength=n_users)
    starts = np.cumsum(counts) - counts
    rank = np.arange(users.size) - starts[sorted_users]

    n_u = counts.astype(np.float64)
    n_train = np.rint(train_frac * n_u).astype(np.int64)
    n_train = np.where(train_frac > 0, np.clip(n_train, 1, counts), 0)
    n_val = np.minimum(np.rint(val_frac * n_u).astype(np.int64), counts - n_train)
    # Leave room for one test item when the user has enough interactions (take it from val first).
    needs_test = np.where(train_frac > 0, counts >= 3, counts >= 1) & (n_train + n_val >= counts)
    from_val = needs_test & (n_val > 0)
    n_val = n_val - from_val
    n_train = n_train - (needs_test & ~from_val)

    code_sorted = np.full(users.size, FOLD_TEST, dtype=np.int8)
    code_sorted[rank < n_val[sorted_users] + n_train[sorted_users]] = FOLD_VAL
    code_sorted[rank < n_train[sorted_users]] = FOLD_TRAIN
    codes = np.empty_like(code_sorted)
    codes[order] = code_sorted
    return codes


def _csr(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    matrix = sp.csr_matrix(
        (np.ones(users.size, dtype=np.float32), (users, items)), shape=(n_users, n_items), dtype=np.float32
    )
    matrix.sort_indices()
    return matrix


def _fingerprint(
    user_ids: np.ndarray, item_ids: np.ndarray, splits: list[sp.csr_matrix], split: SplitConfig
) -> str:
    digest = hashlib.sha256(_FINGERPRINT_VERSION)
    digest.update(json.dumps(asdict(split), sort_keys=True).encode())
    for arr in (user_ids, item_ids):
        digest.update(np.ascontiguousarray(arr, dtype="<i8").tobytes())
    for matrix in splits:
        digest.update(np.ascontiguousarray(matrix.indptr, dtype="<i8").tobytes())
        digest.update(np.ascontiguousarray(matrix.indices, dtype="<i8").tobytes())
    return digest.hexdigest()


def build_dataset(log: InteractionLog, split: SplitConfig, name: str) -> RecDataset:
    """Re-index ``log`` contiguously, drop duplicate pairs (keep first), and split per user.

    Without ``log.folds`` every user's interactions are split train/val/test by ``split``. With folds
    (LightGCN files): the train fold is the train split; a val fold, if any, is the val split; and when there
    is no val fold, each user's test-fold items are divided with the same seeded rule, half to val and half
    to test (all to test if ``split.val == 0``). A user with no train-fold item instead gets the ordinary
    train/val/test split of their items, so every user keeps a train item. Users and items are the union
    over all splits. The split depends only on the set of interactions and ``split``, not on row order.
    """
    if not isinstance(log, InteractionLog):
        raise DataError(f"build_dataset needs an InteractionLog, got {type(log).__name__}")
    user_ids, users = np.unique(log.users, return_inverse=True)
    item_ids, items = np.unique(log.items, return_inverse=True)
    n_users, n_items = int(user_ids.size), int(item_ids.size)
    users, items = users.astype(np.int64), items.astype(np.int64)

    key = users * n_items + items
    _, first = np.unique(key, return_index=True)  # sorted by key = canonical (user, item) order
    users, items = users[first], items[first]
    folds = None if log.folds is None else log.folds[first]

    rng = np.random.default_rng(split.seed)
    if folds is None:
        train_frac = np.full(n_users, split.train)
        val_frac = np.full(n_users, split.val)
        codes = _assign_splits(users, train_frac, val_frac, n_users, rng)
    else:
        codes = folds.copy()
        has_train = np.bincount(users[folds == FOLD_TRAIN], minlength=n_users) > 0
        has_val_fold = bool((folds == FOLD_VAL).any())
        # Users with train-fold items only split their test fold (val share: half, or none); others split all.
        test_val_frac = 0.0 if (has_val_fold or split.val == 0) else 0.5
        train_frac = np.where(has_train, 0.0, split.train)
        val_frac = np.where(has_train, test_val_frac, split.val)
        redo = (folds == FOLD_TEST) | ~has_train[users]
        codes[redo] = _assign_splits(users[redo], train_frac, val_frac, n_users, rng)

    splits = [
        _csr(users[codes == c], items[codes == c], n_users, n_items)
        for c in (FOLD_TRAIN, FOLD_VAL, FOLD_TEST)
    ]
    return RecDataset(
        name=name,
        n_users=n_users,
        n_items=n_items,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        user_ids=user_ids.astype(np.int64),
        item_ids=item_ids.astype(np.int64),
        fingerprint=_fingerprint(user_ids, item_ids, splits, split),
    )
