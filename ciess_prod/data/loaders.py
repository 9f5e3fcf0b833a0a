"""Readers that turn benchmark files into an :class:`InteractionLog` of original ids.

Each reader only parses and validates: it never re-indexes, de-duplicates or splits, so every source shares
the one tested path in ``build_dataset``. Parsing goes through pandas' C engine (or numpy for the ragged
LightGCN lines), never through per-line Python code, so ML-1M loads in about a second. Every problem a user
can cause (missing file, renamed column, a line in the wrong format) becomes a one-line :class:`DataError`
naming the file.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from ciess_prod.data.errors import DataError
from ciess_prod.data.interactions import FOLD_TEST, FOLD_TRAIN, InteractionLog

FORMATS = ("auto", "ml-1m", "ml-100k", "lightgcn", "csv", "parquet")

_ML1M_DIR_NAMES = {"ml-1m", "movielens-1m", "ml1m", "movielens1m"}
_ML100K_DIR_NAMES = {"ml-100k", "movielens-100k", "ml100k", "movielens100k"}
_PARQUET_SUFFIXES = (".parquet", ".pq")
_MAX_DIGITS = 18  # int64 holds every 18-digit decimal
_CHUNK_BYTES = 1 << 22  # LightGCN files are parsed 4 MiB at a time to bound memory


# ---------------------------------------------------------------------------------------------------- helpers
def require_file(path: Path) -> Path:
    """Fail early, and by name, on a missing or empty file (pandas' own messages omit the path)."""
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if not path.is_file():
        raise DataError(f"{path}: expected a file, found a directory")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    return path


def _example(values: pd.Series, bad: np.ndarray, first_line: int, what: str) -> str:
    """Describe the first offending value and where it is, so a user can find it in the file."""
    pos = int(np.flatnonzero(bad)[0])
    value = values.iloc[pos]
    if isinstance(value, np.generic):
        value = value.item()  # show 1.5, not np.float64(1.5)
    return f"{value!r} at {what} {pos + first_line}"


def _as_int64(values: pd.Series, column: str, source: str, first_line: int = 1, what: str = "line") -> np.ndarray:
    """Convert an id column to int64, rejecting missing, fractional or non-numeric ids with an example."""
    if pd.api.types.is_bool_dtype(values.dtype):
        raise DataError(f"{source}: column {column!r} holds booleans, not integer ids")
    if pd.api.types.is_integer_dtype(values.dtype):
        if values.isna().any():  # nullable integer dtypes (Parquet) can hold missing values
            raise DataError(
                f"{source}: column {column!r} has a missing id, e.g. "
                f"{_example(values, values.isna().to_numpy(), first_line, what)}"
            )
        return values.to_numpy(dtype=np.int64)
    numeric = values if pd.api.types.is_float_dtype(values.dtype) else pd.to_numeric(values, errors="coerce")
    if pd.api.types.is_integer_dtype(numeric.dtype) and not numeric.isna().any():
        return numeric.to_numpy(dtype=np.int64)  # integer strings: exact, even beyond 2**53
    as_float = numeric.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(as_float) | (as_float != np.round(as_float)) | (np.abs(as_float) >= 2.0**53)
    if bad.any():
        raise DataError(
            f"{source}: column {column!r} has non-integer ids, e.g. {_example(values, bad, first_line, what)}"
        )
    return as_float.astype(np.int64)


def _check_columns(wanted: Iterable[str], present: Iterable[str], source: str) -> None:
    present = list(present)
    missing = [c for c in wanted if c not in present]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; the file has columns {present}")


def _read_csv(handle: Path | IO[bytes], source: str, **kwargs: Any) -> pd.DataFrame:
    """pandas.read_csv with its parse errors turned into DataError naming the source."""
    try:
        return pd.read_csv(handle, engine="c", **kwargs)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{source}: file is empty (no data)") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError, zipfile.BadZipFile) as exc:
        reason = " ".join(str(exc).split())
        raise DataError(f"{source}: cannot parse ({reason})") from exc


def _open_zip_member(stack: ExitStack, archive: Path, member_name: str) -> tuple[IO[bytes], str]:
    """Open ``member_name`` (or any member with that base name) inside ``archive``."""
    try:
        zf = stack.enter_context(zipfile.ZipFile(archive))
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{archive}: not a readable zip archive ({exc})") from exc
    names = zf.namelist()
    base = member_name.rsplit("/", 1)[-1]
    candidates = [n for n in names if n == member_name] or [n for n in names if n.rsplit("/", 1)[-1] == base]
    if not candidates:
        shown = names[:10] + (["..."] if len(names) > 10 else [])
        raise DataError(f"{archive}: zip has no {member_name!r}; it contains {shown}")
    info = zf.getinfo(candidates[0])
    source = f"{archive}[{info.filename}]"
    if info.file_size == 0:
        raise DataError(f"{source}: file is empty")
    try:
        return stack.enter_context(zf.open(info)), source
    except (zipfile.BadZipFile, OSError, RuntimeError) as exc:
        raise DataError(f"{source}: cannot read member of zip archive ({exc})") from exc


def _find_in_dir(directory: Path, candidates: tuple[str, ...], dataset: str) -> Path:
    for rel in candidates:
        if (directory / rel).is_file():
            return directory / rel
    present = sorted(p.name for p in directory.iterdir())[:20]
    raise DataError(f"{directory}: no {dataset} data found; looked for {list(candidates)}, found {present}")


def _sniff_first_line(handle: IO[bytes]) -> bytes:
    """First non-blank line, used to reject the wrong format with a precise message before the bulk parse."""
    for line in handle:
        if line.strip():
            return line.rstrip(b"\r\n")
    return b""


def _with_handle(path: Path, zip_member: str | None, fn: Callable[[IO[bytes], str], InteractionLog]) -> InteractionLog:
    """Run ``fn(handle, source)`` on a plain file or on a member of a zip archive."""
    with ExitStack() as stack:
        if zip_member is not None:
            handle, source = _open_zip_member(stack, path, zip_member)
        else:
            handle, source = stack.enter_context(path.open("rb")), str(path)
        return fn(handle, source)


# -------------------------------------------------------------------------------------------------- MovieLens
def _expect_separator(handle: IO[bytes], source: str, separator: bytes, name: str, expected: str) -> None:
    """Refuses an empty file or one whose first line lacks ``separator``; rewinds the handle."""
    first = _sniff_first_line(handle)
    if not first:
        raise DataError(f"{source}: file is empty")
    if separator not in first:
        line = first[:80].decode("utf-8", "replace")
        raise DataError(f"{source}: not in {name} format (expected {expected}), first line is {line!r}")
    handle.seek(0)


def _parse_ml1m_dat(handle: IO[bytes], source: str) -> InteractionLog:
    """``UserID::MovieID::Rating::Timestamp`` lines; parsed with sep=':' so the C engine can be used."""
    _expect_separator(handle, source, b"::", "ML-1M ratings.dat", "'UserID::MovieID::Rating::Timestamp'")
    # "a::b::c::d" split on ':' gives a,'',b,'',c,'',d: ids in columns 0 and 2; 1, 3, 5 must stay empty.
    df = _read_csv(handle, source, sep=":", header=None, names=list(range(7)))
    malformed = df[[0, 2, 4]].isna().any(axis=1).to_numpy() | df[[1, 3, 5]].notna().any(axis=1).to_numpy()
    if malformed.any():
        line = int(np.flatnonzero(malformed)[0]) + 1
        raise DataError(
            f"{source}: line {line} is not 'UserID::MovieID::Rating::Timestamp' (every field must be separated by '::')"
        )
    users = _as_int64(df[0], "UserID", source)
    items = _as_int64(df[2], "MovieID", source)
    return InteractionLog(users=users, items=items, source=source)


def _parse_ml100k_data(handle: IO[bytes], source: str) -> InteractionLog:
    """Tab-separated ``user item rating timestamp`` lines of ML-100K ``u.data``."""
    _expect_separator(handle, source, b"\t", "ML-100K u.data", "tab-separated 'user item rating timestamp'")
    df = _read_csv(handle, source, sep="\t", header=None, names=list(range(4)))
    malformed = df[[0, 1, 2]].isna().any(axis=1).to_numpy()
    if malformed.any():
        line = int(np.flatnonzero(malformed)[0]) + 1
        raise DataError(f"{source}: line {line} has fewer than 3 tab-separated fields (user item rating ...)")
    users = _as_int64(df[0], "user", source)
    items = _as_int64(df[1], "item", source)
    return InteractionLog(users=users, items=items, source=source)


def _load_movielens(
    path: str | Path,
    label: str,
    members: tuple[str, ...],
    zip_member: str,
    item_col: str,
    parse: Callable[[IO[bytes], str], InteractionLog],
) -> InteractionLog:
    """Shared dispatch of the MovieLens layouts: the raw file, its GroupLens zip, a directory, or a CSV."""
    path = Path(path)
    if path.is_dir():
        path = _find_in_dir(path, (*members, "ratings.csv.gz", "ratings.csv"), label)
    require_file(path)
    name = path.name.lower()
    if name.endswith(".zip"):
        return _with_handle(path, zip_member, parse)
    if ".csv" in name:
        return load_table(path, user_col="user_id", item_col=item_col)
    return _with_handle(path, None, parse)


def load_movielens_1m(path: str | Path) -> InteractionLog:
    """ML-1M from ``ratings.dat``, ``ml-1m.zip``, a directory holding one of them, or ``ratings.csv.gz``.

    Every rating counts as a positive (the CIESS protocol); the rating value is not returned.
    """
    members = ("ratings.dat", "ml-1m/ratings.dat", "ml-1m.zip")
    return _load_movielens(path, "ML-1M", members, "ml-1m/ratings.dat", "movie_id", _parse_ml1m_dat)


def load_movielens_100k(path: str | Path) -> InteractionLog:
    """ML-100K from ``u.data``, ``ml-100k.zip``, a directory holding one of them, or ``ratings.csv.gz``."""
    members = ("u.data", "ml-100k/u.data", "ml-100k.zip")
    return _load_movielens(path, "ML-100K", members, "ml-100k/u.data", "item_id", _parse_ml100k_data)


# --------------------------------------------------------------------------------------------------- LightGCN
def _parse_adjacency_block(block: bytes, source: str, first_line: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse whole ``user item item ...`` lines with numpy: tokens from a digit mask, values by reduceat."""
    buf = np.frombuffer(block, dtype=np.uint8)
    is_digit = (buf >= ord("0")) & (buf <= ord("9"))
    is_space = (buf == ord(" ")) | (buf == ord("\t")) | (buf == ord("\n")) | (buf == ord("\r"))
    bad = ~(is_digit | is_space)
    if bad.any():
        pos = int(np.argmax(bad))
        line_start = block.rfind(b"\n", 0, pos) + 1
        line_end = block.find(b"\n", pos)
        text = block[line_start : line_end if line_end >= 0 else len(block)][:80].decode("utf-8", "replace")
        line = first_line + block.count(b"\n", 0, pos)
        raise DataError(f"{source}: line {line} has a non-integer id (expected 'user item item ...'): {text!r}")
    newline_before = np.cumsum(buf == ord("\n"), dtype=np.int64)
    prev_digit = np.concatenate(([False], is_digit[:-1]))
    next_digit = np.concatenate((is_digit[1:], [False]))
    starts = np.flatnonzero(is_digit & ~prev_digit)
    ends = np.flatnonzero(is_digit & ~next_digit)
    if starts.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    lengths = ends - starts + 1
    if lengths.max() > _MAX_DIGITS:
        tok = int(np.argmax(lengths))
        line = first_line + int(newline_before[starts[tok]])
        raise DataError(f"{source}: line {line} has an id with more than {_MAX_DIGITS} digits")
    digit_pos = np.flatnonzero(is_digit)
    token_of_digit = np.repeat(np.arange(starts.size), lengths)
    powers = 10 ** np.arange(_MAX_DIGITS, dtype=np.int64)
    contrib = (buf[digit_pos].astype(np.int64) - ord("0")) * powers[ends[token_of_digit] - digit_pos]
    values = np.add.reduceat(contrib, np.concatenate(([0], np.cumsum(lengths)[:-1])))
    line_of_token = newline_before[starts]
    first_in_line = np.concatenate(([True], line_of_token[1:] != line_of_token[:-1]))
    user_of_token = values[first_in_line][np.cumsum(first_in_line) - 1]
    return user_of_token[~first_in_line], values[~first_in_line]


def _read_adjacency_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a LightGCN ``train.txt``/``test.txt`` in line-aligned chunks so memory stays bounded."""
    require_file(path)
    users: list[np.ndarray] = []  # one array per 4 MiB chunk, not per line
    items: list[np.ndarray] = []
    line = 1
    carry = b""
    with path.open("rb") as fh:
        while True:
            chunk = fh.read(_CHUNK_BYTES)
            data = carry + chunk
            if not chunk:
                block, carry = data, b""
            else:
                cut = data.rfind(b"\n") + 1
                block, carry = data[:cut], data[cut:]
            if block:
                u, i = _parse_adjacency_block(block, str(path), line)
                users.append(u)
                items.append(i)
                line += block.count(b"\n")
            if not chunk:
                break
    users_arr = np.concatenate(users) if users else np.empty(0, np.int64)
    items_arr = np.concatenate(items) if items else np.empty(0, np.int64)
    return users_arr, items_arr


def load_lightgcn(path: str | Path) -> InteractionLog:
    """NGCF/LightGCN layout (Yelp2018, Gowalla, Amazon-book): ``train.txt`` + ``test.txt`` adjacency lines.

    Each line is ``user item item ...`` (a user may have no items). ``folds`` records the predefined split
    (0 for train.txt, 2 for test.txt) so ``build_dataset`` can keep the published test set.
    """
    directory = Path(path)
    if not directory.exists():
        raise DataError(f"{directory}: no such file or directory")
    if not directory.is_dir():
        raise DataError(f"{directory}: expected a directory with train.txt and test.txt")
    missing = [n for n in ("train.txt", "test.txt") if not (directory / n).is_file()]
    if missing:
        raise DataError(f"{directory}: LightGCN directory lacks {missing} (needs train.txt and test.txt)")
    tr_u, tr_i = _read_adjacency_file(directory / "train.txt")
    te_u, te_i = _read_adjacency_file(directory / "test.txt")
    if tr_u.size == 0:
        raise DataError(f"{directory / 'train.txt'}: no (user, item) interactions in the file")
    folds = np.concatenate((np.full(tr_u.size, FOLD_TRAIN, np.int8), np.full(te_u.size, FOLD_TEST, np.int8)))
    return InteractionLog(
        users=np.concatenate((tr_u, te_u)),
        items=np.concatenate((tr_i, te_i)),
        source=str(directory),
        folds=folds,
    )


# --------------------------------------------------------------------------------------------- generic tables
def _is_parquet(path: Path) -> bool:
    return path.name.lower().endswith(_PARQUET_SUFFIXES)


def _read_parquet(path: Path, columns: list[str]) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({' '.join(str(exc).split())})") from exc
    _check_columns(columns, names, str(path))
    try:
        return pd.read_parquet(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read Parquet data ({' '.join(str(exc).split())})") from exc


def load_table(
    path: str | Path,
    user_col: str = "user_id",
    item_col: str = "item_id",
    rating_col: str | None = None,
    min_rating: float | None = None,
    sep: str = ",",
) -> InteractionLog:
    """Interaction log from a CSV (any compression pandas infers) or Parquet (by suffix) table.

    With ``min_rating``, only rows whose ``rating_col`` is at least that value are positives (explicit ratings
    turned into implicit feedback); without it every row is a positive.
    """
    path = require_file(Path(path))
    source = str(path)
    if min_rating is not None and rating_col is None:
        raise DataError(f"{source}: min_rating={min_rating} needs rating_col to name the rating column")
    columns = [user_col, item_col] + ([rating_col] if rating_col is not None else [])
    if len(set(columns)) != len(columns):
        raise DataError(f"{source}: user, item and rating columns must differ, got {columns}")
    if _is_parquet(path):
        df = _read_parquet(path, columns)
        first_line, what = 0, "row"
    else:
        header = _read_csv(path, source, sep=sep, nrows=0).columns
        _check_columns(columns, header, source)
        df = _read_csv(path, source, sep=sep, usecols=columns)
        first_line, what = 2, "line"  # line 1 is the header
    if len(df) == 0:
        raise DataError(f"{source}: table has a header but no rows")
    users = _as_int64(df[user_col], user_col, source, first_line, what)
    items = _as_int64(df[item_col], item_col, source, first_line, what)
    if rating_col is not None and min_rating is not None:
        ratings = pd.to_numeric(df[rating_col], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        if np.isnan(ratings).any():
            bad = np.isnan(ratings)
            raise DataError(
                f"{source}: column {rating_col!r} has non-numeric ratings, e.g. "
                f"{_example(df[rating_col], bad, first_line, what)}"
            )
        keep = ratings >= min_rating
        if not keep.any():
            raise DataError(f"{source}: no row has {rating_col} >= {min_rating}")
        users, items = users[keep], items[keep]
    return InteractionLog(users=users, items=items, source=source)


# --------------------------------------------------------------------------------------------------- dispatch
def detect_format(path: str | Path) -> str:
    """Guess the format from file and directory names (see ``load_interactions``)."""
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        if (path / "train.txt").is_file() and (path / "test.txt").is_file():
            return "lightgcn"
        if name in _ML1M_DIR_NAMES or (path / "ratings.dat").is_file() or (path / "ml-1m.zip").is_file():
            return "ml-1m"
        if name in _ML100K_DIR_NAMES or (path / "u.data").is_file() or (path / "ml-100k.zip").is_file():
            return "ml-100k"
        if (path / "ml-1m" / "ratings.dat").is_file():
            return "ml-1m"
        if (path / "ml-100k" / "u.data").is_file():
            return "ml-100k"
    else:
        parent = path.parent.name.lower()
        if name in ("ratings.dat", "ml-1m.zip") or (name.startswith("ratings.csv") and parent in _ML1M_DIR_NAMES):
            return "ml-1m"
        if name in ("u.data", "ml-100k.zip") or (name.startswith("ratings.csv") and parent in _ML100K_DIR_NAMES):
            return "ml-100k"
        if name.endswith(_PARQUET_SUFFIXES):
            return "parquet"
        if ".csv" in name:
            return "csv"
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    raise DataError(f"{path}: cannot detect the data format from its name; pass format= one of {list(FORMATS[1:])}")


def load_interactions(path: str | Path, format: str = "auto", **kwargs: Any) -> InteractionLog:
    """Load any supported source; ``format="auto"`` detects it from file/directory names.

    ``kwargs`` go to the chosen loader (column names, ``min_rating`` and ``sep`` for csv/parquet).
    """
    if format not in FORMATS:
        raise DataError(f"{path}: unknown data format {format!r}; valid formats are {list(FORMATS)}")
    fmt = detect_format(path) if format == "auto" else format
    if fmt in ("csv", "parquet"):
        if (fmt == "parquet") != _is_parquet(Path(path)):
            raise DataError(
                f"{path}: format={fmt!r} does not match the file name (Parquet files end in .parquet or .pq)"
            )
        return load_table(path, **kwargs)
    if kwargs:
        raise DataError(f"{path}: format {fmt!r} takes no options, got {sorted(kwargs)}")
    loaders: dict[str, Callable[[str | Path], InteractionLog]] = {
        "ml-1m": load_movielens_1m,
        "ml-100k": load_movielens_100k,
        "lightgcn": load_lightgcn,
    }
    return loaders[fmt](path)
