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
    def propagation_width(self) -> int:
        # The layers act on each column alone and score by dot product, so the columns no row keeps, zero in every
        # row, would stay zero and add nothing: a plan trains at its widest row's width (20 of 128 columns for a
        # plan of 20-column users and 3-column items; bench/plan_width.py), with the same scores and gradients.
        return self.widest_row()

    def final_from_ego(self, ego: torch.Tensor) -> torch.Tensor:
        return lightgcn_layers(self.adjacency, ego, self.config.n_layers)
