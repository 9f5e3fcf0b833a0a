"""A trained recommender whose embedding tables are ragged: the plan's saving made real, the scores kept.

``CompressedRecommender.from_model`` cuts every table of a trained ``Recommender`` to its rows' sizes
(``RaggedEmbedding``) and keeps the model's dense part as is: NeuMF's ``NeuMFHead``, NGCF's ``NGCFLayers``, and for
the graph models (LightGCN, NGCF) the normalised training adjacency their propagation runs over. The dense tables
are dropped. Scores equal the masked model's bit for bit in fp32.

Graph models: the artifact carries the propagation *inputs* (ragged ego tables, adjacency, layer weights), not the
propagated representations. Propagation mixes rows of every size, so the final representations are dense,
[N, widest row's size] for LightGCN (its later columns stay zero; models/lightgcn.py) and [N, (layers + 1) d_max]
for NGCF, and would throw the plan's saving away in storage; from the inputs they are recomputed exactly, once,
when the model first scores (cached: serving keeps them resident, a cost the byte accounting reports as
``propagated_bytes``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from ciess_prod.compress.ragged import RaggedDtype, RaggedEmbedding
from ciess_prod.models import ModelConfig, Recommender
from ciess_prod.models.base import SIDES, Side
from ciess_prod.models.lightgcn import lightgcn_layers
from ciess_prod.models.neumf import NeuMF, NeuMFHead
from ciess_prod.models.ngcf import NGCF, NGCFLayers
from ciess_prod.models.sizes import widest

GRAPH_KINDS = ("lightgcn", "ngcf")
TABLES: dict[str, dict[str, Side]] = {
    "mf": {"user": "user", "item": "item"},
    "lightgcn": {"user": "user", "item": "item"},
    "ngcf": {"user": "user", "item": "item"},
    "neumf": dict(NeuMF.tables),
}


def build_head(config: ModelConfig) -> nn.Module | None:
    """The dense part of a model kind (None when it has none), freshly initialised: load weights into it."""
    if config.kind == "neumf":
        return NeuMFHead(config)
    if config.kind == "ngcf":
        return NGCFLayers(config)
    return None


def _model_head(model: Recommender) -> nn.Module | None:
    if isinstance(model, NeuMF):
        return model.head
    if isinstance(model, NGCF):
        return model.layers
    return None


class CompressedRecommender(nn.Module):
    """Inference-only recommender over ragged tables; ``score_users`` as in ``Recommender``."""

    def __init__(
        self,
        config: ModelConfig,
        n_users: int,
        n_items: int,
        tables: Mapping[str, RaggedEmbedding],
        head: nn.Module | None,
        adjacency: sp.csr_matrix | None,
    ) -> None:
        """tables: one per name of ``TABLES[config.kind]`` with that side's row count and d_max; head: as
        ``build_head(config)`` gives, weights loaded; adjacency: [n_users + n_items]^2 for graph kinds, else None."""
        super().__init__()
        expected = TABLES[config.kind]
        if set(tables) != set(expected):
            raise ValueError(f"{config.kind} needs the tables {sorted(expected)}, got {sorted(tables)}")
        rows = {"user": n_users, "item": n_items}
        for name, table in tables.items():
            if table.num_rows != rows[expected[name]] or table.d_max != config.d_max:
                raise ValueError(
                    f"table {name}: {table.num_rows} rows x d_max {table.d_max}, expected "
                    f"{rows[expected[name]]} x {config.d_max}"
                )
        if len({t.dtype for t in tables.values()}) != 1:
            raise ValueError("all tables must share one dtype")
        if (head is None) != (build_head(config) is None):
            raise ValueError(f"{config.kind} {'takes no' if head is not None else 'needs a'} dense head")
        graph = config.kind in GRAPH_KINDS
        if graph and (adjacency is None or adjacency.shape != (n_users + n_items,) * 2):
            raise ValueError(f"{config.kind} needs the normalised adjacency of {n_users + n_items} nodes")
        self.config, self.n_users, self.n_items = config, n_users, n_items
        self.tables = nn.ModuleDict(dict(tables))
        self.head = head
        self.adjacency = adjacency if graph else None
        self._propagated: tuple[torch.Tensor, torch.Tensor] | None = None
        self.eval()

    @classmethod
    def from_model(cls, model: Recommender, dtype: RaggedDtype = "fp32") -> CompressedRecommender:
        """Compresses a trained model at its own per-row sizes (set them from the plan before training)."""
        tables = {
            name: RaggedEmbedding.from_dense(model.table_weight(name).detach(), model.row_sizes(side), dtype)
            for name, side in model.tables.items()
        }
        source = _model_head(model)
        head = build_head(model.config)
        if head is not None:
            head.load_state_dict(source.state_dict())
        adjacency = getattr(model, "adjacency", None)
        return cls(model.config, model.n_users, model.n_items, tables, head, adjacency)

    @property
    def dtype(self) -> str:
        return next(iter(self.tables.values())).dtype

    def row_sizes(self, side: Side) -> torch.Tensor:
        name = next(n for n, s in TABLES[self.config.kind].items() if s == side)
        return self.tables[name].sizes

    # ---- scoring ---------------------------------------------------------------------------------------------
    def propagated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Graph kinds: final (users, items) representations, computed once from the ragged ego tables."""
        if self._propagated is None:
            # The sparse propagation runs on CPU (models/graph.py); the result moves to the tables' device.
            device = self.tables["user"].values.device
            ego = torch.cat([self.tables["user"].to_dense(), self.tables["item"].to_dense()]).cpu()
            with torch.no_grad():
                if self.config.kind == "lightgcn":
                    final = lightgcn_layers(self.adjacency, ego[:, : self.final_width()], self.config.n_layers)
                else:
                    head = self.head if device.type == "cpu" else copy.deepcopy(self.head).cpu()
                    final = head(self.adjacency, ego)
            self._propagated = tuple(final.to(device).split([self.n_users, self.n_items]))
        return self._propagated

    def final_width(self) -> int:
        """Columns of the propagated representations (graph kinds), as the masked model computes them."""
        if self.config.kind == "lightgcn":
            return widest(self.row_sizes(side) for side in SIDES)
        if self.config.kind == "ngcf":
            return self.config.d_max * (self.config.n_layers + 1)
        raise ValueError(f"{self.config.kind} does not propagate")

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> CompressedRecommender:
        self._propagated = None  # a device move drops the cached representations
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        """Scores of every item for each user: int64 [B] -> fp32 [B, n_items]."""
        kind = self.config.kind
        if kind in GRAPH_KINDS:
            user_final, item_final = self.propagated()
            return user_final[users] @ item_final.T
        if kind == "mf":
            return self.tables["user"].lookup(users) @ self.tables["item"].to_dense().T
        return self.head.score_all_items(
            self.tables["user_gmf"].lookup(users),
            self.tables["user_mlp"].lookup(users),
            self.tables["item_gmf"].to_dense(),
            self.tables["item_mlp"].to_dense(),
        )

    def train(self, mode: bool = True) -> CompressedRecommender:
        if mode:
            raise RuntimeError("a compressed recommender is inference-only")
        return super().train(False)

    # ---- bytes -----------------------------------------------------------------------------------------------
    def nbytes(self) -> dict[str, int]:
        """Exact bytes held: tables (``compressed_bytes``: payload, offsets, scales), their ``ideal_bytes`` and
        ``dense_bytes``, the dense head, the adjacency, and (graph kinds) the propagated representations."""
        tables = list(self.tables.values())
        head = 0 if self.head is None else sum(t.numel() * t.element_size() for t in self.head.state_dict().values())
        graph = 0
        if self.adjacency is not None:
            graph = sum(a.nbytes for a in graph_arrays(self.adjacency).values())
        return {
            "compressed_bytes": sum(t.nbytes()["total"] for t in tables),
            "ideal_bytes": sum(t.ideal_bytes() for t in tables),
            "dense_bytes": sum(t.dense_bytes() for t in tables),
            "head_bytes": head,
            "graph_bytes": graph,
            "propagated_bytes": (
                (self.n_users + self.n_items) * self.final_width() * 4 if self.config.kind in GRAPH_KINDS else 0
            ),
        }


