"""A trained DLRM whose tables are ragged: the CTR counterpart of ``CompressedRecommender``.

Each feature's table becomes a ``RaggedEmbedding`` at its rows' sizes; bags pool in the ragged op
(``RaggedEmbedding.pooled``: sum or mean, empty bags zero), and everything after the tables (bottom MLP,
interaction, top MLP) is the DLRM's own ``head``, so logits equal the masked DLRM's (fp32: up to the order of the
pooled sums, ~1e-7).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from ciess_prod.compress.ragged import RaggedDtype, RaggedEmbedding
from ciess_prod.models.dlrm import DLRM, DLRMConfig, check_ids

HEAD_PREFIXES = ("bottom.", "top.")


class CompressedDLRM(nn.Module):
    """Inference-only DLRM over ragged tables: ``forward(dense, sparse)`` -> logits [B], as ``DLRM``."""

    def __init__(
        self,
        config: DLRMConfig,
        n_dense: int,
        feature_names: Sequence[str],
        tables: Mapping[str, RaggedEmbedding],
        head_state: Mapping[str, torch.Tensor],
    ) -> None:
        """tables: one per feature, named ``t_<feature>``, at d_max columns; head_state: the DLRM's ``bottom.*`` and
        ``top.*`` weights."""
        super().__init__()
        names = [f"t_{f}" for f in feature_names]
        if set(tables) != set(names):
            raise ValueError(f"tables must be {names}, got {sorted(tables)}")
        if any(tables[t].d_max != config.d_max for t in names):
            raise ValueError(f"every table must have d_max {config.d_max}")
        if len({t.dtype for t in tables.values()}) != 1:
            raise ValueError("all tables must share one dtype")
        # The DLRM's dense part; its EBC is built on the meta device (no memory) and dropped: the ragged tables
        # stand in for it.
        self.net = DLRM(config, n_dense, [tables[t].num_rows for t in names], feature_names, row_sizes="enforced")
        self.net.ebc = None
        expected = {k for k in self.net.state_dict() if k.startswith(HEAD_PREFIXES)}
        if set(head_state) != expected:
            raise ValueError(f"head weights must be {sorted(expected)}, got {sorted(head_state)}")
        self.net.load_state_dict(dict(head_state), strict=False)
        self.config, self.n_dense, self.feature_names = config, n_dense, list(feature_names)
        self.tables = nn.ModuleDict({t: tables[t] for t in names})
        self.eval()

    @classmethod
    def from_model(cls, model: DLRM, dtype: RaggedDtype = "fp32") -> CompressedDLRM:
        """Compresses a single-process (``row_sizes="masked"``) DLRM at its own per-row sizes."""
        tables = {
            name: RaggedEmbedding.from_dense(model.table_weight(i).detach(), model.row_sizes(i), dtype)
            for i, name in enumerate(model.table_names)
        }
        head = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(HEAD_PREFIXES)}
        return cls(model.config, model.n_dense, model.feature_names, tables, head)

    @property
    def dtype(self) -> str:
        return next(iter(self.tables.values())).dtype

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.net.state_dict().items() if k.startswith(HEAD_PREFIXES)}

    def embed(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """Pooled embeddings [B, F, d_max] in ``feature_names`` order, from the ragged tables."""
        jagged = sparse.to_dict()
        pooled = []
        for f in self.feature_names:
            jt, table = jagged[f], self.tables[f"t_{f}"]
            check_ids(f, jt.values(), table.num_rows)
            pooled.append(table.pooled(jt.values(), jt.offsets(), mode=self.config.pooling, include_last_offset=True))
        return torch.stack(pooled, dim=1)

    @torch.no_grad()
    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        self.net.check_inputs(dense, sparse)
        return self.net.head(dense, self.embed(sparse))

    def predict_proba(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return torch.sigmoid(self(dense, sparse))

    def train(self, mode: bool = True) -> CompressedDLRM:
        if mode:
            raise RuntimeError("a compressed DLRM is inference-only")
        return super().train(False)

    def nbytes(self) -> dict[str, int]:
        """Exact bytes held: ragged tables (compressed, ideal, dense equivalents) and the dense head."""
        tables = list(self.tables.values())
        return {
            "compressed_bytes": sum(t.nbytes()["total"] for t in tables),
            "ideal_bytes": sum(t.ideal_bytes() for t in tables),
            "dense_bytes": sum(t.dense_bytes() for t in tables),
            "head_bytes": sum(v.numel() * v.element_size() for v in self.head_state().values()),
            "graph_bytes": 0,
            "propagated_bytes": 0,
        }
