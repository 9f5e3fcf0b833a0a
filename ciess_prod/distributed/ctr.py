"""The CTR task of the sharded search: a DLRM over every categorical feature, tables sharded, one global budget.

Every rank loads the data (replicated; each rank takes its slice of every global batch) and builds the DLRM with
its tables on the meta device; ``environment.ShardedTables`` shards them. Training is binary cross-entropy: the
tables with the fused optimizer of ``sharding``, the dense MLPs with Adam.

Per-row quality generalises the paper's item quality: P_n is the mean over the validation examples whose bags
contain row n of p(y | x), the probability the model gives the true label (exp(-log-loss): higher is better, in
(0, 1]); q_n = min(1, P_n / P_n^ref) against the full-size reference. Rows in no validation example get q = 1
(no evidence of harm); the size penalty then shrinks them. Candidates are chosen on validation log-loss and
tested with log-loss and AUC; plans name the EBC's tables (model "dlrm").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ciess_prod.config import to_dict
from ciess_prod.data.ctr import CTRDataset, SyntheticCTRConfig, load_ctr
from ciess_prod.distributed.environment import (
    KeptRows,
    ShardedTables,
    all_reduce,
    check_batch_size,
    rank_slice,
    refuse_unsupported,
)
from ciess_prod.distributed.layout import route_to_owners
from ciess_prod.distributed.sharding import ShardingConfig
from ciess_prod.models.dlrm import DLRM, DLRMConfig
from ciess_prod.search.config import SearchConfig
from ciess_prod.search.plan import DimensionPlan


# ---- configs -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CTRDataConfig:
    source: Literal["synthetic", "criteo", "avazu"] = "synthetic"  # which loader
    path: str | None = None  # file or directory of a real dataset (relative: to the working dir, then the repo)
    synthetic: SyntheticCTRConfig = field(default_factory=SyntheticCTRConfig)  # generator settings (synthetic)
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train / validation / test fractions
    split_seed: int = 0  # seed of the example permutation
    min_count: int = 1  # rarer raw values share the out-of-vocabulary row 0 (real data)


@dataclass(frozen=True)
class CTRTrainConfig:
    batch_size: int = 1024  # GLOBAL batch; each rank takes batch_size / world consecutive examples of it
    dense_lr: float = 1e-3  # Adam learning rate of the dense MLPs (tables use sharding.optimizer, fused)
    reference_batches: int = 300  # full-size reference training length
    final_batches: int = 300  # training length of each candidate plan, from a fresh initialisation
    eval_batch: int = 8192  # examples per rank per evaluation batch
    seed: int = 0  # model initialisation and batch order

    def __post_init__(self) -> None:
        for name in ("batch_size", "reference_batches", "final_batches", "eval_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.dense_lr <= 0:
            raise ValueError(f"train.dense_lr must be > 0, got {self.dense_lr}")


@dataclass(frozen=True)
class CTRSearchExperimentConfig:
    task: Literal["ctr"] = "ctr"  # marks a CTR search config (training/search.py dispatches on it)
    data: CTRDataConfig = field(default_factory=CTRDataConfig)
    model: DLRMConfig = field(default_factory=DLRMConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    train: CTRTrainConfig = field(default_factory=CTRTrainConfig)
    # budgets, episodes, TD3, exploration; environment.batches/lr: each step's fine-tune (warm: Adam lr of the dense
    # part; the tables keep sharding.lr)
    search: SearchConfig = field(default_factory=SearchConfig)
    output_dir: str = "runs/ctr-search"  # reference/, checkpoints/, plans/, history.json, search.json

    def __post_init__(self) -> None:
        if self.model.d_max < 2:
            raise ValueError(f"model.d_max must be >= 2 for a search, got {self.model.d_max}")
        refuse_unsupported(self.search)
        impossible = [c for c in self.search.budgets if (1 - c) * self.model.d_max < 1]
        if impossible:
            raise ValueError(
                f"search.budgets {impossible} leave less than one column per row at d_max {self.model.d_max}"
            )


# ---- data ----------------------------------------------------------------------------------------------------------
def load_ctr_data(config: CTRDataConfig, base_dir: Path | None) -> CTRDataset:
    if config.source == "synthetic":
        return load_ctr("synthetic", config.synthetic)
    if config.path is None:
        raise ValueError(f"data.path is required for source {config.source!r}")
    path = Path(config.path)
    if not path.is_absolute() and not path.exists() and base_dir is not None:
        path = base_dir / path
    return load_ctr(config.source, path, min_count=config.min_count)


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN with a single class."""
    positives = labels > 0.5
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores.double())
    sorted_scores = scores.double()[order]
    ranks = torch.empty(len(scores), dtype=torch.float64)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    mean_rank = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, ranks[order]) / counts
    ranks[order] = mean_rank[inverse]
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))



