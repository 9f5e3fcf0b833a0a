"""The evaluation protocols shared by baselines and the search's final retraining.

``train_only``: train with early stopping on validation, test that model (test ranking excludes train and
validation items). ``final`` (the CIESS authors' reported protocol, digest section 5): the same run picks the
training length on validation; a fresh model is then trained on train+validation for that length (by default
the same number of epochs, see ``TrainConfig.final_length``) and tested with each user's train+validation items
excluded. ``RetrainConfig`` lets the early-stopped fit try several L2 weights and train longer: the weight best on
validation is the one retrained and tested, so a plan is scored at the regularisation that suits its sizes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ciess_prod.data import RecDataset
from ciess_prod.models import Recommender
from ciess_prod.train.trainer import FitResult, TrainConfig, evaluate, fit

Protocol = Literal["train_only", "final"]
REPORT_KS = (5, 10, 20)


@dataclass(frozen=True)
class RetrainConfig:
    """How the protocol's early-stopped fits depart from the training recipe (the reference model keeps it).

    At the authors' L2 weight LightGCN overfits on ML-1M after ~500 batches, and which weight suits a sized model
    depends on its sizes (docs/benchmarks.md, "Size-plan families"): trying several and keeping the best on
    validation scores every plan at its own best regularisation.
    """

    l2: tuple[float, ...] = ()  # L2 weights tried, one early-stopped fit each; the best on val Recall@20 is tested
    max_batches: int | None = None  # cap of each fit (null: train.max_batches)
    patience: int | None = None  # evaluations without improvement before a fit stops (null: train.patience)

    def __post_init__(self) -> None:
        if any(w < 0 for w in self.l2) or len(set(self.l2)) != len(self.l2):
            raise ValueError(f"retrain.l2 must be distinct weights >= 0, got {list(self.l2)}")
        for name in ("max_batches", "patience"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"retrain.{name} must be >= 1 or null, got {getattr(self, name)}")

    def recipes(self, train: TrainConfig) -> list[TrainConfig]:
        """The recipe of each fit tried, in ``l2`` order (``train`` itself when nothing departs from it)."""
        lengths = {k: v for k, v in (("max_batches", self.max_batches), ("patience", self.patience)) if v is not None}
        return [dataclasses.replace(train, l2=w, **lengths) for w in self.l2 or (train.l2,)]


@dataclass
class ProtocolResult:
    model: Recommender  # the model that was tested (trained on train+validation under "final")
    test_dataset: RecDataset  # the dataset view it was tested on (validation merged under "final")
    fit: FitResult  # the early-stopped run on train (of the recipe tested)
    val: dict[str, float]  # validation means of the early-stopped run
    test: dict[str, float]  # test means of the tested model
    train: TrainConfig  # the recipe tested: the one best on validation among those ``RetrainConfig`` tries


def split_metrics(
    model: Recommender, dataset: RecDataset, split: Literal["val", "test"], chunk: int
) -> dict[str, float]:
    return evaluate(model, dataset, split, ks=REPORT_KS, chunk_size=chunk).mean()


def fit_on_train(
    dataset: RecDataset, make_model: Callable[[RecDataset], Recommender], config: TrainConfig
) -> tuple[Recommender, FitResult, dict[str, float]]:
    """Trains a fresh model with early stopping on validation; returns it, how it went and its validation means."""
    torch.manual_seed(config.seed)
    model = make_model(dataset)
    result = fit(model, dataset, config)
    val = result.best_val or split_metrics(model, dataset, "val", config.eval_chunk)
    return model, result, val


def retrain_batches(config: TrainConfig, dataset: RecDataset, merged: RecDataset, best_batches: int) -> int:
    """Length of the final retraining on train+validation (see ``TrainConfig.final_length``)."""
    if config.final_length == "batches":
        return best_batches
    return max(1, round(best_batches * merged.train.nnz / max(dataset.train.nnz, 1)))


def score_with_protocol(
    dataset: RecDataset,
    make_model: Callable[[RecDataset], Recommender],
    config: TrainConfig,
    protocol: Protocol,
    fitted: Recommender | None,
    best_batches: int,
) -> tuple[Recommender, RecDataset, dict[str, float]]:
    """Tests ``fitted`` (train_only) or a model retrained on train+validation for ``best_batches`` (final).

    Under ``final`` the fitted weights are not used, so ``fitted`` may be None (a fit known from its outcome only).
    """
    model, test_dataset = fitted, dataset
    if protocol == "final":
        test_dataset = dataset.with_validation_merged()
        torch.manual_seed(config.seed)
        model = make_model(test_dataset)
        fit(model, test_dataset, config, n_batches=retrain_batches(config, dataset, test_dataset, best_batches))
    elif model is None:
        raise ValueError(f"protocol {protocol!r} tests the fitted weights, but none were given")
    # With validation merged into train, "test" excludes train+validation items: the final protocol's ranking.
    return model, test_dataset, split_metrics(model, test_dataset, "test", config.eval_chunk)


def train_and_test(
    dataset: RecDataset,
    make_model: Callable[[RecDataset], Recommender],
    config: TrainConfig,
    protocol: Protocol,
    retrain: RetrainConfig | None = None,
) -> ProtocolResult:
    """Runs ``protocol``; ``make_model(dataset)`` builds a fresh, sized model over that dataset's graph.

    Each of ``retrain``'s recipes is fitted on train; the best on validation Recall@20 (the first on a tie) is
    tested. Only that fit's model is kept in memory.
    """
    best: tuple[TrainConfig, Recommender, FitResult, dict[str, float]] | None = None
    for recipe in (retrain or RetrainConfig()).recipes(config):
        fitted, result, val = fit_on_train(dataset, make_model, recipe)
        if best is None or val["recall@20"] > best[3]["recall@20"]:
            best = (recipe, fitted, result, val)
    recipe, fitted, result, val = best
    model, test_dataset, test = score_with_protocol(dataset, make_model, recipe, protocol, fitted, result.best_batches)
    return ProtocolResult(model=model, test_dataset=test_dataset, fit=result, val=val, test=test, train=recipe)
