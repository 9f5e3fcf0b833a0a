"""One training experiment end to end: data -> model at given sizes -> training protocol -> checkpoint + metrics.

This is what ``ciess train`` / ``ciess evaluate`` and the benchmarks run; the pieces it wires (data, models,
trainer, metrics) know nothing of each other beyond their public APIs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ciess_prod import __version__
from ciess_prod.config import ConfigError, from_dict, to_dict
from ciess_prod.data import DataConfig, RecDataset, load_dataset
from ciess_prod.io import write_json_atomic
from ciess_prod.models import ModelConfig, Recommender, build_model, model_memory, uniform_sizes
from ciess_prod.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ciess_prod.train.protocol import Protocol, RetrainConfig, retrain_batches, split_metrics, train_and_test
from ciess_prod.train.trainer import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SizeConfig:
    method: Literal["full", "es"] = "full"  # full: every row at d_max; es: every row at floor((1-c) d_max)
    sparsity: float = 0.0  # target sparsity c for "es"

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sizes.sparsity must lie in [0, 1), got {self.sparsity}")
        if self.method == "full" and self.sparsity != 0.0:
            raise ValueError("sizes.sparsity must be 0 for method 'full'")


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sizes: SizeConfig = field(default_factory=SizeConfig)
    # train_only: early-stop on validation, test that model; final: then retrain on train+validation for the
    # chosen length and test with train+validation items excluded (the CIESS authors' reported protocol)
    protocol: Protocol = "train_only"
    retrain: RetrainConfig = field(default_factory=RetrainConfig)  # L2 weights and length the fit tries
    output_dir: str = "runs/default"  # checkpoint/ and metrics.json go here


def sized_model(config: ExperimentConfig, dataset: RecDataset) -> Recommender:
    """A fresh model over ``dataset.train`` with the configured per-row sizes."""
    model = build_model(config.model, dataset.n_users, dataset.n_items, dataset.train)
    if config.sizes.method == "es":
        for side, n in (("user", dataset.n_users), ("item", dataset.n_items)):
            model.set_row_sizes(side, uniform_sizes(n, config.model.d_max, config.sizes.sparsity))
    return model


def run_experiment(config: ExperimentConfig, base_dir: Path | None = None) -> dict[str, Any]:
    """Trains under ``config.protocol``, writes ``checkpoint/`` and ``metrics.json``, returns the metrics."""
    torch.manual_seed(config.train.seed)
    start = time.perf_counter()
    dataset = load_dataset(config.data, base_dir)
    log.info("dataset %s: %s", dataset.name, dataset.summary())

    outcome = train_and_test(dataset, lambda d: sized_model(config, d), config.train, config.protocol, config.retrain)
    model, result, val, test = outcome.model, outcome.fit, outcome.val, outcome.test
    memory = model_memory(model)
    metrics = {
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint,
        "model": config.model.kind,
        "protocol": config.protocol,
        "method": config.sizes.method,
        "target_sparsity": config.sizes.sparsity,
        "achieved_sparsity": memory.sparsity,
        "embedding_bytes": memory.bytes,
        "dense_embedding_bytes": memory.dense_bytes,
        "best_batches": result.best_batches,
        "batches_trained": result.batches,
        "final_length": config.train.final_length,
        "l2": outcome.train.l2,  # the weight tested: train.l2, or the best on validation of retrain.l2
        "retrain_batches": (
            retrain_batches(outcome.train, dataset, outcome.test_dataset, result.best_batches)
            if config.protocol == "final"
            else None
        ),
        "val": val,
        "test": test,
        "history": result.history,
        "wall_seconds": time.perf_counter() - start,
        "seed": config.train.seed,
        "version": __version__,
    }
    out = Path(config.output_dir)
    summary = {k: v for k, v in metrics.items() if k != "history"}
    save_checkpoint(out / "checkpoint", model, {"config": to_dict(config), "metrics": summary})
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


@dataclass
class TrainedModel:
    model: Recommender  # weights and per-row sizes as saved
    dataset: RecDataset  # the data it was trained on (final protocol: validation merged into train)
    config: ExperimentConfig
    meta: dict[str, Any]  # the checkpoint's metadata


def load_trained_model(path: Path, base_dir: Path | None = None) -> TrainedModel:
    """Rebuilds a checkpoint's dataset (checking its fingerprint) and model, as it was trained."""
    checkpoint = load_checkpoint(path)
    try:
        config = from_dict(ExperimentConfig, checkpoint.meta["config"], where=f"{path}/checkpoint.json config")
        expected = checkpoint.meta["metrics"]["dataset_fingerprint"]
    except (KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: checkpoint metadata unusable: {exc}") from exc
    dataset = load_dataset(config.data, base_dir)
    if dataset.fingerprint != expected:
        raise CheckpointError(
            f"{path}: dataset fingerprint {dataset.fingerprint[:12]} differs from the checkpoint's {expected[:12]}: "
            "the data or split changed since training"
        )
    if config.protocol == "final":
        dataset = dataset.with_validation_merged()
    model = build_model(config.model, dataset.n_users, dataset.n_items, dataset.train)
    try:
        model.load_state_dict(checkpoint.state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: tensors do not fit the configured model: {exc}") from exc
    model.eval()
    return TrainedModel(model, dataset, config, checkpoint.meta)


def evaluate_checkpoint(
    path: Path, split: Literal["val", "test"], base_dir: Path | None = None
) -> dict[str, float]:
    """Scores ``split`` with a saved model (under the final protocol only 'test' is meaningful)."""
    trained = load_trained_model(path, base_dir)
    if trained.config.protocol == "final" and split == "val":
        raise CheckpointError(f"{path}: trained on train+validation (final protocol); only 'test' is meaningful")
    return split_metrics(trained.model, trained.dataset, split, trained.config.train.eval_chunk)
