"""BPR training of a recommender at fixed per-row sizes, with early stopping on validation Recall@20.

The default recipe is the CIESS authors' (digest section 5): Adam at lr 0.03 decayed x0.9 every 200 batches down
to 1e-3, batches of 10,000 uniformly drawn users with one positive and one sampled negative each, L2 1e-4 on
the batch's ego embeddings.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.nn import functional as F
from torchrec import KeyedJaggedTensor
from tqdm.auto import tqdm

from ciess_prod.data import BPRSampler, RecDataset
from ciess_prod.eval.metrics import RankingResult, rank_users
from ciess_prod.models import Recommender

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 0.03  # Adam learning rate at batch 0
    lr_decay: float = 0.9  # lr is multiplied by this every lr_decay_every batches
    lr_decay_every: int = 200  # batches between decays
    lr_floor: float = 1e-3  # lr never decays below this
    l2: float = 1e-4  # weight of the L2 term on the batch's (masked) ego embeddings
    batch_size: int = 10_000  # BPR triples per batch
    sampling: Literal["users", "interactions"] = "users"  # draw users uniformly, or interactions uniformly
    max_batches: int = 4000  # hard cap on training length
    eval_every: int = 200  # batches between validation evaluations
    patience: int = 5  # evaluations without a better validation Recall@20 before stopping
    eval_chunk: int = 1024  # users scored at once during ranking evaluation
    # final protocol: retrain for the same number of BATCHES as chosen on validation, or for the same number of
    # EPOCHS (batches scaled by |train+val| / |train|, so every interaction is seen as often as when chosen)
    final_length: Literal["batches", "epochs"] = "epochs"
    seed: int = 0  # seeds initialisation order, sampling and dropout
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        for name in ("lr", "lr_floor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must lie in (0, 1], got {self.lr_decay}")
        for name in ("lr_decay_every", "batch_size", "max_batches", "eval_every", "patience", "eval_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2}")


@dataclass
class FitResult:
    batches: int  # batches trained in total
    best_batches: int  # batches at the best validation Recall@20 (the weights kept)
    best_val: dict[str, float]  # validation means at best_batches (empty without validation)
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per evaluation
    seconds: float = 0.0


def evaluate(
    model: Recommender, dataset: RecDataset, split: Literal["val", "test"], ks=(5, 10, 20), chunk_size: int = 1024
) -> RankingResult:
    """Full ranking on ``split``: validation excludes training items; test excludes training and validation."""
    if split == "val":
        targets, exclude = dataset.val, [dataset.train]
    elif split == "test":
        targets, exclude = dataset.test, [dataset.train, dataset.val]
    else:
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        result = rank_users(model.score_users, targets, exclude, ks=ks, chunk_size=chunk_size)
    model.train(was_training)
    return result


def learning_rate(config: TrainConfig, batch: int) -> float:
    return max(config.lr * config.lr_decay ** (batch // config.lr_decay_every), config.lr_floor)


def train_step(
    model: Recommender, batch: KeyedJaggedTensor, optimizer: torch.optim.Optimizer, config: TrainConfig, step: int
) -> torch.Tensor:
    """One BPR + L2 update at batch ``step``'s learning rate; returns the loss (a scalar tensor)."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, step)
    out = model(batch)
    loss = F.softplus(out.neg_scores - out.pos_scores).mean() + config.l2 * out.l2
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def fit(
    model: Recommender, dataset: RecDataset, config: TrainConfig, n_batches: int | None = None
) -> FitResult:
    """Trains ``model`` in place and returns how it went.

    With ``n_batches`` the model trains exactly that long (the final protocol's retraining, where validation is
    merged into training); otherwise it stops early on validation Recall@20 and keeps the best weights.
    """
    torch.manual_seed(config.seed)
    sampler = BPRSampler(dataset.train, batch_size=config.batch_size, seed=config.seed, mode=config.sampling)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    early_stop = n_batches is None and dataset.val.nnz > 0
    total = n_batches if n_batches is not None else config.max_batches
    best_recall, best_batches, best_val, best_state = -1.0, 0, {}, None
    history: list[dict[str, float]] = []
    stale = 0
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(total), desc=f"train {model.config.kind}", disable=not config.progress, leave=False)
    for step in bar:
        loss = train_step(model, sampler.next_batch(), optimizer, config, step)
        done = step + 1
        if early_stop and (done % config.eval_every == 0 or done == total):
            val = evaluate(model, dataset, "val", chunk_size=config.eval_chunk).mean()
            history.append({"batch": done, "loss": loss.item(), **val})
            bar.set_postfix(loss=f"{loss.item():.4f}", r20=f"{val['recall@20']:.4f}")
            log.info("batch %d loss %.4f val %s", done, loss.item(), {k: round(v, 4) for k, v in val.items()})
            if val["recall@20"] > best_recall:
                best_recall, best_batches, best_val, stale = val["recall@20"], done, val, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
                if stale >= config.patience:
                    break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_batches = done
    return FitResult(
        batches=done, best_batches=best_batches, best_val=best_val, history=history,
        seconds=time.perf_counter() - start,
    )
