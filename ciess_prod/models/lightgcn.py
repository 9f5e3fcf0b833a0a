"""LightGCN (He et al., SIGIR 2020): K propagations over D^-1/2 A D^-1/2, layer mean, dot-product score."""

from __future__ import annotations

import scipy.sparse as sp
import torch

from ciess_prod.models.graph import GraphRecommender, propagate


def lightgcn_layers(adjacency: sp.csr_matrix, ego: torch.Tensor, n_layers: int) -> torch.Tensor:
    """Mean of the ego embeddings and their ``n_layers`` propagations: [N, d] -> [N, d]."""
    layer, total = ego, ego
    for _ in range(n_layers):
        layer = propagate(adjacency, layer)
        total = total + layer
    return total / (n_layers + 1)


class LightGCN(GraphRecommender):
    def final_embeddings(self) -> torch.Tensor:
        return lightgcn_layers(self.adjacency, self.ego(), self.config.n_layers)
