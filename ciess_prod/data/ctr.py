"""Click-through-rate (CTR) datasets for DLRM-style models: Criteo and Avazu loaders and a seeded generator.

A CTR example is a click label, a few dense (numeric) features and one bag of row ids per categorical feature;
each categorical feature has its own embedding table. Bags are stored per feature in CSR form (``values`` row
ids, ``offsets`` [N + 1]) so a feature may hold 0..k ids per example: Criteo and Avazu have one id per feature
(0 when the raw value is empty), the synthetic generator draws multi-id bags. Batches come out as TorchRec
``KeyedJaggedTensor`` s with one key per feature, ready for :class:`ciess_prod.models.dlrm.DLRM`.

Conventions of the real-data loaders (documented here once, shared by Criteo and Avazu):

* Vocabulary: every distinct raw string of a feature gets a dense row id in order of FIRST APPEARANCE over the
  whole file (not only the training rows: the split is a property of the dataset, not of the vocabulary, and
  a value seen only in val/test simply has an untrained row, as in the DLRM reference preprocessing). Row 0 of
  every table is reserved for out-of-vocabulary values: values seen fewer than ``min_count`` times map to it
  (with the default ``min_count=1`` it is unused in the file, but a serving path can map unseen values there).
  Hence ``table_size = 1 + number of distinct kept values``.
* Empty raw values: ``missing="empty"`` (default) gives an EMPTY BAG (0 ids; pooling yields a zero vector);
  ``missing="row"`` treats the empty string as one more value with its own row (subject to ``min_count``).
* Criteo dense features ``I1..I13``: ``log(1 + max(x, 0))``, empty -> 0 (the DLRM reference preprocessing).
* Avazu has no dense features. ``hour`` (``YYMMDDHH``) becomes two categorical features, ``hour_of_day``
  (``00``..``23``) and ``weekday`` (0 = Monday); the raw timestamp would be a useless all-distinct id.

Every parse is vectorised (pandas / numpy, no per-row Python code); every bad input raises a one-line
:class:`DataError` naming the file and the problem. torch/torchrec are imported only when batches are built.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from ciess_prod.data.errors import DataError
from ciess_prod.data.loaders import require_file

if TYPE_CHECKING:
    from torchrec import KeyedJaggedTensor

CTR_KINDS = ("criteo", "avazu", "synthetic")
CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_SPARSE = tuple(f"C{i}" for i in range(1, 27))
AVAZU_SPARSE = (
    "C1",
    "banner_pos",
    "site_id",
    "site_domain",
    "site_category",
    "app_id",
    "app_domain",
    "app_category",
    "device_id",
    "device_ip",
    "device_model",
    "device_type",
    "device_conn_type",
    "C14",
    "C15",
    "C16",
    "C17",
    "C18",
    "C19",
    "C20",
    "C21",
)
AVAZU_TIME_FEATURES = ("hour_of_day", "weekday")
OOV_ROW = 0  # row of every real-data table that out-of-vocabulary (rarer than min_count) values map to

_FINGERPRINT_VERSION = b"ciess-ctr-v1"
_MISSING_MODES = ("empty", "row")


# ------------------------------------------------------------------------------------------------- dataset
def _gather_bags(values: np.ndarray, offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids and bag lengths of examples ``idx`` of one CSR feature, in ``idx`` order (no per-example loop)."""
    starts = offsets[idx]
    lengths = offsets[idx + 1] - starts
    if lengths.size and lengths.min() == 1 and lengths.max() == 1:
        return values[starts], lengths
    total = int(lengths.sum())
    out_starts = np.cumsum(lengths) - lengths
    positions = np.arange(total, dtype=np.int64) + np.repeat(starts - out_starts, lengths)
    return values[positions], lengths


