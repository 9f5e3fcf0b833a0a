"""Sharding a model's EmbeddingBagCollection with TorchRec DistributedModelParallel, on CPU (gloo) and GPU (NCCL).

Every table gets a sharding type from ``ShardingConfig`` (per table, or one default): table-wise, row-wise,
table-row-wise, column-wise, or ``auto`` (the TorchRec planner chooses). Tables train with an optimizer fused into
the backward pass (FBGEMM); on CPU FBGEMM fuses SGD and (row-wise) Adagrad only, not Adam.

On CPU the stock sharder offers row-wise and table-row-wise only for cuda/mtia, so the planner refuses them
("No available sharding type and compute kernel combination"), although they run on gloo
(``../shared/reference/torchrec-fbgemm-notes.md``). ``RowShardingSharder`` offers them on every device, and
explicit types are written into the plan by hand (TorchRec's ``sharding_plan`` constructors), so every listed type works
on CPU. Data-parallel is never used for tables: it replicates whole tables and all-reduces them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.sharding_plan import (
    column_wise,
    row_wise,
    table_row_wise,
    table_wise,
)
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ShardingEnv, ShardingPlan, ShardingType

TableSharding = Literal["auto", "table_wise", "row_wise", "table_row_wise", "column_wise"]
FUSED = "fused"
_OPTIMIZERS = {"sgd": EmbOptimType.EXACT_SGD, "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD}


@dataclass(frozen=True)
class ShardingConfig:
    default: TableSharding = "auto"  # sharding type of every table not listed in `tables`
    tables: dict[str, TableSharding] = field(default_factory=dict)  # per-table overrides, by EBC table name
    optimizer: Literal["rowwise_adagrad", "sgd"] = "rowwise_adagrad"  # fused into backward (CPU: no Adam)
    lr: float = 0.05  # learning rate of the fused table optimizer
    eps: float = 1e-8  # Adagrad epsilon

    def __post_init__(self) -> None:
        allowed = TableSharding.__args__
        for name, kind in [("default", self.default), *self.tables.items()]:
            if kind not in allowed:
                raise ValueError(f"sharding of {name!r} must be one of {allowed}, got {kind!r}")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def of(self, table: str) -> TableSharding:
        return self.tables.get(table, self.default)


class RowShardingSharder(EmbeddingBagCollectionSharder):
    """The stock EBC sharder, offering row-wise and table-row-wise on CPU too, and never data-parallel."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return [
            ShardingType.TABLE_WISE.value,
            ShardingType.ROW_WISE.value,
            ShardingType.TABLE_ROW_WISE.value,
            ShardingType.COLUMN_WISE.value,
        ]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return [FUSED]


def make_sharder(config: ShardingConfig) -> RowShardingSharder:
    fused = {"optimizer": _OPTIMIZERS[config.optimizer], "learning_rate": config.lr, "eps": config.eps}
    return RowShardingSharder(fused_params=fused)


def _by_hand(kind: TableSharding, world_size: int, table_index: int):
    """The plan constructor of an explicit sharding type (fused kernel)."""
    if kind == "table_wise":
        return table_wise(rank=table_index % world_size, compute_kernel=FUSED)  # round-robin over ranks
    if kind == "row_wise":
        return row_wise(compute_kernel=FUSED)
    if kind == "column_wise":
        return column_wise(ranks=list(range(world_size)), compute_kernel=FUSED)
    if kind == "table_row_wise":
        return table_row_wise(host_index=0)
    raise ValueError(f"no hand-written plan for {kind!r}")


def sharding_plan(
    ebc: EmbeddingBagCollection, path: str, config: ShardingConfig, env: ShardingEnv, device_type: str
) -> ShardingPlan:
    """A plan for the EBC at module path ``path``: explicit types by hand, ``auto`` tables by the planner."""
    names = [t.name for t in ebc.embedding_bag_configs()]
    unknown = sorted(set(config.tables) - set(names))
    if unknown:
        raise ValueError(f"sharding.tables names unknown tables {unknown}; the model has {names}")
    sharder = make_sharder(config)
    world = env.world_size
    auto = [n for n in names if config.of(n) == "auto"]
    per_table = {}
    if auto:
        allowed = sharder.sharding_types(device_type)
        constraints = {n: ParameterConstraints(sharding_types=allowed, compute_kernels=[FUSED]) for n in names}
        for n in names:
            if n not in auto:  # planned by hand below; pin the planner's choice to the same type
                constraints[n] = ParameterConstraints(sharding_types=[config.of(n)], compute_kernels=[FUSED])
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=world, compute_device=device_type, local_world_size=world),
            constraints=constraints,
            debug=False,
        )
        planned = planner.collective_plan(ebc, [sharder], env.process_group).plan[""]  # the EBC as root module
        per_table.update({n: planned[n] for n in auto})
    parameters = dict(ebc.named_parameters())
    for i, n in enumerate(names):
        if n not in auto:
            make = _by_hand(config.of(n), world, i)
            per_table[n] = make(parameters[f"embedding_bags.{n}.weight"], world, world, device_type, sharder)
            per_table[n].compute_kernel = FUSED  # table_row_wise's constructor takes no kernel argument
    return ShardingPlan({path: EmbeddingModuleShardingPlan({n: per_table[n] for n in names})})


def shard_model(model: nn.Module, ebc_path: str, config: ShardingConfig, device: torch.device) -> nn.Module:
    """Wraps ``model`` in DistributedModelParallel with its EBC at ``ebc_path`` (e.g. "ebc") sharded by plan.

    The dense rest of the model is replicated (DistributedDataParallel). Call under an initialised process group.
    """
    if not dist.is_initialized():
        raise RuntimeError("shard_model needs an initialised process group (run under torchrun)")
    env = ShardingEnv.from_process_group(dist.group.WORLD)
    ebc = model.get_submodule(ebc_path)
    plan = sharding_plan(ebc, ebc_path, config, env, device.type)
    return DistributedModelParallel(model, env=env, device=device, plan=plan, sharders=[make_sharder(config)])
