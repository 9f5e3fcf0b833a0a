"""The search environment: a recommender whose per-row sizes are the action, and per-row quality the outcome.

One step takes a size for every user and item, trains the recommender at those sizes (``warm``: fine-tunes the
trained full-size reference for a few batches; ``paper``: trains a freshly initialised model for a fixed batch
budget, as in the paper), ranks the validation split, and returns each row's quality ratio
q_n = min(eval(n | sizes) / eval(n | full size), 1) (digest section 2). A row whose reference quality is 0
(no validation hit at full size) gets q_n = 1: nothing can be lost there. eval(item) is the paper's mean eval(u)
over the item's training users, or (``item_quality: hits``) the item's own validation hit rate. Under ``warm``
with ``reference_basis: principal`` the reference is first rotated into its principal basis (models/basis.py), so
that a row cut to d columns keeps its d most used directions rather than arbitrary ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from ciess_prod.data import RecDataset
from ciess_prod.eval.metrics import item_hit_quality, item_quality, user_quality
from ciess_prod.models import SIDES, ModelConfig, Recommender, build_model
from ciess_prod.models.basis import rotate_to_principal_basis
from ciess_prod.train.trainer import TrainConfig, evaluate, fit


@dataclass(frozen=True)
class EnvironmentConfig:
    protocol: Literal["warm", "paper"] = "warm"  # warm: fine-tune the full-size reference; paper: train from scratch
    batches: int = 40  # BPR batches per step (the authors' code trains 2000 from scratch under "paper")
    lr: float = 0.003  # Adam lr of the warm fine-tune (paper protocol uses the train recipe's schedule)
    # eval(item): users = mean eval(u) over its training users [P]; hits = its own validation items' hit rate in
    # their users' top-k, which moves with the item's own size
    item_quality: Literal["users", "hits"] = "users"
    # warm starts from the reference's leading columns: "trained" keeps its columns as trained (in no order);
    # "principal" first rotates them, scores unchanged, so the leading ones carry the most (MF, LightGCN) [I]
    reference_basis: Literal["trained", "principal"] = "trained"

    def __post_init__(self) -> None:
        if self.batches < 1:
            raise ValueError(f"environment.batches must be >= 1, got {self.batches}")
        if self.lr <= 0:
            raise ValueError(f"environment.lr must be > 0, got {self.lr}")
        if self.item_quality not in ("users", "hits"):
            raise ValueError(f"environment.item_quality must be 'users' or 'hits', got {self.item_quality!r}")
        if self.reference_basis not in ("trained", "principal"):
            raise ValueError(f"environment.reference_basis must be 'trained' or 'principal', got "
                             f"{self.reference_basis!r}")


@dataclass
class Quality:
    """Per-row outcome of one configuration: raw eval and the ratio to the full-size reference."""

    raw: dict[str, torch.Tensor]  # side -> eval(n) [rows], float64
    ratio: dict[str, torch.Tensor]  # side -> q_n in [0, 1] [rows], float32

    @property
    def mean_ratio(self) -> float:
        """Mean q over users and items together: how the search ranks configurations."""
        return float(torch.cat([self.ratio[s] for s in SIDES]).double().mean())


def row_quality(
    model: Recommender, dataset: RecDataset, chunk: int, item_signal: Literal["users", "hits"] = "users"
) -> dict[str, torch.Tensor]:
    """eval(user) and eval(item) on the validation split (training items excluded)."""
    result = evaluate(model, dataset, "val", chunk_size=chunk)
    users = user_quality(result)
    items = item_quality(users, dataset.train) if item_signal == "users" else item_hit_quality(result, dataset.val)
    return {"user": users, "item": items}


class SizeEnvironment:
    """Evaluates per-row size configurations against a trained full-size reference model."""

    def __init__(
        self,
        dataset: RecDataset,
        model_config: ModelConfig,
        train_config: TrainConfig,
        config: EnvironmentConfig,
        reference: Recommender,
    ) -> None:
        self.dataset, self.model_config, self.train_config, self.config = dataset, model_config, train_config, config
        self._model = build_model(model_config, dataset.n_users, dataset.n_items, dataset.train)
        if config.reference_basis == "principal":  # a rotated copy: same scores, most used columns first
            self._model.load_state_dict(reference.state_dict())
            rotate_to_principal_basis(self._model)
            reference = self._model
        self.reference_state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
        self.reference_quality = row_quality(reference, dataset, train_config.eval_chunk, config.item_quality)

    def step_config(self, step_seed: int) -> TrainConfig:
        """The training recipe of one step: warm fine-tunes at a constant lr; paper trains from scratch."""
        if self.config.protocol == "warm":
            return dataclasses.replace(
                self.train_config, lr=self.config.lr, lr_decay=1.0, seed=step_seed, progress=False
            )
        return dataclasses.replace(self.train_config, seed=step_seed, progress=False)

    def evaluate(self, sizes: dict[str, torch.Tensor], step_seed: int) -> Quality:
        """Trains at ``sizes`` (side -> int sizes [rows]) and measures every row's quality."""
        model = self._model
        if self.config.protocol == "warm":
            model.load_state_dict(self.reference_state)
        else:
            torch.manual_seed(step_seed)
            model = build_model(self.model_config, self.dataset.n_users, self.dataset.n_items, self.dataset.train)
        for side in SIDES:
            model.set_row_sizes(side, sizes[side])
        fit(model, self.dataset, self.step_config(step_seed), n_batches=self.config.batches)
        raw = row_quality(model, self.dataset, self.train_config.eval_chunk, self.config.item_quality)
        return Quality(raw=raw, ratio={s: self.ratio(s, raw[s]) for s in SIDES})

    def ratio(self, side: str, raw: torch.Tensor) -> torch.Tensor:
        ref = self.reference_quality[side]
        q = torch.where(ref > 0, raw / ref.clamp(min=1e-12), torch.ones_like(raw))
        return q.clamp(max=1.0).to(torch.float32)

    def full_size_quality(self) -> Quality:
        """The reference itself: q = 1 everywhere (where every episode starts)."""
        raw = self.reference_quality
        return Quality(raw=raw, ratio={s: torch.ones(raw[s].shape[0]) for s in SIDES})
