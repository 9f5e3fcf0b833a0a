"""The recommender interface shared by MF, NeuMF, NGCF and LightGCN.

User and item embeddings are tables of one TorchRec ``EmbeddingBagCollection`` at ``d_max`` columns, so later
stages can shard them with DistributedModelParallel unchanged. Per-row sizes are buffers next to the tables:
changing them never rebuilds the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from ciess_prod.models.sizes import check_sizes, mask_rows, masked_table, widest

Side = Literal["user", "item"]
SIDES: tuple[Side, ...] = ("user", "item")
BATCH_KEYS = ("user", "pos_item", "neg_item")
"""Keys of a BPR batch: one id per bag for the user, the positive item and the sampled negative item."""


@dataclass(frozen=True)
class ModelConfig:
    kind: Literal["mf", "neumf", "ngcf", "lightgcn"] = "lightgcn"
    d_max: int = 128  # full embedding width; per-row sizes lie in [1, d_max]
    n_layers: int = 3  # propagation layers (NGCF, LightGCN)
    dropout: float = 0.1  # NGCF message dropout, training only
    mlp_layers: tuple[int, ...] = (256, 128, 64)  # NeuMF MLP tower widths
    init_std: float = 0.01  # embeddings start as N(0, init_std^2), as in the paper

    def __post_init__(self) -> None:
        if self.d_max < 1:
            raise ValueError(f"d_max must be >= 1, got {self.d_max}")
        if self.n_layers < 0:
            raise ValueError(f"n_layers must be >= 0, got {self.n_layers}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if not self.mlp_layers or any(w < 1 for w in self.mlp_layers):
            raise ValueError(f"mlp_layers must be positive widths, got {self.mlp_layers}")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")


@dataclass
class BPROutput:
    pos_scores: torch.Tensor  # [B]
    neg_scores: torch.Tensor  # [B]
    l2: torch.Tensor  # scalar: (|e_u|^2 + |e_pos|^2 + |e_neg|^2) / 2 / B over the masked ego embeddings


class Recommender(nn.Module):
    """Base class: owns the embedding tables, the per-row sizes and the batch plumbing."""

    # table name -> side whose per-row sizes it obeys; subclasses list their tables here
    tables: dict[str, Side] = {}

    def __init__(self, n_users: int, n_items: int, config: ModelConfig) -> None:
        super().__init__()
        self.n_users, self.n_items, self.config = n_users, n_items, config
        self.n_rows = {"user": n_users, "item": n_items}
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=name,
                    embedding_dim=config.d_max,
                    num_embeddings=self.n_rows[side],
                    feature_names=self.feature_names(name),
                )
                for name, side in self.tables.items()
            ]
        )
        with torch.no_grad():
            for name in self.tables:
                nn.init.normal_(self.table_weight(name), std=config.init_std)
        for side in SIDES:
            self.register_buffer(f"{side}_sizes", torch.full((self.n_rows[side],), config.d_max, dtype=torch.int32))

    @staticmethod
    def feature_names(table: str) -> list[str]:
        """Each table reads the batch keys of its side, prefixed by the table name so features stay unique."""
        side = "user" if table.startswith("user") else "item"
        keys = ["user"] if side == "user" else ["pos_item", "neg_item"]
        return [f"{table}.{k}" for k in keys]

    # ---- sizes ---------------------------------------------------------------------------------------------
    def row_sizes(self, side: Side) -> torch.Tensor:
        return getattr(self, f"{side}_sizes")

    def set_row_sizes(self, side: Side, sizes: torch.Tensor) -> None:
        """Sets the per-row sizes of every table of ``side`` in place (no rebuild, no mask allocation)."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        checked = check_sizes(sizes, self.n_rows[side], self.config.d_max, name=f"{side} sizes")
        self.row_sizes(side).copy_(checked)
        self.invalidate_cache()

    # ---- tables --------------------------------------------------------------------------------------------
    def table_weight(self, name: str) -> nn.Parameter:
        return self.ebc.embedding_bags[name].weight

    def masked_table(self, name: str, width: int | None = None) -> torch.Tensor:
        """The table with every row cut to its size, as the model consumes it: [N, width or d_max].

        ``width`` drops trailing columns that no row keeps; it must be at least ``widest_row()``.
        """
        weight = self.table_weight(name)
        return masked_table(weight if width is None else weight[:, :width], self.row_sizes(self.tables[name]))

    def widest_row(self) -> int:
        """The largest size of any row: from this column on every masked table is zero."""
        return widest(self.row_sizes(side) for side in SIDES)

    def lookup(self, batch: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Masked ego embeddings per (table, batch key) through the EBC: ``{"user_gmf.user": [B, d], ...}``."""
        ids = {key: batch[key].values() for key in BATCH_KEYS}
        features = [(f, ids[f.split(".", 1)[1]]) for name in self.tables for f in self.feature_names(name)]
        values = torch.cat([v for _, v in features])
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[f for f, _ in features], values=values, lengths=torch.ones_like(values, dtype=torch.int32)
        )
        pooled = self.ebc(kjt).to_dict()
        out = {}
        for f, v in features:
            table = f.split(".", 1)[0]
            out[f] = mask_rows(pooled[f], self.row_sizes(self.tables[table])[v])
        return out

    # ---- model API -----------------------------------------------------------------------------------------
    def forward(self, batch: KeyedJaggedTensor) -> BPROutput:
        raise NotImplementedError

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        """Scores of every item for each user: [B] -> [B, n_items]."""
        raise NotImplementedError

    def invalidate_cache(self) -> None:
        """Drops cached inference state (graph models cache propagated embeddings in eval mode)."""

    def train(self, mode: bool = True) -> Recommender:
        self.invalidate_cache()
        return super().train(mode)


def l2_of(*embeddings: torch.Tensor) -> torch.Tensor:
    """LightGCN-style L2 term: half the squared norm of the batch's ego embeddings, per example."""
    batch = embeddings[0].shape[0]
    return sum(e.pow(2).sum() for e in embeddings) / 2 / batch
