"""What every sharded search environment shares: the DMP-wrapped model of this rank, its table shards, the rows
whose search state this rank keeps, and the weight operations a search step needs (fresh initialisation, the
reference snapshot, per-row sizes enforced on the shards, and the whole tables gathered for export).

A task (``ctr.py``: a DLRM over many categorical features; ``recommender.py``: user/item tables) subclasses
``ShardedTables`` and adds how it trains, how it scores, and what per-row quality it measures
(``search.py`` runs the search over any of them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ciess_prod.distributed.layout import TableLayout, table_layouts
from ciess_prod.distributed.rows import LocalShard, enforce_sizes, held_rows, init_shards, local_shards
from ciess_prod.distributed.sharding import ShardingConfig, shard_model
from ciess_prod.search.config import SearchConfig

EBC = "ebc"  # the attribute holding the EmbeddingBagCollection in every sharded model


def all_reduce(*values: float, op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
    """Element-wise reduction of a few scalars over the ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.tolist()


def refuse_unsupported(search: SearchConfig) -> None:
    """The single-process search's options that the sharded search does not implement, refused before any work."""
    if search.fill_budget or search.reward != "paper":
        raise ValueError("search.fill_budget and search.reward 'code' are not supported by the sharded search")
    if search.candidates_from != "budget" or search.within_side != "keep":
        raise ValueError("search.candidates_from 'loosest' and search.within_side 'even' are not supported by the "
                         "sharded search")
    if search.probe_top or search.penalty_control != "fixed":
        raise ValueError("search.probe_top and an adapted search.penalty_control ('loosest', 'signed') are not "
                         "supported by the sharded search")
    if search.environment.item_quality != "users":
        raise ValueError("search.environment.item_quality 'hits' is not supported by the sharded search (the "
                         "sharded ranking does not count item hits)")
    if search.environment.reference_basis != "trained":
        raise ValueError("search.environment.reference_basis 'principal' is not supported by the sharded search")


def process_device() -> torch.device:
    """This rank's device: its GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def check_batch_size(batch_size: int) -> None:
    """Every rank takes a slice of each global batch: refuse a batch too small to give each one an example."""
    if batch_size < dist.get_world_size():
        raise ValueError(f"train.batch_size {batch_size} leaves some of the {dist.get_world_size()} ranks no example")


def rank_slice(indices: np.ndarray) -> np.ndarray:
    """This rank's consecutive share of a global batch (ranks may get one element more or less)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    bounds = np.linspace(0, len(indices), world + 1).round().astype(int)
    return indices[bounds[rank] : bounds[rank + 1]]


# ---- the rows this rank keeps the state of -------------------------------------------------------------------------
@dataclass
class KeptRows:
    """Per table: the row range whose search state lives here (None: none), its popularity state, its sizes."""

    span: dict[str, tuple[int, int] | None]
    popularity: dict[str, torch.Tensor]  # table -> float32 [kept rows] in [-1, 1]

    @property
    def tables(self) -> list[str]:
        return [t for t, s in self.span.items() if s is not None]

    def count(self, table: str) -> int:
        span = self.span[table]
        return 0 if span is None else span[1] - span[0]


def kept_rows(layouts: dict[str, TableLayout], counts: list[np.ndarray], log_scale: bool) -> KeptRows:
    """Spans from the layout; popularity = min-max of the counts (``log_scale``: of log(1 + count)) within each
    table, scaled to [-1, 1] (the table's min and max all-reduced, so the state matches one process's)."""
    rank = dist.get_rank()
    span = {t: layout.primary_rows(rank) for t, layout in layouts.items()}
    popularity = {}
    for (t, s), count in zip(span.items(), counts, strict=True):
        mine = (count[s[0] : s[1]] if s else count[:0]).astype(np.float64)
        local = torch.from_numpy(np.log1p(mine) if log_scale else mine)
        bounds = torch.tensor([-local.min().item() if len(local) else -math.inf,
                               local.max().item() if len(local) else -math.inf], dtype=torch.float64)
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
        lo, hi = -bounds[0].item(), bounds[1].item()
        popularity[t] = ((local - lo) / max(hi - lo, 1e-12) * 2 - 1).to(torch.float32)
    return KeptRows(span, popularity)


def full_sizes(kept: KeptRows, d_max: int) -> dict[str, torch.Tensor]:
    return {t: torch.full((kept.count(t),), d_max, dtype=torch.int64) for t in kept.span}


