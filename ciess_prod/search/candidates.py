"""Retraining results of candidate configurations, kept on disk by what determines them.

One visited configuration is often among the top-l of two budgets (a sparse one meets every looser budget too), and
budgets may be retrained by separate processes. Retraining on train is deterministic given the data, the model, the
recipe and the sizes, so its outcome (validation means, the batch count the final protocol retrains for) is stored
under a sha256 of exactly those and read back instead of retraining. Only outcomes are stored, not weights: a caller
that tests the fitted weights themselves (the ``train_only`` protocol) must retrain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ciess_prod.io import write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CandidateFit:
    val: dict[str, float]  # validation means at the best checkpoint
    best_batches: int  # batches at that checkpoint (the final protocol's retraining length)
    seconds: float  # what the retraining cost when it ran


def fit_key(recipe: Mapping[str, Any], sizes: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the recipe (JSON, sorted keys) and each side's sizes as int16 bytes, sides in sorted order."""
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for side in sorted(sizes):
        digest.update(side.encode())
        digest.update(sizes[side].to(torch.int16).contiguous().numpy().tobytes())
    return digest.hexdigest()


class CandidateFits:
    """A directory of ``<key>.json`` files; an unreadable or mismatched entry is reported and treated as absent."""

    def __init__(self, directory: Path, recipe: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        self.recipe = dict(recipe)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, sizes: Mapping[str, torch.Tensor]) -> CandidateFit | None:
        key = fit_key(self.recipe, sizes)
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
            if entry.get("key") != key:
                raise ValueError(f"it records key {entry.get('key')!r}")
            fit = CandidateFit(
                val={str(k): float(v) for k, v in entry["val"].items()},
                best_batches=int(entry["best_batches"]),
                seconds=float(entry["seconds"]),
            )
            if fit.best_batches < 0 or not all(math.isfinite(v) for v in fit.val.values()):
                raise ValueError("negative best_batches or a non-finite validation mean")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring the unreadable candidate fit %s (%s); retraining it", path, e)
            return None
        return fit

    def put(self, sizes: Mapping[str, torch.Tensor], fit: CandidateFit) -> None:
        key = fit_key(self.recipe, sizes)
        entry = {"key": key, "val": fit.val, "best_batches": fit.best_batches, "seconds": fit.seconds}
        write_json_atomic(self._path(key), entry)
