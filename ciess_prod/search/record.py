"""The record of visited configurations: per budget, the best ``keep`` configurations meeting it by mean q (the top-l,
or the probe's pool), and the sparsest one visited (the repair's starting point). The search writes it (one per
restart; ``pooled`` joins them); the plan selection reads it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Visited:
    step: int
    sparsity: float
    mean_q: float
    sizes: dict[str, torch.Tensor]  # side -> int16 [rows]
    restart: int = 0  # which of the search's restarts visited it (search.restarts; 0: the search at its own seed)


class ConfigurationRecord:
    """The best ``keep`` visited configurations per budget by mean q, plus the sparsest one (the repair's start)."""

    def __init__(self, budgets: tuple[float, ...], keep: int) -> None:
        self.budgets, self.keep = budgets, keep
        self.best: dict[float, list[Visited]] = {c: [] for c in budgets}
        self.sparsest: Visited | None = None

    def add(self, visited: Visited) -> None:
        for c in self.budgets:
            if visited.sparsity >= c:
                kept = sorted([*self.best[c], visited], key=lambda v: (-v.mean_q, v.step))
                self.best[c] = kept[: self.keep]
        if self.sparsest is None or visited.sparsity > self.sparsest.sparsity:
            self.sparsest = visited

    @classmethod
    def pooled(cls, records: Sequence[ConfigurationRecord]) -> ConfigurationRecord:
        """The records of a search's restarts as one: everything each kept, tagged with its restart (its index in
        ``records``) and ranked by mean q, and the sparsest of all."""
        pooled = cls(records[0].budgets, sum(r.keep for r in records))
        for c in pooled.budgets:
            kept = [dataclasses.replace(v, restart=i) for i, r in enumerate(records) for v in r.best[c]]
            pooled.best[c] = sorted(kept, key=lambda v: (-v.mean_q, v.restart, v.step))
        sparsest = [dataclasses.replace(r.sparsest, restart=i) for i, r in enumerate(records) if r.sparsest]
        pooled.sparsest = max(sparsest, key=lambda v: v.sparsity, default=None)
        return pooled

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": {str(c): [dataclasses.asdict(v) for v in vs] for c, vs in self.best.items()},
            "sparsest": dataclasses.asdict(self.sparsest) if self.sparsest else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = {c: [Visited(**v) for v in state["best"][str(c)]] for c in self.budgets}
        self.sparsest = Visited(**state["sparsest"]) if state["sparsest"] else None

