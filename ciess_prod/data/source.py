"""Where a dataset comes from: a typed config naming a real file or the synthetic generator, and its loading."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ciess_prod.data.dataset import RecDataset, SplitConfig, build_dataset
from ciess_prod.data.loaders import load_interactions
from ciess_prod.data.synthetic import SyntheticConfig, generate_interactions


@dataclass(frozen=True)
class DataConfig:
    source: Literal["synthetic", "auto", "ml-1m", "ml-100k", "lightgcn", "csv", "parquet"] = "synthetic"
    path: str | None = None  # file or directory of a real dataset (every source but "synthetic")
    user_col: str = "user_id"  # column names for csv/parquet logs
    item_col: str = "item_id"
    rating_col: str | None = None
    min_rating: float | None = None  # keep only interactions rated at least this (csv/parquet)
    split: SplitConfig = field(default_factory=SplitConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"data.path is required for source {self.source!r}")


def resolve_data_path(path: str, base_dir: Path | None) -> Path:
    """Relative paths resolve against the working directory first, then against ``base_dir``."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists() or base_dir is None:
        return candidate
    return base_dir / candidate


def load_dataset(config: DataConfig, base_dir: Path | None = None) -> RecDataset:
    """Reads (or generates) the interactions and splits them."""
    if config.source == "synthetic":
        interactions = generate_interactions(config.synthetic)
        s = config.synthetic
        name = f"synthetic-{s.n_users}x{s.n_items}-s{s.seed}"
    else:
        path = resolve_data_path(config.path, base_dir)
        kwargs: dict[str, Any] = {}
        if config.source in ("csv", "parquet"):
            kwargs = dict(
                user_col=config.user_col,
                item_col=config.item_col,
                rating_col=config.rating_col,
                min_rating=config.min_rating,
            )
        interactions = load_interactions(path, format=config.source, **kwargs)
        name = path.name
    return build_dataset(interactions, config.split, name=name)
