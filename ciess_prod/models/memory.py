"""Memory accounting of embedding tables at given per-row sizes (the paper's sparsity, parameters, bytes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EmbeddingMemory:
    """Parameters and bytes of embedding tables stored densely at d_max vs. at their per-row sizes."""

    rows: int
    dense_parameters: int  # rows x d_max, per table copy
    parameters: int  # sum of per-row sizes over all table copies
    bytes_per_value: int

    @property
    def dense_bytes(self) -> int:
        return self.dense_parameters * self.bytes_per_value

    @property
    def bytes(self) -> int:
        return self.parameters * self.bytes_per_value

    @property
    def sparsity(self) -> float:
        """The paper's c = 1 - sum(d_n) / (N d_max)."""
        return 1.0 - self.parameters / self.dense_parameters if self.dense_parameters else 0.0


def sparsity(sizes: Sequence[torch.Tensor], d_max: int) -> float:
    """1 - sum(d_n) / (N d_max) over all rows of all given size vectors."""
    rows = sum(int(s.numel()) for s in sizes)
    kept = sum(int(s.to(torch.int64).sum()) for s in sizes)
    return 1.0 - kept / (rows * d_max) if rows else 0.0


def embedding_memory(
    sizes: Mapping[str, torch.Tensor],
    d_max: int,
    copies: Mapping[str, int] | None = None,
    bytes_per_value: int = 4,
) -> EmbeddingMemory:
    """Accounts tables whose rows follow ``sizes[side]``; ``copies[side]`` tables share one size vector.

    NeuMF, for instance, keeps a GMF and an MLP table per side, both obeying the same per-row sizes.
    """
    copies = copies or {}
    rows = dense = kept = 0
    for side, s in sizes.items():
        n = copies.get(side, 1)
        rows += n * int(s.numel())
        dense += n * int(s.numel()) * d_max
        kept += n * int(s.to(torch.int64).sum())
    return EmbeddingMemory(rows=rows, dense_parameters=dense, parameters=kept, bytes_per_value=bytes_per_value)


def uniform_sizes(n_rows: int, d_max: int, target_sparsity: float) -> torch.Tensor:
    """The ES baseline: every row gets floor((1 - c) d_max) columns (at least 1)."""
    if not 0.0 <= target_sparsity < 1.0:
        raise ValueError(f"target sparsity must lie in [0, 1), got {target_sparsity}")
    d = max(1, int((1.0 - target_sparsity) * d_max + 1e-9))
    return torch.full((n_rows,), d, dtype=torch.int32)
