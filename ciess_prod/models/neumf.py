"""NeuMF (He et al., NCF 2017): a GMF branch and an MLP branch, each with its own user and item tables.

Both branches' tables obey the same per-row sizes, so an entity of size d_n keeps d_n columns in each.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from ciess_prod.models.base import BPROutput, ModelConfig, Recommender, l2_of


class NeuMF(Recommender):
    tables = {"user_gmf": "user", "item_gmf": "item", "user_mlp": "user", "item_mlp": "item"}

    def __init__(self, n_users: int, n_items: int, config: ModelConfig) -> None:
        super().__init__(n_users, n_items, config)
        widths = config.mlp_layers
        # The first MLP layer acts on [e_u ; e_i]; it is split in two so scoring all items never builds B x I x 2d.
        self.mlp_user_in = nn.Linear(config.d_max, widths[0])
        self.mlp_item_in = nn.Linear(config.d_max, widths[0], bias=False)
        tower: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            tower += [nn.ReLU(), nn.Linear(w_in, w_out)]
        self.mlp_tower = nn.Sequential(*tower, nn.ReLU())
        self.predict = nn.Linear(config.d_max + widths[-1], 1)

    def _score(self, gu: torch.Tensor, gi: torch.Tensor, mu_h: torch.Tensor, mi_h: torch.Tensor) -> torch.Tensor:
        """gu/gi: GMF embeddings; mu_h/mi_h: first-layer MLP projections; broadcasting over leading dims."""
        mlp = self.mlp_tower(mu_h + mi_h)
        d = self.config.d_max
        weight = self.predict.weight.view(-1)
        return (gu * gi) @ weight[:d] + mlp @ weight[d:] + self.predict.bias

    def forward(self, batch: KeyedJaggedTensor) -> BPROutput:
        e = self.lookup(batch)
        gu, gp, gn = e["user_gmf.user"], e["item_gmf.pos_item"], e["item_gmf.neg_item"]
        mu, mp, mn = e["user_mlp.user"], e["item_mlp.pos_item"], e["item_mlp.neg_item"]
        mu_h = self.mlp_user_in(mu)
        pos = self._score(gu, gp, mu_h, self.mlp_item_in(mp))
        neg = self._score(gu, gn, mu_h, self.mlp_item_in(mn))
        return BPROutput(pos, neg, l2_of(gu, gp, gn, mu, mp, mn))

    def score_users(self, users: torch.Tensor, items_per_chunk: int = 256) -> torch.Tensor:
        gu = self.masked_table("user_gmf")[users].unsqueeze(1)  # [B, 1, d]
        mu_h = self.mlp_user_in(self.masked_table("user_mlp")[users]).unsqueeze(1)  # [B, 1, h]
        gi_all = self.masked_table("item_gmf")
        mi_h_all = self.mlp_item_in(self.masked_table("item_mlp"))
        chunks = [
            self._score(gu, gi_all[s : s + items_per_chunk], mu_h, mi_h_all[s : s + items_per_chunk])
            for s in range(0, self.n_items, items_per_chunk)
        ]
        return torch.cat(chunks, dim=1)
