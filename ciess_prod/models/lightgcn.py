"""LightGCN (He et al., SIGIR 2020): K propagations over D^-1/2 A D^-1/2, layer mean, dot-product score."""

from __future__ import annotations

import torch

from ciess_prod.models.graph import GraphRecommender, propagate


class LightGCN(GraphRecommender):
    def final_embeddings(self) -> torch.Tensor:
        layer = self.ego()
        total = layer
        for _ in range(self.config.n_layers):
            layer = propagate(self.adjacency, layer)
            total = total + layer
        return total / (self.config.n_layers + 1)
