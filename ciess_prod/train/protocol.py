"""The evaluation protocols shared by baselines and the search's final retraining.

``train_only``: train with early stopping on validation, test that model (test ranking excludes train and
validation items). ``final`` (the CIESS authors' reported protocol, digest section 5): the same run picks the
training length on validation; a fresh model is then trained on train+validation for that length (by default
the same number of epochs, see ``TrainConfig.final_length``) and tested with each user's train+validation items
excluded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ciess_prod.data import RecDataset
from ciess_prod.models import Recommender
from ciess_prod.train.trainer import FitResult, TrainConfig, evaluate, fit

Protocol = Literal["train_only", "final"]
REPORT_KS = (5, 10, 20)


@dataclass
class ProtocolResult:
    model: Recommender  # the model that was tested (trained on train+validation under "final")
    test_dataset: RecDataset  # the dataset view it was tested on (validation merged under "final")
    fit: FitResult  # the early-stopped run on train
    val: dict[str, float]  # validation means of the early-stopped run
    test: dict[str, float]  # test means of the tested model


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
) -> ProtocolResult:
    """Runs ``protocol``; ``make_model(dataset)`` builds a fresh, sized model over that dataset's graph."""
    fitted, result, val = fit_on_train(dataset, make_model, config)
    model, test_dataset, test = score_with_protocol(dataset, make_model, config, protocol, fitted, result.best_batches)
    return ProtocolResult(model=model, test_dataset=test_dataset, fit=result, val=val, test=test)
