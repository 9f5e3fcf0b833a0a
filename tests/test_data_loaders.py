"""Loaders: every supported layout on small files, and a readable DataError for every kind of bad input."""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ciess_prod.data import (
    FOLD_TEST,
    FOLD_TRAIN,
    DataError,
    InteractionLog,
    detect_format,
    load_interactions,
    load_lightgcn,
    load_movielens_1m,
    load_movielens_100k,
    load_table,
)

SHARED = Path("/work/shared/data")

ML1M_LINES = "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n3::3408::4::978300275\n"
ML1M_USERS = [1, 1, 2, 3]
ML1M_ITEMS = [1193, 661, 1193, 3408]
ML100K_LINES = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _zip(path: Path, members: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return path


def _assert_ml1m(log: InteractionLog) -> None:
    assert log.users.dtype == np.int64 and log.items.dtype == np.int64
    assert log.users.tolist() == ML1M_USERS
    assert log.items.tolist() == ML1M_ITEMS
    assert log.folds is None


# -------------------------------------------------------------------------------------------------- MovieLens
def test_ml1m_ratings_dat(tmp_path: Path) -> None:
    path = _write(tmp_path / "ratings.dat", ML1M_LINES)
    log = load_movielens_1m(path)
    _assert_ml1m(log)
    assert log.source == str(path)


def test_ml1m_zip_and_directories(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "ml-1m.zip", {"ml-1m/ratings.dat": ML1M_LINES, "ml-1m/README": "x"})
    log = load_movielens_1m(archive)
    _assert_ml1m(log)
    assert "ml-1m/ratings.dat" in log.source
    _assert_ml1m(load_movielens_1m(tmp_path))  # directory holding the zip
    unpacked = tmp_path / "unpacked"
    _write(unpacked / "ml-1m" / "ratings.dat", ML1M_LINES)  # what fetch_dataset leaves behind
    _assert_ml1m(load_movielens_1m(unpacked))
    _assert_ml1m(load_movielens_1m(unpacked / "ml-1m"))


def test_ml1m_csv_layout(tmp_path: Path) -> None:
    df = pd.DataFrame({"user_id": ML1M_USERS, "movie_id": ML1M_ITEMS, "rating": [5, 3, 4, 4]})
    directory = tmp_path / "movielens-1m"
    directory.mkdir()
    df.to_csv(directory / "ratings.csv.gz", index=False)
    _assert_ml1m(load_movielens_1m(directory / "ratings.csv.gz"))
    _assert_ml1m(load_movielens_1m(directory))
    assert detect_format(directory / "ratings.csv.gz") == "ml-1m"
    _assert_ml1m(load_interactions(directory))


def test_ml100k_layouts(tmp_path: Path) -> None:
    expected_users, expected_items = [196, 186, 22], [242, 302, 377]
    udata = _write(tmp_path / "a" / "u.data", ML100K_LINES)
    archive = _zip(tmp_path / "ml-100k.zip", {"ml-100k/u.data": ML100K_LINES})
    csv_dir = tmp_path / "movielens-100k"
    csv_dir.mkdir()
    pd.DataFrame(
        {"user_id": expected_users, "item_id": expected_items, "rating": [3, 3, 1], "timestamp": [1, 2, 3]}
    ).to_csv(csv_dir / "ratings.csv.gz", index=False)
    for source in (udata, udata.parent, archive, csv_dir / "ratings.csv.gz", csv_dir):
        log = load_movielens_100k(source)
        assert log.users.tolist() == expected_users and log.items.tolist() == expected_items
        assert load_interactions(source).users.tolist() == expected_users


# --------------------------------------------------------------------------------------------------- LightGCN
def test_lightgcn_directory(tmp_path: Path) -> None:
    _write(tmp_path / "train.txt", "0 0 1 2\n1 2\n2\n3 0 4\r\n")  # user 2 has no items; CRLF tolerated
    _write(tmp_path / "test.txt", "0 3\n1 0 1\n3 1")  # no trailing newline
    log = load_lightgcn(tmp_path)
    assert log.users.tolist() == [0, 0, 0, 1, 3, 3, 0, 1, 1, 3]
    assert log.items.tolist() == [0, 1, 2, 2, 0, 4, 3, 0, 1, 1]
    assert log.folds is not None
    assert log.folds.tolist() == [FOLD_TRAIN] * 6 + [FOLD_TEST] * 4
    assert detect_format(tmp_path) == "lightgcn"
    assert load_interactions(tmp_path).items.tolist() == log.items.tolist()


def test_lightgcn_large_file_crosses_chunks(tmp_path: Path) -> None:
    """Bigger than one 4 MiB parse block, so line-aligned chunking and line numbers are exercised."""
    rng = np.random.default_rng(0)
    n_users, per_user = 20_000, 30
    items = rng.integers(0, 10**6, size=(n_users, per_user))
    table = np.column_stack([np.arange(n_users), items])
    np.savetxt(tmp_path / "train.txt", table, fmt="%d")
    _write(tmp_path / "test.txt", "5 7\n")
    assert (tmp_path / "train.txt").stat().st_size > 4 << 20
    log = load_lightgcn(tmp_path)
    assert np.array_equal(log.users[:-1], np.repeat(np.arange(n_users), per_user))
    assert np.array_equal(log.items[:-1], items.ravel())
    bad = (tmp_path / "train.txt").read_text().splitlines()
    bad[-2] = bad[-2] + " 12x"
    (tmp_path / "train.txt").write_text("\n".join(bad) + "\n")
    with pytest.raises(DataError, match=rf"train\.txt: line {n_users - 1} has a non-integer id"):
        load_lightgcn(tmp_path)


# ----------------------------------------------------------------------------------------------------- tables
def test_csv_with_custom_columns_and_threshold(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    pd.DataFrame({"uid": [10, 11, 12, 10], "asin": [5, 6, 7, 8], "stars": [5.0, 2.0, 4.0, 3.5]}).to_csv(
        path, index=False
    )
    log = load_table(path, user_col="uid", item_col="asin")
    assert log.users.tolist() == [10, 11, 12, 10] and log.items.tolist() == [5, 6, 7, 8]
    kept = load_table(path, user_col="uid", item_col="asin", rating_col="stars", min_rating=3.5)
    assert kept.users.tolist() == [10, 12, 10] and kept.items.tolist() == [5, 7, 8]
    via_dispatch = load_interactions(path, user_col="uid", item_col="asin", rating_col="stars", min_rating=4)
    assert via_dispatch.items.tolist() == [5, 7]


def test_compressed_and_tab_separated_csv(tmp_path: Path) -> None:
    path = tmp_path / "log.tsv.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("user\titem\n1\t2\n3\t4\n")
    log = load_table(path, user_col="user", item_col="item", sep="\t")
    assert log.users.tolist() == [1, 3] and log.items.tolist() == [2, 4]
    path_csv = tmp_path / "log.csv.gz"
    pd.DataFrame({"user_id": [1], "item_id": [2]}).to_csv(path_csv, index=False)
    assert detect_format(path_csv) == "csv"
    assert load_interactions(path_csv, format="csv").items.tolist() == [2]


def test_parquet_with_custom_columns(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    pd.DataFrame(
        {"customer": np.array([3, 1, 2], dtype=np.int32), "sku": [30, 10, 20], "score": [1.0, 0.0, 1.0]}
    ).to_parquet(path)
    log = load_table(path, user_col="customer", item_col="sku", rating_col="score", min_rating=1)
    assert log.users.tolist() == [3, 2] and log.items.tolist() == [30, 20]
    assert log.users.dtype == np.int64
    assert detect_format(path) == "parquet"
    assert load_interactions(path, format="parquet", user_col="customer", item_col="sku").users.tolist() == [
        3,
        1,
        2,
    ]


def test_integral_float_ids_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    pd.DataFrame({"user_id": [1.0, 2.0], "item_id": [3.0, 4.0]}).to_parquet(path)
    assert load_table(path).items.tolist() == [3, 4]


# -------------------------------------------------------------------------------------------------- bad input
def test_missing_and_empty_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "ratings.dat"
    with pytest.raises(DataError, match=r"nope/ratings\.dat: no such file"):
        load_movielens_1m(missing)
    with pytest.raises(DataError, match=r"no such file"):
        load_interactions(tmp_path / "ghost.csv")
    for name, loader in (
        ("ratings.dat", load_movielens_1m),
        ("u.data", load_movielens_100k),
        ("x.csv", load_table),
    ):
        empty = _write(tmp_path / name, "")
        with pytest.raises(DataError, match=rf"{name}: file is empty"):
            loader(empty)
    gz = tmp_path / "empty.csv.gz"
    with gzip.open(gz, "wt"):
        pass
    with pytest.raises(DataError, match=r"empty\.csv\.gz: file is empty"):
        load_table(gz)
    archive = _zip(tmp_path / "ml-1m.zip", {"ml-1m/ratings.dat": ""})
    with pytest.raises(DataError, match=r"ml-1m\.zip\[ml-1m/ratings\.dat\]: file is empty"):
        load_movielens_1m(archive)
    header_only = _write(tmp_path / "header.csv", "user_id,item_id\n")
    with pytest.raises(DataError, match=r"header\.csv: table has a header but no rows"):
        load_table(header_only)


def test_missing_columns_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "renamed.csv", "userId,movieId,rating\n1,2,5\n")
    with pytest.raises(DataError) as info:
        load_table(path)
    message = str(info.value)
    assert "renamed.csv" in message
    assert "missing column(s) ['user_id', 'item_id']" in message
    assert "['userId', 'movieId', 'rating']" in message
    parquet = tmp_path / "renamed.parquet"
    pd.DataFrame({"user_id": [1], "movie": [2]}).to_parquet(parquet)
    with pytest.raises(DataError, match=r"renamed\.parquet: missing column\(s\) \['item_id'\].*'movie'"):
        load_table(parquet)
    with pytest.raises(DataError, match=r"missing column\(s\) \['movie_id'\]"):
        load_movielens_1m(_write(tmp_path / "ratings.csv", "user_id,item_id\n1,2\n"))


@pytest.mark.parametrize(
    "name, text, load, message",
    [
        (
            "ids.csv",
            "user_id,item_id\n1,10\n2,abc\n3,30\n",
            load_table,
            r"ids\.csv: column 'item_id' has non-integer ids, e\.g\. 'abc' at line 3",
        ),
        (
            "frac.csv",
            "user_id,item_id\n1.5,10\n",
            load_table,
            r"frac\.csv: column 'user_id' has non-integer ids, e\.g\. 1\.5 at line 2",
        ),
        (
            "gap.csv",
            "user_id,item_id\n1,10\n2,\n",
            load_table,
            r"gap\.csv: column 'item_id' has non-integer ids, e\.g\. nan at line 3",
        ),
        (
            "ratings.dat",
            "1::10::5::1\nu7::11::5::1\n",
            load_movielens_1m,
            r"ratings\.dat: column 'UserID' has non-integer ids, e\.g\. 'u7' at line 2",
        ),
        (
            "u.data",
            "1\t2\t3\t4\n1\tx\t3\t4\n",
            load_movielens_100k,
            r"u\.data: column 'item' has non-integer ids, e\.g\. 'x' at line 2",
        ),
        (
            "stars.csv",
            "user_id,item_id,stars\n1,2,five\n",
            lambda path: load_table(path, rating_col="stars", min_rating=3),
            r"stars\.csv: column 'stars' has non-numeric ratings, e\.g\. 'five'",
        ),
    ],
)
def test_non_integer_ids_named(tmp_path: Path, name, text, load, message) -> None:
    path = _write(tmp_path / name, text)
    with pytest.raises(DataError, match=message):
        load(path)


def test_wrong_format_lines(tmp_path: Path) -> None:
    comma = _write(tmp_path / "ratings.dat", "1,1193,5,978300760\n")
    with pytest.raises(DataError, match=r"ratings\.dat: not in ML-1M ratings\.dat format .*'1,1193,5,978300760'"):
        load_movielens_1m(comma)
    mixed = _write(tmp_path / "mixed" / "ratings.dat", "1::2::3::4\n5::6::7::8\n9,10,11,12\n")
    with pytest.raises(DataError, match=r"mixed/ratings\.dat: line 3 is not 'UserID::MovieID::Rating::Timestamp'"):
        load_movielens_1m(mixed)
    single = _write(tmp_path / "single" / "ratings.dat", "1::2::3::4\n5:6:7:8\n")
    with pytest.raises(DataError, match=r"line 2 is not 'UserID::MovieID"):
        load_movielens_1m(single)
    too_many = _write(tmp_path / "many" / "ratings.dat", "1::2::3::4\n5::6::7::8::9\n")
    with pytest.raises(DataError, match=r"many/ratings\.dat: cannot parse .*line 2"):
        load_movielens_1m(too_many)
    spaces = _write(tmp_path / "u.data", "196 242 3 881250949\n")
    with pytest.raises(DataError, match=r"u\.data: not in ML-100K u\.data format"):
        load_movielens_100k(spaces)
    short = _write(tmp_path / "short" / "u.data", "1\t2\t3\t4\n5\t6\n")
    with pytest.raises(DataError, match=r"short/u\.data: line 2 has fewer than 3 tab-separated fields"):
        load_movielens_100k(short)


def test_bad_archives_and_directories(tmp_path: Path) -> None:
    junk = _write(tmp_path / "ml-1m.zip", "this is an HTML error page, not a zip")
    with pytest.raises(DataError, match=r"ml-1m\.zip: not a readable zip archive"):
        load_movielens_1m(junk)
    other = _zip(tmp_path / "other" / "ml-100k.zip", {"ml-100k/u.item": "x"})
    with pytest.raises(
        DataError, match=r"ml-100k\.zip: zip has no 'ml-100k/u\.data'; it contains \['ml-100k/u\.item'\]"
    ):
        load_movielens_100k(other)
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    (empty_dir / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"empty_dir: no ML-1M data found; looked for .*found \['notes\.txt'\]"):
        load_movielens_1m(empty_dir)
    with pytest.raises(DataError, match=r"empty_dir: LightGCN directory lacks \['train\.txt', 'test\.txt'\]"):
        load_lightgcn(empty_dir)
    _write(tmp_path / "lg" / "train.txt", "0 1 2\n")
    _write(tmp_path / "lg" / "test.txt", "0 -3\n")
    with pytest.raises(DataError, match=r"test\.txt: line 1 has a non-integer id .*'0 -3'"):
        load_lightgcn(tmp_path / "lg")
    _write(tmp_path / "lg2" / "train.txt", "0\n1\n")
    _write(tmp_path / "lg2" / "test.txt", "0 1\n")
    with pytest.raises(DataError, match=r"lg2/train\.txt: no \(user, item\) interactions"):
        load_lightgcn(tmp_path / "lg2")
    not_parquet = _write(tmp_path / "fake.parquet", "user_id,item_id\n1,2\n")
    with pytest.raises(DataError, match=r"fake\.parquet: not a readable Parquet file"):
        load_table(not_parquet)
    with pytest.raises(DataError, match=r"x\.csv: min_rating=3 needs rating_col"):
        load_table(_write(tmp_path / "x.csv", "user_id,item_id\n1,2\n"), min_rating=3)


def test_dispatcher_formats(tmp_path: Path) -> None:
    path = _write(tmp_path / "ratings.dat", ML1M_LINES)
    assert detect_format(path) == "ml-1m"
    _assert_ml1m(load_interactions(path))
    _assert_ml1m(load_interactions(path, format="ml-1m"))
    with pytest.raises(DataError, match=r"unknown data format 'movielens'; valid formats are \['auto', 'ml-1m'"):
        load_interactions(path, format="movielens")
    odd = _write(tmp_path / "data.bin", "1 2\n")
    with pytest.raises(DataError, match=r"data\.bin: cannot detect the data format .*'lightgcn', 'csv', 'parquet'"):
        load_interactions(odd)
    with pytest.raises(DataError, match=r"takes no options"):
        load_interactions(path, user_col="x")
    with pytest.raises(DataError, match=r"format='parquet' does not match the file name"):
        load_interactions(_write(tmp_path / "t.csv", "user_id,item_id\n1,2\n"), format="parquet")


def test_interaction_log_validation() -> None:
    ok = InteractionLog(np.array([1, 2], dtype=np.int32), np.array([3, 4], dtype=np.uint16), "mem")
    assert ok.users.dtype == np.int64 and ok.items.dtype == np.int64 and len(ok) == 2
    with pytest.raises(DataError, match=r"src: users and items differ in length \(2 vs 1\)"):
        InteractionLog(np.array([1, 2]), np.array([3]), "src")
    with pytest.raises(DataError, match=r"src: items must have an integer dtype, got float64"):
        InteractionLog(np.array([1]), np.array([3.0]), "src")
    with pytest.raises(DataError, match=r"src: users must be 1-D"):
        InteractionLog(np.array([[1]]), np.array([3]), "src")
    with pytest.raises(DataError, match=r"src: no interactions"):
        InteractionLog(np.array([], dtype=np.int64), np.array([], dtype=np.int64), "src")
    with pytest.raises(DataError, match=r"src: folds must be 0 \(train\), 1 \(val\) or 2 \(test\); found 5"):
        InteractionLog(np.array([1]), np.array([3]), "src", folds=np.array([5]))
    with pytest.raises(DataError, match=r"src: folds must be an array with one entry per interaction"):
        InteractionLog(np.array([1]), np.array([3]), "src", folds=np.array([0, 2]))
    with pytest.raises(DataError):
        InteractionLog([1], np.array([3]), "src")  # type: ignore[arg-type]


def test_real_movielens_100k() -> None:
    path = SHARED / "movielens-100k" / "ratings.csv.gz"
    if not path.is_file():
        pytest.skip("shared ML-100K copy not available")
    log = load_interactions(path)
    assert len(log) == 100_000
    assert np.unique(log.users).size == 943 and np.unique(log.items).size == 1682