def graph_arrays(adjacency: sp.csr_matrix) -> dict[str, np.ndarray]:
    """The CSR arrays stored for a graph: indptr int64, indices int32, data float32."""
    return {
        "indptr": adjacency.indptr.astype(np.int64),
        "indices": adjacency.indices.astype(np.int32),
        "data": adjacency.data.astype(np.float32),
    }


def graph_from_arrays(arrays: Mapping[str, np.ndarray], nodes: int) -> sp.csr_matrix:
    """Inverse of ``graph_arrays``; ValueError when the arrays are not a valid CSR matrix of ``nodes`` nodes."""
    indptr, indices, data = arrays["indptr"], arrays["indices"], arrays["data"]
    if indptr.shape != (nodes + 1,) or indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != len(indices):
        raise ValueError(f"graph indptr is not a CSR row pointer of {nodes} rows over {len(indices)} entries")
    if len(data) != len(indices) or (len(indices) and (indices.min() < 0 or indices.max() >= nodes)):
        raise ValueError(f"graph indices/data do not describe {nodes} columns")
    if not np.isfinite(data).all():
        raise ValueError("graph data contain NaN or infinity")
    return sp.csr_matrix((data, indices, indptr), shape=(nodes, nodes))


__all__ = ["GRAPH_KINDS", "SIDES", "TABLES", "CompressedRecommender", "build_head", "graph_arrays", "graph_from_arrays"]
