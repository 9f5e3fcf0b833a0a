"""Data package: loaders, synthetic logs, the seeded per-user split, dataset download and BPR sampling.

``BPRSampler`` is imported lazily: it pulls in torch and torchrec (seconds), which ``ciess data fetch`` and
the loaders do not need.
"""

from typing import TYPE_CHECKING, Any

from ciess_prod.data.ctr import (
    CTR_KINDS,
    CTRDataset,
    SyntheticCTRConfig,
    generate_ctr,
    load_avazu,
    load_criteo,
    load_ctr,
)
from ciess_prod.data.dataset import RecDataset, SplitConfig, build_dataset, load_mapping
from ciess_prod.data.errors import DataError, FetchError
from ciess_prod.data.fetch import DATASETS, RemoteDataset, fetch_dataset, verify_and_unpack
from ciess_prod.data.interactions import FOLD_TEST, FOLD_TRAIN, FOLD_VAL, InteractionLog
from ciess_prod.data.loaders import (
    FORMATS,
    detect_format,
    load_interactions,
    load_lightgcn,
    load_movielens_1m,
    load_movielens_100k,
    load_table,
)
from ciess_prod.data.source import DataConfig, load_dataset, resolve_data_path
from ciess_prod.data.synthetic import SyntheticConfig, generate_interactions

if TYPE_CHECKING:
    from ciess_prod.data.sampler import BPRSampler

__all__ = [
    "CTR_KINDS",
    "CTRDataset",
    "SyntheticCTRConfig",
    "generate_ctr",
    "load_avazu",
    "load_criteo",
    "load_ctr",
    "DATASETS",
    "DataConfig",
    "load_dataset",
    "resolve_data_path",
    "FOLD_TEST",
    "FOLD_TRAIN",
    "FOLD_VAL",
    "FORMATS",
    "BPRSampler",
    "DataError",
    "FetchError",
    "InteractionLog",
    "RecDataset",
    "RemoteDataset",
    "SplitConfig",
    "SyntheticConfig",
    "build_dataset",
    "detect_format",
    "fetch_dataset",
    "generate_interactions",
    "load_interactions",
    "load_lightgcn",
    "load_mapping",
    "load_movielens_100k",
    "load_movielens_1m",
    "load_table",
    "verify_and_unpack",
]


def __getattr__(name: str) -> Any:
    if name == "BPRSampler":
        from ciess_prod.data.sampler import BPRSampler

        return BPRSampler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
