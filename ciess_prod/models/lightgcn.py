"""LightGCN (He et al., SIGIR 2020): K propagations over D^-1/2 A D^-1/2, layer mean, dot-product score."""

from __future__ import annotations

import torch

from ciess_prod.models.graph import Graph, GraphRecommender, spread


def lightgcn_layers(adjacency: Graph, ego: torch.Tensor, n_layers: int) -> torch.Tensor:
    """Mean of the ego embeddings and their ``n_layers`` propagations: [N, d] -> [N, d]."""
    layer, total = ego, ego
    for _ in range(n_layers):
        layer = spread(adjacency, layer)
        total = total + layer
    return total / (n_layers + 1)


class LightGCN(GraphRecommender):
    def final_embeddings(self) -> torch.Tensor:
        return lightgcn_layers(self.adjacency, self.ego(), self.config.n_layers)
