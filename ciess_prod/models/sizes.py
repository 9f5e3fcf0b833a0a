"""Per-row embedding sizes as prefix masks: row n keeps its first d_n columns, the rest read as zero.

Neither helper materialises an N x d_max mask. Lookups mask only the B looked-up rows; whole tables go through
FBGEMM's jagged ops (dense -> ragged values of sum(d_n) -> zero-padded dense), whose backward sends exactly zero
gradient to trailing columns.
"""

from __future__ import annotations

from collections.abc import Iterable

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import torch


def check_sizes(sizes: torch.Tensor, n_rows: int, d_max: int, name: str = "sizes") -> torch.Tensor:
    """Validates a size vector and returns it as int32 (one value in [1, d_max] per row)."""
    if not isinstance(sizes, torch.Tensor):
        sizes = torch.as_tensor(sizes)
    if sizes.dim() != 1 or sizes.shape[0] != n_rows:
        raise ValueError(f"{name}: expected shape [{n_rows}], got {list(sizes.shape)}")
    if sizes.dtype.is_floating_point or sizes.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor, got {sizes.dtype}")
    if n_rows and (int(sizes.min()) < 1 or int(sizes.max()) > d_max):
        raise ValueError(f"{name}: sizes must lie in [1, {d_max}], got [{int(sizes.min())}, {int(sizes.max())}]")
    return sizes.to(torch.int32)


def widest(sizes: Iterable[torch.Tensor]) -> int:
    """The largest size in any of the per-row size vectors: from this column on, every masked table is zero."""
    return max(int(s.max()) for s in sizes)


def mask_rows(embeddings: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Zeroes columns >= sizes[b] of each looked-up row b: [B, d] x [B] -> [B, d]."""
    columns = torch.arange(embeddings.shape[1], device=embeddings.device)
    return embeddings * (columns < sizes.unsqueeze(1)).to(embeddings.dtype)


def masked_table(weight: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """The whole table [N, d] with each row's trailing columns zero, differentiable, without a dense mask."""
    n_rows, d = weight.shape
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(sizes.to(torch.int64))
    values = torch.ops.fbgemm.dense_to_jagged(weight.unsqueeze(-1), [offsets])[0]  # [sum(d_n), 1]
    return torch.ops.fbgemm.jagged_to_padded_dense(values, [offsets], [d], 0.0).view(n_rows, d)
