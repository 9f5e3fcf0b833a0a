"""The rows a rank holds of each sharded table, and per-row sizes enforced on them in place.

Under DistributedModelParallel, ``state_dict()`` exposes every table weight as a ShardedTensor whose local shards
are VIEWS of the live FBGEMM buffers (``../shared/reference/torchrec-fbgemm-notes.md``): writing zeros into a
shard's trailing columns shows up in the next forward. A shard covers rows [r0, r0 + n) and columns [c0, c0 + w)
of its table: table-wise and column-wise shards hold every row, row-wise and table-row-wise shards a block.

Prefix mask under sharding (the fused kernels pool inside FBGEMM, so rows cannot be masked on the way): a row of
size d keeps columns [0, d); ``enforce_sizes`` zeroes columns >= d of every local row. Zeros pool exactly, so a
trailing column never reaches a pooled output as long as the sizes are enforced after every optimizer step (the
fused optimizer updates trailing columns too: their gradient is the bag's upstream gradient). Row-wise Adagrad's
per-row accumulator still sees the trailing columns' gradients, which slightly changes the effective step size of
the kept columns; the forward stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LocalShard:
    table: str
    row_offset: int  # first global row of the table held here
    col_offset: int  # first column held here
    weight: torch.Tensor  # [rows, cols] view of the live buffer

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    @property
    def primary(self) -> bool:
        """Whether this shard holds column 0: the one copy that speaks for its rows (column-wise has several)."""
        return self.col_offset == 0


def local_shards(model: nn.Module, tables: list[str]) -> dict[str, list[LocalShard]]:
    """The shards of each table held by this rank (empty list when none); works on sharded and plain models."""
    state = model.state_dict(keep_vars=True)
    out: dict[str, list[LocalShard]] = {t: [] for t in tables}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) < 3 or parts[-1] != "weight" or parts[-3] != "embedding_bags" or parts[-2] not in out:
            continue
        table = parts[-2]
        if hasattr(value, "local_shards"):
            for shard in value.local_shards():
                row, col = shard.metadata.shard_offsets[:2]
                out[table].append(LocalShard(table, int(row), int(col), shard.tensor))
        else:
            out[table].append(LocalShard(table, 0, 0, value.data))
    return out


def held_rows(shards: list[LocalShard]) -> tuple[int, int] | None:
    """The global row range [start, end) a rank holds of one table (None when it holds none of it).

    Every TorchRec sharding type gives a rank one contiguous row range per table; anything else is refused.
    """
    if not shards:
        return None
    ranges = {(s.row_offset, s.row_offset + s.rows) for s in shards}
    if len(ranges) != 1:
        raise ValueError(f"table {shards[0].table}: this rank holds several row ranges {sorted(ranges)}")
    return ranges.pop()


@torch.no_grad()
def enforce_sizes(shards: list[LocalShard], sizes: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Zeroes columns >= size of the rank's rows of one table, in place.

    sizes: int [held rows], the sizes of the rows of ``held_rows(shards)`` in order. rows: optional local row
    indices to touch (e.g. those a step looked up); default all. Vectorised; cost O(rows x shard width).
    """
    for shard in shards:
        index = torch.arange(shard.rows) if rows is None else rows
        if index.numel() == 0:
            continue
        columns = torch.arange(shard.col_offset, shard.col_offset + shard.weight.shape[1])
        keep = columns.unsqueeze(0) < sizes[index].to(torch.int64).unsqueeze(1)  # [rows, width]
        if rows is None:
            shard.weight.masked_fill_(~keep, 0.0)
        else:
            shard.weight[index] = shard.weight[index].masked_fill(~keep, 0.0)


# ---- partition-independent initialisation ------------------------------------------------------------------------
_MASK62 = (1 << 62) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A splitmix64-style integer hash on int64 (wrapping arithmetic), kept non-negative."""
    x = (x ^ (x >> 31)) * 0x5851F42D4C957F2D
    x = (x ^ (x >> 29)) * 0x14057B7EF767814F
    return (x ^ (x >> 32)) & _MASK62


def hashed_normal(seed: int, table: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """N(0, 1) values [len(rows), len(cols)] that depend only on (seed, table, global row, column).

    Every rank initialises the rows it holds to the same values a single process gives them, whatever the
    sharding, without materialising anyone else's rows.
    """
    key = (rows.to(torch.int64).unsqueeze(1) << 20) + cols.to(torch.int64).unsqueeze(0)
    base = _mix(key + _mix(torch.tensor((seed << 16) + table, dtype=torch.int64)))
    u1 = ((_mix(base) >> 9).to(torch.float64) + 0.5) / float(1 << 53)  # (0, 1)
    u2 = ((_mix(base + 1) >> 9).to(torch.float64) + 0.5) / float(1 << 53)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)).to(torch.float32)


@torch.no_grad()
def init_shards(
    shards: dict[str, list[LocalShard]], table_ids: dict[str, int], std: float, seed: int, chunk_rows: int = 1 << 15
) -> None:
    """Writes N(0, std^2) hashed values into every local shard (see ``hashed_normal``), ``chunk_rows`` rows at a
    time: the hash's int64/float64 temporaries are ~10x the values they make, so chunks bound the peak memory."""
    for table, parts in shards.items():
        for shard in parts:
            cols = torch.arange(shard.col_offset, shard.col_offset + shard.weight.shape[1])
            for lo in range(0, shard.rows, chunk_rows):
                hi = min(lo + chunk_rows, shard.rows)
                rows = torch.arange(shard.row_offset + lo, shard.row_offset + hi)
                shard.weight[lo:hi] = hashed_normal(seed, table_ids[table], rows, cols) * std
