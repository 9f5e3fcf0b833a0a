"""The raw interaction log shared by every loader and the dataset builder."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ciess_prod.data.errors import DataError

#: Fold codes used in :attr:`InteractionLog.folds` (predefined splits such as the LightGCN train/test files).
FOLD_TRAIN = 0
FOLD_VAL = 1
FOLD_TEST = 2


@dataclass(frozen=True, eq=False)
class InteractionLog:
    """Positive (user, item) interactions with ORIGINAL integer ids, as read from a source.

    Loaders only parse; re-indexing, de-duplication and splitting happen once, in ``build_dataset``, so every
    source goes through the same (tested) path. ``eq=False`` because arrays have no single truth value.
    Integer id arrays of any width are widened to int64 so downstream code has one dtype to handle.
    """

    users: np.ndarray  # int64, shape [n]
    items: np.ndarray  # int64, shape [n]
    source: str  # file or generator description, used in error messages and provenance
    folds: np.ndarray | None = None  # optional int8 per interaction: 0 = train, 2 = test (predefined splits)

    def __post_init__(self) -> None:
        for name in ("users", "items"):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray):
                raise DataError(f"{self.source}: {name} must be a numpy array, got {type(arr).__name__}")
            if arr.ndim != 1:
                raise DataError(f"{self.source}: {name} must be 1-D, got shape {arr.shape}")
            if not np.issubdtype(arr.dtype, np.integer):
                raise DataError(f"{self.source}: {name} must have an integer dtype, got {arr.dtype}")
            if arr.dtype != np.int64:
                object.__setattr__(self, name, arr.astype(np.int64))
        if self.users.shape != self.items.shape:
            raise DataError(
                f"{self.source}: users and items differ in length ({self.users.size} vs {self.items.size})"
            )
        if self.users.size == 0:
            raise DataError(f"{self.source}: no interactions")
        if self.folds is not None:
            folds = self.folds
            if not isinstance(folds, np.ndarray) or folds.shape != self.users.shape:
                raise DataError(f"{self.source}: folds must be an array with one entry per interaction")
            if not np.issubdtype(folds.dtype, np.integer):
                raise DataError(f"{self.source}: folds must have an integer dtype, got {folds.dtype}")
            bad = ~np.isin(folds, (FOLD_TRAIN, FOLD_VAL, FOLD_TEST))
            if bad.any():
                raise DataError(
                    f"{self.source}: folds must be 0 (train), 1 (val) or 2 (test); found {folds[bad][0]}"
                )
            if folds.dtype != np.int8:
                object.__setattr__(self, "folds", folds.astype(np.int8))

    def __len__(self) -> int:
        return int(self.users.size)
