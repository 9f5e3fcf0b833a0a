"""Base recommenders over TorchRec tables with per-row embedding sizes."""

from __future__ import annotations

import scipy.sparse as sp

from ciess_prod.models.base import SIDES, BPROutput, ModelConfig, Recommender
from ciess_prod.models.dlrm import DLRM, DLRMConfig
from ciess_prod.models.lightgcn import LightGCN
from ciess_prod.models.memory import EmbeddingMemory, embedding_memory, sparsity, uniform_sizes
from ciess_prod.models.mf import MF
from ciess_prod.models.neumf import NeuMF
from ciess_prod.models.ngcf import NGCF

__all__ = [
    "SIDES",
    "BPROutput",
    "DLRM",
    "DLRMConfig",
    "EmbeddingMemory",
    "LightGCN",
    "MF",
    "ModelConfig",
    "NGCF",
    "NeuMF",
    "Recommender",
    "build_model",
    "embedding_memory",
    "model_memory",
    "sparsity",
    "uniform_sizes",
]


def build_model(config: ModelConfig, n_users: int, n_items: int, train: sp.csr_matrix) -> Recommender:
    """The recommender named by ``config.kind``; graph models take the training interactions as their graph."""
    if config.kind == "mf":
        return MF(n_users, n_items, config)
    if config.kind == "neumf":
        return NeuMF(n_users, n_items, config)
    if config.kind == "ngcf":
        return NGCF(n_users, n_items, config, train)
    if config.kind == "lightgcn":
        return LightGCN(n_users, n_items, config, train)
    raise ValueError(f"unknown model kind {config.kind!r}; expected one of mf, neumf, ngcf, lightgcn")


def model_memory(model: Recommender, bytes_per_value: int = 4) -> EmbeddingMemory:
    """Embedding parameters and bytes of ``model`` at its current per-row sizes."""
    copies = {side: sum(1 for s in model.tables.values() if s == side) for side in SIDES}
    sizes = {side: model.row_sizes(side) for side in SIDES}
    return embedding_memory(sizes, model.config.d_max, copies=copies, bytes_per_value=bytes_per_value)
