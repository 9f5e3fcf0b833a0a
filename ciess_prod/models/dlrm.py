"""DLRM (Naumov et al., 2019) for CTR prediction over per-row embedding sizes.

Every sparse feature has its own table in one TorchRec ``EmbeddingBagCollection`` at ``d_max`` columns (later
stages shard it with DistributedModelParallel unchanged); row n of a table keeps only its first d_n columns, with
d_n held in an int32 buffer next to the tables. Changing sizes never rebuilds the model or overwrites weights.

Pooling with a prefix mask per ROW (design choice (a)). A bag pools several rows of different sizes, so pooling
first and masking after cannot be exact. Instead ``embed`` gathers the bag's rows from the EBC table weight
(``F.embedding``), zeroes each row's trailing columns with a mask built from ``sizes[ids]`` only (never an
N x d_max mask), and segment-sums the masked rows into their bags (``index_add``; mean divides by the bag length,
empty bags pool to zero as in the EBC). Cost: O(total ids x d_max), like the EBC itself. Trailing columns thus never
reach an output, and their gradient is exactly zero, so Adam/SGD leave them untouched as long as they never had a
gradient (weight decay or momentum carried from before a size shrank may still move them, harmlessly: they are
read as zero). With every size at d_max the result equals the EBC's own pooled output.

The alternative (b), zeroing the trailing columns in the weight after every optimizer step so that the EBC/FBGEMM
kernels pool exactly, is what sharded training with fused optimizers needs, but it destroys the trailing values
(a size that later grows back would regrow from zero), needs a hook after every step, and under row-wise Adagrad the
trailing gradients still enter each row's accumulator unless masked too. It is not used here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from ciess_prod.models.sizes import check_sizes, masked_table


@dataclass(frozen=True)
class DLRMConfig:
    d_max: int = 16  # embedding width of every table; per-row sizes lie in [1, d_max]
    bottom_mlp: tuple[int, ...] = (64, 16)  # dense-feature MLP widths; the last must equal d_max
    top_mlp: tuple[int, ...] = (64, 32)  # hidden widths after the interaction; a final layer outputs 1 logit
    interaction: Literal["dot", "cat"] = "dot"  # "dot": pairwise dots (upper triangle) + bottom output; "cat": concat
    pooling: Literal["sum", "mean"] = "sum"  # how a bag of ids pools its (masked) rows
    init_std: float = 0.01  # embeddings start as N(0, init_std^2)

    def __post_init__(self) -> None:
        if self.d_max < 1:
            raise ValueError(f"d_max must be >= 1, got {self.d_max}")
        if not self.bottom_mlp or any(w < 1 for w in self.bottom_mlp):
            raise ValueError(f"bottom_mlp must be positive widths, got {self.bottom_mlp}")
        if self.bottom_mlp[-1] != self.d_max:
            raise ValueError(f"bottom_mlp must end at d_max={self.d_max}, got {self.bottom_mlp}")
        if any(w < 1 for w in self.top_mlp):
            raise ValueError(f"top_mlp must be positive widths, got {self.top_mlp}")
        if self.interaction not in ("dot", "cat"):
            raise ValueError(f"interaction must be 'dot' or 'cat', got {self.interaction!r}")
        if self.pooling not in ("sum", "mean"):
            raise ValueError(f"pooling must be 'sum' or 'mean', got {self.pooling!r}")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")


def _mlp(widths: Sequence[int], relu_last: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(w_in, w_out))
        if relu_last or i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def check_ids(feature: str, ids: torch.Tensor, n_rows: int) -> None:
    """Raises IndexError naming ``feature`` if an id lies outside [0, n_rows)."""
    if ids.numel():
        lo, hi = torch.aminmax(ids)
        if int(lo) < 0 or int(hi) >= n_rows:
            raise IndexError(f"feature {feature!r}: ids must lie in [0, {n_rows}), got [{int(lo)}, {int(hi)}]")


def row_mean_over_examples(
    sparse: KeyedJaggedTensor, per_example: torch.Tensor, table_rows: Mapping[str, int]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per row, the sum of ``per_example`` [B] over the examples whose bag holds that row, and how many they are.

    ``table_rows`` maps each KJT feature to its table's row count; the result maps the same features to
    ``(sum [rows], count [rows])`` (sum in ``per_example``'s dtype, count int64), so the mean is ``sum / count``
    where ``count > 0``. An id repeated within one bag counts its example once. Vectorised: one ``unique`` over
    (example, id) pairs, then ``index_add_`` and ``bincount``.
    """
    if per_example.dim() != 1 or per_example.shape[0] != sparse.stride():
        raise ValueError(f"per_example: expected shape [{sparse.stride()}], got {list(per_example.shape)}")
    jagged = sparse.to_dict()
    missing = [f for f in table_rows if f not in jagged]
    if missing:
        raise ValueError(f"features {missing} are missing from the batch (keys {sparse.keys()})")
    out = {}
    for feature, n_rows in table_rows.items():
        jt = jagged[feature]
        ids = jt.values().long()
        check_ids(feature, ids, n_rows)
        lengths = jt.lengths().long()
        examples = torch.repeat_interleave(torch.arange(lengths.numel(), device=ids.device), lengths)
        pairs = torch.unique(examples * n_rows + ids)  # one entry per (example, row) occurrence
        rows, examples = pairs % n_rows, torch.div(pairs, n_rows, rounding_mode="floor")
        total = torch.zeros(n_rows, dtype=per_example.dtype, device=per_example.device)
        total.index_add_(0, rows, per_example[examples])
        out[feature] = (total, torch.bincount(rows, minlength=n_rows))
    return out


