"""Where every row of every sharded table lives, read from the DMP sharding plan; routing per-row values there.

Each table's rows are split into contiguous ranges, one per row-shard (one range for table-wise and column-wise,
one per rank for row-wise and table-row-wise). The PRIMARY holder of a range is the rank whose shard starts at
column 0: it alone keeps the per-row search state of those rows (sizes, popularity, quality, agent actions);
column-wise co-holders receive the sizes from it to enforce them on their columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torchrec.distributed.types import ShardingPlan


@dataclass(frozen=True)
class Shard:
    rank: int
    row_offset: int
    rows: int
    col_offset: int
    cols: int


@dataclass(frozen=True)
class TableLayout:
    name: str
    index: int  # position among the model's tables (seeds per-table hashing)
    rows: int
    shards: tuple[Shard, ...]

    @property
    def primary(self) -> tuple[Shard, ...]:
        """One shard per row range (the column-0 one), by row offset."""
        return tuple(sorted((s for s in self.shards if s.col_offset == 0), key=lambda s: s.row_offset))

    def primary_rows(self, rank: int) -> tuple[int, int] | None:
        """The row range [start, end) whose state ``rank`` keeps, or None."""
        mine = [s for s in self.primary if s.rank == rank]
        return (mine[0].row_offset, mine[0].row_offset + mine[0].rows) if mine else None

    def owners(self, ids: torch.Tensor) -> torch.Tensor:
        """Primary rank of each row id (int64 [n])."""
        primary = self.primary
        starts = torch.tensor([s.row_offset for s in primary], dtype=torch.int64)
        ranks = torch.tensor([s.rank for s in primary], dtype=torch.int64)
        return ranks[torch.searchsorted(starts, ids, right=True) - 1]

    @property
    def replicated_rows(self) -> bool:
        """True when some rows are held by several ranks (column-wise): their sizes must be shared."""
        return len(self.shards) != len(self.primary)


def table_layouts(plan: ShardingPlan, ebc_path: str, names: list[str]) -> dict[str, TableLayout]:
    """The layout of every table from the plan DMP used (``model.plan``)."""
    module_plan = plan.plan[ebc_path]
    out = {}
    for index, name in enumerate(names):
        sharding = module_plan[name]
        spec = sharding.sharding_spec
        shards = tuple(
            Shard(int(m.placement.rank()), m.shard_offsets[0], m.shard_sizes[0], m.shard_offsets[1], m.shard_sizes[1])
            for m in spec.shards
        )
        rows = max(s.row_offset + s.rows for s in shards)
        out[name] = TableLayout(name, index, rows, shards)
    return out


def route_to_owners(ids: torch.Tensor, values: torch.Tensor, owners: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sends each (id, values row) to its owner rank; returns what this rank received (all-to-all, any backend).

    ids int64 [n], values float [n, k], owners int64 [n] -> (ids [m], values [m, k]) for this rank's rows.
    """
    world = dist.get_world_size()
    order = torch.argsort(owners, stable=True)
    ids, values, owners = ids[order], values[order], owners[order]
    send_counts = torch.bincount(owners, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    out_ids = torch.empty(sum(recv), dtype=ids.dtype)
    dist.all_to_all_single(out_ids, ids.contiguous(), output_split_sizes=recv, input_split_sizes=send)
    k = values.shape[1]
    out_values = torch.empty(sum(recv) * k, dtype=values.dtype)
    dist.all_to_all_single(
        out_values, values.contiguous().view(-1), output_split_sizes=[c * k for c in recv],
        input_split_sizes=[c * k for c in send],
    )
    return out_ids, out_values.view(-1, k)
