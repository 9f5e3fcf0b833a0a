"""Heuristic size assignments that meet a budget exactly, the search's comparison points.

- MR (paper section 6): sizes drawn uniformly at random in [1, d_max], then shrunk to the budget by the same
  order-keeping repair the search uses.
- Frequency: sizes proportional to log(1 + popularity), scaled so the total uses the budget.
"""

from __future__ import annotations

import numpy as np
import torch

from ciess_prod.search.plan import budget_for, repair_to_budget


def random_sizes(n_rows: dict[str, int], d_max: int, target_sparsity: float, seed: int) -> dict[str, torch.Tensor]:
    """MR: uniform random sizes per row, shrunk to fit ``target_sparsity``."""
    generator = torch.Generator().manual_seed(seed)
    drawn = {side: torch.randint(1, d_max + 1, (n,), generator=generator) for side, n in n_rows.items()}
    return repair_to_budget(drawn, d_max, target_sparsity)


def frequency_sizes(popularity: dict[str, np.ndarray], d_max: int, target_sparsity: float) -> dict[str, torch.Tensor]:
    """Sizes proportional to log(1 + popularity), the largest common scale whose total fits the budget."""
    weights = {side: torch.from_numpy(np.log1p(pop.astype(np.float64))) for side, pop in popularity.items()}
    budget = budget_for(sum(w.numel() for w in weights.values()), d_max, target_sparsity)

    def sized(scale: float) -> dict[str, torch.Tensor]:
        return {side: (w * scale).floor().clamp(1, d_max).to(torch.int64) for side, w in weights.items()}

    def total(scale: float) -> int:
        return sum(int(s.sum()) for s in sized(scale).values())

    if total(0.0) > budget:
        raise ValueError(f"budget {budget} is below one column per row")
    low, high = 0.0, float(d_max)
    while total(high) <= budget and high < 1e12:  # grow until the budget binds (or every row is at d_max)
        low, high = high, high * 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if total(mid) <= budget else (low, mid)
    return {side: s.to(torch.int16) for side, s in sized(low).items()}
