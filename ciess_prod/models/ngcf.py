"""NGCF (Wang et al., SIGIR 2019): layers of LeakyReLU((L+I)E W1 + (L E) * E W2), message dropout in training,
L2-normalised layer outputs concatenated with the ego embeddings, dot-product score.

The layer weights are their own module, ``NGCFLayers``, so a compressed model reuses them as is.
"""

from __future__ import annotations

import scipy.sparse as sp
import torch
from torch import nn
from torch.nn import functional as F

from ciess_prod.models.base import ModelConfig
from ciess_prod.models.graph import Graph, GraphRecommender, spread


class NGCFLayers(nn.Module):
    """The propagation layers: ego embeddings [N, d] -> final representations [N, (n_layers + 1) d]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, self.dropout = config.d_max, config.dropout
        self.w_sum = nn.ModuleList(nn.Linear(d, d) for _ in range(config.n_layers))
        self.w_product = nn.ModuleList(nn.Linear(d, d) for _ in range(config.n_layers))
        for layer in [*self.w_sum, *self.w_product]:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, adjacency: Graph, ego: torch.Tensor) -> torch.Tensor:
        layer, outputs = ego, [ego]
        for w_sum, w_product in zip(self.w_sum, self.w_product, strict=True):
            side = spread(adjacency, layer)
            layer = F.leaky_relu(w_sum(side + layer) + w_product(side * layer), negative_slope=0.2)
            layer = F.dropout(layer, p=self.dropout, training=self.training)
            outputs.append(F.normalize(layer, dim=1))
        return torch.cat(outputs, dim=1)


class NGCF(GraphRecommender):
    def __init__(self, n_users: int, n_items: int, config: ModelConfig, train: sp.csr_matrix) -> None:
        super().__init__(n_users, n_items, config, train)
        self.layers = NGCFLayers(config)

    def final_from_ego(self, ego: torch.Tensor) -> torch.Tensor:
        return self.layers(self.adjacency, ego)
