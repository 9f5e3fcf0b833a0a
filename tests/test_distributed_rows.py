"""Single-process pieces of the sharded search: partition-independent init, size enforcement, row ownership."""

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from ciess_prod.distributed.layout import Shard, TableLayout
from ciess_prod.distributed.rows import enforce_sizes, hashed_normal, held_rows, init_shards, local_shards


def test_hashed_values_depend_only_on_row_and_column():
    whole = hashed_normal(3, 1, torch.arange(300), torch.arange(16))
    part = hashed_normal(3, 1, torch.arange(120, 180), torch.arange(8, 16))
    assert torch.equal(whole[120:180, 8:16], part)
    assert abs(float(whole.mean())) < 0.05 and abs(float(whole.std()) - 1) < 0.05
    assert not torch.equal(whole, hashed_normal(3, 2, torch.arange(300), torch.arange(16)))  # per table


def test_init_and_enforce_on_a_plain_model():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.ebc = EmbeddingBagCollection(
                tables=[EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=100, feature_names=["f"])]
            )

    shards = local_shards(M(), ["t"])
    assert held_rows(shards["t"]) == (0, 100)
    init_shards(shards, {"t": 0}, std=0.5, seed=1, chunk_rows=7)  # chunking changes nothing
    torch.testing.assert_close(shards["t"][0].weight, hashed_normal(1, 0, torch.arange(100), torch.arange(8)) * 0.5)
    sizes = torch.randint(0, 9, (100,))
    enforce_sizes(shards["t"], sizes, rows=torch.tensor([3, 5]))
    weight = shards["t"][0].weight
    assert bool((weight[3, sizes[3]:] == 0).all()) and bool((weight[5, sizes[5]:] == 0).all())
    enforce_sizes(shards["t"], sizes)
    assert bool((weight * (torch.arange(8) >= sizes.unsqueeze(1)) == 0).all())


def test_row_owners_follow_the_column_zero_shards():
    layout = TableLayout("t", 0, 10, (Shard(0, 0, 6, 0, 8), Shard(1, 6, 4, 0, 8), Shard(1, 0, 6, 8, 8)))
    assert layout.primary_rows(0) == (0, 6) and layout.primary_rows(1) == (6, 10)
    assert layout.owners(torch.tensor([0, 5, 6, 9])).tolist() == [0, 0, 1, 1]
    assert layout.replicated_rows
