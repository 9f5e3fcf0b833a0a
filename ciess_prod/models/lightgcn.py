"""LightGCN (He et al., SIGIR 2020): K propagations over D^-1/2 A D^-1/2, layer mean, dot-product score."""

from __future__ import annotations

import torch
from torch.nn import functional as F

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
        # Propagation acts on each column alone, so the columns no row keeps stay zero: only the widest row's
        # columns are propagated (a plan of 20-column users and 3-column items multiplies 20 of 128 columns;
        # bench/plan_width.py), then the result is padded back to d_max.
        width = self.widest_row()
        final = lightgcn_layers(self.adjacency, self.ego(width), self.config.n_layers)
        return F.pad(final, (0, self.config.d_max - width))
