"""Run under torchrun (2 processes, gloo): per-row sizes hold for pooled multi-id bags under every sharding type.

For each sharding type and pooling mode: tables are initialised partition-independently, sizes enforced on the
local shards, and the pooled output of a batch of multi-id bags (some empty) must equal the pooled output of the
masked full table computed in one process. Garbage written into trailing columns must change nothing once sizes
are enforced, also after a fused-optimizer step. Exits non-zero on the first failure.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from ciess_prod.distributed.process import exit_skipping_finalisation
from ciess_prod.distributed.rows import enforce_sizes, hashed_normal, held_rows, init_shards, local_shards
from ciess_prod.distributed.sharding import ShardingConfig, shard_model

D_MAX, ROWS, SEED, STD = 16, (60, 80, 100, 40), 0, 0.1
TABLES = [f"t{i}" for i in range(len(ROWS))]


class Pooled(nn.Module):
    def __init__(self, pooling: PoolingType) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=t, embedding_dim=D_MAX, num_embeddings=n, feature_names=[f"f{i}"], pooling=pooling
                )
                for i, (t, n) in enumerate(zip(TABLES, ROWS, strict=True))
            ]
        )

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.ebc(kjt).to_dict()  # a sharded EBC orders its output keys by shard: key by feature
        return torch.cat([pooled[f"f{i}"] for i in range(len(ROWS))], dim=1)


def batch(rank: int, size: int = 12) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(100 + rank)
    lengths = torch.randint(0, 5, (len(ROWS) * size,), generator=g)  # bags of 0..4 ids
    values = torch.cat(
        [torch.randint(0, n, (int(lengths[i * size : (i + 1) * size].sum()),), generator=g) for i, n in enumerate(ROWS)]
    )
    return KeyedJaggedTensor.from_lengths_sync(keys=[f"f{i}" for i in range(len(ROWS))], values=values, lengths=lengths)


def reference(kjt: KeyedJaggedTensor, sizes: dict[str, torch.Tensor], mode: str) -> torch.Tensor:
    """The masked full tables pooled in one process (test only: it builds every table whole)."""
    outs = []
    for i, (t, n) in enumerate(zip(TABLES, ROWS, strict=True)):
        weight = hashed_normal(SEED, i, torch.arange(n), torch.arange(D_MAX)) * STD
        weight = weight * (torch.arange(D_MAX) < sizes[t].unsqueeze(1))
        jt = kjt[f"f{i}"]
        outs.append(F.embedding_bag(jt.values(), weight, jt.offsets()[:-1], mode=mode))
    return torch.cat(outs, dim=1)


def check(kind: str, pooling: PoolingType, mode: str, optimizer: str) -> None:
    rank = dist.get_rank()
    config = ShardingConfig(default=kind, optimizer=optimizer, lr=0.5)
    model = shard_model(Pooled(pooling), "ebc", config, torch.device("cpu"))
    shards = local_shards(model, TABLES)
    init_shards(shards, {t: i for i, t in enumerate(TABLES)}, STD, SEED)
    g = torch.Generator().manual_seed(7)
    sizes = {t: torch.randint(1, D_MAX + 1, (n,), generator=g) for t, n in zip(TABLES, ROWS, strict=True)}

    def held(t: str) -> torch.Tensor:
        span = held_rows(shards[t]) or (0, 0)  # table-wise: some ranks hold no row of a table
        return sizes[t][span[0] : span[1]]

    for t in TABLES:  # garbage in every trailing column first: enforcement must clear it
        for s in shards[t]:
            cols = torch.arange(s.col_offset, s.col_offset + s.weight.shape[1])
            s.weight.masked_fill_(cols.unsqueeze(0) >= held(t).unsqueeze(1), 1e3)
        enforce_sizes(shards[t], held(t))
    kjt = batch(rank)
    out = model(kjt)
    torch.testing.assert_close(out, reference(kjt, sizes, mode), rtol=1e-6, atol=1e-6, msg=f"{kind} {mode}: forward")

    out.square().sum().backward()  # the fused optimizer steps inside backward, trailing columns included
    for t in TABLES:
        enforce_sizes(shards[t], held(t))
    after = model(kjt).detach()
    assert not torch.allclose(after, out.detach()), f"{kind} {mode}: the step changed nothing"
    for t in TABLES:
        for s in shards[t]:
            cols = torch.arange(s.col_offset, s.col_offset + s.weight.shape[1])
            s.weight.masked_fill_(cols.unsqueeze(0) >= held(t).unsqueeze(1), -7.0)
        enforce_sizes(shards[t], held(t))
    assert torch.equal(model(kjt).detach(), after), f"{kind} {mode}: a trailing column reached the output"
    if rank == 0:
        print(f"ok {kind} {mode} {optimizer}", flush=True)


def main() -> int:
    dist.init_process_group("gloo")
    try:
        for kind in ("table_wise", "row_wise", "column_wise", "table_row_wise", "auto"):
            check(kind, PoolingType.SUM, "sum", "rowwise_adagrad")
            check(kind, PoolingType.MEAN, "mean", "sgd")
        dist.barrier()  # neither rank tears gloo down while the other still sends (only on success: no hang)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_skipping_finalisation(main())  # the group is destroyed; a gloo teardown abort must not fail the check