class DLRM(nn.Module):
    """Bottom MLP over dense features, one per-row-sized table per sparse feature, interaction, top MLP -> logit."""

    def __init__(
        self,
        config: DLRMConfig,
        n_dense: int,
        table_sizes: Sequence[int],
        feature_names: Sequence[str],
        row_sizes: Literal["masked", "enforced"] = "masked",
    ) -> None:
        """row_sizes: "masked" holds per-row sizes and masks looked-up rows (design (a), single process);
        "enforced" holds none: the tables are built on the meta device for DistributedModelParallel to
        materialise shard by shard, pooling is the EBC's own, and the caller keeps trailing columns zero
        (``ciess_prod.distributed.rows.enforce_sizes``, design (b), what fused sharded kernels need)."""
        super().__init__()
        if row_sizes not in ("masked", "enforced"):
            raise ValueError(f"row_sizes must be 'masked' or 'enforced', got {row_sizes!r}")
        self.row_size_mode = row_sizes
        if len(table_sizes) != len(feature_names) or not feature_names:
            raise ValueError(
                f"table_sizes and feature_names must be non-empty and of equal length, "
                f"got {len(table_sizes)} and {len(feature_names)}"
            )
        if len(set(feature_names)) != len(feature_names):
            raise ValueError(f"feature_names must be unique, got {list(feature_names)}")
        if any(n < 1 for n in table_sizes):
            raise ValueError(f"table_sizes must be >= 1, got {list(table_sizes)}")
        if n_dense < 0:
            raise ValueError(f"n_dense must be >= 0, got {n_dense}")
        self.config, self.n_dense = config, n_dense
        self.feature_names = list(feature_names)
        self.table_names = [f"t_{f}" for f in feature_names]
        # KJT feature -> rows of its table (the ``table_rows`` argument of ``row_mean_over_examples``)
        self.table_rows = dict(zip(self.feature_names, (int(n) for n in table_sizes), strict=True))
        pooling = PoolingType.SUM if config.pooling == "sum" else PoolingType.MEAN
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=name, embedding_dim=config.d_max, num_embeddings=rows, feature_names=[f], pooling=pooling
                )
                for name, f, rows in zip(self.table_names, self.feature_names, table_sizes, strict=True)
            ],
            device=torch.device("meta") if row_sizes == "enforced" else None,
        )
        if row_sizes == "masked":
            with torch.no_grad():
                for name in self.table_names:
                    nn.init.normal_(self.table_weight(name), std=config.init_std)
            for i, rows in enumerate(table_sizes):
                self.register_buffer(f"sizes_{i}", torch.full((int(rows),), config.d_max, dtype=torch.int32))

        # Without dense features there is no bottom MLP and the interaction acts on the embeddings alone.
        self.bottom = _mlp([n_dense, *config.bottom_mlp], relu_last=True) if n_dense else None
        n_vectors = len(feature_names) + (1 if n_dense else 0)
        if config.interaction == "dot":
            top_in = n_vectors * (n_vectors - 1) // 2 + (config.d_max if n_dense else 0)
        else:
            top_in = n_vectors * config.d_max
        if top_in == 0:
            raise ValueError("interaction 'dot' over a single table and no dense features has no inputs")
        self.top = _mlp([top_in, *config.top_mlp, 1], relu_last=False)
        rows_, cols_ = torch.triu_indices(n_vectors, n_vectors, offset=1)
        self.register_buffer("_triu", rows_ * n_vectors + cols_, persistent=False)

    # ---- tables and sizes ----------------------------------------------------------------------------------
    def table_index(self, table: int | str) -> int:
        """Index of a table given as its index, its table name (``t_<feature>``) or its feature name."""
        if isinstance(table, int) and not isinstance(table, bool):
            if not 0 <= table < len(self.table_names):
                raise IndexError(f"table index {table} out of range [0, {len(self.table_names)})")
            return table
        if table in self.table_names:
            return self.table_names.index(table)
        if table in self.feature_names:
            return self.feature_names.index(table)
        raise KeyError(f"unknown table {table!r}; tables are {self.table_names}")

    def table_weight(self, table: int | str) -> nn.Parameter:
        return self.ebc.embedding_bags[self.table_names[self.table_index(table)]].weight

    def row_sizes(self, table: int | str) -> torch.Tensor:
        if self.row_size_mode != "masked":
            raise RuntimeError("this DLRM holds no sizes (row_sizes='enforced'): its caller enforces them")
        return getattr(self, f"sizes_{self.table_index(table)}")

    def set_row_sizes(self, table: int | str, sizes: torch.Tensor) -> None:
        """Sets one table's per-row sizes in place (no rebuild; the weights are masked, never overwritten)."""
        i = self.table_index(table)
        checked = check_sizes(sizes, self.row_sizes(i).shape[0], self.config.d_max, name=f"{self.table_names[i]} sizes")
        self.row_sizes(i).copy_(checked)

    def masked_table(self, table: int | str) -> torch.Tensor:
        """The table with every row cut to its size, as the model consumes it (for export and compression)."""
        return masked_table(self.table_weight(table), self.row_sizes(table))

    # ---- forward -------------------------------------------------------------------------------------------
    def check_inputs(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> None:
        if dense.dim() != 2 or dense.shape[1] != self.n_dense:
            raise ValueError(f"dense: expected shape [B, {self.n_dense}], got {list(dense.shape)}")
        keys = sparse.keys()
        if sorted(keys) != sorted(self.feature_names):
            missing = [f for f in self.feature_names if f not in keys]
            extra = [k for k in keys if k not in self.feature_names]
            raise ValueError(f"sparse: KJT keys do not match the features; missing {missing}, unexpected {extra}")
        if sparse.stride() != dense.shape[0]:
            raise ValueError(f"sparse: batch size {sparse.stride()} does not match dense batch {dense.shape[0]}")
        if sparse.weights_or_none() is not None:
            raise ValueError("sparse: weighted KJTs are not supported (tables pool unweighted)")

    def embed(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """Pooled embeddings [B, n_features, d_max] in ``feature_names`` order, each row cut to its size first."""
        if self.row_size_mode == "enforced":
            for feature, jt in sparse.to_dict().items():
                check_ids(feature, jt.values(), self.table_rows[feature])
            pooled = self.ebc(sparse).to_dict()  # a sharded EBC orders its keys by shard: key by feature
            return torch.stack([pooled[f] for f in self.feature_names], dim=1)
        jagged = sparse.to_dict()
        d = self.config.d_max
        batch = sparse.stride()
        columns = torch.arange(d, device=self.sizes_0.device)
        pooled = []
        for i, feature in enumerate(self.feature_names):
            jt = jagged[feature]
            ids, lengths = jt.values(), jt.lengths()
            check_ids(feature, ids, self.table_rows[feature])
            weight = self.table_weight(i)
            rows = F.embedding(ids, weight) * (columns < self.row_sizes(i)[ids].unsqueeze(1)).to(weight.dtype)
            bags = torch.repeat_interleave(torch.arange(batch, device=ids.device), lengths, output_size=ids.numel())
            out = torch.zeros(batch, d, dtype=weight.dtype, device=weight.device).index_add(0, bags, rows)
            if self.config.pooling == "mean":
                out = out / lengths.clamp(min=1).unsqueeze(1).to(out.dtype)
            pooled.append(out)
        return torch.stack(pooled, dim=1)

    def interact(self, bottom: torch.Tensor | None, embedded: torch.Tensor) -> torch.Tensor:
        """Top-MLP input from the bottom output [B, d] (or None) and the pooled embeddings [B, F, d]."""
        vectors = embedded if bottom is None else torch.cat([bottom.unsqueeze(1), embedded], dim=1)
        if self.config.interaction == "cat":
            return vectors.flatten(1)
        dots = torch.bmm(vectors, vectors.transpose(1, 2)).flatten(1)[:, self._triu]
        return dots if bottom is None else torch.cat([bottom, dots], dim=1)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """Logits [B] from dense features [B, n_dense] and one bag of ids per example and feature."""
        self.check_inputs(dense, sparse)
        return self.head(dense, self.embed(sparse))

    def head(self, dense: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """Everything after the tables: logits [B] from dense features and pooled embeddings [B, F, d_max]."""
        bottom = self.bottom(dense) if self.bottom is not None else None
        return self.top(self.interact(bottom, embedded)).squeeze(1)

    def predict_proba(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """Click probabilities [B]."""
        return torch.sigmoid(self(dense, sparse))

    @staticmethod
    def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean binary cross-entropy of logits [B] against 0/1 labels [B]."""
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))

    def per_example_quality(self, dense: torch.Tensor, sparse: KeyedJaggedTensor, labels: torch.Tensor) -> torch.Tensor:
        """Negative log-loss per example [B] (higher is better); run it under ``torch.no_grad()`` for the search."""
        logits = self(dense, sparse)
        return -F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