def _offsets_from_lengths(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


@dataclass(frozen=True, eq=False)
class CTRDataset:
    """N labelled CTR examples: dense features, one CSR bag of row ids per categorical feature, click labels.

    ``eq=False``: compare datasets by ``fingerprint``. Arrays are validated and stored as given (after dtype
    coercion); do not mutate them afterwards, the fingerprint would no longer describe them.
    """

    name: str
    dense: np.ndarray  # float32 [N, n_dense]; n_dense may be 0
    labels: np.ndarray  # float32 [N], each 0.0 or 1.0
    feature_names: Sequence[str]  # one per categorical feature = KJT key = embedding table
    table_sizes: Sequence[int]  # rows of each feature's table; every id of feature f lies in [0, table_sizes[f])
    values: Sequence[np.ndarray]  # per feature: int64 row ids of all bags, concatenated in example order
    offsets: Sequence[np.ndarray]  # per feature: int64 [N + 1], bag of example i is values[offsets[i]:offsets[i+1]]
    dense_names: Sequence[str] = ()  # names of the dense columns (generated as dense_0.. when empty)
    fingerprint: str = field(init=False)  # sha256 hex over names, table sizes and every array

    def __post_init__(self) -> None:
        where = f"CTRDataset({self.name!r})"
        dense = np.asarray(self.dense)
        labels = np.asarray(self.labels)
        if dense.ndim != 2:
            raise DataError(f"{where}: dense must be 2-D [N, n_dense], got shape {dense.shape}")
        if labels.ndim != 1 or labels.shape[0] != dense.shape[0]:
            raise DataError(f"{where}: labels must have shape [{dense.shape[0]}], got {labels.shape}")
        n = int(labels.shape[0])
        dense = np.ascontiguousarray(dense, dtype=np.float32)
        labels = np.ascontiguousarray(labels, dtype=np.float32)
        if not np.isfinite(dense).all():
            raise DataError(f"{where}: dense features must be finite")
        if not ((labels == 0) | (labels == 1)).all():
            raise DataError(f"{where}: labels must be 0 or 1")
        names = tuple(str(f) for f in self.feature_names)
        sizes = tuple(self.table_sizes)
        if not names:
            raise DataError(f"{where}: needs at least one categorical feature")
        if len(set(names)) != len(names):
            raise DataError(f"{where}: feature names must be unique, got {list(names)}")
        if not (len(sizes) == len(self.values) == len(self.offsets) == len(names)):
            raise DataError(
                f"{where}: {len(names)} feature names but {len(sizes)} table sizes, {len(self.values)} value "
                f"arrays and {len(self.offsets)} offset arrays"
            )
        dense_names = tuple(str(d) for d in self.dense_names) or tuple(f"dense_{i}" for i in range(dense.shape[1]))
        if len(dense_names) != dense.shape[1]:
            raise DataError(f"{where}: {len(dense_names)} dense names for {dense.shape[1]} dense columns")
        values_out, offsets_out = [], []
        for f, size, vals, offs in zip(names, sizes, self.values, self.offsets, strict=True):
            if not _is_int(size) or size < 1:
                raise DataError(f"{where}: table size of {f!r} must be a positive integer, got {size!r}")
            vals, offs = np.asarray(vals), np.asarray(offs)
            if vals.ndim != 1 or offs.ndim != 1 or (vals.size and vals.dtype.kind not in "iu"):
                raise DataError(f"{where}: feature {f!r}: values and offsets must be 1-D integer arrays")
            if offs.dtype.kind not in "iu" or offs.shape[0] != n + 1:
                raise DataError(f"{where}: feature {f!r}: offsets must be integers of length N + 1 = {n + 1}")
            vals = np.ascontiguousarray(vals, dtype=np.int64)
            offs = np.ascontiguousarray(offs, dtype=np.int64)
            if offs[0] != 0 or offs[-1] != vals.size or (np.diff(offs) < 0).any():
                raise DataError(f"{where}: feature {f!r}: offsets must rise from 0 to len(values) = {vals.size}")
            if vals.size and (vals.min() < 0 or vals.max() >= size):
                raise DataError(
                    f"{where}: feature {f!r}: row ids must lie in [0, {size}), got [{vals.min()}, {vals.max()}]"
                )
            values_out.append(vals)
            offsets_out.append(offs)
        set_ = object.__setattr__
        set_(self, "dense", dense)
        set_(self, "labels", labels)
        set_(self, "feature_names", names)
        set_(self, "table_sizes", tuple(int(s) for s in sizes))
        set_(self, "values", tuple(values_out))
        set_(self, "offsets", tuple(offsets_out))
        set_(self, "dense_names", dense_names)
        set_(self, "fingerprint", self._compute_fingerprint())

    def _compute_fingerprint(self) -> str:
        digest = hashlib.sha256(_FINGERPRINT_VERSION)
        header = {"features": list(self.feature_names), "dense": list(self.dense_names), "tables": self.table_sizes}
        digest.update(json.dumps(header, sort_keys=True).encode())
        digest.update(np.asarray(self.dense.shape, dtype="<i8").tobytes())
        digest.update(np.ascontiguousarray(self.dense, dtype="<f4").tobytes())
        digest.update(np.ascontiguousarray(self.labels, dtype="<f4").tobytes())
        for vals, offs in zip(self.values, self.offsets, strict=True):
            digest.update(np.ascontiguousarray(offs, dtype="<i8").tobytes())
            digest.update(np.ascontiguousarray(vals, dtype="<i8").tobytes())
        return digest.hexdigest()

    # ------------------------------------------------------------------------------------------- properties
    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_examples(self) -> int:
        return len(self)

    @property
    def n_dense(self) -> int:
        return int(self.dense.shape[1])

    @property
    def n_sparse(self) -> int:
        return len(self.feature_names)

    def bag_lengths(self, feature: int | str) -> np.ndarray:
        """Number of ids of every example's bag of ``feature`` (int64 [N])."""
        return np.diff(self.offsets[self._feature_index(feature)])

    def _feature_index(self, feature: int | str) -> int:
        if isinstance(feature, str):
            if feature not in self.feature_names:
                raise DataError(f"CTRDataset({self.name!r}): no feature {feature!r}; features {self.feature_names}")
            return self.feature_names.index(feature)
        if not _is_int(feature) or not 0 <= feature < self.n_sparse:
            raise DataError(f"CTRDataset({self.name!r}): feature index must lie in [0, {self.n_sparse})")
        return int(feature)

    def _check_indices(self, indices: Any) -> np.ndarray:
        if indices is None:
            return np.arange(len(self), dtype=np.int64)
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise DataError(f"CTRDataset({self.name!r}): indices must be a 1-D integer array")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise DataError(f"CTRDataset({self.name!r}): indices must lie in [0, {len(self)})")
        return idx

    # ------------------------------------------------------------------------------------------ subsetting
    def subset(self, indices: Any, name: str | None = None) -> CTRDataset:
        """The examples ``indices`` (in that order) as a new dataset with the same tables and vocabulary."""
        idx = self._check_indices(indices)
        values, offsets = [], []
        for vals, offs in zip(self.values, self.offsets, strict=True):
            v, lengths = _gather_bags(vals, offs, idx)
            values.append(v)
            offsets.append(_offsets_from_lengths(lengths))
        return CTRDataset(
            name=self.name if name is None else name,
            dense=self.dense[idx],
            labels=self.labels[idx],
            feature_names=self.feature_names,
            table_sizes=self.table_sizes,
            values=values,
            offsets=offsets,
            dense_names=self.dense_names,
        )

    def split_indices(
        self, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Disjoint, covering train/val/test example indices (each sorted) from a seeded random permutation.

        The first ``round(train * N)`` permuted examples are train, the next ``round(val * N)`` val, the rest
        test. ``val`` and ``test`` may be 0.
        """
        where = f"CTRDataset({self.name!r}).split"
        fr = tuple(fractions)
        if len(fr) != 3 or not all(
            not isinstance(x, bool) and isinstance(x, (int, float, np.floating)) and np.isfinite(x) and x >= 0
            for x in fr
        ):
            raise DataError(f"{where}: fractions must be three finite numbers >= 0 (train, val, test), got {fr}")
        if fr[0] <= 0 or abs(sum(fr) - 1.0) > 1e-9:
            raise DataError(f"{where}: need train > 0 and train + val + test = 1, got {fr}")
        if not _is_int(seed) or seed < 0:
            raise DataError(f"{where}: seed must be an integer >= 0, got {seed!r}")
        n = len(self)
        perm = np.random.default_rng(seed).permutation(n)
        n_train = int(round(fr[0] * n))
        n_val = min(int(round(fr[1] * n)), n - n_train)
        parts = (perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :])
        train, val, test = (np.sort(p).astype(np.int64) for p in parts)
        return train, val, test

    def split(
        self, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
    ) -> tuple[CTRDataset, CTRDataset, CTRDataset]:
        """Train/val/test datasets (names ``<name>/train`` ...) from :meth:`split_indices`."""
        parts = self.split_indices(fractions, seed)
        train, val, test = (
            self.subset(p, f"{self.name}/{s}") for p, s in zip(parts, ("train", "val", "test"), strict=True)
        )
        return train, val, test

    # ---------------------------------------------------------------------------------------------- batches
    def batch(self, indices: Any) -> dict[str, Any]:
        """One batch of the examples ``indices``: ``dense`` float32 [B, n_dense], ``sparse`` KJT, ``labels`` [B].

        The KJT has keys ``feature_names``, int64 values and int32 lengths (key-major: all examples of the first
        feature, then the next), as :class:`ciess_prod.models.dlrm.DLRM` consumes it.
        """
        import torch
        from torchrec import KeyedJaggedTensor

        idx = self._check_indices(indices)
        values, lengths = [], []
        for vals, offs in zip(self.values, self.offsets, strict=True):
            v, ln = _gather_bags(vals, offs, idx)
            values.append(v)
            lengths.append(ln)
        sparse = KeyedJaggedTensor(
            keys=list(self.feature_names),
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)),
            stride=int(idx.size),
            length_per_key=[int(v.size) for v in values],
        )
        return {
            "dense": torch.from_numpy(self.dense[idx]),
            "sparse": sparse,
            "labels": torch.from_numpy(self.labels[idx]),
        }

    def batches(
        self, batch_size: int, indices: Any = None, shuffle_seed: int | None = None, drop_last: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Batches (see :meth:`batch`) over ``indices`` (default: all examples), shuffled if ``shuffle_seed``."""
        if not _is_int(batch_size) or batch_size < 1:
            raise DataError(f"CTRDataset({self.name!r}): batch_size must be a positive integer, got {batch_size!r}")
        idx = self._check_indices(indices)
        if shuffle_seed is not None:
            idx = idx[np.random.default_rng(shuffle_seed).permutation(idx.size)]
        stop = idx.size - idx.size % batch_size if drop_last else idx.size
        for start in range(0, stop, batch_size):
            yield self.batch(idx[start : start + batch_size])

    def iter_batches(self, *args: Any, **kwargs: Any) -> Iterator[KeyedJaggedTensor]:
        """Only the KJTs of :meth:`batches` (same arguments)."""
        for b in self.batches(*args, **kwargs):
            yield b["sparse"]

    # ------------------------------------------------------------------------------------------- statistics
    def row_popularity(self, indices: Any = None) -> list[np.ndarray]:
        """Per table, int64 [table_size] counts of how often each row occurs in examples ``indices`` (default:
        all; call it on the train split, or pass the train indices). An id repeated in one bag counts twice."""
        if indices is None:
            bags = list(self.values)
        else:
            idx = self._check_indices(indices)
            bags = [_gather_bags(v, o, idx)[0] for v, o in zip(self.values, self.offsets, strict=True)]
        return [np.bincount(v, minlength=s).astype(np.int64) for v, s in zip(bags, self.table_sizes, strict=True)]

    def summary(self) -> dict[str, Any]:
        """Counts, click rate and per-feature table sizes / mean bag lengths as plain Python types."""
        n = len(self)
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "n_examples": n,
            "n_dense": self.n_dense,
            "n_sparse": self.n_sparse,
            "click_rate": float(self.labels.mean()) if n else 0.0,
            "total_rows": int(sum(self.table_sizes)),
            "features": {
                f: {"table_size": s, "mean_bag_length": (float(v.size) / n) if n else 0.0}
                for f, s, v in zip(self.feature_names, self.table_sizes, self.values, strict=True)
            },
        }


# ----------------------------------------------------------------------------------------- real-data loaders
def _resolve_file(path: str | Path, candidates: tuple[str, ...], what: str) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in candidates:
            if (path / name).is_file():
                path = path / name
                break
        else:
            present = sorted(p.name for p in path.iterdir())[:20]
            raise DataError(f"{path}: no {what} file found; looked for {list(candidates)}, found {present}")
    return require_file(path)


def _first_line(path: Path) -> str:
    """First line of a plain or gzip file (to tell a headered CSV from a headerless TSV)."""
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as fh:  # type: ignore[operator]
            line = fh.readline(1 << 16)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({' '.join(str(exc).split())})") from exc
    return line.decode("utf-8", "replace").rstrip("\r\n")


def _read_strings(path: Path, **kwargs: Any) -> pd.DataFrame:
    """Every column as strings, empty fields kept as ''. The pyarrow engine refuses rows with a wrong number of
    fields (the C engine would silently pad a truncated last line with empty values)."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, engine="pyarrow", **kwargs)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: file is empty (no data)") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise DataError(f"{path}: cannot parse ({reason})") from exc


def _check_header(path: Path, wanted: Sequence[str], present: Sequence[str], what: str) -> None:
    missing = [c for c in wanted if c not in present]
    if missing:
        shown = list(present)[:50]
        raise DataError(f"{path}: not a {what} file: missing column(s) {missing}; the header has {shown}")


def _first_bad(column: pd.Series, bad: np.ndarray) -> str:
    pos = int(np.flatnonzero(bad)[0])
    return f"{column.iloc[pos]!r} at line {pos + 2}"  # line 1 is the header


def _parse_labels(column: pd.Series, path: Path, name: str) -> np.ndarray:
    ones = (column == "1").to_numpy(dtype=bool)
    zeros = (column == "0").to_numpy(dtype=bool)
    bad = ~(ones | zeros)
    if bad.any():
        raise DataError(f"{path}: label column {name!r} must be 0 or 1, found {_first_bad(column, bad)}")
    return ones.astype(np.float32)


def _parse_count(column: pd.Series, path: Path, name: str) -> np.ndarray:
    """Criteo integer feature -> log(1 + max(x, 0)); empty -> 0; anything else non-integer is an error."""
    empty = (column == "").to_numpy(dtype=bool)
    numbers = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        bad = ~empty & (~np.isfinite(numbers) | (numbers != np.floor(numbers)))
    if bad.any():
        raise DataError(f"{path}: dense column {name!r} must hold integers, found {_first_bad(column, bad)}")
    return np.log1p(np.maximum(np.where(empty, 0.0, numbers), 0.0)).astype(np.float32)


def _encode(column: pd.Series, min_count: int, missing: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Raw strings -> (values, offsets, table_size) by first appearance; rare -> OOV row 0; see module doc."""
    codes, uniques = pd.factorize(column, sort=False)  # codes in order of first appearance
    codes = codes.astype(np.int64)
    counts = np.bincount(codes, minlength=len(uniques))
    keep = counts >= min_count
    empty_code = -1
    if missing == "empty":
        is_empty = np.asarray(uniques == "", dtype=bool)
        if is_empty.any():
            empty_code = int(np.flatnonzero(is_empty)[0])
            keep[empty_code] = False
    row_of_code = np.where(keep, np.cumsum(keep), OOV_ROW).astype(np.int64)
    present = codes != empty_code
    values = row_of_code[codes[present]]
    offsets = _offsets_from_lengths(present.astype(np.int64))
    return values, offsets, 1 + int(keep.sum())


def _check_loader_args(path: Path, min_count: int, missing: str) -> None:
    if not _is_int(min_count) or min_count < 1:
        raise DataError(f"{path}: min_count must be an integer >= 1, got {min_count!r}")
    if missing not in _MISSING_MODES:
        raise DataError(f"{path}: missing must be one of {list(_MISSING_MODES)}, got {missing!r}")


def _build(
    path: Path,
    name: str,
    frame: pd.DataFrame,
    label_col: str,
    dense_cols: Sequence[str],
    sparse: dict[str, pd.Series],
    min_count: int,
    missing: str,
) -> CTRDataset:
    if len(frame) == 0:
        raise DataError(f"{path}: the file has a header but no data rows")
    labels = _parse_labels(frame[label_col], path, label_col)
    if dense_cols:
        dense = np.stack([_parse_count(frame[c], path, c) for c in dense_cols], axis=1)
    else:
        dense = np.zeros((len(frame), 0), dtype=np.float32)
    values, offsets, sizes = [], [], []
    for column in sparse.values():
        v, o, s = _encode(column, min_count, missing)
        values.append(v)
        offsets.append(o)
        sizes.append(s)
    return CTRDataset(
        name=name,
        dense=dense,
        labels=labels,
        feature_names=list(sparse),
        table_sizes=sizes,
        values=values,
        offsets=offsets,
        dense_names=list(dense_cols),
    )


def load_criteo(path: str | Path, min_count: int = 1, missing: Literal["empty", "row"] = "empty") -> CTRDataset:
    """Criteo display-ads data: 13 dense features (``I1..I13``), 26 categorical (``C1..C26``), label ``Label``.

    Reads the Kaggle CSV layout (header ``Id,Label,I1..I13,C1..C26``; ``Id`` optional and dropped, ``label``
    accepted in lower case) or the original headerless tab-separated ``train.txt`` / Criteo-1TB ``day_N``
    layout (label, 13 integers, 26 categoricals), plain or ``.gz``; ``path`` may be a directory holding
    ``train.csv[.gz]`` or ``train.txt[.gz]``. See the module docstring for the vocabulary conventions.
    """
    file = _resolve_file(path, ("train.csv.gz", "train.csv", "train.txt.gz", "train.txt"), "Criteo")
    _check_loader_args(file, min_count, missing)
    first = _first_line(file)
    label_col = "Label"
    if "\t" in first and first.split("\t")[0].strip().lower() not in ("label", "id"):
        columns = ["Label", *CRITEO_DENSE, *CRITEO_SPARSE]
        n_fields = first.count("\t") + 1
        if n_fields != len(columns):
            raise DataError(
                f"{file}: headerless Criteo TSV needs {len(columns)} tab-separated fields "
                f"(label, 13 integer, 26 categorical), the first line has {n_fields}"
            )
        frame = _read_strings(file, sep="\t", header=None, names=columns)
    else:
        frame = _read_strings(file)
        if label_col not in frame.columns and "label" in frame.columns:
            label_col = "label"
        _check_header(file, [label_col, *CRITEO_DENSE, *CRITEO_SPARSE], list(frame.columns), "Criteo")
    sparse = {c: frame[c] for c in CRITEO_SPARSE}
    return _build(file, f"criteo:{file.name}", frame, label_col, CRITEO_DENSE, sparse, min_count, missing)


def _avazu_time(column: pd.Series, path: Path) -> tuple[pd.Series, pd.Series]:
    """``YYMMDDHH`` -> (hour of day ``00``..``23``, weekday ``0``..``6``) as strings."""
    digits = column.str.fullmatch(r"\d{8}").to_numpy(dtype=bool, na_value=False)
    hour = pd.to_numeric(column.str.slice(6, 8), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    day = pd.to_datetime(column.str.slice(0, 6), format="%y%m%d", errors="coerce")
    with np.errstate(invalid="ignore"):
        bad = ~digits | ~(hour <= 23) | day.isna().to_numpy(dtype=bool)
    if bad.any():
        raise DataError(f"{path}: column 'hour' must be YYMMDDHH, found {_first_bad(column, bad)}")
    weekday = pd.Series(day.dt.day_of_week.to_numpy(dtype=np.int64).astype(str), index=column.index)
    return column.str.slice(6, 8), weekday


def load_avazu(path: str | Path, min_count: int = 1, missing: Literal["empty", "row"] = "empty") -> CTRDataset:
    """Avazu mobile-ads data (Kaggle CSV with header, plain or gzip): label ``click``, ``id`` dropped, no dense
    features, 21 categorical columns plus ``hour_of_day`` and ``weekday`` derived from ``hour`` (23 features).

    ``path`` may be a directory holding ``train.csv[.gz]``, ``train.gz`` or ``avazu_sample.csv.gz``.
    """
    candidates = ("train.csv.gz", "train.csv", "train.gz", "avazu_sample.csv.gz", "avazu_sample.csv")
    file = _resolve_file(path, candidates, "Avazu")
    _check_loader_args(file, min_count, missing)
    frame = _read_strings(file)
    _check_header(file, ["click", "hour", *AVAZU_SPARSE], list(frame.columns), "Avazu")
    hour_of_day, weekday = _avazu_time(frame["hour"], file)
    sparse = {"hour_of_day": hour_of_day, "weekday": weekday, **{c: frame[c] for c in AVAZU_SPARSE}}
    return _build(file, f"avazu:{file.name}", frame, "click", (), sparse, min_count, missing)


# --------------------------------------------------------------------------------------------- synthetic
_MASK64 = (1 << 64) - 1


def _splitmix64_int(x: int) -> int:
    """SplitMix64 finaliser on a Python int (used for per-table salts)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _hash_uniform(rows: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic pseudo-uniform [0, 1) per (salt, row): SplitMix64 on uint64 arrays (wrapping arithmetic).

    It gives every row of a table a hidden weight without storing O(rows) weights."""
    z = rows.astype(np.uint64) + np.uint64(salt)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _zipf_ranks(u: np.ndarray, n_rows: int, exponent: float) -> np.ndarray:
    """0-based popularity ranks by inverse-CDF sampling of a power law truncated to ``n_rows`` rows.

    ``x`` has density proportional to x^-s on [1, n_rows + 1) and rank = floor(x) - 1, so
    P(rank k) is proportional to the integral of x^-s over [k + 1, k + 2), about (k + 1)^-s. ``log1p``/``expm1``
    keep it exact near s = 1; s = 0 is uniform. O(len(u)) time and memory, none per row.
    """
    e = 1.0 - exponent
    log_top = math.log(n_rows + 1.0)
    if abs(e) < 1e-12:
        x = np.exp(u * log_top)
    else:
        x = np.exp(np.log1p(u * math.expm1(e * log_top)) / e)
    return np.clip(np.floor(x).astype(np.int64) - 1, 0, n_rows - 1)


@dataclass(frozen=True)
class SyntheticCTRConfig:
    """Size, skew and signal of a synthetic CTR dataset; the output is a pure function of these values."""

    n_examples: int = 10_000
    n_dense: int = 13  # dense features, standard normal; may be 0
    table_sizes: tuple[int, ...] = (100_000, 10_000, 1_000, 100, 10)  # rows of each categorical feature's table
    bag_lengths: tuple[float, ...] | None = None  # mean ids per bag per table (None: 1 everywhere); see generate_ctr
    zipf_exponent: float = 1.05  # power-law exponent of row popularity (0: uniform)
    click_rate: float = 0.25  # expected positive rate; sets the hidden model's intercept
    dense_signal: float = 1.0  # std of the dense part of the hidden logit
    sparse_signal: float = 1.5  # std scale of the sparse part of the hidden logit
    seed: int = 0

    def __post_init__(self) -> None:
        where = f"SyntheticCTRConfig({asdict(self)})"
        for name in ("n_examples", "n_dense", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise DataError(f"{where}: {name} must be an integer >= 0, got {value!r}")
        if self.n_examples < 1:
            raise DataError(f"{where}: n_examples must be >= 1")
        sizes = tuple(self.table_sizes)
        if not sizes or not all(_is_int(s) and s >= 1 for s in sizes):
            raise DataError(f"{where}: table_sizes must be a non-empty sequence of positive integers")
        object.__setattr__(self, "table_sizes", tuple(int(s) for s in sizes))
        if self.bag_lengths is not None:
            bags = tuple(self.bag_lengths)
            if len(bags) != len(sizes):
                raise DataError(f"{where}: bag_lengths needs one mean per table ({len(sizes)}), got {len(bags)}")
            if not all(not isinstance(m, bool) and isinstance(m, (int, float)) and 0 < m < 1e4 for m in bags):
                raise DataError(f"{where}: every bag length must be a number in (0, 1e4)")
            object.__setattr__(self, "bag_lengths", tuple(float(m) for m in bags))
        for name in ("zipf_exponent", "dense_signal", "sparse_signal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise DataError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.click_rate, bool) or not isinstance(self.click_rate, (int, float)):
            raise DataError(f"{where}: click_rate must be a number")
        if not 0 < self.click_rate < 1:
            raise DataError(f"{where}: click_rate must lie in (0, 1)")


def _bag_lengths(mean: float, n: int, rng: np.random.Generator) -> np.ndarray:
    if mean == 1.0:
        return np.ones(n, dtype=np.int64)
    if mean < 1.0:
        return (rng.random(n) < mean).astype(np.int64)
    return 1 + rng.poisson(mean - 1.0, n).astype(np.int64)


def _calibrate_intercept(logits: np.ndarray, rate: float) -> float:
    """Intercept b with mean(sigmoid(logits + b)) = rate (bisection over the scalar b)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if np.mean(1.0 / (1.0 + np.exp(-(logits + mid)))) < rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def generate_ctr(config: SyntheticCTRConfig) -> CTRDataset:
    """Seeded synthetic CTR data with power-law row popularity, multi-id bags and a learnable click model.

    * Bags: table t has mean bag length m_t (``bag_lengths``, default 1): m = 1 gives exactly one id, m > 1 gives
      1 + Poisson(m - 1) ids, m < 1 gives one id with probability m and otherwise an empty bag. The ids of a bag
      are drawn independently (a head row may repeat inside a bag).
    * Ids: a popularity rank from a truncated power law (:func:`_zipf_ranks`), mapped to a row by a seeded affine
      bijection ``(a * rank + b) mod rows`` so popular rows are scattered over the table, not rows 0, 1, 2, ...
    * Labels: Bernoulli(sigmoid(b + dense_signal * <x, w> + sparse_signal * sum_t mean_bag(h_t) / sqrt(T)))
      with dense x ~ N(0, 1), a hidden unit-norm w, and hidden per-row weights h_t(row) in [-sqrt(3), sqrt(3)]
      (unit variance) given by an integer hash of (seed, table, row), so no O(rows) memory is used. ``b`` is
      calibrated so the expected click rate is ``click_rate``.

    Memory and time are O(n_examples * (n_dense + total bag length)), independent of the table sizes.
    """
    rng = np.random.default_rng(config.seed)
    n = config.n_examples
    n_tables = len(config.table_sizes)
    means = config.bag_lengths if config.bag_lengths is not None else (1.0,) * n_tables
    dense = rng.standard_normal((n, config.n_dense), dtype=np.float32)
    logits = np.zeros(n, dtype=np.float64)
    if config.n_dense:
        w = rng.standard_normal(config.n_dense)
        logits += config.dense_signal * (dense.astype(np.float64) @ (w / np.linalg.norm(w)))
    values, offsets = [], []
    sparse_part = np.zeros(n, dtype=np.float64)
    for t, (rows, mean) in enumerate(zip(config.table_sizes, means, strict=True)):
        lengths = _bag_lengths(mean, n, rng)
        ranks = _zipf_ranks(rng.random(int(lengths.sum())), rows, config.zipf_exponent)
        a = int(rng.integers(1, max(rows, 2)))
        while math.gcd(a, rows) != 1:
            a += 1
        b = int(rng.integers(0, rows))
        ids = (ranks * a + b) % rows
        salt = _splitmix64_int(_splitmix64_int(config.seed) ^ (t + 1))
        weights = math.sqrt(3.0) * (2.0 * _hash_uniform(ids, salt) - 1.0)
        example = np.repeat(np.arange(n, dtype=np.int64), lengths)
        sums = np.bincount(example, weights=weights, minlength=n)
        sparse_part += sums / np.maximum(lengths, 1)
        values.append(ids.astype(np.int64))
        offsets.append(_offsets_from_lengths(lengths))
    logits += config.sparse_signal * sparse_part / math.sqrt(n_tables)
    logits += _calibrate_intercept(logits, config.click_rate)
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    return CTRDataset(
        name=f"synthetic-ctr(seed={config.seed}, n={n})",
        dense=dense,
        labels=labels,
        feature_names=[f"cat_{t}" for t in range(n_tables)],
        table_sizes=config.table_sizes,
        values=values,
        offsets=offsets,
        dense_names=[f"dense_{i}" for i in range(config.n_dense)],
    )


# ------------------------------------------------------------------------------------------------- dispatch
def load_ctr(
    kind: str, source: str | Path | SyntheticCTRConfig | dict[str, Any] | None = None, **kwargs: Any
) -> CTRDataset:
    """``load_ctr("criteo", path, min_count=.., missing=..)``, ``load_ctr("avazu", path)`` or
    ``load_ctr("synthetic", config)`` (a :class:`SyntheticCTRConfig`, a dict of its fields, or None: defaults)."""
    if kind not in CTR_KINDS:
        raise DataError(f"unknown CTR dataset kind {kind!r}; valid kinds are {list(CTR_KINDS)}")
    if kind == "synthetic":
        if kwargs:
            raise DataError(f"load_ctr('synthetic'): unexpected arguments {sorted(kwargs)}; pass a config")
        if source is None:
            return generate_ctr(SyntheticCTRConfig())
        if isinstance(source, dict):
            try:
                return generate_ctr(SyntheticCTRConfig(**source))
            except TypeError as exc:
                raise DataError(f"load_ctr('synthetic'): bad config fields ({exc})") from exc
        if not isinstance(source, SyntheticCTRConfig):
            raise DataError(f"load_ctr('synthetic') needs a SyntheticCTRConfig, got {type(source).__name__}")
        return generate_ctr(source)
    if not isinstance(source, (str, Path)):
        raise DataError(f"load_ctr({kind!r}) needs a file or directory path, got {type(source).__name__}")
    loader = load_criteo if kind == "criteo" else load_avazu
    return loader(source, **kwargs)
