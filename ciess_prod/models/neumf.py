"""NeuMF (He et al., NCF 2017): a GMF branch and an MLP branch, each with its own user and item tables.

Both branches' tables obey the same per-row sizes, so an entity of size d_n keeps d_n columns in each. The dense
part (MLP tower and prediction layer) is its own module, ``NeuMFHead``, so a compressed model reuses it as is.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from ciess_prod.models.base import BPROutput, ModelConfig, Recommender, l2_of


class NeuMFHead(nn.Module):
    """Everything of NeuMF but its tables: scores from GMF and MLP embeddings of users and items."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        widths, self.d_max = config.mlp_layers, config.d_max
        # The first MLP layer acts on [e_u ; e_i]; it is split in two so scoring all items never builds B x I x 2d.
        self.mlp_user_in = nn.Linear(config.d_max, widths[0])
        self.mlp_item_in = nn.Linear(config.d_max, widths[0], bias=False)
        tower: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            tower += [nn.ReLU(), nn.Linear(w_in, w_out)]
        self.mlp_tower = nn.Sequential(*tower, nn.ReLU())
        self.predict = nn.Linear(config.d_max + widths[-1], 1)

    def score(self, gu: torch.Tensor, gi: torch.Tensor, mu_h: torch.Tensor, mi_h: torch.Tensor) -> torch.Tensor:
        """gu/gi: GMF embeddings; mu_h/mi_h: first-layer MLP projections; broadcasting over leading dims."""
        mlp = self.mlp_tower(mu_h + mi_h)
        weight = self.predict.weight.view(-1)
        return (gu * gi) @ weight[: self.d_max] + mlp @ weight[self.d_max :] + self.predict.bias

    def score_all_items(
        self,
        user_gmf: torch.Tensor,
        user_mlp: torch.Tensor,
        item_gmf: torch.Tensor,
        item_mlp: torch.Tensor,
        items_per_chunk: int = 256,
    ) -> torch.Tensor:
        """Users' rows [B, d] of both branches against every item's rows [I, d] -> scores [B, I], item-chunked."""
        gu = user_gmf.unsqueeze(1)  # [B, 1, d]
        mu_h = self.mlp_user_in(user_mlp).unsqueeze(1)  # [B, 1, h]
        mi_h = self.mlp_item_in(item_mlp)
        chunks = [
            self.score(gu, item_gmf[s : s + items_per_chunk], mu_h, mi_h[s : s + items_per_chunk])
            for s in range(0, item_gmf.shape[0], items_per_chunk)
        ]
        return torch.cat(chunks, dim=1)


class NeuMF(Recommender):
    tables = {"user_gmf": "user", "item_gmf": "item", "user_mlp": "user", "item_mlp": "item"}

    def __init__(self, n_users: int, n_items: int, config: ModelConfig) -> None:
        super().__init__(n_users, n_items, config)
        self.head = NeuMFHead(config)

    def forward(self, batch: KeyedJaggedTensor) -> BPROutput:
        e = self.lookup(batch)
        gu, gp, gn = e["user_gmf.user"], e["item_gmf.pos_item"], e["item_gmf.neg_item"]
        mu, mp, mn = e["user_mlp.user"], e["item_mlp.pos_item"], e["item_mlp.neg_item"]
        mu_h = self.head.mlp_user_in(mu)
        pos = self.head.score(gu, gp, mu_h, self.head.mlp_item_in(mp))
        neg = self.head.score(gu, gn, mu_h, self.head.mlp_item_in(mn))
        return BPROutput(pos, neg, l2_of(gu, gp, gn, mu, mp, mn))

    def score_users(self, users: torch.Tensor, items_per_chunk: int = 256) -> torch.Tensor:
        return self.head.score_all_items(
            self.masked_table("user_gmf")[users],
            self.masked_table("user_mlp")[users],
            self.masked_table("item_gmf"),
            self.masked_table("item_mlp"),
            items_per_chunk,
        )
