"""Matrix factorisation: score = <e_u, e_i>."""

from __future__ import annotations

import torch
from torchrec import KeyedJaggedTensor

from ciess_prod.models.base import BPROutput, Recommender, l2_of


class MF(Recommender):
    tables = {"user": "user", "item": "item"}

    def forward(self, batch: KeyedJaggedTensor) -> BPROutput:
        e = self.lookup(batch)
        u, p, n = e["user.user"], e["item.pos_item"], e["item.neg_item"]
        return BPROutput((u * p).sum(-1), (u * n).sum(-1), l2_of(u, p, n))

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        user_emb = self.masked_table("user")[users]
        return user_emb @ self.masked_table("item").T