# ---- the sharded model and its weights -----------------------------------------------------------------------------
class ShardedTables:
    """A model whose EBC (at ``model.ebc``) DistributedModelParallel shards by ``sharding``.

    Tables are initialised from a hash of (seed, table, row, column) (``rows.init_shards``), so the model is the
    same whatever the sharding and world size; the dense rest (if any) from ``torch.manual_seed(seed)`` before
    the caller built it.

    ``row_groups`` names the rows the search sizes: group -> the EBC tables whose rows share its sizes (NeuMF's
    user rows live in a GMF and an MLP table). ``tables``/``layouts`` are the groups (the first table of a group
    speaks for its rows); ``physical``/``physical_layouts`` the EBC's tables. Default: one group per table.
    """

    def __init__(
        self, model: nn.Module, sharding: ShardingConfig, device: torch.device, d_max: int, init_std: float, seed: int,
        row_groups: dict[str, list[str]] | None = None,
    ) -> None:
        self.device, self.d_max, self.init_std, self.seed = device, d_max, init_std, seed
        self.physical = [c.name for c in model.get_submodule(EBC).embedding_bag_configs()]
        self.row_groups = row_groups or {t: [t] for t in self.physical}
        self.table_ids = {t: i for i, t in enumerate(self.physical)}
        self.dense_init = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(EBC)}
        self.model = shard_model(model, EBC, sharding, device)
        self.physical_layouts = table_layouts(self.model.plan, EBC, self.physical)
        self.tables = list(self.row_groups)
        self.layouts = {g: self.physical_layouts[group[0]] for g, group in self.row_groups.items()}
        self.shards: dict[str, list[LocalShard]] = local_shards(self.model, self.physical)
        self.held = {t: held_rows(s) for t, s in self.shards.items()}  # rows of any local shard (any column)
        self.reference: dict[str, Any] | None = None

    @property
    def sharding_types(self) -> dict[str, str]:
        return {t: self.model.plan.plan[EBC][t].sharding_type for t in self.physical}

    # -- state of the weights
    def reset_fresh(self) -> None:
        """The hashed initialisation of every shard and the seeded dense initialisation: a fresh model."""
        init_shards(self.shards, self.table_ids, self.init_std, self.seed)
        self._load_dense(self.dense_init)
        self._zero_fused_state()

    def snapshot_reference(self) -> None:
        self.reference = self.snapshot()

    def reset_to_reference(self) -> None:
        self.restore(self.reference)
        self._zero_fused_state()

    def snapshot(self) -> dict[str, Any]:
        """This rank's weights (local shards and dense part), to restore later."""
        return {
            "shards": {t: [s.weight.detach().clone() for s in parts] for t, parts in self.shards.items()},
            "dense": self._dense_state(),
        }

    def restore(self, snapshot: dict[str, Any]) -> None:
        with torch.no_grad():
            for t, parts in self.shards.items():
                for shard, saved in zip(parts, snapshot["shards"][t], strict=True):
                    shard.weight.copy_(saved)
        self._load_dense(snapshot["dense"])

    def checkpoint_state(self) -> dict[str, Any]:
        """The model's weights as views: torch.distributed.checkpoint saves from them and loads into them."""
        return {"model": self.model.state_dict()}

    def gather_tables(self) -> dict[str, torch.Tensor] | None:
        """Rank 0: every table whole [rows, d_max], assembled from the ranks' shards (the export step); else None.

        Collective.
        """
        pieces = {t: [(s.row_offset, s.col_offset, s.weight.detach().cpu().clone()) for s in parts]
                  for t, parts in self.shards.items()}
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.gather_object(pieces, gathered if dist.get_rank() == 0 else None, dst=0)
        if dist.get_rank() != 0:
            return None
        tables = {}
        for t in self.physical:
            full = torch.zeros(self.physical_layouts[t].rows, self.d_max)
            for rank_pieces in gathered:
                for row, col, weight in rank_pieces[t]:
                    full[row : row + weight.shape[0], col : col + weight.shape[1]] = weight
            tables[t] = full
        return tables

    def dense_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if ".embedding_bags." not in n]

    def _dense_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items() if ".embedding_bags." not in k}

    def _load_dense(self, state: dict[str, torch.Tensor]) -> None:
        current = self.model.state_dict()
        with torch.no_grad():
            for key, value in current.items():
                if ".embedding_bags." in key or not isinstance(value, torch.Tensor):
                    continue
                source = state.get(key, state.get(key.split("module.", 1)[-1]))
                value.copy_(source)

    def _zero_fused_state(self) -> None:
        """Fresh fused-optimizer state (e.g. row-wise Adagrad accumulators): every step starts alike."""
        with torch.no_grad():
            for per_param in self.model.fused_optimizer.state.values():
                for value in per_param.values():
                    if hasattr(value, "local_shards"):  # a ShardedTensor: its local shards are views
                        for shard in value.local_shards():
                            shard.tensor.zero_()
                    elif isinstance(value, torch.Tensor):
                        value.zero_()

    # -- sizes
    def apply_sizes(self, kept: KeptRows, sizes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Enforces the kept rows' sizes (per group) on every table of the group, sharing them with every other
        holder of those rows (column-wise co-holders; a group's tables placed elsewhere); returns the sizes of
        each table's held rows."""
        held_sizes = {}
        for g, group in self.row_groups.items():
            speaker = self.layouts[g]
            for t in group:
                layout, held = self.physical_layouts[t], self.held[t]
                if layout.replicated_rows or layout.shards != speaker.shards:  # the primaries broadcast
                    full = torch.zeros(speaker.rows, dtype=torch.int64)
                    for shard in speaker.primary:
                        part = full[shard.row_offset : shard.row_offset + shard.rows]
                        if shard.rank == dist.get_rank():
                            part.copy_(sizes[g])
                        dist.broadcast(part.contiguous(), src=shard.rank)
                        full[shard.row_offset : shard.row_offset + shard.rows] = part
                    held_sizes[t] = full[held[0] : held[1]] if held else full[:0]
                else:
                    held_sizes[t] = sizes[g] if held else torch.zeros(0, dtype=torch.int64)
                enforce_sizes(self.shards[t], held_sizes[t])
        return held_sizes

    def enforce(self, held_sizes: dict[str, torch.Tensor]) -> None:
        """Re-zeroes trailing columns after a fused-optimizer step."""
        for t in self.physical:
            enforce_sizes(self.shards[t], held_sizes[t])