# ---- the environment -----------------------------------------------------------------------------------------------
class CTREnvironment(ShardedTables):
    """The DMP-wrapped DLRM of this rank, the data slices, and how it trains and scores."""

    name = "dlrm"  # the plans' model name
    selection_metric = "logloss"  # candidates are chosen on the lowest validation log-loss
    popularity_log_scale = True  # feature values are power-law distributed: log counts spread the state

    def __init__(self, config: CTRSearchExperimentConfig, dataset: CTRDataset, device: torch.device) -> None:
        check_batch_size(config.train.batch_size)
        self.config, self.dataset = config, dataset
        self.train_idx, self.val_idx, self.test_idx = dataset.split_indices(config.data.split, config.data.split_seed)
        torch.manual_seed(config.train.seed)  # dense MLP init: the same on every rank
        model = DLRM(config.model, dataset.n_dense, dataset.table_sizes, dataset.feature_names, row_sizes="enforced")
        super().__init__(model, config.sharding, device, config.model.d_max, config.model.init_std, config.train.seed)
        self.fingerprint = dataset.fingerprint
        self.config_dict = to_dict(config)
        self._val_pairs: list[torch.Tensor] | None = None

    def row_counts(self) -> list[np.ndarray]:
        return self.dataset.row_popularity(self.train_idx)

    # -- training
    def train(self, n_batches: int, held_sizes: dict[str, torch.Tensor], seed: int, dense_lr: float) -> None:
        """``n_batches`` global batches (this rank's slice of each), fresh Adam on the dense part at ``dense_lr``."""
        cfg = self.config.train
        optimizer = torch.optim.Adam(self.dense_parameters(), lr=dense_lr)
        rng = np.random.default_rng(seed)
        self.model.train()
        for _ in range(n_batches):
            global_batch = rng.choice(self.train_idx, size=min(cfg.batch_size, len(self.train_idx)), replace=False)
            batch = self.dataset.batch(rank_slice(np.sort(global_batch)))
            logits = self.model(batch["dense"], batch["sparse"])
            loss = F.binary_cross_entropy_with_logits(logits, batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # the fused table optimizer steps here, trailing columns included
            optimizer.step()
            self.enforce(held_sizes)

    def train_reference(self, held_sizes: dict[str, torch.Tensor]) -> None:
        cfg = self.config.train
        self.train(cfg.reference_batches, held_sizes, seed=cfg.seed, dense_lr=cfg.dense_lr)

    def fine_tune(self, n_batches: int, held_sizes: dict[str, torch.Tensor], seed: int, warm: bool) -> None:
        """One search step's training: warm fine-tunes the dense part at environment.lr; paper at train.dense_lr."""
        lr = self.config.search.environment.lr if warm else self.config.train.dense_lr
        self.train(n_batches, held_sizes, seed=seed, dense_lr=lr)

    def retrain(self, held_sizes: dict[str, torch.Tensor]) -> dict[str, float]:
        """A candidate from a fresh model for ``train.final_batches``: validation log-loss and AUC."""
        cfg = self.config.train
        self.train(cfg.final_batches, held_sizes, seed=cfg.seed + 1, dense_lr=cfg.dense_lr)
        return self.score(self.val_idx)

    def test(self, held_sizes: dict[str, torch.Tensor]) -> dict[str, float]:
        return self.score(self.test_idx)

    # -- scoring
    @torch.no_grad()
    def predict(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(p(true label) [n], logits [n], per-feature bags as (example, id) pairs) for this rank's slice."""
        self.model.eval()
        mine, size = rank_slice(indices), self.config.train.eval_batch
        # Every rank must run the same number of forwards (the sharded EBC's all-to-alls are collective): a rank
        # with fewer chunks runs a throw-away forward of one example (an empty KJT does not pass through the EBC).
        (chunks,) = all_reduce(-(-len(mine) // size), op=dist.ReduceOp.MAX)
        chunks = int(chunks)
        p_true, logits_all, bags = [], [], [[] for _ in self.tables]
        for lo in range(0, chunks * size, size):
            part = mine[lo : lo + size]
            if len(part) == 0:
                filler = self.dataset.batch(indices[:1])
                self.model(filler["dense"], filler["sparse"])
                continue
            batch = self.dataset.batch(part)
            logits = self.model(batch["dense"], batch["sparse"])
            p = torch.sigmoid(logits)
            p_true.append(torch.where(batch["labels"] > 0.5, p, 1 - p).double())
            logits_all.append(logits)
            for f, jt in batch["sparse"].to_dict().items():
                example = torch.repeat_interleave(torch.arange(len(part)) + lo, jt.lengths().long())
                bags[self.dataset.feature_names.index(f)].append(torch.stack([example, jt.values()]))
        cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0)  # noqa: E731
        pairs = [torch.cat(b, dim=1) if b else torch.zeros(2, 0, dtype=torch.int64) for b in bags]
        return cat(p_true), cat(logits_all), pairs

    def row_quality(self, kept: KeptRows) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Per kept row: the mean p(true label) over the validation examples containing it (0: in none), and the
        validation log-loss."""
        p_true, _, pairs = self.predict(self.val_idx)
        if self._val_pairs is None:  # validation examples (and their bags) are fixed
            self._val_pairs = pairs
        raw = {}
        for t, layout, pair in zip(self.tables, self.layouts.values(), self._val_pairs, strict=True):
            unique = torch.unique(pair, dim=1) if pair.numel() else pair  # an example counts once per row
            ids, example = unique[1], unique[0]
            values = torch.stack([p_true[example], torch.ones(len(ids), dtype=torch.float64)], dim=1)
            got_ids, got = route_to_owners(ids, values, layout.owners(ids))
            span = kept.span[t]
            sums = torch.zeros(kept.count(t), 2, dtype=torch.float64)
            if span is not None and len(got_ids):
                sums.index_add_(0, got_ids - span[0], got)
            raw[t] = torch.where(sums[:, 1] > 0, sums[:, 0] / sums[:, 1].clamp(min=1), 0.0)
        loss_sum, n_val = all_reduce(float(-torch.log(p_true.clamp(min=1e-12)).sum()), float(len(p_true)))
        return raw, {"val_logloss": loss_sum / n_val}

    def score(self, indices: np.ndarray) -> dict[str, float]:
        """Log-loss and AUC over ``indices`` (each rank scores its slice; logits gathered for the AUC)."""
        p_true, logits, _ = self.predict(indices)
        loss_sum, n = all_reduce(float(-torch.log(p_true.clamp(min=1e-12)).sum()), float(len(p_true)))
        labels = torch.from_numpy(self.dataset.labels[rank_slice(indices)])
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (logits.double(), labels))
        all_logits = torch.cat([g[0] for g in gathered])
        all_labels = torch.cat([g[1] for g in gathered])
        return {"logloss": loss_sum / n, "auc": auc(all_logits, all_labels)}

    # -- export
    def export_state(self, sizes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Rank 0: the state dict of a single-process masked DLRM with these weights and ``sizes``; else None."""
        tables = self.gather_tables()
        if tables is None:
            return None
        state = self._dense_state()
        for i, t in enumerate(self.tables):
            state[f"ebc.embedding_bags.{t}.weight"] = tables[t]
            state[f"sizes_{i}"] = sizes[t].to(torch.int32)
        return state

    def model_meta(self, plan: DimensionPlan) -> dict[str, Any]:
        """What ``load_trained_dlrm`` rebuilds the model from, plus provenance."""
        return {
            "task": "ctr",
            "config": self.config_dict,
            "n_dense": self.dataset.n_dense,
            "feature_names": list(self.dataset.feature_names),
            "table_sizes": [int(n) for n in self.dataset.table_sizes],
            "metrics": {"dataset_fingerprint": self.fingerprint, **plan.metrics},
            "plan_target_sparsity": plan.target_sparsity,
        }
